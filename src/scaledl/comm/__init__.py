"""Compressed gradient communication (BytePS-Compress, arXiv 2105.07829).

Compressors with fixed-size payloads (:mod:`~scaledl.comm.compressors`), error feedback
(:mod:`~scaledl.comm.error_feedback`), the two-way DDP communication hook
(:mod:`~scaledl.comm.hooks`) with its fused codec kernels (:mod:`~scaledl.comm.fused`,
:mod:`~scaledl.comm.onebit_triton`), the CLAN optimizer (:mod:`~scaledl.comm.clan`), byte
accounting (:mod:`~scaledl.comm.accounting`) and the codec's time in a profile
(:mod:`~scaledl.comm.profiling`). See docs/comm.md.

Names are imported on first use, so ``scaledl --help`` does not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scaledl._lazy import lazy_exports

_EXPORTS = {
    "CommStats": "scaledl.comm.accounting",
    "interface_bytes": "scaledl.comm.accounting",
    "Compressor": "scaledl.comm.base",
    "IdentityCompressor": "scaledl.comm.base",
    "ZeroCompressor": "scaledl.comm.base",
    "CLAN": "scaledl.comm.clan",
    "LANS": "scaledl.comm.clan",
    "lans_param_groups": "scaledl.comm.clan",
    "CastCompressor": "scaledl.comm.compressors",
    "DitheringCompressor": "scaledl.comm.compressors",
    "OneBitCompressor": "scaledl.comm.compressors",
    "RandomKCompressor": "scaledl.comm.compressors",
    "TopKCompressor": "scaledl.comm.compressors",
    "available_compressors": "scaledl.comm.compressors",
    "derive_key": "scaledl.comm.compressors",
    "get_compressor": "scaledl.comm.compressors",
    "EF_MODES": "scaledl.comm.error_feedback",
    "ErrorFeedback": "scaledl.comm.error_feedback",
    "compress_shards": "scaledl.comm.error_feedback",
    "MODES": "scaledl.comm.hooks",
    "CompressionState": "scaledl.comm.hooks",
    "compression_hook": "scaledl.comm.hooks",
    "register_compression": "scaledl.comm.hooks",
    "replica_divergence": "scaledl.comm.hooks",
}

__all__ = [
    "CLAN",
    "EF_MODES",
    "LANS",
    "MODES",
    "CastCompressor",
    "CommStats",
    "CompressionState",
    "Compressor",
    "DitheringCompressor",
    "ErrorFeedback",
    "IdentityCompressor",
    "OneBitCompressor",
    "RandomKCompressor",
    "TopKCompressor",
    "ZeroCompressor",
    "available_compressors",
    "compress_shards",
    "compression_hook",
    "derive_key",
    "get_compressor",
    "interface_bytes",
    "lans_param_groups",
    "register_compression",
    "replica_divergence",
]

if TYPE_CHECKING:
    from scaledl.comm.accounting import CommStats, interface_bytes
    from scaledl.comm.base import Compressor, IdentityCompressor, ZeroCompressor
    from scaledl.comm.clan import CLAN, LANS, lans_param_groups
    from scaledl.comm.compressors import (
        CastCompressor,
        DitheringCompressor,
        OneBitCompressor,
        RandomKCompressor,
        TopKCompressor,
        available_compressors,
        derive_key,
        get_compressor,
    )
    from scaledl.comm.error_feedback import EF_MODES, ErrorFeedback, compress_shards
    from scaledl.comm.hooks import (
        MODES,
        CompressionState,
        compression_hook,
        register_compression,
        replica_divergence,
    )


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

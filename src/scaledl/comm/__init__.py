"""Compressed gradient communication (BytePS-Compress, arXiv 2105.07829)."""

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

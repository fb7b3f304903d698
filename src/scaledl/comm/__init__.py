"""Compressed gradient communication (BytePS-Compress, arXiv 2105.07829)."""

from scaledl.comm.accounting import CommStats
from scaledl.comm.base import Compressor, IdentityCompressor, ZeroCompressor
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

__all__ = [
    "CastCompressor",
    "CommStats",
    "Compressor",
    "DitheringCompressor",
    "IdentityCompressor",
    "OneBitCompressor",
    "RandomKCompressor",
    "TopKCompressor",
    "ZeroCompressor",
    "available_compressors",
    "derive_key",
    "get_compressor",
]

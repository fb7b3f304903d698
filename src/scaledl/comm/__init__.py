"""Compressed gradient communication (BytePS-Compress, arXiv 2105.07829)."""

from scaledl.comm.accounting import CommStats
from scaledl.comm.base import Compressor, IdentityCompressor, ZeroCompressor

__all__ = ["CommStats", "Compressor", "IdentityCompressor", "ZeroCompressor"]

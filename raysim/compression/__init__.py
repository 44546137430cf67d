"""Communication compression for client updates: byte-exact codecs and error feedback (numpy only)."""

from raysim.compression.codec import (
    KINDS,
    CompressionSpec,
    compress,
    compress_roundtrip,
    decompress,
    dense_bytes,
    keep_count,
    shared_mask_indices,
)
from raysim.compression.error_feedback import check_error_feedback, compress_with_feedback

__all__ = [
    "KINDS",
    "CompressionSpec",
    "check_error_feedback",
    "compress",
    "compress_roundtrip",
    "compress_with_feedback",
    "decompress",
    "dense_bytes",
    "keep_count",
    "shared_mask_indices",
]

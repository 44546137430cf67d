"""Lossy compressors for client updates, each with a real byte encoding so that byte counts are exact.

Every message starts with a 5-byte header, little-endian: the kind code (uint8) and the dimension d
(uint32). The kind-specific fields and the payload follow. With k = max(1, ceil(fraction · d)):

=========== ================================== ======================================== =====================
kind        fields after the 5-byte header     payload                                  total bytes
=========== ================================== ======================================== =====================
none        —                                  d float32                                5 + 4d
topk        k (uint32)                         k indices (w bytes each), then k float32 9 + k·(w + 4)
randk       k (uint32), index seed (uint64)    k float32                                17 + 4k
random_mask k (uint32)                         k float32                                9 + 4k
quantize    bits b (uint8), min, max (float32) d levels of b bits, bit-packed           14 + ceil(d·b / 8)
sign        scale (float32)                    d sign bits, bit-packed                  9 + ceil(d / 8)
=========== ================================== ======================================== =====================

* **topk** keeps the k entries of largest |v| (ties go to the lower index), sent as ascending indices
  of the smallest unsigned width that holds d − 1 (w = 1 for d ≤ 2^8, 2 for d ≤ 2^16, else 4) and
  their exact values.
* **randk** keeps k distinct coordinates drawn from a 64-bit seed that the sender draws from its rng;
  the receiver regenerates the indices from the seed, so none are sent (Stich et al. 2018, Wangni et
  al. 2018). **random_mask** is the same with the index set derived only from the round's public
  ``shared_seed``, identical for every client, so masked sums still line up under secure aggregation.
  With ``unbiased=True`` (the default) the kept values are scaled by d/k, which makes the decoded
  vector an unbiased estimate of v (E[(d/k)·1_S ⊙ v] = v); ``unbiased=False`` sends them raw, which is
  a contraction and the form that error feedback needs. The scaling is the sender's choice: the
  receiver only places values, so the format is the same either way.
* **quantize** maps each coordinate onto 2^b − 1 uniform steps of [min v, max v] (QSGD-style,
  Alistarh et al. 2017, on a min/max range): a level x = (v − min)/Δ is rounded up with probability
  frac(x), so E[decoded] = v, or to the nearest level when ``stochastic=False``. Levels are written
  most significant bit first as one bit stream (``np.packbits`` bit order), zero-padded to a byte.
* **sign** is scaled signSGD (Bernstein et al. 2018; Karimireddy et al. 2019): scale = ‖v‖₁ / d, one
  bit per coordinate (1 for v ≥ 0, 0 for v < 0), decoded as scale · sign(v) with sign(0) = +1.
"""

from __future__ import annotations

import math
import numbers
import struct
from dataclasses import dataclass

import numpy as np

from raysim.errors import ScenarioError

KINDS = ("none", "topk", "randk", "random_mask", "quantize", "sign")
_CODE = {kind: code for code, kind in enumerate(KINDS)}
_HEADER = struct.Struct("<BI")  # kind code, dimension
_COUNT = struct.Struct("<I")  # k for the sparse kinds
_SEED = struct.Struct("<Q")  # randk index seed
_RANGE = struct.Struct("<Bff")  # quantize: bits, min, max
_SCALE = struct.Struct("<f")  # sign: scale
_CHUNK = 1 << 20  # quantize packs this many coordinates at a time (a multiple of 8, so chunks stay byte-aligned)


@dataclass(frozen=True)
class CompressionSpec:
    """How a client compresses its update.

    ``fraction`` (topk, randk, random_mask) is the share of coordinates kept, in (0, 1];
    ``bits`` (quantize) is the level width, 1..16 (8 is nearly lossless for training, 2–4 is aggressive);
    ``stochastic`` (quantize) picks unbiased stochastic rounding over nearest-level rounding;
    ``unbiased`` (randk, random_mask) scales the kept values by d/k.
    """

    kind: str
    fraction: float = 0.01
    bits: int = 8
    stochastic: bool = True
    unbiased: bool = True

    def __post_init__(self) -> None:
        if self.kind not in _CODE:
            raise ScenarioError(f"compression.kind: unknown {self.kind!r}; use one of {', '.join(KINDS)}")
        fraction = self.fraction
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 < fraction <= 1.0:
            raise ScenarioError(f"compression.fraction: must be in (0, 1] (got {fraction!r}); "
                                "use the share of coordinates to keep, such as 0.01")
        bits = self.bits
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 16:
            raise ScenarioError(f"compression.bits: must be in 1..16 (got {bits!r}); use 8 for near-lossless updates")
        for name in ("stochastic", "unbiased"):
            if not isinstance(getattr(self, name), bool):
                raise ScenarioError(f"compression.{name}: must be true or false (got {getattr(self, name)!r})")


def keep_count(dim: int, fraction: float) -> int:
    """k = max(1, ceil(fraction · d)): the number of coordinates the sparse kinds keep.

    The ceiling forgives float noise of one part in 10^12, so 0.07 of 100 keeps 7, not 8.
    """
    return min(dim, max(1, math.ceil(fraction * dim * (1 - 1e-12))))


def _random_indices(dim: int, k: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(dim, size=k, replace=False))


def shared_mask_indices(dim: int, fraction: float, shared_seed: int) -> np.ndarray:
    """The sorted coordinates every client keeps under ``random_mask`` in a round with ``shared_seed``.

    The mask is public (the server knows it too), so numpy's generator is the right tool here.
    """
    return _random_indices(dim, keep_count(dim, fraction), shared_seed)


def _index_dtype(dim: int) -> np.dtype:
    for dtype in ("<u1", "<u2", "<u4"):
        if dim - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"compress: dimension {dim} does not fit a uint32 header")


def _top_indices(magnitude: np.ndarray, k: int) -> np.ndarray:
    """Ascending indices of the k largest entries; among equal entries the lower index wins."""
    if k == magnitude.size:
        return np.arange(k)
    threshold = magnitude[np.argpartition(magnitude, magnitude.size - k)[magnitude.size - k]]
    above = np.flatnonzero(magnitude > threshold)
    tied = np.flatnonzero(magnitude == threshold)[: k - above.size]
    return np.union1d(above, tied)


def _pack_levels(levels: np.ndarray, bits: int) -> bytes:
    chunks = []
    for start in range(0, levels.size, _CHUNK):
        # Each level as 16 big-endian bits; keep the low ``bits`` of them, most significant first.
        wide = np.unpackbits(levels[start:start + _CHUNK].astype(">u2").view(np.uint8).reshape(-1, 2), axis=1)
        chunks.append(np.packbits(wide[:, 16 - bits:]).tobytes())
    return b"".join(chunks)


def _unpack_levels(payload: bytes, dim: int, bits: int) -> np.ndarray:
    stream = np.frombuffer(payload, dtype=np.uint8)
    levels = np.empty(dim, dtype=np.float64)
    for start in range(0, dim, _CHUNK):
        count = min(_CHUNK, dim - start)
        chunk = stream[start * bits // 8: (start * bits + count * bits + 7) // 8]
        wide = np.zeros((count, 16), dtype=np.uint8)
        wide[:, 16 - bits:] = np.unpackbits(chunk, count=count * bits).reshape(count, bits)
        levels[start:start + count] = np.packbits(wide, axis=1).view(">u2").ravel()
    return levels


def _quantize(values: np.ndarray, spec: CompressionSpec, rng: np.random.Generator) -> bytes:
    low, high = np.float32(values.min()), np.float32(values.max())
    top = (1 << spec.bits) - 1
    if high > low:
        # x = (v − min)/Δ with Δ = (max − min)/(2^b − 1); round up with probability frac(x), so E[level] = x.
        scaled = (values.astype(np.float64) - float(low)) * (top / (float(high) - float(low)))
        scaled += rng.random(values.size) if spec.stochastic else 0.5
        levels = np.clip(np.floor(scaled), 0, top).astype(np.uint16)
    else:
        levels = np.zeros(values.size, dtype=np.uint16)
    return _RANGE.pack(spec.bits, low, high) + _pack_levels(levels, spec.bits)


def compress(vector: np.ndarray, spec: CompressionSpec, rng: np.random.Generator,
             shared_seed: int | None = None) -> bytes:
    """Encode ``vector`` (any shape, read as a flat float32 vector) as one message in ``spec``'s format.

    ``rng`` drives the randomized kinds (randk's index seed, stochastic rounding); ``shared_seed`` is
    the round's public seed, required by ``random_mask``.
    """
    values = np.ascontiguousarray(np.ravel(vector), dtype=np.float32)
    dim = values.size
    if not 1 <= dim <= np.iinfo(np.uint32).max:
        raise ValueError(f"compress: the vector needs 1..2^32 − 1 coordinates (got {dim})")
    if spec.kind != "none" and not np.isfinite(values).all():
        raise ValueError("compress: the vector holds NaN or infinite values; a lossy encoding cannot carry them")
    header = _HEADER.pack(_CODE[spec.kind], dim)
    if spec.kind == "none":
        return header + values.astype("<f4").tobytes()
    if spec.kind == "sign":
        scale = np.float32(np.abs(values, dtype=np.float64).sum() / dim)  # ‖v‖₁ / d (Karimireddy et al. 2019)
        return header + _SCALE.pack(scale) + np.packbits(values >= 0).tobytes()
    if spec.kind == "quantize":
        return header + _quantize(values, spec, rng)
    k = keep_count(dim, spec.fraction)
    if spec.kind == "topk":
        indices = _top_indices(np.abs(values), k)
        return (header + _COUNT.pack(k) + indices.astype(_index_dtype(dim)).tobytes()
                + values[indices].astype("<f4").tobytes())
    if spec.kind == "randk":
        seed = int(rng.integers(0, 2**64, dtype=np.uint64))
        fields = _COUNT.pack(k) + _SEED.pack(seed)
    else:
        if shared_seed is None:
            raise ValueError("compress: random_mask needs the round's shared_seed")
        seed = shared_seed
        fields = _COUNT.pack(k)
    kept = values[_random_indices(dim, k, seed)]
    if spec.unbiased:
        kept = kept * np.float32(dim / k)  # E[(d/k)·1_S ⊙ v] = v for a uniform k-subset S
    return header + fields + kept.astype("<f4").tobytes()


def _expect(message: bytes, size: int, kind: str) -> None:
    if len(message) != size:
        raise ValueError(f"decompress: a {kind} message of this header has {size} bytes (got {len(message)})")


def decompress(message: bytes, shared_seed: int | None = None) -> np.ndarray:
    """Decode a message from ``compress`` into a dense float32 vector of its dimension."""
    if len(message) < _HEADER.size or message[0] >= len(KINDS):
        raise ValueError("decompress: not a raysim compression message")
    try:
        return _decode(bytes(message), shared_seed)
    except struct.error as exc:
        raise ValueError(f"decompress: the message is truncated ({exc})") from exc


def _decode(message: bytes, shared_seed: int | None) -> np.ndarray:
    code, dim = _HEADER.unpack_from(message)
    kind, body = KINDS[code], _HEADER.size
    if kind == "none":
        _expect(message, body + 4 * dim, kind)
        return np.frombuffer(message, dtype="<f4", offset=body).astype(np.float32)
    if kind == "sign":
        _expect(message, body + _SCALE.size + (dim + 7) // 8, kind)
        (scale,) = _SCALE.unpack_from(message, body)
        bits = np.unpackbits(np.frombuffer(message, dtype=np.uint8, offset=body + _SCALE.size), count=dim)
        return np.where(bits == 1, np.float32(scale), np.float32(-scale)).astype(np.float32)
    if kind == "quantize":
        bits, low, high = _RANGE.unpack_from(message, body)
        if not 1 <= bits <= 16:
            raise ValueError(f"decompress: a quantize message cannot have {bits} bits per level")
        _expect(message, body + _RANGE.size + (dim * bits + 7) // 8, kind)
        levels = _unpack_levels(message[body + _RANGE.size:], dim, bits)
        step = (float(high) - float(low)) / ((1 << bits) - 1)
        return (float(low) + levels * step).astype(np.float32)
    (k,) = _COUNT.unpack_from(message, body)
    body += _COUNT.size
    out = np.zeros(dim, dtype=np.float32)
    if kind == "topk":
        width = _index_dtype(dim)
        _expect(message, body + k * (width.itemsize + 4), kind)
        indices = np.frombuffer(message, dtype=width, count=k, offset=body).astype(np.int64)
        if k and indices.max() >= dim:
            raise ValueError(f"decompress: a topk index is out of range for dimension {dim}")
        out[indices] = np.frombuffer(message, dtype="<f4", count=k, offset=body + k * width.itemsize)
        return out
    if kind == "randk":
        (seed,) = _SEED.unpack_from(message, body)
        body += _SEED.size
    elif shared_seed is None:
        raise ValueError("decompress: random_mask needs the round's shared_seed")
    else:
        seed = shared_seed
    _expect(message, body + 4 * k, kind)
    out[_random_indices(dim, k, seed)] = np.frombuffer(message, dtype="<f4", count=k, offset=body)
    return out


def compress_roundtrip(vector: np.ndarray, spec: CompressionSpec, rng: np.random.Generator,
                       shared_seed: int | None = None) -> tuple[np.ndarray, int]:
    """What the receiver decodes from ``vector``, and the number of bytes the message took."""
    message = compress(vector, spec, rng, shared_seed)
    return decompress(message, shared_seed), len(message)


def dense_bytes(dim: int) -> int:
    """Bytes of the uncompressed float32 vector in this format (kind ``none``), the ratio's denominator."""
    return _HEADER.size + 4 * dim

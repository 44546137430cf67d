"""Per-client state that only the clients can read, kept by the server between rounds.

Under secure aggregation the server may learn nothing about one client's update beyond the
protocol's sum (Bonawitz et al. 2017). SCAFFOLD's control variate c_i and error feedback's residual
are functions of a client's past updates, yet they must outlive the round and follow the client to
whichever worker trains it next, so the server keeps them, *sealed*: each row is encrypted with
AES-256-CTR under the simulated clients' storage key, which every worker holds and the server actor
never receives. The counter block is (client id, round written, 0), so no two rows share a keystream;
the round travels in the clear in the row's two-word header, which is all the next reader needs. A
client with two kinds of rows (residuals and personal parameters) seals them in distinct streams
(``for_stream``), whose number sits above the round in the counter block, so they never share one either.
A row never written is all zeros and opens as zeros, so the server's lazily zero-filled stores work
unchanged. Encryption is exact, so a sealed run gives the bit-identical model of an unsealed one.
Confidentiality only: against an honest-but-curious server no integrity tag is needed.
"""

from __future__ import annotations

import secrets
import struct

import numpy as np

from raysim.privacy.secagg.crypto import KEY_BYTES, keystream_block

HEADER_WORDS = 2  # float32 words holding the int64 (round written + 1); 0 means never written
STREAM_SHIFT = 24  # the counter block's round word: (stream << 24) | (round + 1); rounds stay below 2^24 − 1


def sealed_width(dim: int) -> int:
    """Width of a sealed row holding ``dim`` float32 values."""
    return dim + HEADER_WORDS


def new_storage_key() -> bytes:
    """A fresh storage key for the simulated clients of one run, from the OS CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


class RowSealer:
    """Seals and opens the float32 state rows of clients with one storage key."""

    def __init__(self, key: bytes, stream: int = 0) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a storage key has {KEY_BYTES} bytes (got {len(key)})")
        if not 0 <= stream < 256:
            raise ValueError(f"a sealing stream is a byte (got {stream})")
        self._key, self._stream = key, stream

    def for_stream(self, stream: int) -> RowSealer:
        """A sealer with the same key whose keystreams are disjoint from this one's."""
        return RowSealer(self._key, stream)

    def _keystream_xor(self, client_id: int, written: int, payload: bytes) -> bytes:
        if written >= 1 << STREAM_SHIFT:
            raise ValueError(f"round {written - 1} is past what a sealed row's counter block holds")
        counter = struct.pack(">QII", client_id, written | (self._stream << STREAM_SHIFT), 0)
        return keystream_block(self._key, counter, payload)

    def seal(self, client_ids: np.ndarray, round_index: int, rows: np.ndarray) -> np.ndarray:
        """Each client's row, encrypted, behind a header naming ``round_index``; shape (n, dim + 2)."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        out = np.empty((rows.shape[0], sealed_width(rows.shape[1])), dtype=np.float32)
        header = np.array([round_index + 1], dtype="<i8").view(np.float32)
        for k, cid in enumerate(np.asarray(client_ids, dtype=np.int64).tolist()):
            out[k, :HEADER_WORDS] = header
            out[k, HEADER_WORDS:] = np.frombuffer(self._keystream_xor(cid, round_index + 1, rows[k].tobytes()),
                                                  dtype=np.float32)
        return out

    def open(self, client_ids: np.ndarray, sealed: np.ndarray) -> np.ndarray:
        """The plaintext rows of ``seal``'s output (zeros for a row never written); shape (n, dim)."""
        sealed = np.ascontiguousarray(sealed, dtype=np.float32)
        out = np.zeros((sealed.shape[0], sealed.shape[1] - HEADER_WORDS), dtype=np.float32)
        for k, cid in enumerate(np.asarray(client_ids, dtype=np.int64).tolist()):
            written = int(sealed[k, :HEADER_WORDS].view("<i8")[0])
            if written:
                out[k] = np.frombuffer(self._keystream_xor(cid, written, sealed[k, HEADER_WORDS:].tobytes()),
                                       dtype=np.float32)
        return out

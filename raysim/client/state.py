"""Server-side per-client state: one float32 row per client, lazily zero-filled.

SCAFFOLD's control variates c_i (Karimireddy et al. 2020, Algorithm 1), error-feedback
residuals and per-client accountant states are vectors that belong to a client but
must follow it to whichever worker trains it. The server keeps them here, ships
``get(ids)`` with a task and folds the returned change in with ``add(ids, deltas)``.

A client that was never written reads as zeros and costs nothing: memory and disk grow
with the clients ever sampled, never with the population. Rows are appended in the
order clients are first written; an index maps client id → row. The index is a pair of
sorted int64 arrays (ids, rows) searched with ``np.searchsorted``: 16 bytes per stored
client (a dict of ints would take ~100), and every lookup, read and write is one
vectorised numpy call per batch.

Backends:
* ``MemoryStateStore``: a dense array that doubles its capacity as rows are appended.
* ``DiskStateStore``: an append-only row file ``rows.f32`` (row-major float32) that grows to
  exactly the rows written. It is memory-mapped only for the duration of one batched read
  or write, so resident memory is one batch, not the file. ``state_dict()`` flushes the
  file, writes the index (``index.npz``) and returns the path; a checkpoint restored
  from it sees the store as of that flush.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal

import numpy as np

from raysim.atomic import fsync_path, write_atomic
from raysim.errors import ScenarioError

_ROWS_FILE = "rows.f32"
_INDEX_FILE = "index.npz"


class ClientStateStore(ABC):
    """A per-client float32 vector of width ``dim``; clients never written read as zeros."""

    def __init__(self, dim: int) -> None:
        if int(dim) < 1:
            raise ValueError(f"a client state store needs dim >= 1 (got {dim})")
        self.dim = int(dim)
        self._ids = np.empty(0, dtype=np.int64)  # sorted client ids
        self._rows = np.empty(0, dtype=np.int64)  # row of _ids[k]
        self._closed = False

    # -- public API ---------------------------------------------------------------
    def get(self, client_ids: np.ndarray) -> np.ndarray:
        """Rows for ``client_ids`` in the given order (repeats allowed), shape (len, dim)."""
        ids = self._check_ids(client_ids)
        rows = self._lookup(ids)
        out = np.zeros((ids.size, self.dim), dtype=np.float32)
        hit = rows >= 0
        if hit.any():
            out[hit] = self._read(rows[hit])
        return out

    def put(self, client_ids: np.ndarray, values: np.ndarray) -> None:
        """Overwrite the rows of ``client_ids``; for a repeated id the last value wins."""
        ids = self._check_ids(client_ids)
        values = self._check_values(ids, values)
        if ids.size == 0:
            return
        # Keep the last occurrence of each id: unique() on the reversed ids finds it.
        uniq, first_in_reversed = np.unique(ids[::-1], return_index=True)
        last = ids.size - 1 - first_in_reversed
        self._write(self._rows_for(uniq), values[last])

    def add(self, client_ids: np.ndarray, deltas: np.ndarray) -> None:
        """c_i ← c_i + Δc_i; the deltas of a repeated id are all added."""
        ids = self._check_ids(client_ids)
        deltas = self._check_values(ids, deltas)
        if ids.size == 0:
            return
        order = np.argsort(ids, kind="stable")
        uniq, starts = np.unique(ids[order], return_index=True)
        summed = np.add.reduceat(deltas[order], starts, axis=0)
        rows = self._rows_for(uniq)
        self._write(rows, self._read(rows) + summed)

    def __contains__(self, client_id: object) -> bool:
        return bool(self._lookup(np.asarray([client_id], dtype=np.int64))[0] >= 0)

    @property
    def num_stored(self) -> int:
        """Clients with a row (ever written)."""
        return int(self._ids.size)

    def nbytes_index(self) -> int:
        """Bytes of the id → row index (16 per stored client)."""
        return int(self._ids.nbytes + self._rows.nbytes)

    @abstractmethod
    def nbytes_memory(self) -> int:
        """Bytes this store holds in process memory."""

    @abstractmethod
    def nbytes_disk(self) -> int:
        """Bytes this store occupies on disk."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """A checkpointable description from which ``restore_state_store`` rebuilds it."""

    def close(self) -> None:
        """Release resources; the store cannot be used afterwards."""
        self._closed = True

    # -- backend hooks -------------------------------------------------------------
    @abstractmethod
    def _read(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (all < num rows) as a new (len, dim) float32 array."""

    @abstractmethod
    def _write(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Store ``values[k]`` in row ``rows[k]``; rows are distinct."""

    @abstractmethod
    def _grow(self, num_rows: int) -> None:
        """Make room for rows [0, num_rows); new rows read as zeros."""

    # -- index ---------------------------------------------------------------------
    def _lookup(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id, or -1 where the client has none."""
        if self._ids.size == 0:
            return np.full(ids.size, -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._ids, ids), self._ids.size - 1)
        return np.where(self._ids[pos] == ids, self._rows[pos], -1)

    def _rows_for(self, uniq: np.ndarray) -> np.ndarray:
        """Rows of the sorted, distinct ``uniq``, appending zero rows for new clients."""
        rows = self._lookup(uniq)
        new = rows < 0
        if new.any():
            new_ids = uniq[new]
            first = self._ids.size
            new_rows = np.arange(first, first + new_ids.size, dtype=np.int64)
            self._grow(first + new_ids.size)
            at = np.searchsorted(self._ids, new_ids)
            self._ids = np.insert(self._ids, at, new_ids)
            self._rows = np.insert(self._rows, at, new_rows)
            rows[new] = new_rows
        return rows

    def _set_index(self, ids: np.ndarray, rows: np.ndarray) -> None:
        order = np.argsort(ids, kind="stable")
        self._ids = np.ascontiguousarray(ids[order], dtype=np.int64)
        self._rows = np.ascontiguousarray(rows[order], dtype=np.int64)

    def _check_ids(self, client_ids: np.ndarray) -> np.ndarray:
        if self._closed:
            raise RuntimeError("this client state store is closed")
        ids = np.asarray(client_ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"client_ids must be a 1-D integer array (got shape {ids.shape}, {ids.dtype})")
        ids = ids.astype(np.int64, copy=False)
        if ids.size and ids.min() < 0:
            raise ValueError(f"client ids must be >= 0 (got {int(ids.min())})")
        return ids

    def _check_values(self, ids: np.ndarray, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (ids.size, self.dim):
            raise ValueError(f"values must have shape ({ids.size}, {self.dim}) (got {values.shape})")
        return values


class MemoryStateStore(ClientStateStore):
    """Rows in a dense in-process array whose capacity doubles as clients are added."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self._data = np.zeros((0, self.dim), dtype=np.float32)
        self._num_rows = 0

    def _read(self, rows: np.ndarray) -> np.ndarray:
        return self._data[rows]

    def _write(self, rows: np.ndarray, values: np.ndarray) -> None:
        self._data[rows] = values

    def _grow(self, num_rows: int) -> None:
        if num_rows > self._data.shape[0]:
            capacity = max(num_rows, 2 * self._data.shape[0], 16)
            data = np.zeros((capacity, self.dim), dtype=np.float32)
            data[: self._num_rows] = self._data[: self._num_rows]
            self._data = data
        self._num_rows = num_rows

    def nbytes_memory(self) -> int:
        return int(self._data.nbytes) + self.nbytes_index()

    def nbytes_disk(self) -> int:
        return 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "backend": "memory",
            "dim": self.dim,
            "client_ids": self._ids.copy(),
            "values": self._data[self._rows].copy(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> MemoryStateStore:
        store = cls(int(state["dim"]))
        ids = np.asarray(state["client_ids"], dtype=np.int64)
        if ids.size:
            store.put(ids, np.asarray(state["values"], dtype=np.float32))
        return store

    def close(self) -> None:
        self._data = np.zeros((0, self.dim), dtype=np.float32)
        super().close()


class DiskStateStore(ClientStateStore):
    """Rows in ``<path>/rows.f32``, appended as clients are first written.

    ``DiskStateStore(path, dim)`` starts an empty store, replacing any store files already
    in ``path``; ``DiskStateStore(path, dim, reopen=True)`` (or ``restore_state_store``)
    reopens the store as of its last ``state_dict()`` or ``close()``.
    """

    def __init__(self, path: str | os.PathLike[str], dim: int, *, reopen: bool = False) -> None:
        super().__init__(dim)
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._rows_path = self.path / _ROWS_FILE
        self._index_path = self.path / _INDEX_FILE
        self._num_rows = 0
        if reopen:
            self._load_index()
        else:
            self._index_path.unlink(missing_ok=True)
            self._rows_path.unlink(missing_ok=True)
        with open(self._rows_path, "ab") as f:
            f.truncate(self._num_rows * self._row_bytes)

    @property
    def _row_bytes(self) -> int:
        return 4 * self.dim

    def _map(self) -> np.memmap:
        return np.memmap(self._rows_path, dtype=np.float32, mode="r+", shape=(self._num_rows, self.dim))

    def _read(self, rows: np.ndarray) -> np.ndarray:
        mm = self._map()
        out = mm[rows]  # fancy indexing copies, so the mapping is released on return
        del mm
        return out

    def _write(self, rows: np.ndarray, values: np.ndarray) -> None:
        mm = self._map()
        mm[rows] = values
        del mm

    def _grow(self, num_rows: int) -> None:
        # Extending with truncate writes nothing: the new rows read as zeros (a sparse hole).
        with open(self._rows_path, "r+b") as f:
            f.truncate(num_rows * self._row_bytes)
        self._num_rows = num_rows

    def nbytes_memory(self) -> int:
        return self.nbytes_index()

    def nbytes_disk(self) -> int:
        files = (self._rows_path, self._index_path)
        return sum(p.stat().st_size for p in files if p.exists())

    def flush(self) -> None:
        """Make the rows durable and write the index beside them (atomically)."""
        fsync_path(self._rows_path)
        write_atomic(self._index_path,
                     lambda f: np.savez(f, client_ids=self._ids, rows=self._rows, dim=np.int64(self.dim)))

    def state_dict(self) -> dict[str, Any]:
        self.flush()
        return {"backend": "disk", "dim": self.dim, "path": str(self.path), "num_stored": self.num_stored}

    def close(self) -> None:
        if not self._closed:
            self.flush()
        super().close()

    def _load_index(self) -> None:
        if not self._index_path.exists():
            raise ScenarioError(
                f"state_store.path: no client state store in '{self.path}' ({_INDEX_FILE} is missing); "
                "point it at the directory of a checkpointed store"
            )
        with np.load(self._index_path) as index:
            if int(index["dim"]) != self.dim:
                raise ScenarioError(
                    f"state_store.path: the store in '{self.path}' has dim {int(index['dim'])}, "
                    f"not {self.dim}; it belongs to a different model"
                )
            self._set_index(index["client_ids"], index["rows"])
        self._num_rows = int(self._rows.max()) + 1 if self._rows.size else 0
        if self._rows_path.stat().st_size < self._num_rows * self._row_bytes:
            raise ScenarioError(
                f"state_store.path: '{self._rows_path}' is shorter than its index; the store is damaged"
            )


def make_state_store(
    backend: Literal["memory", "disk"], dim: int, path: str | os.PathLike[str] | None = None
) -> ClientStateStore:
    """A new, empty store: ``"memory"``, or ``"disk"`` in directory ``path``."""
    if backend == "memory":
        return MemoryStateStore(dim)
    if backend == "disk":
        if path is None:
            raise ScenarioError("state_store.path: the disk backend needs a directory; set state_store.path")
        return DiskStateStore(path, dim)
    raise ScenarioError(f"state_store.backend: must be 'memory' or 'disk' (got {backend!r})")


def restore_state_store(state: dict[str, Any]) -> ClientStateStore:
    """Rebuild a store from its ``state_dict()`` (a disk store reopens its directory)."""
    if state.get("backend") == "memory":
        return MemoryStateStore.from_state_dict(state)
    if state.get("backend") == "disk":
        return DiskStateStore(state["path"], int(state["dim"]), reopen=True)
    raise ValueError(f"not a client state store state dict (backend {state.get('backend')!r})")

"""Malformed data files, each run through ``raysim run`` with a small scenario that reads it.

Every case is malformed by construction: a truncated or corrupt archive, x and y of different lengths,
labels that are negative, fractional, NaN or far beyond any sensible class count, NaN features, a
missing column, a file of the wrong kind. Data is loaded before Ray starts, so every one of them must
be refused before the runner's ``connect``; reaching it counts as an escape.
"""

from __future__ import annotations

import io
import zipfile
from typing import Any

import numpy as np

from raysim.fuzz.schema import DIR, SCENARIO, Case, dump

_ROWS = 40


def _npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _claimed_shape_npz(shape: tuple[int, ...]) -> bytes:
    """An .npz whose x header claims ``shape`` but holds 64 bytes of data."""
    x = io.BytesIO()
    np.lib.format.write_array_header_1_0(x, {"descr": "<f4", "fortran_order": False, "shape": shape})
    x.write(b"\0" * 64)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("x.npy", x.getvalue())
        archive.writestr("y.npy", _npy(np.zeros(4, dtype=np.int64)))
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _parquet(columns: dict[str, list]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


def _scenario(source: str, path: str, partition: dict[str, Any] | None = None, **data: Any) -> bytes:
    text = source == "text"
    tiny = {"hidden_size": 16, "layers": 1, "heads": 2, "intermediate_size": 16}
    model = {"kind": "hf_classifier", "tokenizer": "byte", "lora": {"r": 2}, "tiny": tiny} if text \
        else {"kind": "logreg"}
    extra = {"seq_len": 16, "cache_dir": f"{DIR}/cache"} if text else {}
    return dump({"name": "fuzzdata", "seed": 0, "num_clients": 4, "rounds": 1,
                 "data": {"source": source, "path": f"{DIR}/{path}", **extra, **data},
                 "partition": partition or {"kind": "iid"}, "sampling": {"clients_per_round": 2}, "model": model,
                 "training": {"batch_size": 8}, "tracking": {"progress": False}, "output": {"dir": f"{DIR}/out"}})


def data_cases(seed: int = 0) -> list[Case]:
    """Every malformed data file case, for the npz, table and text sources."""
    return _npz_cases(seed) + _table_cases(seed) + _text_cases(seed)


def _npz_cases(seed: int) -> list[Case]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((_ROWS, 4)).astype(np.float32)
    y = np.arange(_ROWS) % 3
    good = _npz(x=x, y=y)

    def labels(**changes: Any) -> np.ndarray:
        out = y.astype(changes.pop("dtype", y.dtype))
        for index, value in changes.items():
            out[int(index[1:])] = value
        return out

    nan_x, inf_x = x.copy(), x.copy()
    nan_x[7, 2], inf_x[3, 0] = np.nan, np.inf
    cases: list[tuple[str, dict[str, bytes], dict[str, Any]]] = [
        ("truncated .npz (half)", {"train.npz": good[: len(good) // 2]}, {}),
        ("truncated .npz (all but 10 bytes)", {"train.npz": good[:-10]}, {}),
        ("truncated .npz (first 10 bytes)", {"train.npz": good[:10]}, {}),
        ("empty .npz", {"train.npz": b""}, {}),
        ("random bytes as .npz", {"train.npz": rng.bytes(2048)}, {}),
        ("a text file as .npz", {"train.npz": b"x,y\n1,2\n"}, {}),
        ("an .npz without x and y", {"train.npz": _npz(a=x, b=y)}, {}),
        ("an .npz without y", {"train.npz": _npz(x=x)}, {}),
        ("x has 40 rows, y 39", {"train.npz": _npz(x=x, y=y[:-1])}, {}),
        ("a negative label", {"train.npz": _npz(x=x, y=labels(i5=-1))}, {}),
        ("a fractional label", {"train.npz": _npz(x=x, y=labels(dtype=np.float64, i5=0.5))}, {}),
        ("a NaN label", {"train.npz": _npz(x=x, y=labels(dtype=np.float64, i5=np.nan))}, {}),
        ("a label of 10^9", {"train.npz": _npz(x=x, y=labels(i5=10**9))}, {}),
        ("a label of 1e30", {"train.npz": _npz(x=x, y=labels(dtype=np.float64, i5=1e30))}, {}),
        ("a uint64 label of 2^64-1", {"train.npz": _npz(x=x, y=labels(dtype=np.uint64, i5=2**64 - 1))}, {}),
        ("a single class", {"train.npz": _npz(x=x, y=np.zeros(_ROWS, dtype=np.int64))}, {}),
        ("2-D labels", {"train.npz": _npz(x=x, y=np.zeros((_ROWS, 3), dtype=np.int64))}, {}),
        ("a NaN feature", {"train.npz": _npz(x=nan_x, y=y)}, {}),
        ("an Inf feature", {"train.npz": _npz(x=inf_x, y=y)}, {}),
        ("string features", {"train.npz": _npz(x=x.astype(str), y=y)}, {}),
        ("complex features", {"train.npz": _npz(x=x.astype(np.complex64), y=y)}, {}),
        ("pickled object features", {"train.npz": _pickled(x, y)}, {}),
        ("zero samples", {"train.npz": _npz(x=x[:0], y=y[:0])}, {}),
        ("zero features per sample", {"train.npz": _npz(x=x[:, :0], y=y)}, {}),
        ("a scalar x", {"train.npz": _npz(x=np.float32(1.0), y=y)}, {}),
        ("keys shorter than x", {"train.npz": _npz(x=x, y=y, keys=np.arange(_ROWS - 1))}, {}),
        ("fractional keys", {"train.npz": _npz(x=x, y=y, keys=np.full(_ROWS, 0.5))}, {}),
        ("an x header claiming 10^12 rows", {"train.npz": _claimed_shape_npz((10**12, 4))}, {}),
        ("a test file of another feature shape", {"train.npz": good, "test.npz": _npz(x=x[:10, :3], y=y[:10])},
         {"test_path": f"{DIR}/test.npz"}),
        ("a truncated test file", {"train.npz": good, "test.npz": good[:100]}, {"test_path": f"{DIR}/test.npz"}),
        ("a negative test label", {"train.npz": good, "test.npz": _npz(x=x[:10], y=-y[:10] - 1)},
         {"test_path": f"{DIR}/test.npz"}),
        ("too few samples for min_size", {"train.npz": good}, {"partition": {"kind": "dirichlet", "min_size": 50}}),
        ("an .npy file", {"train.npy": _npy(x)}, {"path": "train.npy"}),
        ("a folder as data.path", {}, {"path": ""}),
    ]
    return [Case("npz_file", label, {SCENARIO: _scenario("npz", extra.pop("path", "train.npz"), **extra), **files},
                 "run") for label, files, extra in cases]


def _pickled(x: np.ndarray, y: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=np.array([list(row) for row in x] + [None], dtype=object)[:-1], y=y)
    return buf.getvalue()


def _table_cases(seed: int) -> list[Case]:
    rng = np.random.default_rng(seed + 1)
    rows = [(float(a), float(b), i % 3) for i, (a, b) in enumerate(rng.standard_normal((_ROWS, 2)))]

    def csv(label_of: Any = lambda i, v: v, extra: str = "") -> bytes:
        lines = ["a,b,label"] + [f"{a},{b},{label_of(i, c)}" for i, (a, b, c) in enumerate(rows)]
        return ("\n".join(lines) + "\n" + extra).encode()

    parquet = _parquet({"a": [r[0] for r in rows], "b": [r[1] for r in rows], "label": [r[2] for r in rows]})
    cases: list[tuple[str, str, bytes, dict[str, Any]]] = [
        ("a csv without the label column", "train.csv", b"a,b\n" + b"1,2\n" * _ROWS, {}),
        ("a csv with a text feature column", "train.csv", b"a,b,label\n" + b"x,1,0\ny,2,1\n" * 20, {}),
        ("a csv with a ragged row", "train.csv", csv(extra="1,2,0,9,9\n"), {}),
        ("an empty csv", "train.csv", b"", {}),
        ("a csv with a header only", "train.csv", b"a,b,label\n", {}),
        ("binary garbage as csv", "train.csv", rng.bytes(2048), {}),
        ("a csv with a missing feature value", "train.csv", csv(extra="1.0,,0\n"), {}),
        ("a csv with an inf feature", "train.csv", csv(extra="inf,1.0,0\n"), {}),
        ("a csv with a negative label", "train.csv", csv(lambda i, v: -1 if i == 3 else v), {}),
        ("a csv with a fractional label", "train.csv", csv(lambda i, v: 0.5 if i == 3 else v), {}),
        ("a csv with a label of 10^9", "train.csv", csv(lambda i, v: 10**9 if i == 3 else v), {}),
        ("a jsonl with a malformed line", "train.jsonl", b'{"a": 1, "b": 2, "label": 0}\n{"a": 1, "b"\n', {}),
        ("a json holding a number", "train.json", b"42\n", {}),
        ("a truncated parquet", "train.parquet", parquet[: len(parquet) // 2], {}),
        ("garbage between parquet magic", "train.parquet", b"PAR1" + rng.bytes(512) + b"PAR1", {}),
        ("feature_columns naming a missing column", "train.parquet", parquet, {"feature_columns": ["a", "zz"]}),
        ("natural_column naming a missing column", "train.parquet", parquet, {"natural_column": "zz"}),
        ("label_column naming a missing column", "train.parquet", parquet, {"label_column": "zz"}),
        ("a parquet of ragged list features", "train.parquet",
         _parquet({"f": [[1.0] * (1 + i % 3) for i in range(_ROWS)], "label": [i % 3 for i in range(_ROWS)]}), {}),
        ("an .xlsx file", "train.xlsx", b"PK\x03\x04" + rng.bytes(256), {}),
    ]
    built = [Case("table_file", label, {SCENARIO: _scenario("table", name, **extra), name: content}, "run")
             for label, name, content, extra in cases]
    built.append(Case("table_file", "a folder not written by save_to_disk", {SCENARIO: _scenario("table", "")}, "run"))
    return built


def _text_cases(seed: int) -> list[Case]:
    rng = np.random.default_rng(seed + 2)

    def jsonl(label_of: Any) -> bytes:
        return "".join(f'{{"text": "line {i}", "label": {label_of(i)}}}\n' for i in range(_ROWS)).encode()

    cases = [
        ("a jsonl without the text column", b'{"body": "x", "label": 0}\n' * _ROWS),
        ("a jsonl with a negative label", jsonl(lambda i: -1 if i == 3 else i % 2)),
        ("a jsonl with a null label", jsonl(lambda i: "null" if i == 3 else i % 2)),
        ("a jsonl with a label of 10^9", jsonl(lambda i: 10**9 if i == 3 else i % 2)),
        ("binary garbage as jsonl", rng.bytes(2048)),
        ("an empty jsonl", b""),
    ]
    return [Case("text_file", label, {SCENARIO: _scenario("text", "train.jsonl"), "train.jsonl": content}, "run")
            for label, content in cases]

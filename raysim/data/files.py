"""User data from files: ``.npz`` arrays, and tables (parquet, csv, jsonl/json, ``save_to_disk`` folders).

Tables are read through Hugging Face ``datasets`` with a throw-away cache directory and
``keep_in_memory``, so nothing is written next to the user's data.  Every problem with the data
(a missing file, a corrupt archive, a missing column, NaN features, negative labels) raises a
one-line ``ScenarioError`` that names the scenario field to fix: ``data.path``,
``data.test_path``, ``data.label_column``, ``data.feature_columns`` or ``data.natural_column``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

import numpy as np

from raysim.data.sources import ArrayDataset, held_out
from raysim.errors import ScenarioError, first_line

_TABLE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json"}
_NUMERIC_KINDS = "biuf"
MAX_CLASSES = 100_000  # the largest data.num_classes a scenario may declare


def load_npz(train_path: str, *, test_path: str | None, test_fraction: float, seed: int) -> ArrayDataset:
    """Arrays ``x`` (features) and ``y`` (labels), and optionally ``keys`` (one natural group per
    sample), from ``train_path``; the test set comes from ``test_path`` (same keys) or, without
    one, from a seeded split of ``test_fraction`` of each class."""
    train = _read_npz(train_path, "data.path")
    test = _read_npz(test_path, "data.test_path") if test_path is not None else None
    fields = {"label_fields": ("data.path", "data.test_path"), "keys_field": "data.path"}
    return _assemble(_stem(train_path), train, test, test_fraction=test_fraction, seed=seed, **fields)


def load_table(
    path: str,
    *,
    label_column: str,
    feature_columns: list[str] | None,
    test_path: str | None,
    test_fraction: float,
    seed: int,
    natural_column: str | None = None,
) -> ArrayDataset:
    """A table whose rows are samples: numeric feature columns (by default every column but the
    label and the natural column), or one list-valued column holding each sample's features.

    ``path`` is a .parquet, .csv, .jsonl or .json file, or a folder written by ``save_to_disk``
    (a single ``Dataset``, or a ``DatasetDict`` whose ``train`` split is used and whose ``test``
    split, if any, is the test set unless ``test_path`` is given).
    """
    with _quiet_datasets(), tempfile.TemporaryDirectory(prefix="raysim-datasets-") as cache:
        train_table, bundled_test = _read_table(path, "data.path", cache)
        test_table = _read_table(test_path, "data.test_path", cache)[0] if test_path is not None else bundled_test
        wanted = [label_column] + ([natural_column] if natural_column else [])
        features = _feature_columns(train_table.column_names, feature_columns, exclude=wanted)
        train = _table_arrays(train_table, path, "data.path", label_column, features, natural_column)
        test = None
        if test_table is not None:
            test = _table_arrays(test_table, test_path or path, "data.test_path", label_column, features, None)
    fields = {"label_fields": ("data.label_column", "data.label_column"), "keys_field": "data.natural_column"}
    return _assemble(_stem(path), train, test, test_fraction=test_fraction, seed=seed, **fields)


def _read_npz(path: str, field: str) -> dict[str, np.ndarray]:
    _check_file(path, field)
    if _ext(path) != ".npz":
        raise ScenarioError(f"{field}: unsupported file type '{_ext(path)}' for npz data; use numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files if name in ("x", "y", "keys")}
            found = list(archive.files)
    except Exception as exc:  # zipfile, zlib and numpy each raise their own error on a damaged file
        raise ScenarioError(
            f"{field}: cannot read {path} as .npz ({first_line(_root_cause(exc))}); "
            "the file may be truncated or corrupt, re-save it with numpy.savez"
        ) from None
    for name in ("x", "y"):
        if name not in arrays:
            raise ScenarioError(
                f"{field}: {path} has no array '{name}' (found: {', '.join(found) or 'none'}); "
                "save features as x and labels as y"
            )
    return arrays


def _read_table(path: str, field: str, cache: str):
    """(first split, test split or None) of a table file or a ``save_to_disk`` folder."""
    import datasets

    if os.path.isdir(path):
        try:
            loaded = datasets.load_from_disk(path, keep_in_memory=True)
        except Exception as exc:
            raise ScenarioError(
                f"{field}: {path} is a folder but not one written by datasets' save_to_disk "
                f"({first_line(_root_cause(exc))}); point it at a data file or a save_to_disk folder"
            ) from None
        if isinstance(loaded, datasets.Dataset):
            return loaded, None
        splits = list(loaded.keys())
        preferred = "test" if field == "data.test_path" else "train"
        if preferred in loaded:
            main = loaded[preferred]
        elif len(splits) == 1:
            main = loaded[splits[0]]
        else:
            raise ScenarioError(f"{field}: {path} holds splits {', '.join(splits)} but no '{preferred}' split")
        return main, (loaded["test"] if preferred == "train" and "test" in loaded else None)
    _check_file(path, field)
    builder = _TABLE_BUILDERS.get(_ext(path))
    if builder is None:
        raise ScenarioError(
            f"{field}: unsupported file type '{_ext(path)}'; use .npz, .parquet, .csv, .jsonl, .json "
            "or a folder written by datasets' save_to_disk"
        )
    try:
        table = datasets.load_dataset(
            builder,
            data_files={"train": os.path.abspath(path)},
            split="train",
            keep_in_memory=True,
            cache_dir=cache,
        )
    except Exception as exc:  # pyarrow, json and datasets each raise their own error on a bad file
        raise ScenarioError(
            f"{field}: cannot read {path} as {builder} ({first_line(_root_cause(exc))}); "
            "check that the file is complete and well formed"
        ) from None
    return table, None


def _feature_columns(columns: list[str], requested: list[str] | None, *, exclude: list[str]) -> list[str]:
    if requested is None:
        chosen = [c for c in columns if c not in exclude]
    else:
        missing = [c for c in requested if c not in columns]
        if missing:
            raise ScenarioError(
                f"data.feature_columns: no column {', '.join(map(repr, missing))} "
                f"(columns: {', '.join(columns)}); list existing columns"
            )
        chosen = list(requested)
    if not chosen:
        raise ScenarioError(f"data.feature_columns: no feature columns left (columns: {', '.join(columns)})")
    return chosen


def _table_arrays(
    table, path: str, field: str, label: str, features: list[str], natural: str | None
) -> dict[str, np.ndarray]:
    columns = table.column_names
    for name, column_field in ((label, "data.label_column"), (natural, "data.natural_column")):
        if name is not None and name not in columns:
            raise ScenarioError(
                f"{column_field}: no column '{name}' in {path} (columns: {', '.join(columns)}); "
                f"set {column_field} to one of them"
            )
    missing = [c for c in features if c not in columns]
    if missing:
        raise ScenarioError(f"data.feature_columns: {path} has no column {', '.join(map(repr, missing))}")
    wanted = features + [label] + ([natural] if natural else [])
    values = table.with_format("numpy", columns=wanted)[:]
    for name in features:
        kind = values[name].dtype.kind
        if kind not in _NUMERIC_KINDS:
            detail = "lists of different lengths" if kind == "O" else f"{values[name].dtype} values"
            raise ScenarioError(
                f"data.feature_columns: column '{name}' in {path} holds {detail}, not numbers; "
                "drop it or list numeric feature_columns"
            )
    if len(features) == 1:
        x = values[features[0]]
    elif all(values[name].ndim == 1 for name in features):
        x = np.stack([values[name] for name in features], axis=1)
    else:
        raise ScenarioError(
            "data.feature_columns: give several scalar columns or one list-valued column, not a mix; "
            f"columns chosen: {', '.join(features)}"
        )
    arrays = {"x": x, "y": values[label]}
    if natural:
        arrays["keys"] = values[natural]
    return arrays


def _assemble(
    name: str,
    train: dict[str, np.ndarray],
    test: dict[str, np.ndarray] | None,
    *,
    test_fraction: float,
    seed: int,
    label_fields: tuple[str, str],
    keys_field: str,
) -> ArrayDataset:
    x_train = _features(train["x"], train["y"], "data.path")
    x_test = _features(test["x"], test["y"], "data.test_path") if test is not None else None
    if x_test is not None and x_test.shape[1:] != x_train.shape[1:]:
        raise ScenarioError(
            f"data.test_path: test samples have shape {x_test.shape[1:]} but training samples {x_train.shape[1:]}"
        )
    keys = _keys(train["keys"], keys_field) if "keys" in train else None
    if keys is not None and keys.size != x_train.shape[0]:
        raise ScenarioError(f"{keys_field}: keys has {keys.size} entries but x has {x_train.shape[0]} samples")
    raw_test_labels = [test["y"]] if test is not None else []
    y_train, *rest, num_classes = _labels([train["y"], *raw_test_labels], label_fields)
    if test is not None:
        y_test = rest[0]
    else:
        if not 0.0 < test_fraction < 1.0:
            raise ScenarioError(
                f"data.test_fraction: must be between 0 and 1, exclusive (got {test_fraction}); or give data.test_path"
            )
        held = held_out(y_train, test_fraction=test_fraction, seed=seed)
        if not held.any():
            raise ScenarioError(
                f"data.test_fraction: {test_fraction} of {y_train.size} samples leaves no test sample; "
                "use a larger test_fraction or give data.test_path"
            )
        x_train, x_test, y_train, y_test = x_train[~held], x_train[held], y_train[~held], y_train[held]
        keys = keys[~held] if keys is not None else None
    return ArrayDataset(name, x_train, y_train, x_test, y_test, num_classes, keys)


def _features(x: np.ndarray, y: np.ndarray, field: str) -> np.ndarray:
    if x.ndim == 0 or x.shape[0] == 0:
        raise ScenarioError(f"{field}: the dataset is empty (0 samples); provide at least one sample")
    if x.dtype.kind not in _NUMERIC_KINDS:
        raise ScenarioError(f"{field}: features must be numbers (got dtype {x.dtype})")
    if y.ndim != 1 and not (y.ndim == 2 and y.shape[1] == 1):
        raise ScenarioError(f"{field}: labels must be one value per sample (got shape {y.shape})")
    if x.shape[0] != y.shape[0]:
        raise ScenarioError(f"{field}: x has {x.shape[0]} samples but y has {y.shape[0]}; they must match")
    if 0 in x.shape[1:]:
        raise ScenarioError(f"{field}: samples have no features (x has shape {x.shape}); give each sample at least one")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x.reshape(-1, 1)
    finite = np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)
    if not finite.all():
        raise ScenarioError(
            f"{field}: features contain NaN or Inf ({int((~finite).sum())} samples, first at row "
            f"{int(np.argmin(finite))}); clean or impute them"
        )
    return x


def _labels(parts: list[np.ndarray], fields: tuple[str, str]) -> list:
    """Labels of each part (train, then test) as int64 in [0, num_classes), then num_classes;
    string labels map to their index among the sorted distinct values. At least two and at most
    ``MAX_CLASSES`` classes, the range of ``data.num_classes``: a label of 10^9 would otherwise
    ask every client for a head of 10^9 outputs."""
    parts = [p.reshape(-1) for p in parts]
    if any(p.dtype.kind in "USO" for p in parts):
        classes = np.unique(np.concatenate([p.astype(str) for p in parts]))
        _check_class_count(classes.size, len(classes), fields[0])
        return [np.searchsorted(classes, p.astype(str)).astype(np.int64) for p in parts] + [int(classes.size)]
    ints = []
    for part, field in zip(parts, fields):
        if part.dtype.kind not in _NUMERIC_KINDS:
            raise ScenarioError(f"{field}: labels must be integers or strings (got dtype {part.dtype})")
        bad = ~np.isfinite(part) | (part < 0) | (part != np.round(part))
        if bad.any():
            raise ScenarioError(
                f"{field}: labels must be non-negative integers (found {part[bad][0]}); "
                "use class ids 0..num_classes-1 or class names"
            )
        if part.size and part.max() >= MAX_CLASSES:
            raise ScenarioError(
                f"{field}: labels must be class ids in [0, {MAX_CLASSES}) (found {part.max()}); "
                "number the classes 0..num_classes-1"
            )
        ints.append(part.astype(np.int64))
    present = np.unique(np.concatenate(ints))
    _check_class_count(int(present[-1]) + 1 if present.size else 0, present.size, fields[0])
    return ints + [int(present[-1]) + 1]


def _check_class_count(num_classes: int, distinct: int, field: str) -> None:
    if num_classes > MAX_CLASSES:
        raise ScenarioError(f"{field}: {num_classes} classes is more than {MAX_CLASSES}; "
                            "labels name classes, not samples")
    if distinct < 2:
        raise ScenarioError(f"{field}: every label is the same class; "
                            "a classifier needs samples of at least two classes")


def _keys(keys: np.ndarray, field: str) -> np.ndarray:
    """Natural group keys as int64; strings map to their index among the sorted distinct values."""
    keys = keys.reshape(-1)
    if keys.dtype.kind in "USO":
        return np.unique(keys.astype(str), return_inverse=True)[1].reshape(-1).astype(np.int64)
    whole_floats = keys.dtype.kind == "f" and np.isfinite(keys).all() and (keys == np.round(keys)).all()
    if keys.dtype.kind in "biu" or whole_floats:
        return keys.astype(np.int64)
    raise ScenarioError(f"{field}: natural keys must be integers or strings (got dtype {keys.dtype})")


def _check_file(path: str, field: str) -> None:
    if not os.path.isfile(path):
        raise ScenarioError(f"{field}: file not found: {path}; check the path")


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide datasets' progress bars and its logging of read errors (we raise our own one-line
    error instead) while loading, restoring the caller's settings."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if was_enabled:
            datasets.enable_progress_bars()


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost ``__cause__`` of ``exc``: datasets wraps parser errors in its own."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc

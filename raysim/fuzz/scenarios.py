"""Seeded malformed scenarios: schema mutations of the shipped scenarios, and hostile YAML.

One generator per category. The schema categories (``missing_required``, ``wrong_type``,
``out_of_range``, ``huge_number``, ``impossible_combo``) mutate a valid scenario and may, rarely,
produce one pydantic accepts; every other category is malformed by construction. The impossible
combinations of features are the rows of ``raysim.config.compat``, each row's example written over
the base, so a row added to the table is fuzzed without touching this package.
"""

from __future__ import annotations

import copy
import datetime
import gzip
import random
import typing
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from raysim.config.compat import ROWS, Exclusion
from raysim.fuzz.hostile import anchor_bomb, deep_nesting, quadratic_aliases
from raysim.fuzz.schema import (SCENARIO, Case, delete_path, dump, get_path, kinds, load_bases, load_studies,
                                out_of_range, schema_fields, set_path, submodel, wrong_type)

Mutator = Callable[[dict, random.Random, list], Case]


def _case(description: str, text: bytes | str, must_reject: bool = True, overrides: tuple[str, ...] = ()) -> Case:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return Case("", description, {SCENARIO: data}, overrides=overrides, must_reject=must_reject)


def _pick_field(raw: dict, rng: random.Random, wanted: Callable[[str, Any], bool]) -> tuple[str, Any]:
    """A schema field that ``wanted`` accepts, one the scenario sets four times in five."""
    fields = [(path, info) for path, info in schema_fields() if wanted(path, info)]
    present = [(path, info) for path, info in fields if get_path(raw, path) is not None]
    return rng.choice(present if present and rng.random() < 0.8 else fields)


def _set_all(raw: dict, **changes: Any) -> dict:
    for dotted, value in changes.items():
        set_path(raw, dotted.replace("__", "."), value)
    return raw


_REQUIREMENTS: list[tuple[str, Callable[[dict], Any]]] = [
    ("privacy block without mechanism", lambda r: r.update(privacy={"delta": 1e-5, "clip_norm": 1.0})),
    ("npz source without data.path", lambda r: (_set_all(r, data__source="npz"), delete_path(r, "data.path"))),
    ("table source without data.path", lambda r: (_set_all(r, data__source="table"), delete_path(r, "data.path"))),
    ("text source without data.path", lambda r: (_set_all(r, data__source="text", model__kind="hf_classifier"),
                                                 delete_path(r, "data.path"))),
    ("poisson sampling without rate", lambda r: (_set_all(r, sampling__kind="poisson"),
                                                 delete_path(r, "sampling.rate"))),
    ("system block without speed or trace", lambda r: r.update(system={"dropout": 0.1})),
    ("asynchronous block without system", lambda r: (r.setdefault("asynchronous", {"mode": "fedbuff"}),
                                                     r.pop("system", None))),
    ("distributed DP without secure_aggregation", lambda r: (r.update(privacy={"mechanism": "distributed"}),
                                                             r.pop("secure_aggregation", None))),
    ("pretrained tokenizer without name_or_path", lambda r: _set_all(r, model__kind="hf_causal_lm",
                                                                     model__tokenizer="pretrained")),
]

_INCONSISTENT: list[tuple[str, Callable[[dict], Any]]] = [  # counts and settings that disagree across fields
    ("clients_per_round > num_clients", lambda r: _set_all(r, num_clients=10, sampling__kind="uniform",
                                                            sampling__clients_per_round=11)),
    ("federated_clients > num_clients", lambda r: _set_all(r, num_clients=10, evaluation__federated=True,
                                                            evaluation__federated_clients=11)),
    ("min_size x num_clients > training samples", lambda r: _set_all(
        r, num_clients=100, data={"source": "synthetic", "num_samples": 100}, partition={"kind": "iid", "min_size": 10},
        sampling={"clients_per_round": 10})),
    ("proximal mu without fedprox", lambda r: _set_all(r, strategy__name="fedavg", strategy__mu=0.1)),
    ("stragglers with one epoch", lambda r: _set_all(r, training__epochs=1, training__straggler_fraction=0.5)),
    ("FedBuff buffer larger than concurrency", lambda r: _set_all(
        r, asynchronous={"mode": "fedbuff", "concurrency": 5, "buffer_size": 20},
        system={"speed": {"kind": "constant", "value": 10}})),
    ("tiny transformer heads not dividing hidden", lambda r: _set_all(r, model__tiny={"hidden_size": 64, "heads": 5})),
    ("checkpoint name on an mlp", lambda r: _set_all(r, model__kind="mlp", model__name_or_path="gpt2")),
    ("DP clip_norm above the secagg clip range", lambda r: _set_all(
        r, privacy={"mechanism": "distributed", "clip_norm": 5.0}, secure_aggregation={"clip_range": 1.0})),
    ("secagg threshold above the cohort", lambda r: _set_all(
        r, sampling={"kind": "uniform", "clients_per_round": 10}, secure_aggregation={"threshold": 1000})),
]


def _combined(row: Exclusion) -> tuple[str, Callable[[dict], Any]]:
    """A row of the feature table as a mutation: its example's settings written over the base."""
    def change(raw: dict) -> None:
        for dotted, value in row.example.items():
            set_path(raw, dotted, copy.deepcopy(value))

    return f"{row.features[0]} with {row.features[1]}", change


_IMPOSSIBLE = _INCONSISTENT + [_combined(row) for row in ROWS]  # every refused feature pair, from compat.ROWS

_VALIDATED_RANGES: dict[str, list[Any]] = {  # bounds checked by validators rather than Field(ge=...)
    "system.dropout": [1.0, -0.5], "system.over_selection": [0.5, float("nan")], "system.deadline_s": [0.0, -1.0],
    "asynchronous.alpha": [0.0, 1.5], "asynchronous.concurrency": [0], "asynchronous.buffer_size": [0],
    "asynchronous.max_staleness": [-1], "secure_aggregation.threshold": [0, 1.5, -3],
    "executor.num_workers": [0, -2], "executor.num_gpus": [1.5], "model.hidden": [[0], [-4]], "model.channels": [[0]],
    "secure_aggregation.dropout": [{"share_keys": 1.5}], "system.availability.probability": [1.5, -0.1],
}


def missing_required(raw: dict, rng: random.Random, studies: list) -> Case:
    label, change = rng.choice(_REQUIREMENTS)
    change(raw)
    return _case(label, dump(raw), must_reject=False)


def unknown_key(raw: dict, rng: random.Random, studies: list) -> Case:
    blocks = {"": _field_names(None)} | {path: _field_names(info.annotation) for path, info in schema_fields()
                                          if "dict" in kinds(info.annotation)}
    present = [b for b in blocks if b == "" or isinstance(get_path(raw, b), dict)]
    where = rng.choice(present if rng.random() < 0.8 else list(blocks))
    names = blocks[where]
    typos = [n + rng.choice("sx_") for n in names] + [n[:-1] for n in names if len(n) > 3]
    odd_keys = ["zz_unknown", 17, True, None, 3.5, "", "ключ", "with space"]
    key = rng.choice([k for k in typos if k not in names] + odd_keys)
    target = raw if where == "" else get_path(raw, where)
    if not isinstance(target, dict):
        set_path(raw, where, {})
        target = get_path(raw, where)
    target[key] = rng.choice([1, "x", None, [1, 2], {"a": 1}])
    return _case(f"unknown key {key!r} in {where or 'the top level'}", dump(raw))


def _field_names(annotation: Any) -> list[str]:
    """The keys a block takes: its model's fields, or the named keys of a ``dict[Literal[...], ...]``."""
    from raysim.config import Scenario

    model = Scenario if annotation is None else submodel(annotation)
    if model is not None:
        return list(model.model_fields)
    return [str(k) for k in typing.get_args(typing.get_args(annotation)[0])]


def wrong_types(raw: dict, rng: random.Random, studies: list) -> Case:
    path, info = _pick_field(raw, rng, lambda p, i: True)
    value = wrong_type(info, rng)
    set_path(raw, path, value)
    return _case(f"{path} = {value!r}", dump(raw), must_reject=False)


def out_of_ranges(raw: dict, rng: random.Random, studies: list) -> Case:
    known = dict(schema_fields())
    path, _ = _pick_field(raw, rng, lambda p, i: bool(out_of_range(i)) or p in _VALIDATED_RANGES and p in known)
    value = rng.choice(out_of_range(known[path]) or _VALIDATED_RANGES[path])
    set_path(raw, path, value)
    return _case(f"{path} = {_short(value)}", dump(raw), must_reject=False)


def huge_numbers(raw: dict, rng: random.Random, studies: list) -> Case:
    path, info = _pick_field(raw, rng, lambda p, i: bool(kinds(i.annotation) & {"int", "float"})
                             or p in ("model.hidden", "model.channels", "secure_aggregation.late"))
    accepted = kinds(info.annotation)
    values = [10**12, 2**63, 2**64 + 1, 10**400, -(10**12)] if "int" in accepted else []
    values += [1e308, -1e308, float("inf"), float("-inf"), 10**400] if "float" in accepted else []
    values = values or [[10**12], [10**400]]
    value = rng.choice(values)
    set_path(raw, path, value)
    return _case(f"{path} = {_short(value)}", dump(raw), must_reject=False)


def impossible_combo(raw: dict, rng: random.Random, studies: list) -> Case:
    label, change = rng.choice(_IMPOSSIBLE)
    change(raw)
    return _case(label, dump(raw), must_reject=False)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} chars)"


_SYNTAX: list[tuple[str, str]] = [  # appended to a valid scenario
    ("a tab-indented line", "\tseed: 1\n"), ("an unclosed flow sequence", "rounds: [1, 2\n"),
    ("an unterminated quote", 'name: "unterminated\n'), ("an undefined alias", "seed: *nowhere\n"),
    ("a colon inside a plain value", "name: a: b\n"),
    ("a python object tag", "seed: !!python/object/apply:os.system ['echo pwned']\n"),
    ("an invalid escape", 'name: "\\q"\n'), ("an unhashable key", "? [a, b]\n: 1\n"),
    ("an !!int tag on a word", "seed: !!int abc\n"), ("a !!float tag on a word", "seed: !!float abc\n"),
    ("a !!timestamp tag on a word", "seed: !!timestamp abc\n"), ("a stray sequence item", "- item\n"),
    ("a merge key onto a scalar", "<<: 5\n"), ("a duplicate anchor", "x1: &d 1\nx2: &d 2\n"),
    ("an unknown tag", "seed: !custom 1\n"), ("an invalid !!binary", "name: !!binary '%%%'\n"),
    ("a flow mapping missing a comma", "training: {lr: 0.1 epochs: 2}\n"), ("a second document", "---\nname: second\n"),
]


def yaml_syntax(raw: dict, rng: random.Random, studies: list) -> Case:
    text = dump(raw).decode("utf-8")
    if rng.random() < 0.15:
        return _case("an unsupported %YAML directive", "%YAML 9.9\n---\n" + text)
    label, tail = rng.choice(_SYNTAX)
    return _case(label, text + tail)


def top_level_shape(raw: dict, rng: random.Random, studies: list) -> Case:
    label, text = rng.choice([
        ("a list", "- a\n- b\n"), ("a string", "just a string\n"), ("an integer", "42\n"), ("null", "~\n"),
        ("an empty list", "[]\n"), ("a boolean", "true\n"), ("binary", "!!binary aGVsbG8=\n"), ("a float", "3.14\n"),
        ("a list holding the scenario", dump([raw]).decode()), ("a set", "!!set {a, b}\n"),
        ("a folded block", ">\n  x\n"),
    ])
    return _case(f"top level is {label}", text)


def empty_file(raw: dict, rng: random.Random, studies: list) -> Case:
    label, text = rng.choice([("nothing", b""), ("newlines", b"\n\n\n"), ("spaces", b"   \n  \n"),
                              ("a comment", b"# only a comment\n"), ("a document marker", b"---\n"),
                              ("document markers", b"---\n...\n"), ("a byte-order mark", b"\xef\xbb\xbf"),
                              ("CRLF line ends", b"\r\n\r\n")])
    return _case(f"empty file: {label}", text)


def binary_garbage(raw: dict, rng: random.Random, studies: list) -> Case:
    text = dump(raw)
    cut = rng.randrange(len(text))
    label, data = rng.choice([
        ("random bytes", rng.randbytes(rng.choice([1, 16, 512, 4096, 65536]))),
        ("random bytes after the scenario", text + rng.randbytes(64)),
        ("UTF-16 with a BOM", text.decode("utf-8").encode("utf-16")),
        ("Latin-1 text", "name: café\n".encode("latin-1") + text),
        ("a NUL byte", text[:cut] + b"\x00" + text[cut:]), ("a BEL byte", text[:cut] + b"\x07" + text[cut:]),
        ("a DEL byte", text[:cut] + b"\x7f" + text[cut:]),
        ("a gzip-compressed scenario", gzip.compress(text)), ("a PNG", b"\x89PNG\r\n\x1a\n" + rng.randbytes(256)),
        ("a lone surrogate", b"name: \xed\xa0\x80\n" + text), ("an overlong encoding", b"name: \xc0\xaf\n" + text),
        ("a truncated multi-byte character", text + b"\xe2\x82"),
        ("a BOM then garbage", b"\xef\xbb\xbf" + rng.randbytes(128)),
    ])
    return _case(label, data)


def deep_nesting_case(raw: dict, rng: random.Random, studies: list) -> Case:
    depth = rng.choice([33, 100, 1_000, 10_000, 10_000, 10_000, 100_000])
    form = rng.choice(["flow_list", "flow_map", "block_seq", "block_map", "in_field", "mixed"])
    return _case(f"nesting {depth} deep ({form})", deep_nesting(form, depth))


def anchor_bomb_case(raw: dict, rng: random.Random, studies: list) -> Case:
    form = rng.choice(["list", "map", "in_field", "flow", "merge", "quadratic"])
    if form == "quadratic":
        size, count = rng.choice([1_000, 10_000]), rng.choice([100, 1_000])
        return _case(f"{count} aliases of a {size}-character string", quadratic_aliases(size, count))
    levels, fan = rng.randint(5, 12), rng.randint(5, 10)
    return _case(f"anchor bomb ({form}, {fan}^{levels})", anchor_bomb(form, levels, fan))


def long_string(raw: dict, rng: random.Random, studies: list) -> Case:
    size = rng.choice([300, 10_000, 200_000, 900_000, 1_100_000])  # 300 passes PATH_MAX but not NAME_MAX
    text, where = "x" * size, rng.choice(["name", "key", "model.kind", "document", "data.path", "system.trace",
                                          "model.name_or_path"])
    if where == "document":
        return _case(f"a {size}-character document", text + "\n")
    if where == "key":
        raw[text] = 1
    elif where == "data.path":
        _set_all(raw, data__source="npz", data__path=text)
    elif where == "system.trace":
        _set_all(raw, system__trace=text)
    elif where == "model.name_or_path":
        _set_all(raw, model={"kind": "hf_causal_lm", "name_or_path": text}, data={"source": "shakespeare_lm"})
    else:
        set_path(raw, where, text)
    return _case(f"a {size}-character string in {where}", dump(raw))


def bad_override(raw: dict, rng: random.Random, studies: list) -> Case:
    path, info = _pick_field(raw, rng, lambda p, i: True)
    flow = dump(wrong_type(info, rng)).decode().replace("\n...\n", "").strip().replace("\n", " ")
    label, sets = rng.choice([
        ("an unclosed flow value", ["training.lr=[0.1"]), ("no '='", ["training.lr"]), ("an empty key path", ["=0.1"]),
        ("only dots", ["...=1"]), ("an unknown key", ["training.lrr=0.1"]),
        ("a path below a value", ["training.lr.deeper=1"]),
        ("a section set to a number", ["training=5"]), ("a null name", ["name="]),
        ("a python tag", ["seed=!!python/object/apply:os.system ['echo pwned']"]),
        ("an !!int tag on a word", ["seed=!!int abc"]),
        ("an anchor bomb", ["model.hidden=" + anchor_bomb("flow_value", 9, 9)]),
        ("nesting 10000 deep", ["model.hidden=" + deep_nesting("flow_list", 10_000)]),
        ("a 200000-character value", ["name=" + "x" * 200_000]), ("a 200000-character key", ["x" * 200_000 + "=1"]),
        ("a 400-digit number", ["num_clients=" + "9" * 400]),
        ("a control character", ["name=a\x07b"]),
        ("a good value then a bad one", ["training.lr=0.1", "training.lr=-1"]),
        (f"{path}={flow}", [f"{path}={flow}"]), (f"{path}={flow}", [f"{path}={flow}"]),
    ])
    return _case(f"--set {label[:80]}", dump(raw), overrides=tuple(f for s in sets for f in ("--set", s)))


_GRID_AXES = ["seed", "rounds", "training.epochs", "training.batch_size", "evaluation.every",  # 10 values each
              "executor.clients_per_call", "executor.calls_in_flight", "partition.max_tries", "model.init_seed",
              "partition.shards_per_client", "evaluation.federated_clients", "data.num_features"]


def study_file(raw: dict, rng: random.Random, studies: list) -> Case:
    name, study = copy.deepcopy(rng.choice(studies))
    grid, date = study.setdefault("grid", {}), datetime.date(2001, 12, 14)
    label, change = rng.choice([
        ("an unknown study key", lambda: study.update(grids={})), ("grid is a list", lambda: study.update(grid=[1, 2])),
        ("grid values not a list", lambda: grid.update({"training.lr": 0.5})),
        ("grid values empty", lambda: grid.update({"training.lr": []})),
        ("an unknown grid path", lambda: grid.update({"training.lrr": [0.1]})),
        ("the name swept", lambda: grid.update({"name": ["a", "b"]})),
        ("base is a number", lambda: study.update(base=42)),
        ("base file missing", lambda: study.update(base="missing.yaml")),
        ("base with an unknown key", lambda: study.update(base={**(study.get("base") or {}), "bogus": 1})),
        ("set is a list", lambda: study.update(set=[1])),
        ("an unknown set path", lambda: study.update(set={"training.lrr": 1})),
        ("a name with spaces", lambda: study.update(name="bad name!")),
        ("a grid point out of range", lambda: grid.update({"training.lr": [0.1, -1]})),
        ("zipped keys of the wrong arity", lambda: grid.update({"training.lr,training.epochs": [[0.1]]})),
        ("duplicate grid values", lambda: grid.update({"training.lr": [0.1, 0.1]})),
        ("a date as a grid value", lambda: grid.update({"seed": [date]})),
        ("a date in set", lambda: study.update(set={"seed": date})),
        ("bytes as a grid value", lambda: grid.update({"name": [b"\x00\x01"]})),
        ("a grid of 10^12 runs", lambda: study.update(grid={axis: list(range(1, 11)) for axis in _GRID_AXES})),
    ])
    change()
    return _case(f"study {name}: {label}", dump(study))


CATEGORIES: dict[str, Mutator] = {
    "missing_required": missing_required, "unknown_key": unknown_key, "wrong_type": wrong_types,
    "out_of_range": out_of_ranges, "huge_number": huge_numbers, "impossible_combo": impossible_combo,
    "yaml_syntax": yaml_syntax, "top_level_shape": top_level_shape, "empty_file": empty_file,
    "binary_garbage": binary_garbage, "deep_nesting": deep_nesting_case, "anchor_bomb": anchor_bomb_case,
    "long_string": long_string, "bad_override": bad_override, "study_file": study_file,
}


def scenario_cases(count: int, seed: int, folder: str | Path) -> list[Case]:
    """``count`` malformed scenarios, cycling through the categories so that each is tried;
    case ``i`` depends only on ``(seed, i)`` and the shipped scenarios in ``folder``."""
    bases, studies = load_bases(folder), load_studies(folder)
    cases = []
    for i in range(count):
        category = list(CATEGORIES)[i % len(CATEGORIES)]
        rng = random.Random(f"{seed}/{i}")
        base_name, base = rng.choice(bases)
        case = CATEGORIES[category](copy.deepcopy(base), rng, studies)
        where = "" if category == "study_file" else f" [{base_name}]"
        cases.append(replace(case, category=category, description=case.description + where))
    return cases

"""What a fuzz case is, and what the scenario schema accepts: the raw material of the mutations.

The mutations are driven by the pydantic models of ``raysim.config`` themselves, so a field added to the
schema is fuzzed without touching this package: ``schema_fields`` walks every block and leaf,
``wrong_type`` picks a value of a type the field cannot take (pydantic's lax mode coerces ``"12"`` to 12
and ``True`` to 1, so those are never offered as wrong), and ``out_of_range`` steps past the bounds
the field declares.
"""

from __future__ import annotations

import datetime
import random
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from pydantic import BaseModel

SCENARIO = "scenario.yaml"
DIR = "@DIR@"  # replaced in every case file and argument by the case's own temporary folder


@dataclass(frozen=True)
class Case:
    """One malformed input: the files of its folder (``scenario.yaml`` is passed to the command),
    the command and its ``--set`` arguments.

    ``must_reject``: the input is malformed by construction, so accepting it is an escape. A schema
    mutation may be accidentally valid; that is counted as accepted, not failed.
    """

    category: str
    description: str
    files: dict[str, bytes]
    command: str = "validate"
    overrides: tuple[str, ...] = ()
    must_reject: bool = True


def schema_fields(model: type[BaseModel] | None = None, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, FieldInfo) of every field of the scenario schema, blocks and leaves alike."""
    if model is None:
        from raysim.config import Scenario

        model = Scenario
    for name, info in model.model_fields.items():
        yield prefix + name, info
        sub = submodel(info.annotation)
        if sub is not None:
            yield from schema_fields(sub, f"{prefix}{name}.")


def submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``X`` or ``X | None``, if there is one."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def kinds(annotation: Any) -> set[str]:
    """What a field accepts: none, bool, int, float, str, literal, list, dict (a block counts as dict)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        return set().union(*(kinds(a) for a in typing.get_args(annotation)))
    if origin is typing.Literal:
        return {"literal"}
    if origin in (list, dict):
        return {origin.__name__}
    if annotation is type(None):
        return {"none"}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {"dict"}
    return {annotation.__name__} if annotation in (bool, int, float, str) else set()


_WRONG_TYPES: list[tuple[Any, Callable[[set[str]], bool]]] = [  # (value, does a field of these kinds take it?)
    ({"nested": {"x": 1}}, lambda k: False),  # blocks forbid the unknown key; dicts take only named phases
    ([1, "two", None], lambda k: False),  # no list field takes numbers, strings and null together
    ("not-a-number", lambda k: "str" in k),
    (None, lambda k: "none" in k),
    (12.5, lambda k: "float" in k),
    (42, lambda k: bool(k & {"int", "float"})),
    (True, lambda k: bool(k & {"int", "float", "bool"})),
    (datetime.date(2001, 12, 14), lambda k: False),  # a YAML timestamp is a date, which no field takes
]


def wrong_type(info: Any, rng: random.Random) -> Any:
    """A value of a type the field cannot take."""
    accepted = kinds(info.annotation)
    return rng.choice([value for value, takes in _WRONG_TYPES if not takes(accepted)])


def out_of_range(info: Any) -> list[Any]:
    """Values past the bounds the field declares: below ge/gt, above le/lt, NaN, too long, off pattern."""
    accepted, values = kinds(info.annotation), []
    for rule in info.metadata:
        for attr, past in (("ge", lambda b: [b - 1]), ("gt", lambda b: [b, b - 1]), ("lt", lambda b: [b, b + 1]),
                           ("le", lambda b: [b + 1, 10**400 if "int" in accepted else float("inf")]),
                           ("max_length", lambda n: ["x" * (n + 1)]),
                           ("min_length", lambda n: [""] if n == 1 else []),
                           ("pattern", lambda p: ["has spaces and a / slash"])):
            bound = getattr(rule, attr, None)
            if bound is not None:
                values += past(bound)
    if values and "float" in accepted:
        values.append(float("nan"))
    return values


def load_bases(folder: str | Path) -> list[tuple[str, dict]]:
    """The shipped scenarios (``folder/*.yaml``) as mappings, leaving out those that name a checkpoint,
    which cannot validate offline."""
    bases = []
    for path in sorted(Path(folder).glob("*.yaml")):
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(raw, dict) and not (raw.get("model") or {}).get("name_or_path"):
            bases.append((path.name, raw))
    return bases


def load_studies(folder: str | Path) -> list[tuple[str, dict]]:
    """The shipped studies (``folder/studies/*.yaml``) with a base file inlined, so each stands alone."""
    studies = []
    for path in sorted((Path(folder) / "studies").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(raw.get("base"), str):
            raw["base"] = yaml.safe_load((path.parent / raw["base"]).read_text(encoding="utf-8"))
        studies.append((path.name, raw))
    return studies


def dump(raw: Any) -> bytes:
    """YAML bytes of a mapping, in block style, on lines as long as they need to be."""
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True, width=2**30).encode("utf-8")


def set_path(raw: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested mapping, making (or replacing with) mappings on the way."""
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[leaf] = value


def get_path(raw: dict, dotted: str) -> Any:
    node: Any = raw
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def delete_path(raw: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node = get_path(raw, ".".join(parents)) if parents else raw
    if isinstance(node, dict):
        node.pop(leaf, None)

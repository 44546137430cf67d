"""Safe YAML: a scenario, a study or a ``--set`` value read without trusting its author.

Safe tags only, at most 1 MB, 32 levels of nesting (refused while parsing, before PyYAML's recursive
composer can overflow the stack) and 10,000 nodes once aliases are expanded (billion laughs).
"""

from __future__ import annotations

from typing import Any

import yaml

from raysim.errors import ScenarioError, shown_text


def safe_yaml(text: str, source: str) -> Any:
    """The YAML document ``text`` as Python data, within the limits above; ``source`` names it in errors."""
    if len(text) > 1_000_000:
        raise ScenarioError(f"{source}: scenario file is larger than 1 MB; a scenario is a short YAML file")
    try:
        _check_depth(text, source)
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ScenarioError(f"{source}: YAML syntax error{where}: {problem}; fix the file") from None
    if node is None:
        raise ScenarioError(f"{source}: the scenario is empty; start from scenarios/quickstart.yaml")
    _check_expansion(node, source)
    try:
        return yaml.SafeLoader(text).get_single_data()
    except Exception as err:  # a tag on the wrong scalar (!!int abc) raises ValueError, TypeError or AttributeError
        problem = getattr(err, "problem", None) or f"{type(err).__name__}: {err}"
        raise ScenarioError(f"{source}: YAML could not be read ({shown_text(str(problem))}); fix the file") from None


def _check_depth(text: str, source: str, limit: int = 32) -> None:
    """Refuse deep nesting while parsing, before composing: PyYAML's parser keeps an explicit stack,
    but its composer and constructor recurse once per level and overflow Python's stack near 1,000."""
    loader = yaml.SafeLoader(text)
    depth = 0
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > limit:
                    raise ScenarioError(f"{source}: YAML nested deeper than {limit} levels; "
                                        "a scenario is at most a few levels deep")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    finally:
        loader.dispose()


def _check_expansion(node: yaml.Node, source: str, budget: int = 10_000) -> None:
    """Refuse alias bombs and absurd nesting before constructing Python objects."""
    seen = 0
    stack = [(node, 0)]
    while stack:
        current, depth = stack.pop()
        seen += 1
        if seen > budget:
            raise ScenarioError(f"{source}: the scenario expands to more than {budget} YAML nodes; remove anchor aliases")
        if depth > 32:
            raise ScenarioError(f"{source}: YAML nested deeper than 32 levels; a scenario is at most a few levels deep")
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                stack.append((key, depth + 1))
                stack.append((value, depth + 1))
        elif isinstance(current, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in current.value)

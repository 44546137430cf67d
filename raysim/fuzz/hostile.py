"""YAML built to hurt a loader: nesting thousands of levels deep, and aliases that expand exponentially.

* Deep nesting: a recursive composer or constructor overflows the Python stack long before a file
  reaches 1 MB (``[`` ten thousand times is 20 KB).
* Billion laughs: ``a1: &a1 [*a0, *a0, ...]`` repeated L times with fan-out F is F^L nodes once
  expanded from a file of a few hundred bytes, in list, mapping, merge-key and flow forms.
* Quadratic aliases: a few hundred aliases of one long string stay under any node budget but expand
  to megabytes wherever a loader copies or prints the value, such as an error message that echoes it.
"""

from __future__ import annotations


def deep_nesting(form: str, depth: int) -> str:
    """A document nested ``depth`` levels deep in one of several forms."""
    if form == "flow_list":
        return "[" * depth + "]" * depth
    if form == "flow_map":
        return "{a: " * depth + "1" + "}" * depth
    if form == "block_seq":
        return "- " * depth + "x\n"
    if form == "block_map":
        levels = min(depth, 1_000)  # one-space indentation keeps 1,000 levels under 1 MB
        return "".join(" " * i + "a:\n" for i in range(levels)) + " " * levels + "b: 1\n"
    if form == "in_field":
        return "name: deep\nmodel:\n  hidden: " + deep_nesting("flow_list", depth) + "\n"
    if form == "mixed":
        return "[{a: " * depth + "1" + "}]" * depth
    raise ValueError(f"unknown nesting form {form!r}")


def anchor_bomb(form: str, levels: int, fan: int) -> str:
    """A billion-laughs document expanding to ``fan ** levels`` leaves."""
    def refs(level: int) -> str:
        return ", ".join([f"*a{level - 1}"] * fan)

    if form == "flow_value":  # one line, for --set model.hidden=...
        inner = [f"&a0 [{', '.join(['1'] * fan)}]"] + [f"&a{k} [{refs(k)}]" for k in range(1, levels + 1)]
        return "[" + ", ".join(inner) + "]"
    if form == "flow":
        return "name: bomb\nmodel: {hidden: " + anchor_bomb("flow_value", levels, fan) + "}\n"
    lines = [f"a0: &a0 [{', '.join(['lol'] * fan)}]"]
    for k in range(1, levels + 1):
        if form == "map":
            lines.append(f"a{k}: &a{k} {{{', '.join(f'k{j}: *a{k - 1}' for j in range(fan))}}}")
        elif form == "merge":
            lines.append(f"a{k}: &a{k} {{<<: {{m: *a{k - 1}}}, x: [{refs(k)}]}}")
        else:
            lines.append(f"a{k}: &a{k} [{refs(k)}]")
    if form == "in_field":
        lines.append(f"model:\n  hidden: *a{levels}")
    return "\n".join(lines) + "\n"


def quadratic_aliases(size: int, count: int) -> str:
    """``count`` aliases of one ``size``-character string, placed where a string is expected."""
    return f"x: &s {'x' * size}\nname: [{', '.join(['*s'] * count)}]\n"

"""Client trace files: per-client speed, bandwidth and optional availability intervals from a CSV.

A trace replaces the seeded distributions of the system model with measured values, e.g. from
FedScale's device traces (Lai et al. 2022) reduced to ``client_id,speed,up_bw,down_bw`` plus,
optionally, ``avail_start,avail_end`` intervals. A malformed file is a one-line ScenarioError that
names the file and the line.
"""

from __future__ import annotations

import csv
import math
import os

import numpy as np

from raysim.errors import ScenarioError

_TRACE_REQUIRED = ("client_id", "speed", "up_bw", "down_bw")
_TRACE_INTERVAL = ("avail_start", "avail_end")


class ClientTrace:
    """Per-client speed and bandwidth, and optional availability intervals [start, end), from a CSV.

    Header ``client_id,speed,up_bw,down_bw`` plus, optionally, ``avail_start,avail_end``;
    a client may have several rows, one per availability interval, that agree on speed
    and bandwidth. Intervals of one client must not overlap.
    """

    def __init__(self, path: str, ids: np.ndarray, values: np.ndarray, intervals: np.ndarray | None) -> None:
        order = np.argsort(ids, kind="stable")
        self.path = path
        self.client_ids = ids[order]
        self._values = {name: values[order, k] for k, name in enumerate(_TRACE_REQUIRED[1:])}
        self.has_intervals = intervals is not None
        if intervals is not None:  # rows (client_id, start, end), sorted by client then start
            self._iv_ids = intervals[:, 0].astype(np.int64)
            self._iv_start, self._iv_end = intervals[:, 1], intervals[:, 2]

    def column(self, client_ids: np.ndarray, name: str) -> np.ndarray:
        """``name`` ("speed", "up_bw" or "down_bw") for each client; every client must be listed."""
        pos = np.minimum(np.searchsorted(self.client_ids, client_ids), self.client_ids.size - 1)
        missing = self.client_ids[pos] != client_ids
        if missing.any():
            raise ScenarioError(
                f"system.trace: client {int(client_ids[missing][0])} is not in {self.path} "
                f"({self.client_ids.size} clients listed); give every client of the population a row"
            )
        return self._values[name][pos]

    def windows(self, ids: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(online, next online time, online until) at times ``t`` from the listed intervals."""
        self.column(ids, "speed")  # raises for clients the trace does not list
        first, stop = np.searchsorted(self._iv_ids, ids, "left"), np.searchsorted(self._iv_ids, ids, "right")
        lo, hi = first.copy(), stop.copy()
        while np.any(lo < hi):  # vectorised bisection: lo ends one past the last start <= t
            active = lo < hi
            mid = np.where(active, (lo + hi) // 2, 0)
            right = active & (self._iv_start[mid] <= t)
            lo, hi = np.where(right, mid + 1, lo), np.where(active & ~right, mid, hi)
        last = np.maximum(lo - 1, 0)
        online = (lo > first) & (t < self._iv_end[last])
        upcoming = np.where(lo < stop, self._iv_start[np.minimum(lo, self._iv_ids.size - 1)], np.inf)
        return online, np.where(online, t, upcoming), np.where(online, self._iv_end[last], t)


def _number(text: str, name: str, line: int, fail, *, positive: bool) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if math.isnan(v) or (positive and not (math.isfinite(v) and v > 0)):
        kind = "a positive number" if positive else "a number"
        raise fail(line, f"{name} must be {kind} (got {text!r})")
    return v


def _header(reader, fail) -> tuple[list[str], bool]:
    """The trace's columns, checked, and whether it lists availability intervals."""
    header = [h.strip() for h in next(reader, [])]
    unknown = [h for h in header if h not in _TRACE_REQUIRED + _TRACE_INTERVAL]
    missing = [h for h in _TRACE_REQUIRED if h not in header]
    if unknown or missing or len(set(header)) != len(header):
        raise fail(1, f"header must be {','.join(_TRACE_REQUIRED)}[,{','.join(_TRACE_INTERVAL)}] "
                      f"(got {','.join(header) or 'nothing'})")
    has_iv = _TRACE_INTERVAL[0] in header
    if has_iv != (_TRACE_INTERVAL[1] in header):
        raise fail(1, "give both avail_start and avail_end, or neither")
    return header, has_iv


def _sorted_intervals(intervals: list, lines: list, fail) -> np.ndarray:
    """(client, start, end) rows sorted by client and start; overlapping intervals of a client raise."""
    iv = np.asarray(intervals, dtype=np.float64)
    order = np.lexsort((iv[:, 1], iv[:, 0]))
    iv, iv_lines = iv[order], np.asarray(lines)[order]
    overlap = (iv[1:, 0] == iv[:-1, 0]) & (iv[1:, 1] < iv[:-1, 2])
    if overlap.any():
        k = int(np.flatnonzero(overlap)[0]) + 1
        raise fail(int(iv_lines[k]), f"client {int(iv[k, 0])}'s interval overlaps the one on line {iv_lines[k - 1]}")
    return iv


def load_trace(path: str | os.PathLike[str]) -> ClientTrace:
    """Parse a client trace CSV; a malformed one raises ScenarioError naming the file and line."""

    def fail(line: int, message: str) -> ScenarioError:
        return ScenarioError(f"system.trace: {path}, line {line}: {message}")

    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise ScenarioError(f"system.trace: cannot read {path} ({e.strerror}); check the path") from None
    with f:
        reader = csv.reader(f)
        header, has_iv = _header(reader, fail)
        col = {name: header.index(name) for name in header}
        first_row: dict[int, tuple[int, tuple[float, float, float]]] = {}
        ids, values, intervals, lines = [], [], [], []
        for fields in reader:
            line = reader.line_num
            if not any(x.strip() for x in fields):
                continue
            if len(fields) != len(header):
                raise fail(line, f"expected {len(header)} fields, got {len(fields)}")
            text = fields[col["client_id"]].strip()
            if not (text.isascii() and text.isdigit()):
                raise fail(line, f"client_id must be an integer >= 0 (got {text!r})")
            cid = int(text)
            row = tuple(_number(fields[col[n]].strip(), n, line, fail, positive=True) for n in _TRACE_REQUIRED[1:])
            if cid in first_row:
                seen_line, seen = first_row[cid]
                if not has_iv:
                    raise fail(line, f"client {cid} already has a row (line {seen_line}); "
                                     "repeat a client only to list several availability intervals")
                if row != seen:
                    raise fail(line, f"client {cid} has speed/bandwidth {row} here but {seen} on line {seen_line}")
            else:
                first_row[cid] = (line, row)
                ids.append(cid)
                values.append(row)
            if has_iv:
                start = _number(fields[col["avail_start"]].strip(), "avail_start", line, fail, positive=False)
                end = _number(fields[col["avail_end"]].strip(), "avail_end", line, fail, positive=False)
                if not (math.isfinite(start) and end > start):
                    raise fail(line, f"need a finite avail_start before avail_end (got {start}, {end})")
                intervals.append((cid, start, end))
                lines.append(line)
    if not ids:
        raise fail(2, "the trace lists no clients")
    iv = _sorted_intervals(intervals, lines, fail) if has_iv else None
    return ClientTrace(path, np.asarray(ids, dtype=np.int64), np.asarray(values, dtype=np.float64), iv)

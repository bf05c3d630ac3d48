"""Medians over runs, ratios, and the one table the benchmark prints."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    unit: str
    path: tuple[str, ...]  # into one run's result for one MTA
    better: str  # "higher" | "lower" | ""
    target: float | None = None  # on relayd/Postfix, from the issue
    digits: int = 1


def rows(idle: int) -> list[Row]:
    return [
        Row("accept_2k", "accept 2 KB (held), new conn/msg", "msg/s",
            ("accept", "accept_2k", "rate"), "higher", 1.2, 0),
        Row("accept_100k", "accept 100 KB (held), new conn/msg", "msg/s",
            ("accept", "accept_100k", "rate"), "higher", 1.2, 0),
        Row("relay_2k", "relay 2 KB to smtp-sink, new conn/msg", "msg/s",
            ("relay", "relay_2k", "rate"), "higher", 1.2, 0),
        Row("relay_100k", "relay 100 KB to smtp-sink, new conn/msg", "msg/s",
            ("relay", "relay_100k", "rate"), "higher", None, 0),
        Row("p50", "end-of-DATA p50, new conn/msg", "ms", ("accept", "latency", "p50_ms"),
            "lower", None, 2),
        Row("p99", "end-of-DATA p99, new conn/msg", "ms", ("accept", "latency", "p99_ms"),
            "lower", 1.0, 2),
        Row("cpu_accept_2k", "CPU/msg accept 2 KB, new conn/msg", "ms",
            ("accept", "accept_2k", "cpu_ms_per_msg"), "lower", None, 2),
        Row("cpu_accept_100k", "CPU/msg accept 100 KB, new conn/msg", "ms",
            ("accept", "accept_100k", "cpu_ms_per_msg"), "lower", None, 2),
        Row("cpu_relay_2k", "CPU/msg relay 2 KB, new conn/msg", "ms",
            ("relay", "relay_2k", "cpu_ms_per_msg"), "lower", None, 2),
        Row("accept_2k_keep", "accept 2 KB (held), kept sessions", "msg/s",
            ("accept", "accept_2k_keep", "rate"), "higher", None, 0),
        Row("relay_2k_keep", "relay 2 KB to smtp-sink, kept sessions", "msg/s",
            ("relay", "relay_2k_keep", "rate"), "higher", None, 0),
        Row("p50_keep", "end-of-DATA p50, kept sessions", "ms",
            ("accept", "latency_keep", "p50_ms"), "lower", None, 2),
        Row("p99_keep", "end-of-DATA p99, kept sessions", "ms",
            ("accept", "latency_keep", "p99_ms"), "lower", None, 2),
        Row("cpu_accept_2k_keep", "CPU/msg accept 2 KB, kept sessions", "ms",
            ("accept", "accept_2k_keep", "cpu_ms_per_msg"), "lower", None, 2),
        Row("cpu_relay_2k_keep", "CPU/msg relay 2 KB, kept sessions", "ms",
            ("relay", "relay_2k_keep", "cpu_ms_per_msg"), "lower", None, 2),
        Row("rss_rest", "RSS at rest", "MB", ("idle", "memory_at_rest", "rss_mb"), "lower"),
        Row("rss_idle", f"RSS, {idle} idle sessions", "MB", ("idle", "memory", "rss_mb"),
            "lower", 1.0),
        Row("pss_idle", f"PSS, {idle} idle sessions", "MB", ("idle", "memory", "pss_mb"),
            "lower"),
        Row("procs_idle", f"processes, {idle} idle", "", ("idle", "memory", "processes"),
            "lower", None, 0),
        Row("established", "idle sessions established", "", ("idle", "established"),
            "higher", None, 0),
        Row("open_idle", f"seconds to open {idle} sessions", "s", ("idle", "seconds_to_open"),
            "lower", None, 2),
        Row("greeting", f"new client greeting, {idle} idle", "ms",
            ("idle", "greeting_ms_median"), "lower", None, 2),
    ]  # fmt: skip


def _get(result: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = result
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _ok(result: dict[str, Any], path: tuple[str, ...]) -> bool:
    """False when the block behind a figure reported a problem (a message not queued, ...)."""
    block = _get(result, path[:2]) if len(path) > 2 else _get(result, path[:1])
    return not (isinstance(block, dict) and (block.get("ok") is False or "error" in block))


def _capped(result: dict[str, Any], path: tuple[str, ...]) -> bool:
    block = _get(result, path[:2]) if len(path) > 2 else None
    return isinstance(block, dict) and bool(block.get("capped"))


def summarize(runs: list[dict[str, Any]], kinds: tuple[str, ...], idle: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for row in rows(idle):
        entry: dict[str, Any] = {"label": row.label, "unit": row.unit, "better": row.better}
        for kind in kinds:
            values = [_get(r.get(kind, {}), row.path) for r in runs]
            nums = [float(v) for v in values if isinstance(v, int | float) and not math.isnan(v)]
            entry[kind] = statistics.median(nums) if nums else None
            entry[f"{kind}_runs"] = values
            entry[f"{kind}_ok"] = all(_ok(r.get(kind, {}), row.path) for r in runs)
            entry[f"{kind}_capped"] = any(_capped(r.get(kind, {}), row.path) for r in runs)
        a, b = entry.get("relayd"), entry.get("postfix")
        entry["ratio"] = a / b if a is not None and b not in (None, 0) else None
        entry["target"] = row.target
        if row.target is not None and entry["ratio"] is not None:
            ratio = entry["ratio"]
            entry["met"] = ratio >= row.target if row.better == "higher" else ratio <= row.target
        out[row.key] = entry
    return out


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return f"{value:,.{digits}f}"


def table(summary: dict[str, Any], idle: int, runs: int) -> str:
    head = ("figure", "unit", "relayd", "Postfix", "relayd/Postfix", "target")
    lines = []
    for row in rows(idle):
        e = summary[row.key]
        flag = {
            k: ("~" if e.get(f"{k}_capped") else "") + ("" if e.get(f"{k}_ok", True) else " !")
            for k in ("relayd", "postfix")
        }
        ratio = "n/a" if e["ratio"] is None else f"{e['ratio']:.2f}"
        if row.target is None:
            target = ""
        else:
            sign = ">=" if row.better == "higher" else "<="
            met = e.get("met")
            target = f"{sign} {row.target:g}" + (
                "" if met is None else (" met" if met else " not met")
            )
        lines.append(
            (
                row.label,
                row.unit,
                _fmt(e.get("relayd"), row.digits) + flag["relayd"],
                _fmt(e.get("postfix"), row.digits) + flag["postfix"],
                ratio,
                target,
            )
        )
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]

    def fmt(cols: tuple[str, ...]) -> str:
        cells = [
            str(c).ljust(w) if i < 2 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cols, widths, strict=True))
        ]
        return "| " + " | ".join(cells) + " |"

    sep = (
        "|"
        + "|".join(("-" * (w + 1) + ":" if i >= 2 else "-" * (w + 2)) for i, w in enumerate(widths))
        + "|"
    )
    out = [
        f"Medians of {runs} run(s). '~': the load reached its time cap before its count "
        "(rate over what was sent); '!': a run reported a problem (see the JSON)."
    ]
    out += [fmt(head), sep, *(fmt(line) for line in lines)]
    return "\n".join(out)

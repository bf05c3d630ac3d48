"""``python -m bench.whatif VARIANT ...``: relayd with and without one change, alternated.

Each variant is ``base`` or patches from bench.whatif_launch joined by ``+``
(``uvloop+sched``), or ``p2`` for ``[server] processes = 2``. Every variant
runs, per repetition and in alternating order: accept 3,000 x 2 KB and
800 x 100 KB (next hop down), 1,500 latency messages, and 2,000 x 2 KB
relayed to an smtp-sink; all to their full count. Medians are printed and
the rows written to bench-results/whatif-<UTC time>.json.

uvloop is never installed into the project's environment: give
``--uvloop-path DIR`` after ``pip install --target DIR uvloop``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from support.ports import free_port

from bench import procs
from bench.load import Sink
from bench.mta import Relayd
from bench.scenarios import LARGE, SMALL, Plan, _accept, _latency, _relay

REPO = Path(__file__).resolve().parents[2]


def _one(variant: str, root: Path, rep: int, uvloop_path: str | None) -> dict[str, Any]:
    parts = variant.split("+")
    patches = [p for p in parts if p not in ("base", "p2")]
    # relayd runs in its own directory: the launcher's package by absolute path.
    path = [str(Path(__file__).resolve().parents[1])]
    if "uvloop" in patches:
        if not uvloop_path:
            raise SystemExit("whatif: the uvloop variant needs --uvloop-path")
        path.insert(0, str(Path(uvloop_path).resolve()))
    env = {"WHATIF": ",".join(patches), "PYTHONPATH": os.pathsep.join(path)}
    processes = "2" if "p2" in parts else None
    command = [sys.executable, "-m", "bench.whatif_launch"]
    plan = Plan(latency=1500, latency_cap=None, settle_limit=3.0, drain_limit=30.0)
    out: dict[str, Any] = {}
    mta = Relayd(root / "accept", free_port(), command=command, env=env, processes=processes)
    try:
        mta.start()
        out["accept_2k"] = _accept(mta, SMALL, 3000, 20, None, 3.0)
        out["accept_100k"] = _accept(mta, LARGE, 800, 20, None, 3.0)
        out["latency"] = _latency(mta, plan, f"w{rep}")
    finally:
        mta.stop()
    if "hold" not in patches:  # held mail is never delivered
        sink_port = free_port()
        mta = Relayd(root / "relay", sink_port, command=command, env=env, processes=processes)
        try:
            mta.start()
            out["relay_2k"] = _relay(mta, Sink(2000, sink_port), SMALL, 2000, 20, None, plan)
        finally:
            mta.stop()
    shutil.rmtree(root, ignore_errors=True)
    return {
        "accept_2k": out["accept_2k"]["rate"],
        "accept_2k_cpu_ms": out["accept_2k"]["cpu_ms_per_msg"],
        "accept_100k": out["accept_100k"]["rate"],
        "accept_100k_cpu_ms": out["accept_100k"]["cpu_ms_per_msg"],
        "p50_ms": out["latency"]["p50_ms"],
        "p99_ms": out["latency"]["p99_ms"],
        "latency_rate": out["latency"]["rate"],
        "relay_2k": out.get("relay_2k", {}).get("rate"),
        "relay_2k_cpu_ms": out.get("relay_2k", {}).get("cpu_ms_per_msg"),
    }


def _medians(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k, v in rows[0].items() if v is not None]
    return {k: statistics.median(r[k] for r in rows) for k in keys}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.whatif", description=__doc__.split("\n\n")[0])
    p.add_argument("variants", nargs="+", help="base, p2, or patches joined by +")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--uvloop-path", help="a directory holding uvloop (pip install --target)")
    p.add_argument("--results", type=Path, default=REPO / "bench-results")
    args = p.parse_args(argv)
    procs.become_subreaper()
    procs.raise_nofile(65536)
    work = Path(tempfile.mkdtemp(prefix="relayd-whatif-"))
    rows: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    try:
        for rep in range(args.reps):
            order = args.variants if rep % 2 == 0 else list(reversed(args.variants))
            for variant in order:
                row = _one(variant, work / f"{variant}-{rep}", rep, args.uvloop_path)
                rows[variant].append(row)
                print(variant, rep, json.dumps(row), flush=True)
    finally:
        procs.kill_pids([x for x in procs.tree(os.getpid()) if x != os.getpid()])
        procs.reap_orphans()
        shutil.rmtree(work, ignore_errors=True)
    medians = {v: _medians(rs) for v, rs in rows.items() if rs}
    for v, m in medians.items():
        print(v, {k: round(x, 2) for k, x in m.items()})
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (args.results / f"whatif-{stamp}.json").write_text(
        json.dumps({"rows": rows, "medians": medians}, indent=2) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

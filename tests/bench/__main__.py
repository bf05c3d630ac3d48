"""``python -m bench``: relayd and Postfix, same machine, same run, one table.

Run from the repository root with ``tests`` on the module path::

    PYTHONPATH=tests .venv/bin/python -m bench            # 3 runs, < 5 minutes
    PYTHONPATH=tests .venv/bin/python -m bench --quick    # small counts, 1 run

Each run measures every block for both MTAs back to back, the order
alternating from one run to the next; the table shows medians. The raw
results go to ``bench-results/bench-<UTC time>.json`` (and ``latest.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import extra, machine, mta, procs, report, scenarios
from bench.scenarios import Plan

REPO = Path(__file__).resolve().parents[2]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small counts, one run (development)")
    p.add_argument("--runs", type=int, help="runs to take medians over (default 3; quick: 1)")
    p.add_argument(
        "--exact",
        action="store_true",
        help="no time caps: every load runs to its full count (takes much longer)",
    )
    p.add_argument(
        "--results",
        type=Path,
        default=REPO / "bench-results",
        help="where the JSON goes (default: bench-results/)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="parent of the temporary spools and queues (default: $TMPDIR)",
    )
    p.add_argument("--relayd-only", action="store_true", help="skip Postfix (no ratios)")
    p.add_argument(
        "--relayd-processes",
        metavar="N",
        help="relayd's [server] processes (\"auto\" or a number; default: relayd's default)",
    )
    p.add_argument("--no-durability", action="store_true", help="skip the SIGKILL test")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also sample relayd with py-spy under the 2 KB accept load",
    )
    p.add_argument(
        "--only",
        choices=("accept", "relay", "idle", "api", "cluster"),
        action="append",
        help="run only these blocks (repeatable)",
    )
    return p.parse_args(argv)


def _say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _block(name: str, kind: str, func: Any, *args: Any, **kw: Any) -> dict[str, Any]:
    start = time.monotonic()
    try:
        result: dict[str, Any] = func(*args, **kw)
    except (Exception, SystemExit) as e:  # one failed block must not lose the others
        result = {"error": f"{type(e).__name__}: {e}"}
        _say(f"  {name} {kind}: FAILED {result['error'][:300]}")
    result["block_seconds"] = round(time.monotonic() - start, 1)
    _say(f"  {name:6} {kind:7} {result['block_seconds']:6.1f}s  {_brief(name, result)}")
    return result


def _brief(name: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return ""
    if name == "accept":
        return (
            f"2k {r['accept_2k']['rate']:.0f}/s "
            f"({r['accept_2k']['cpu_ms_per_msg']:.2f} ms CPU), "
            f"100k {r['accept_100k']['rate']:.0f}/s, "
            f"2k kept {r['accept_2k_keep']['rate']:.0f}/s "
            f"({r['accept_2k_keep']['cpu_ms_per_msg']:.2f} ms CPU), "
            f"p50 {r['latency']['p50_ms']:.1f} ms p99 {r['latency']['p99_ms']:.1f} ms"
        )
    if name == "relay":
        return ", ".join(
            f"{k} {v['rate']:.0f}/s ({v['cpu_ms_per_msg']:.2f} ms CPU)"
            for k, v in r.items()
            if isinstance(v, dict)
        )
    if name == "api":
        return f"{r['rate']:.0f}/s ({r['cpu_ms_per_msg']:.2f} ms CPU)"
    if name == "cluster":
        return ", ".join(f"{k} {v['rate']:.0f}/s" for k, v in r.items() if isinstance(v, dict))
    if name == "idle":
        return (
            f"{r['established']}/{r['sessions_wanted']} sessions, "
            f"RSS {r['memory']['rss_mb']:.0f} MB, greeting {r['greeting_ms']} ms"
        )
    return ""


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    plan = Plan.quick() if args.quick else Plan()
    if args.exact:
        plan = plan.uncapped()
    if args.runs:
        plan = replace(plan, runs=args.runs)
    kinds = ("relayd",) if args.relayd_only else scenarios.KINDS
    scenarios.RELAYD_PROCESSES = args.relayd_processes
    blocks = tuple(args.only or ("accept", "relay", "idle", "api", "cluster"))
    smtp_blocks = tuple(b for b in blocks if b in ("accept", "relay", "idle"))

    signal.signal(signal.SIGTERM, _interrupt)
    procs.become_subreaper()
    nofile = procs.raise_nofile(max(65536, plan.idle * 4))
    if "postfix" in kinds:
        if os.geteuid() != 0:
            raise SystemExit("bench: the private Postfix instance needs root (or --relayd-only)")
        mta.ensure_postfix(_say)

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="relayd-bench-", dir=args.workdir))
    workdir.chmod(0o755)  # the postfix user must reach its queue below
    results: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["bench", *(argv if argv is not None else sys.argv[1:])]),
        "plan": scenarios.as_dict(plan),
        "relayd_processes": args.relayd_processes or "default",
        "open_files_limit": nofile,
        "runs": [],
    }
    try:
        _say("machine: measuring the disk ...")
        results["machine"] = machine.describe(workdir)
        d = results["machine"]["disk"]
        _say(
            f"machine: {results['machine']['cpus']} cpus, {results['machine']['memory_mb']} MB, "
            f"{d['fstype']} fdatasync {d['fdatasync_4k_median_ms']} ms, "
            f"{d['seq_write_mb_s']} MB/s"
        )
        for run in range(plan.runs):
            order = kinds if run % 2 == 0 else tuple(reversed(kinds))
            _say(f"run {run + 1}/{plan.runs} (order: {', '.join(order)})")
            one: dict[str, Any] = {"order": list(order), **{k: {} for k in kinds}}
            for name in smtp_blocks:
                for kind in order:
                    root = workdir / f"run{run}-{name}-{kind}"
                    if name == "accept":
                        one[kind][name] = _block(name, kind, scenarios.accept_block,
                                                 kind, root, plan, run)  # fmt: skip
                    elif name == "relay":
                        one[kind][name] = _block(name, kind, scenarios.relay_block,
                                                 kind, root, plan)  # fmt: skip
                    else:
                        one[kind][name] = _block(name, kind, scenarios.idle_block,
                                                 kind, root, plan)  # fmt: skip
                    procs.reap_orphans()
            results["runs"].append(one)
        if "postfix" in kinds and "idle" in blocks and plan.postfix_default_limit:
            _say("Postfix at its default process limit (100)")
            results["postfix_default_limit_idle"] = _block(
                "idle", "postfix", scenarios.idle_block, "postfix",
                workdir / "postfix-default", plan, smtpd_maxproc=None, probes=1,
                parallel=plan.idle, handshake_timeout=3.0, greeting_timeout=3.0,
            )  # fmt: skip
        # relayd only, once: the HTTP API beside SMTP, and nodes behind a balancer.
        count = 300 if args.quick else 2000
        if "api" in blocks:
            _say("api: POST /v1/messages, 20 clients, delivery paused")
            results["api"] = _block("api", "relayd", extra.api_block, workdir / "api", count)
        if "cluster" in blocks:
            _say("cluster: HAProxy (send-proxy-v2) in front of 1, 2 and 3 nodes sharing Redis")
            results["cluster"] = _block(
                "cluster", "relayd", extra.cluster_block, workdir / "cluster", count
            )
        if not args.no_durability:
            _say("durability: SIGKILL relayd halfway through a load")
            results["durability"] = _block(
                "durab.", "relayd", scenarios.durability, workdir / "durability", plan
            )
        if args.profile:
            from bench import profile

            _say("profile: py-spy on relayd under the 2 KB accept load")
            results["profile"] = _block(
                "prof.", "relayd", profile.profile_accept, workdir / "profile", plan,
                args.results,
            )  # fmt: skip
    except KeyboardInterrupt:
        _say("interrupted: stopping everything")
        results["interrupted"] = True
    finally:
        _cleanup(workdir)
    results["seconds"] = round(time.monotonic() - started, 1)
    results["machine"] = results.get("machine", {}) | {"loadavg_end": os.getloadavg()}
    results["summary"] = report.summarize(results["runs"], kinds, plan.idle)
    _write(args.results, results)
    print(render(results, plan))
    return 1 if results.get("interrupted") else 0


def render(results: dict[str, Any], plan: Plan) -> str:
    out = [report.table(results["summary"], plan.idle, len(results["runs"]))]
    default = results.get("postfix_default_limit_idle")
    if default and "error" not in default:
        wait = default["greeting_ms"][0]
        out.append(
            f"Postfix at its default smtpd process limit (100): "
            f"{default['established']} of {default['sessions_wanted']} idle sessions got a "
            f"greeting, RSS {default['memory']['rss_mb']:.0f} MB; a new client "
            + (f"was greeted after {wait:.0f} ms" if wait is not None
               else f"got no greeting within {default['greeting_timeout_s']:g} s")
            + "."
        )  # fmt: skip
    api = results.get("api")
    if api and "error" not in api:
        out.append(
            f"HTTP API (relayd): {api['rate']:.0f} msg/s accepted over 20 kept connections, "
            f"{api['cpu_ms_per_msg']:.2f} ms CPU per message (compare accept 2 KB above)."
        )
    nodes = results.get("cluster")
    if nodes and "error" not in nodes:
        out.append(
            "Behind HAProxy, new connection per message: "
            + ", ".join(
                f"{k.replace('_', ' ')} {v['rate']:.0f} msg/s ({v['cpu_ms_per_msg']:.2f} ms CPU)"
                for k, v in nodes.items()
                if isinstance(v, dict)  # the block's own figures (its seconds) are not nodes
            )
            + " (all nodes share this machine's cores)."
        )
    dur = results.get("durability")
    if dur and "error" not in dur:
        out.append(
            f"Durability: relayd SIGKILLed after {dur.get('killed_after_acks')} of "
            f"{dur['messages']} messages were answered 250, restarted in "
            f"{dur.get('restart_seconds')} s: {dur['acked']} answered 250, "
            f"lost {dur['lost']}, duplicates {dur['duplicates']} "
            f"({dur['unanswered_then_resent']} unanswered at the kill, resent)."
        )
    elif dur:
        out.append(f"Durability: FAILED {dur['error']}")
    out.append(f"Total {results['seconds']:.0f} s; raw results: {results.get('file', '?')}")
    load = results.get("machine", {})
    if load.get("loadavg_start"):
        out.append(
            f"Load average at start {load['loadavg_start'][0]:.2f}, at end "
            f"{load['loadavg_end'][0]:.2f} on {load.get('cpus')} CPUs (other work skews results)."
        )
    return "\n".join(out)


def _write(directory: Path, results: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = directory / f"bench-{stamp}.json"
    try:
        results["file"] = str(path.relative_to(Path.cwd()))
    except ValueError:
        results["file"] = str(path)
    text = json.dumps(results, indent=2, default=str)
    path.write_text(text + "\n")
    (directory / "latest.json").write_text(text + "\n")


def _cleanup(workdir: Path) -> None:
    """Stop every process still below us (we are their subreaper), remove the work dir."""
    import shutil

    me = os.getpid()
    left = [p for p in procs.tree(me) if p != me]
    if left:
        procs.kill_pids(left, signal.SIGTERM)
        if not procs.wait_gone(left, 5):
            procs.kill_pids(left)
            procs.wait_gone(left, 5)
    procs.reap_orphans()
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""The Grafana dashboard and Prometheus rules in contrib/ stay true to relayd's metrics.

Every PromQL expression in them may name only metrics relayd exports (read
from a real scrape of :class:`relayd.metrics.Metrics`) and Prometheus's own
``up``. Where promtool is installed (Debian's ``prometheus`` package; CI
installs it), it checks the rules, runs their unit tests, and parses every
dashboard query as well.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from relayd.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "contrib" / "prometheus" / "relayd-rules.yml"
RULE_TESTS = ROOT / "contrib" / "prometheus" / "relayd-rules.test.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "relayd.json"
PROMETHEUS_OWN = {"up"}

_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan",
}  # fmt: skip
_LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def exported() -> set[str]:
    """Every series name a scrape of relayd can hold (histograms with their suffixes)."""
    names: set[str] = set()
    for line in Metrics().render().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels and keywords left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: label values, templates
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = _LABEL_LISTS.sub("", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[match.end() :].lstrip()
        word = match.group()
        before = text[match.start() - 1] if match.start() else ""
        if rest.startswith("(") or word.lower() in _KEYWORDS or before.isdigit():
            continue  # a function, a keyword, or a duration/number suffix such as 5m
        names.add(word)
    return names


def test_metric_names_are_found_in_promql() -> None:
    expr = (
        'sum by (instance) (rate(relayd_deliveries_total{status="deferred"}[15m])) '
        "/ on (instance) group_left sum(relayd_queue_messages) > 4 * 3600 and up == 0"
    )
    assert metric_names(expr) == {"relayd_deliveries_total", "relayd_queue_messages", "up"}


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_rules_name_only_metrics_relayd_exports() -> None:
    known = exported() | PROMETHEUS_OWN
    found = rules()
    assert len(found) >= 8
    for rule in found:
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= known, (rule["alert"], names - known)


def test_rules_are_alerts_with_a_severity_and_a_summary() -> None:
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names))
    for rule in rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_rules_cover_what_operators_watch() -> None:
    used = set().union(*(metric_names(rule["expr"]) for rule in rules()))
    assert {
        "relayd_queue_messages",
        "relayd_queue_oldest_message_age_seconds",
        "relayd_deliveries_total",
        "relayd_outbound_tls_policy_total",
        "relayd_messages_rejected_total",
    } <= used


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every dashboard query, the variable's included."""
    data = dashboard()
    found = [
        (panel["title"], target["expr"])
        for panel in data["panels"]
        for target in panel.get("targets", [])
    ]
    for variable in data["templating"]["list"]:
        found.append((variable["name"], variable["definition"]))
    return found


def test_dashboard_is_importable() -> None:
    data = dashboard()
    assert data["uid"] == "relayd" and data["title"] == "relayd"
    assert [i["name"] for i in data["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [panel["id"] for panel in data["panels"]]
    assert len(ids) == len(set(ids))
    for panel in data["panels"]:
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
            assert panel["targets"], panel["title"]


def test_dashboard_names_only_metrics_relayd_exports() -> None:
    known = exported()
    used: set[str] = set()
    for title, expr in queries():
        names = metric_names(re.sub(r"label_values\(([^,]+),[^)]*\)", r"\1", expr))
        assert names <= known, (title, names - known)
        used |= names
    # what an operator looks at has a panel
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    assert families >= {
        "relayd_up",
        "relayd_start_time_seconds",
        "relayd_queue_messages",
        "relayd_queue_oldest_message_age_seconds",
        "relayd_messages_accepted_total",
        "relayd_messages_rejected_total",
        "relayd_deliveries_total",
        "relayd_delivery_duration_seconds",
        "relayd_tls_connections_total",
        "relayd_outbound_tls_policy_total",
    }


# ---- promtool ------------------------------------------------------------------------


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return found


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_checks_the_rules() -> None:
    out = run_promtool("check", "rules", RULES.name, cwd=RULES.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_runs_the_rule_unit_tests() -> None:
    out = run_promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    recorded = [
        {"record": f"dashboard:query{i}", "expr": expr.replace("$instance", ".*")}
        for i, (_, expr) in enumerate(queries())
        if not expr.startswith("label_values(")
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}))
    out = run_promtool("check", "rules", path.name, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr

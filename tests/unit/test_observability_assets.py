"""The Grafana dashboard and the alert rules refer only to metrics that exist."""

import json
import re
from pathlib import Path

import pytest
import yaml

from finetune_operator.metrics import Metrics

pytestmark = pytest.mark.unit
CHART = Path(__file__).resolve().parents[2] / "charts" / "finetune-operator"
# Prometheus' own per-target series; kube-state-metrics families may be added here by name.
EXTERNAL = {"up"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "le", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric identifiers in a PromQL expression: strip strings, label matchers, ranges and grouping."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\$\{?\w+\}?", "", e)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        following = e[m.end():].lstrip()
        if following.startswith("(") or m.group() in KEYWORDS:
            continue
        if re.fullmatch(r"\d[\d.e+-]*", m.group()):
            continue
        names.add(m.group())
    return names


def dashboard_exprs() -> list[str]:
    dash = json.loads((CHART / "dashboards" / "finetune-operator.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"].removeprefix("label_values(").rsplit(",", 1)[0]
              for v in dash["templating"]["list"] if v.get("type") == "query"]
    return exprs


def rule_exprs() -> list[str]:
    doc = yaml.safe_load((CHART / "rules" / "finetune-operator.rules.yaml").read_text())
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_expression_uses_exported_metrics(source):
    exported = Metrics().metric_names() | EXTERNAL
    exprs = dashboard_exprs() if source == "dashboard" else rule_exprs()
    assert exprs
    for expr in exprs:
        unknown = metric_names(expr) - exported
        assert not unknown, f"{expr!r} refers to {unknown}"


def test_the_parser_catches_a_made_up_metric():
    assert metric_names('sum by (phase) (rate(finetune_bogus_total{x="y"}[5m]))') == {"finetune_bogus_total"}
    assert metric_names("histogram_quantile(0.9, sum by (le) (rate(a_bucket[5m])))") == {"a_bucket"}


def test_dashboard_has_namespace_and_job_variables_and_the_required_panels():
    dash = json.loads((CHART / "dashboards" / "finetune-operator.json").read_text())
    assert {v["name"] for v in dash["templating"]["list"]} >= {"namespace", "job"}
    titles = " | ".join(p["title"] for p in dash["panels"])
    for needed in ("by phase", "Progress", "ETA", "loss", "accuracy", "Failures by reason", "Operator up"):
        assert needed in titles


def test_alerts_cover_failed_stalled_down_and_rejected_pushes():
    doc = yaml.safe_load((CHART / "rules" / "finetune-operator.rules.yaml").read_text())
    alerts = {r["alert"] for g in doc["groups"] for r in g["rules"]}
    assert {"FineTuneJobFailed", "FineTuneJobStalled", "FineTuneOperatorDown",
            "FineTuneProgressPushesRejected"} <= alerts


def test_sweeps_have_a_dashboard_row_and_an_alert_and_pruned_trials_do_not_page():
    dash = json.loads((CHART / "dashboards" / "finetune-operator.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    assert any(p["type"] == "row" and "sweep" in p["title"].lower() for p in dash["panels"])
    assert "finetune_sweep_trials" in exprs and "finetune_sweep_best_metric" in exprs
    doc = yaml.safe_load((CHART / "rules" / "finetune-operator.rules.yaml").read_text())
    rules = {r["alert"]: r["expr"] for g in doc["groups"] for r in g["rules"]}
    assert "finetune_sweep_phase_transitions_total" in rules["FineTuneSweepFailed"]
    assert 'reason!~"Pruned|Stopped"' in rules["FineTuneJobFailed"]

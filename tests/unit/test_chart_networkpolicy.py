"""The chart's NetworkPolicies: the operator's HTTP port admits trainers and the Prometheus namespace only;
trainer pods send to that port, DNS and each other only. Selectors are checked against the labels the
operator really puts on trainer pods (naming.common_labels) and on its own pod (the Deployment)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import test_chart
from test_chart import NAMESPACE, deployment, of_kind, render

from finetune_operator.naming import common_labels
from finetune_operator.parsed import FineTuneJob
from finetune_operator.serving import LABEL_SMOKE

pytestmark = pytest.mark.unit

TRAINER_LABELS = common_labels(FineTuneJob.from_body({
    "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
    "metadata": {"name": "demo", "namespace": "team-a", "uid": "uid-1", "generation": 1},
    "spec": {"dataset": {"builtin": "digits"}}}))
SMOKE_TEST_LABELS = {"app.kubernetes.io/name": "finetune-smoke-test", LABEL_SMOKE: "uid-1"}


@pytest.fixture(scope="module")
def helm_bin() -> str:
    """helm from hack/tools.sh, as test_chart.py gets it: skipped without it, a failure under CI=true."""
    path = test_chart.helm_binary()
    if path is None:
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)("helm could not be built (hack/tools.sh helm)")
    return path


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector's meaning (matchLabels and the In/NotIn/Exists/DoesNotExist expressions)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def policies(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(p["metadata"]["namespace"], p["metadata"]["name"]): p["spec"] for p in of_kind(docs, "NetworkPolicy")}


def ns_labels(name: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name}


def admitted(rules: list[dict], namespace: str, labels: dict[str, str], port: int) -> bool:
    """Would an ingress (from) / egress (to) rule list let a pod with `labels` in `namespace` through on `port`?"""
    for rule in rules:
        peers = rule.get("from", rule.get("to"))
        ports = [p["port"] for p in rule.get("ports") or []]
        if ports and port not in ports:
            continue
        if peers is None:  # no peers listed: every source or destination
            return True
        for peer in peers:
            ns_ok = selects(peer["namespaceSelector"], ns_labels(namespace)) if "namespaceSelector" in peer else (
                namespace == NAMESPACE)
            if ns_ok and selects(peer.get("podSelector") or {}, labels) and "ipBlock" not in peer:
                return True
    return False


def test_on_by_default_the_operator_port_admits_trainers_and_prometheus_only(helm_bin: str) -> None:
    docs = render(helm_bin)
    dep = deployment(docs)
    operator_labels = dep["spec"]["template"]["metadata"]["labels"]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    http = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
    health = next(p["containerPort"] for p in container["ports"] if p["name"] == "health")
    pols = policies(docs)
    operator = next(p for p in pols.values() if selects(p["podSelector"], operator_labels))
    assert operator["policyTypes"] == ["Ingress"]
    rules = operator["ingress"]
    assert all(r.get("from") and r.get("ports") for r in rules), "a rule without peers or ports admits everyone"
    assert admitted(rules, "team-a", TRAINER_LABELS, http), "trainers (any namespace, cluster-wide) push progress"
    assert admitted(rules, "monitoring", {"app": "prometheus"}, http), "Prometheus scrapes /metrics"
    assert not admitted(rules, "team-a", {"app": "anything-else"}, http)
    assert not admitted(rules, "team-a", TRAINER_LABELS, health)
    assert not admitted(rules, "team-a", SMOKE_TEST_LABELS, http)


def test_trainer_pods_may_send_to_the_operator_port_dns_and_each_other_only(helm_bin: str) -> None:
    docs = render(helm_bin)
    dep = deployment(docs)
    operator_labels = dep["spec"]["template"]["metadata"]["labels"]
    pols = policies(docs)
    trainer = pols[(NAMESPACE, "ft-finetune-operator-trainer")]
    assert selects(trainer["podSelector"], TRAINER_LABELS)
    assert not selects(trainer["podSelector"], SMOKE_TEST_LABELS), "smoke tests reach the InferenceService"
    assert not selects(trainer["podSelector"], operator_labels)
    assert trainer["policyTypes"] == ["Egress"]
    rules = trainer["egress"]
    assert admitted(rules, NAMESPACE, operator_labels, 8081)
    assert not admitted(rules, NAMESPACE, operator_labels, 8080), "the health port is not the progress port"
    assert admitted(rules, "kube-system", {"k8s-app": "kube-dns"}, 53)
    assert admitted(rules, NAMESPACE, TRAINER_LABELS, 29500), "workers of a multi-worker job rendezvous"
    assert not admitted(rules, "kube-system", {"component": "kube-apiserver"}, 443)
    assert not admitted(rules, NAMESPACE, {"app": "database"}, 5432)
    assert not any("ipBlock" in peer for r in rules for peer in r.get("to") or []), "no address range by default"


def test_the_prometheus_namespace_is_a_value_and_empty_closes_metrics(helm_bin: str) -> None:
    pols = policies(render(helm_bin, None, "networkPolicy.prometheusNamespace=observability"))
    ingress = pols[(NAMESPACE, "ft-finetune-operator")]["ingress"]
    assert admitted(ingress, "observability", {}, 8081) and not admitted(ingress, "monitoring", {}, 8081)
    closed = policies(render(helm_bin, None, "networkPolicy.prometheusNamespace="))[(NAMESPACE, "ft-finetune-operator")]
    assert not admitted(closed["ingress"], "monitoring", {}, 8081)


def test_namespaced_mode_restricts_trainers_in_every_watched_namespace(helm_bin: str) -> None:
    pols = policies(render(helm_bin, None, "rbac.clusterWide=false", "watchNamespaces={team-a,team-b}"))
    assert {(ns, n) for ns, n in pols if n.endswith("-trainer")} == {
        ("team-a", "ft-finetune-operator-trainer"), ("team-b", "ft-finetune-operator-trainer")}
    ingress = pols[(NAMESPACE, "ft-finetune-operator")]["ingress"]
    assert admitted(ingress, "team-b", TRAINER_LABELS, 8081)
    assert not admitted(ingress, "team-c", TRAINER_LABELS, 8081), "only the watched namespaces' trainers"


def test_cluster_wide_trainer_namespaces_extra_egress_and_off_switches(helm_bin: str) -> None:
    pols = policies(render(helm_bin, None, "networkPolicy.trainerNamespaces={ml,vision}",
                           "networkPolicy.trainerExtraEgress[0].ports[0].port=443"))
    assert {ns for ns, n in pols if n.endswith("-trainer")} == {"ml", "vision"}
    assert admitted(pols[("ml", "ft-finetune-operator-trainer")]["egress"], "anywhere", {"a": "b"}, 443)
    assert not policies(render(helm_bin, None, "networkPolicy.enabled=false"))
    without_server = policies(render(helm_bin, None, "server.enabled=false"))
    assert list(without_server) == [(NAMESPACE, "ft-finetune-operator-trainer")]
    assert not admitted(without_server[(NAMESPACE, "ft-finetune-operator-trainer")]["egress"], NAMESPACE,
                        {"app.kubernetes.io/component": "operator"}, 8081)


def test_the_selector_check_can_fail() -> None:
    sel = {"matchLabels": {"app.kubernetes.io/name": "finetune-trainer"},
           "matchExpressions": [{"key": "finetune.dev/finetunejob-uid", "operator": "Exists"}]}
    assert selects(sel, TRAINER_LABELS)
    assert not selects(sel, {"app.kubernetes.io/name": "finetune-trainer"})
    assert not admitted([{"to": [{"podSelector": sel}], "ports": [{"port": 1}]}], NAMESPACE, TRAINER_LABELS, 2)

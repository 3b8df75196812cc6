"""What users apply is accepted by a real API server: every example and every rendered chart variant.

Server-side dry runs (`dryRun=All`, strict field validation) go through admission, schema and CEL
validation without creating anything. Kinds whose CRDs are not installed on the test cluster
(prometheus-operator's ServiceMonitor/PrometheusRule) cannot be validated here and are listed.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from kubernetes import client, dynamic
from operator_util import apply_crds, raw

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "finetune-operator"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
NOT_INSTALLED = {"ServiceMonitor", "PrometheusRule"}


def _helm(local_cluster) -> str:
    binaries = getattr(local_cluster, "binaries", None) or {}
    if binaries.get("helm"):
        return str(binaries["helm"])
    out = subprocess.run([str(ROOT / "hack" / "tools.sh"), "helm"], capture_output=True, text=True, check=True,
                         timeout=1800)
    return out.stdout.strip().splitlines()[-1]


def _dry_run(api: client.ApiClient, path: str, obj: dict) -> tuple[int, str]:
    resp = raw(api, "POST", path, query=[("dryRun", "All"), ("fieldValidation", "Strict")], body=obj)
    return resp.status, resp.read().decode(errors="replace")


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_server_side_validation(k8s, namespace, example):
    apply_crds(k8s)
    for doc in yaml.safe_load_all(example.read_text()):
        if not doc:
            continue
        doc.setdefault("metadata", {})["namespace"] = namespace
        plural = {"FineTuneJob": "finetunejobs", "FineTuneSweep": "finetunesweeps"}[doc["kind"]]
        path = f"/apis/finetune.dev/v1alpha1/namespaces/{namespace}/{plural}"
        status, body = _dry_run(k8s, path, doc)
        assert status == 201, f"{example.name}: HTTP {status}: {body[:500]}"


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_rendered_chart_passes_server_side_validation(k8s, local_cluster, namespace, values):
    version = client.VersionApi(k8s).get_code()
    rendered = subprocess.run(
        [_helm(local_cluster), "template", "ftv", str(CHART), "-n", namespace, "-f", str(values), "--include-crds",
         "--kube-version", f"{version.major}.{version.minor.rstrip('+')}.0"],
        capture_output=True, text=True, check=True, timeout=120).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    core = client.CoreV1Api(k8s)
    existing = {n.metadata.name for n in core.list_namespace().items}
    made = sorted({d["metadata"]["namespace"] for d in docs if d["metadata"].get("namespace")} - existing)
    for ns in made:  # namespaced mode renders Roles into the watched namespaces
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    try:
        _validate(k8s, docs, namespace, values)
    finally:
        for ns in made:
            core.delete_namespace(ns)


def _validate(k8s, docs: list[dict], namespace: str, values: Path) -> None:
    resources = dynamic.DynamicClient(k8s).resources
    checked, skipped = [], []
    for doc in docs:
        if doc["kind"] in NOT_INSTALLED:
            skipped.append(doc["kind"])
            continue
        res = resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        prefix = "/api/v1" if doc["apiVersion"] == "v1" else f"/apis/{doc['apiVersion']}"
        ns = f"/namespaces/{doc['metadata'].get('namespace') or namespace}" if res.namespaced else ""
        path = f"{prefix}{ns}/{res.name}/{doc['metadata']['name']}"
        # Server-side apply with dryRun works for objects that exist (the CRD) and those that don't.
        resp = raw(k8s, "PATCH", path, query=[("fieldManager", "e2e"), ("force", "true"), ("dryRun", "All"),
                                              ("fieldValidation", "Strict")],
                   headers={"Content-Type": "application/apply-patch+yaml"}, body=json.dumps(doc))
        assert 200 <= resp.status < 300, f"{values.name}: {doc['kind']}/{doc['metadata']['name']}: " \
                                         f"HTTP {resp.status}: {resp.read().decode(errors='replace')[:500]}"
        checked.append(doc["kind"])
    assert {"Deployment", "ServiceAccount", "CustomResourceDefinition"} <= set(checked), checked
    print(f"{values.name}: {len(checked)} objects validated; not installed here: {sorted(set(skipped))}")

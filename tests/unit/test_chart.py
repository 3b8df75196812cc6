"""The Helm chart: lint, render every ci/*-values.yaml, and check what was rendered.

helm is built once from the Go module proxy (hack/tools.sh helm, cached outside the repo). Without Go or
the proxy these tests skip with the reason; with CI=true that is a failure instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.settings import CHART_VALUES, ENV_PREFIX, Settings, env_var

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
CHART = ROOT / "charts/finetune-operator"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSION = "1.31.0"  # the chart's minimum (Chart.yaml kubeVersion)
RELEASE, NAMESPACE = "ft", "finetune-system"

# Every FINETUNE_* variable the chart sets must be one operator/finetune_operator reads.
PENDING_SETTINGS: set[str] = set()


@cache
def helm_binary() -> str | None:
    """Path to helm, or None (with the reason in _HELM_ERROR) when it cannot be built."""
    try:
        out = subprocess.run(
            [str(ROOT / "hack/tools.sh"), "helm"], capture_output=True, text=True, timeout=1200, check=True
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as err:
        _HELM_ERROR.append(getattr(err, "stderr", None) or str(err))
        return None
    return out.stdout.strip().splitlines()[-1]


_HELM_ERROR: list[str] = []


@pytest.fixture(scope="session")
def helm() -> str:
    path = helm_binary()
    if path is None:
        reason = f"helm could not be built by hack/tools.sh helm: {_HELM_ERROR[-1].strip()[-500:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


@cache
def _render_cached(helm: str, values: tuple[str, ...], sets: tuple[str, ...]) -> list[dict[str, Any]]:
    args = ["template", RELEASE, str(CHART), "-n", NAMESPACE, "--kube-version", KUBE_VERSION]
    for v in values:
        args += ["-f", v]
    for s in sets:
        args += ["--set", s]
    res = run_helm(helm, *args)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def render(helm: str, values: Path | None = None, *sets: str) -> list[dict[str, Any]]:
    return _render_cached(helm, (str(values),) if values else (), tuple(sets))


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (dep,) = of_kind(docs, "Deployment")
    return dep


def env_of(dep: dict[str, Any]) -> dict[str, str]:
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value") for e in container.get("env", [])}


# ------------------------------------------------------------------ lint and render


def test_there_are_ci_values_files() -> None:
    assert {p.name for p in CI_VALUES} >= {"default-values.yaml", "namespaced-values.yaml", "monitoring-values.yaml"}


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda p: p.name if p else "no-values")
def test_helm_lint_strict(helm: str, values: Path | None) -> None:
    args = ["lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION]
    if values:
        args += ["-f", str(values)]
    res = run_helm(helm, *args)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_rendered_manifests_are_well_formed(helm: str, values: Path) -> None:
    docs = render(helm, values)
    assert docs
    seen = set()
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), doc
        meta = doc["metadata"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", meta["name"]) and len(meta["name"]) <= 253
        key = (doc["kind"], meta.get("namespace"), meta["name"])
        assert key not in seen, f"rendered twice: {key}"
        seen.add(key)
        labels = meta.get("labels") or {}
        assert labels.get("app.kubernetes.io/instance") == RELEASE, f"{key} lacks the standard labels"
        assert labels.get("helm.sh/chart", "").startswith("finetune-operator-")


def test_values_schema_rejects_typos_and_bad_values(helm: str) -> None:
    for bad in ("replicaCount=2", "imag.tag=x", "trainer.image.pullPolicy=Sometimes", "watchNamespaces[0]=team-*"):
        res = run_helm(helm, "template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION, "--set", bad)
        assert res.returncode != 0, f"--set {bad} was accepted"


# ------------------------------------------------------------------ Pod Security "restricted"

ALLOWED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """The Pod Security Standards "restricted" profile (plus a read-only root filesystem), as field checks."""
    bad: list[str] = []
    psc = pod.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            bad.append(f"pod: {flag}")
    for vol in pod.get("volumes") or []:
        kinds = set(vol) - {"name"}
        if not kinds <= ALLOWED_VOLUME_TYPES:
            bad.append(f"volume {vol['name']}: {kinds - ALLOWED_VOLUME_TYPES}")
    containers = [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]
    for c in containers:
        sc = c.get("securityContext") or {}
        name = c["name"]
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: adds capabilities {caps['add']}")
        if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
            bad.append(f"{name}: runAsNonRoot")
        if 0 in (sc.get("runAsUser"), psc.get("runAsUser")):
            bad.append(f"{name}: runs as uid 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        if sc.get("readOnlyRootFilesystem") is not True:
            bad.append(f"{name}: readOnlyRootFilesystem")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                bad.append(f"{name}: hostPort")
    return bad


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_operator_pod_is_restricted(helm: str, values: Path) -> None:
    for doc in render(helm, values):
        template = (doc.get("spec") or {}).get("template")
        if template is not None:
            assert restricted_violations(template["spec"]) == [], doc["metadata"]["name"]


def test_restricted_check_can_fail() -> None:
    pod = {
        "hostNetwork": True,
        "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
        "containers": [{"name": "c", "securityContext": {"privileged": True, "capabilities": {"add": ["SYS_ADMIN"]}}}],
    }
    found = " ".join(restricted_violations(pod))
    for word in ("hostNetwork", "hostPath", "privileged", "allowPrivilegeEscalation", "SYS_ADMIN", "runAsNonRoot",
                 "seccompProfile", "readOnlyRootFilesystem", "drop ALL"):
        assert word in found, word


def test_operator_deployment_shape(helm: str) -> None:
    dep = deployment(render(helm))
    spec = dep["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}, "two operators must never run at once (no peering)"
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = env_of(dep)
    assert env["FINETUNE_LIVENESS_ENDPOINT"] == f"http://0.0.0.0:{ports['health']}/healthz"
    assert env["FINETUNE_TRAINER_IMAGE"] == "finetune-trainer:0.1.0"
    assert env["FINETUNE_NAMESPACES"] == "", "cluster-wide by default"
    assert env["FINETUNE_HTTP_LISTEN"] == f"0.0.0.0:{ports['http']}"
    assert env["FINETUNE_PROGRESS_URL"] == f"http://{RELEASE}-finetune-operator.{NAMESPACE}.svc:{ports['http']}"
    assert "resources" not in container, "resources are left to the user"
    assert container["image"] == "finetune-operator:0.1.0"
    assert pod["serviceAccountName"] == f"{RELEASE}-finetune-operator"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/tmp" in mounts, "a read-only root needs a writable /tmp"


def test_every_finetune_env_var_is_an_operator_setting(helm: str) -> None:
    code = "\n".join(p.read_text() for p in (ROOT / "operator/finetune_operator").glob("*.py"))
    read = {f"FINETUNE_{m}" for m in re.findall(r"get\(\s*\"([A-Z_]+)\"", code)}
    read |= set(re.findall(r"FINETUNE_[A-Z_]+", code))
    for values in CI_VALUES:
        for name in env_of(deployment(render(helm, values))):
            if name.startswith("FINETUNE_") and name != "FINETUNE_EXAMPLE":
                assert name in read or name in PENDING_SETTINGS, f"{name} is set by the chart but read by no code"


def test_image_digest_wins_over_tag(helm: str) -> None:
    dep = deployment(render(helm, CHART / "ci/namespaced-values.yaml"))
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("registry.example.com/finetune/operator@sha256:")
    assert env_of(dep)["FINETUNE_TRAINER_IMAGE"] == "registry.example.com/finetune/trainer:0.1.0-cuda"


# ------------------------------------------------------------------ RBAC

NAMESPACED_RULES = {
    ("finetune.dev", "finetunejobs"): {"get", "list", "watch", "create", "patch"},  # create: a sweep's trials
    ("finetune.dev", "finetunejobs/status"): {"patch"},
    ("finetune.dev", "finetunejobs/finalizers"): {"update"},
    ("finetune.dev", "finetunesweeps"): {"get", "list", "watch", "patch"},
    ("finetune.dev", "finetunesweeps/status"): {"patch"},
    ("finetune.dev", "finetunesweeps/finalizers"): {"update"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "pods"): {"list", "watch"},
    ("", "configmaps"): {"get", "create"},
    ("", "services"): {"get", "create"},
    ("", "events"): {"create"},
    ("", "secrets"): {"get", "create"},
    ("serving.kserve.io", "inferenceservices"): {"get", "create", "patch"},  # spec.serving
}
CRD_RULE = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}
NAMESPACE_RULE = {("", "namespaces"): {"list", "watch"}}


def flatten(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert "nonResourceURLs" not in rule and "resourceNames" not in rule
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                out.setdefault((group, res), set()).update(rule["verbs"])
    return out


def roles(docs: list[dict[str, Any]], kind: str) -> dict[tuple[str | None, str], dict[tuple[str, str], set[str]]]:
    return {(d["metadata"].get("namespace"), d["metadata"]["name"]): flatten(d["rules"]) for d in of_kind(docs, kind)}


def test_rbac_template_has_a_comment_on_every_rule() -> None:
    lines = (CHART / "templates/rbac.yaml").read_text().splitlines()
    rules = [i for i, line in enumerate(lines) if line.lstrip().startswith("- apiGroups:")]
    assert len(rules) >= 9
    for i in rules:
        j = i - 1
        while j >= 0 and re.match(r"\s*\{\{-? *(if|end|else)", lines[j]):
            j -= 1  # a rule may be wrapped in a condition
        assert lines[j].lstrip().startswith("#"), f"rbac.yaml line {i + 1}: rule without a comment saying why"


def test_cluster_wide_rbac_is_exactly_what_the_operator_uses(helm: str) -> None:
    docs = render(helm)
    assert of_kind(docs, "Role") == [] and of_kind(docs, "RoleBinding") == []
    (rules,) = roles(docs, "ClusterRole").values()
    assert rules == {**NAMESPACED_RULES, **CRD_RULE}
    (binding,) = of_kind(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-finetune-operator",
                                    "namespace": NAMESPACE}]


def test_namespaced_rbac_uses_roles_in_the_watched_namespaces(helm: str) -> None:
    docs = render(helm, CHART / "ci/namespaced-values.yaml")
    found = roles(docs, "Role")
    assert {ns for ns, _ in found} == {"team-a", "team-b"}
    for rules in found.values():
        assert rules == NAMESPACED_RULES
    (cluster_rules,) = roles(docs, "ClusterRole").values()
    assert cluster_rules == {**CRD_RULE, **NAMESPACE_RULE}, "cluster-scoped reads only"
    assert {b["metadata"]["namespace"] for b in of_kind(docs, "RoleBinding")} == {"team-a", "team-b"}
    env = env_of(deployment(docs))
    assert env["FINETUNE_NAMESPACES"] == "team-a,team-b"
    assert env["FINETUNE_TRAINER_SERVICE_ACCOUNT"] == f"{RELEASE}-finetune-operator-trainer"


def test_without_the_server_there_is_no_service_and_no_secret_access(helm: str) -> None:
    docs = render(helm, CHART / "ci/minimal-values.yaml")
    assert of_kind(docs, "Service") == []
    (rules,) = roles(docs, "ClusterRole").values()
    assert ("", "secrets") not in rules
    env = env_of(deployment(docs))
    assert "FINETUNE_PROGRESS_URL" not in env and env["FINETUNE_HTTP_LISTEN"] == "", "the server is on by default"


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_no_wildcards_or_escalation_verbs(helm: str, values: Path) -> None:
    for kind in ("ClusterRole", "Role"):
        for rules in roles(render(helm, values), kind).values():
            for (group, res), verbs in rules.items():
                assert "*" not in (group, res) and "*" not in verbs
                assert not verbs & {"escalate", "bind", "impersonate"}
                assert (group, res) not in {("", "pods/exec"), ("", "nodes"), ("rbac.authorization.k8s.io", "*")}


# ------------------------------------------------------------------ trainer identity


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_trainer_service_account_has_no_token_and_no_rights(helm: str, values: Path) -> None:
    docs = render(helm, values)
    trainer_sas = [d for d in of_kind(docs, "ServiceAccount") if d["metadata"]["name"].endswith("-trainer")]
    if "minimal" in values.name:
        assert trainer_sas == []
        return
    assert trainer_sas
    for sa in trainer_sas:
        assert sa["automountServiceAccountToken"] is False
    bound = {
        (s.get("namespace"), s["name"])
        for kind in ("RoleBinding", "ClusterRoleBinding")
        for b in of_kind(docs, kind)
        for s in b["subjects"]
    }
    for sa in trainer_sas:
        assert (sa["metadata"]["namespace"], sa["metadata"]["name"]) not in bound


# ------------------------------------------------------------------ monitoring switches


def test_monitoring_is_off_by_default(helm: str) -> None:
    kinds = {d["kind"] for d in render(helm)}
    assert not kinds & {"ServiceMonitor", "PrometheusRule"}
    assert not [d for d in of_kind(render(helm), "ConfigMap") if "grafana_dashboard" in d["metadata"]["labels"]]


def test_monitoring_switches_render_the_chart_rules_and_dashboards(helm: str) -> None:
    docs = render(helm, CHART / "ci/monitoring-values.yaml")
    (monitor,) = of_kind(docs, "ServiceMonitor")
    (service,) = of_kind(docs, "Service")
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (rule,) = of_kind(docs, "PrometheusRule")
    shipped = [g for f in sorted((CHART / "rules").glob("*.yaml")) for g in yaml.safe_load(f.read_text())["groups"]]
    groups = rule["spec"]["groups"]
    assert groups[: len(shipped)] == shipped, "chart rule files are passed through unchanged"
    assert groups[-1]["name"] == "finetune-operator.custom"
    dashboards = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert len(dashboards) == len(list((CHART / "dashboards").glob("*.json")))
    for cm in dashboards:
        ((filename, text),) = cm["data"].items()
        assert json.loads(text) == json.loads((CHART / "dashboards" / filename).read_text())


def test_service_monitor_without_the_server_fails_loudly(helm: str) -> None:
    res = run_helm(helm, "template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION,
                   "--set", "metrics.serviceMonitor.enabled=true", "--set", "server.enabled=false")
    assert res.returncode != 0 and "server.enabled" in res.stderr


# ------------------------------------------------------------------ values.yaml documentation


def _schema_paths(schema: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], dict[str, Any]]:
    out = {}
    for key, sub in (schema.get("properties") or {}).items():
        out[(*prefix, key)] = sub
        out.update(_schema_paths(sub, (*prefix, key)))
    return out


def test_every_values_key_is_commented_and_in_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    paths = _schema_paths(schema)
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    documented = set()
    for i, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = (*tuple(k for _, k in stack), key)
        stack.append((indent, key))
        parent = paths.get(path[:-1]) if len(path) > 1 else schema
        if parent is None or "properties" not in parent:
            continue  # inside a free-form value (securityContext, resources, …): an example, not a key
        assert path in paths, f"values.yaml line {i + 1}: {'.'.join(path)} is not in values.schema.json"
        assert lines[i - 1].strip().startswith("#"), f"values.yaml line {i + 1}: {'.'.join(path)} has no comment"
        documented.add(path)
    missing = {".".join(p) for p in paths if p not in documented and p != ("global",)}
    assert not missing, f"in values.schema.json but not in values.yaml: {sorted(missing)}"


# ------------------------------------------------------------------ values.yaml → operator settings

FULLNAME = f"{RELEASE}-finetune-operator"
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
DIGEST = "sha256:" + "ab" * 32
NAMESPACED = ("rbac.clusterWide=false",)

# For every values key in settings.CHART_VALUES: the --set values it needs around it, its own --set, and what
# the settings then hold (each different from what they hold without it).
SETTING_CASES: dict[str, tuple[tuple[str, ...], str, dict[str, Any]]] = {
    "trainer.image.repository": ((), "trainer.image.repository=registry.example.com/t",
                                 {"trainer_image": f"registry.example.com/t:{APP_VERSION}"}),
    "trainer.image.tag": ((), "trainer.image.tag=v9", {"trainer_image": "finetune-trainer:v9"}),
    "trainer.image.digest": ((), f"trainer.image.digest={DIGEST}", {"trainer_image": f"finetune-trainer@{DIGEST}"}),
    "trainer.image.pullPolicy": ((), "trainer.image.pullPolicy=Always", {"image_pull_policy": "Always"}),
    "serving.image.repository": ((), "serving.image.repository=registry.example.com/s",
                                 {"serve_image": f"registry.example.com/s:{APP_VERSION}"}),
    "serving.image.tag": ((), "serving.image.tag=v7", {"serve_image": "finetune-serve:v7"}),
    "serving.image.digest": ((), f"serving.image.digest={DIGEST}", {"serve_image": f"finetune-serve@{DIGEST}"}),
    "trainer.serviceAccount.create": (NAMESPACED, "trainer.serviceAccount.create=false",
                                      {"trainer_service_account": ""}),
    "trainer.serviceAccount.name": (NAMESPACED, "trainer.serviceAccount.name=trainers",
                                    {"trainer_service_account": "trainers"}),
    "trainer.runAsUser": ((), "trainer.runAsUser=2001", {"run_as_user": 2001}),
    "trainer.runAsGroup": ((), "trainer.runAsGroup=2002", {"run_as_group": 2002}),
    "trainer.fsGroup": ((), "trainer.fsGroup=2003", {"fs_group": 2003}),
    "trainer.outputPVC": ((), "trainer.outputPVC=models", {"output_pvc": "models"}),
    "trainer.startupDeadlineSeconds": ((), "trainer.startupDeadlineSeconds=77", {"startup_deadline_seconds": 77}),
    "trainer.terminationGracePeriodSeconds": ((), "trainer.terminationGracePeriodSeconds=45",
                                              {"termination_grace_seconds": 45}),
    "trainer.shmSize": ((), "trainer.shmSize=3Gi", {"shm_size": "3Gi"}),
    "trainer.tmpSize": ((), "trainer.tmpSize=5Gi", {"tmp_size": "5Gi"}),
    "trainer.allowHostPath": ((), "trainer.allowHostPath=true", {"allow_host_path": True}),
    "rbac.clusterWide": ((), "rbac.clusterWide=false",
                         {"namespaces": (NAMESPACE,), "trainer_service_account": f"{FULLNAME}-trainer"}),
    "watchNamespaces": (NAMESPACED, "watchNamespaces={team-a,team-b}", {"namespaces": ("team-a", "team-b")}),
    "operator.postingLevel": ((), "operator.postingLevel=ERROR", {"posting_level": "ERROR"}),
    "operator.resyncSeconds": ((), "operator.resyncSeconds=7", {"resync_seconds": 7.0}),
    "operator.watchServerTimeout": ((), "operator.watchServerTimeout=120", {"watch_server_timeout": 120}),
    "health.port": ((), "health.port=9090", {"liveness_endpoint": "http://0.0.0.0:9090/healthz"}),
    "server.enabled": ((), "server.enabled=false", {"http_listen": "", "progress_url": ""}),
    "server.port": ((), "server.port=9000",
                    {"http_listen": "0.0.0.0:9000", "progress_url": f"http://{FULLNAME}.{NAMESPACE}.svc:9000"}),
    "server.progressURL": ((), "server.progressURL=https://progress.example.com",
                           {"progress_url": "https://progress.example.com"}),
    "nameOverride": (NAMESPACED, "nameOverride=tuner", {"progress_url": f"http://{RELEASE}-tuner.{NAMESPACE}.svc:8081",
                                                       "trainer_service_account": f"{RELEASE}-tuner-trainer"}),
    "fullnameOverride": (NAMESPACED, "fullnameOverride=tuner", {"progress_url": f"http://tuner.{NAMESPACE}.svc:8081",
                                                               "trainer_service_account": "tuner-trainer"}),
}


def try_rendered_settings(helm: str, *args: str) -> Settings | None:
    """The operator's Settings as the chart configures them (the Deployment's env, read by from_env);
    None when the chart refuses the values."""
    res = run_helm(helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, "--kube-version", KUBE_VERSION,
                   "--show-only", "templates/deployment.yaml", *args)
    if res.returncode != 0:
        return None
    env = env_of(yaml.safe_load(res.stdout))
    return Settings.from_env({k: v for k, v in env.items() if k.startswith(ENV_PREFIX) and v is not None})


def rendered_settings(helm: str, *args: str) -> Settings:
    settings = try_rendered_settings(helm, *args)
    assert settings is not None, f"helm template refused {args}"
    return settings


def _sets(*values: str) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def test_every_values_key_of_the_settings_table_has_a_case() -> None:
    assert set(SETTING_CASES) == set(CHART_VALUES)
    paths = {".".join(p) for p in _schema_paths(json.loads((CHART / "values.schema.json").read_text()))}
    for key, (_, _, expected) in SETTING_CASES.items():
        assert key in paths, f"{key} is not a values.yaml key"
        assert {env_var(field) for field in expected} == set(CHART_VALUES[key]), key


@pytest.mark.parametrize("key", sorted(SETTING_CASES))
def test_every_chart_value_reaches_its_setting(helm: str, key: str) -> None:
    context, own, expected = SETTING_CASES[key]
    settings = rendered_settings(helm, *_sets(*context, own))
    without = rendered_settings(helm, *_sets(*context))
    for field, value in expected.items():
        assert getattr(settings, field) == value, f"{key}: {field}"
        assert getattr(without, field) != value, f"{key} did not change {field}"


# Values --set-string may try for a string key with a pattern: the first it accepts is used.
STRING_CANDIDATES = ("x1", DIGEST, "30s", "3Gi", "https://x1.example.com")


def _other_value(schema: dict[str, Any], default: Any) -> list[str] | None:
    """--set arguments giving a key a valid value other than its default; None for lists and objects."""
    kind = schema.get("type")
    if kind == "boolean":
        return ["--set", str(not default).lower()]
    if kind in ("integer", "number"):
        value = default + 1 if default + 1 <= schema.get("maximum", default + 1) else default - 1
        return ["--set", str(value)]
    if kind == "string":
        choices = schema.get("enum") or [c for c in STRING_CANDIDATES if re.search(schema.get("pattern", ""), c)]
        other = next((c for c in choices if c != default), None)
        return None if other is None else ["--set-string", other]
    return None


def test_no_other_values_key_changes_a_setting(helm: str) -> None:
    """Keys outside settings.CHART_VALUES shape Kubernetes objects only: changing one leaves every setting as is,
    cluster-wide and namespaced (where the trainer ServiceAccount and the namespaces come into play).

    Every scalar key is tried; lists and maps are free-form (operator.extraEnv may set any variable on purpose).
    """
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    changes = []
    for path, sub in _schema_paths(schema).items():
        key = ".".join(path)
        if key in CHART_VALUES or "properties" in sub or path == ("global",):
            continue
        default = values
        for part in path:
            default = default[part]
        other = _other_value(sub, default)
        if other is None:  # a list or map (labels, probes' extras, extraEnv): free-form, not one setting's value
            assert sub.get("type") in ("array", "object"), f"{key}: no other valid value to try"
            continue
        changes.append((key, [other[0], f"{key}={other[1]}"]))

    def check(context: tuple[str, ...], key: str, args: list[str]) -> str | None:
        got = try_rendered_settings(helm, *_sets(*context), *args)
        # None: a value the chart refuses on its own (serviceAccount.create=false needs a name) sets nothing.
        if got is None or got == baseline[context]:
            return None
        changed = {f.name: getattr(got, f.name) for f in dataclasses.fields(Settings)
                   if getattr(got, f.name) != getattr(baseline[context], f.name)}
        return f"{key} ({' '.join(context) or 'defaults'}) changes {changed}"

    baseline = {context: rendered_settings(helm, *_sets(*context)) for context in ((), NAMESPACED)}
    with ThreadPoolExecutor(max_workers=4) as pool:
        found = pool.map(lambda job: check(*job), [(c, k, a) for c in baseline for k, a in changes])
        problems = [p for p in found if p]
    assert not problems, "values.yaml keys reaching a setting, not in settings.CHART_VALUES:\n" + "\n".join(problems)

"""deploy/ is generated from the chart (hack/gen-deploy.sh): regenerate into a temp dir and diff."""

from __future__ import annotations

import difflib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from test_chart import helm, restricted_violations  # noqa: F401  (helm is a fixture)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
GENERATED = [
    "base/kustomization.yaml",
    "base/namespace.yaml",
    "base/finetune-operator.yaml",
    "argocd/argocd-cm-patch.yaml",
]


@pytest.fixture(scope="module")
def regenerated(helm: str, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("deploy")
    res = subprocess.run(
        [str(ROOT / "hack/gen-deploy.sh"), str(out / "base")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HELM": helm},
    )
    assert res.returncode == 0, res.stderr
    return out


@pytest.mark.parametrize("name", GENERATED)
def test_deploy_is_up_to_date_with_the_chart(regenerated: Path, name: str) -> None:
    committed = (ROOT / "deploy" / name).read_text()
    fresh = (regenerated / name).read_text()
    diff = "".join(difflib.unified_diff(committed.splitlines(True), fresh.splitlines(True),
                                        f"deploy/{name}", f"regenerated/{name}", n=1))
    assert not diff, f"deploy/ drifted from the chart: run hack/gen-deploy.sh\n{diff[:3000]}"


def test_base_has_the_crd_rbac_and_a_restricted_operator() -> None:
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy/base/finetune-operator.yaml").read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert {"CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"} <= kinds
    crd = next(d for d in docs if d["kind"] == "CustomResourceDefinition")
    assert crd["metadata"]["name"] == "finetunejobs.finetune.dev"
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["metadata"]["namespace"] == "finetune-system"
    assert restricted_violations(dep["spec"]["template"]["spec"]) == []
    ns = yaml.safe_load((ROOT / "deploy/base/namespace.yaml").read_text())
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_kustomize_builds_the_base() -> None:
    res = subprocess.run(["kubectl", "kustomize", str(ROOT / "deploy/base")], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    namespaced = [d for d in docs if d["kind"] in ("ServiceAccount", "Deployment", "Service")]
    assert namespaced and all(d["metadata"]["namespace"] == "finetune-system" for d in namespaced)


def test_trainer_image_is_where_deploy_readme_patches_it() -> None:
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy/base/finetune-operator.yaml").read_text()) if d]
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["spec"]["template"]["spec"]["containers"][0]["env"][2]["name"] == "FINETUNE_TRAINER_IMAGE"
    assert "/spec/template/spec/containers/0/env/2/value" in (ROOT / "deploy/README.md").read_text()

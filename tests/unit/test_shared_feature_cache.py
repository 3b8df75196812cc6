"""training.featureCacheDir (a sweep's shared frozen pass): where the operator mounts it, and a trainer that
cannot use it still trains."""

from __future__ import annotations

import pytest
from test_operator_builders import ftj
from trainer_util import tiny_spec

from finetune_api.sweep import parse_sweep_spec, trial_job_spec
from finetune_operator import objects
from finetune_operator.settings import Settings
from finetune_trainer.fit import fit
from finetune_trainer.report import Reporter

SWEEP = {"template": {"spec": {"dataset": {"builtin": "digits"}}},
         "parameters": [{"path": "head.dropout", "categorical": [0.1, 0.2]}]}


def trial_pod(settings: Settings, template: dict | None = None, name: str = "tune-000") -> dict:
    sweep = parse_sweep_spec({**SWEEP, **({"template": {"spec": template}} if template else {})})
    spec = trial_job_spec(sweep, name, {"head.dropout": 0.1}).to_wire()
    return objects.build_job(ftj(spec, name=name), settings)["spec"]["template"]["spec"]


def mounts(pod: dict) -> dict[str, dict]:
    return {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}


def test_trials_on_the_output_pvc_share_its_feature_cache_folder():
    settings = Settings(trainer_image="t:1", output_pvc="outputs")
    a, b = trial_pod(settings, name="tune-000"), trial_pod(settings, name="tune-001")
    for pod, trial in ((a, "tune-000"), (b, "tune-001")):
        m = mounts(pod)
        assert m[f"/output/{trial}"]["subPath"] == trial  # each trial's own export folder
        assert m["/output/feature-cache"]["subPath"] == "feature-cache"  # one folder for all of them
        volume = next(v for v in pod["volumes"] if v["name"] == m["/output/feature-cache"]["name"])
        assert volume["persistentVolumeClaim"]["claimName"] == "outputs"


def test_without_an_output_pvc_the_cache_folder_is_an_emptydir():
    pod = trial_pod(Settings(trainer_image="t:1"))
    name = mounts(pod)["/output/feature-cache"]["name"]
    assert next(v for v in pod["volumes"] if v["name"] == name) == {"name": name, "emptyDir": {}}


def test_a_cache_folder_inside_a_user_volume_needs_no_mount_of_its_own():
    template = {"dataset": {"builtin": "digits"}, "output": {"path": "/work/out"},
                "volumes": [{"name": "work", "mountPath": "/work", "persistentVolumeClaim": {"claimName": "w"}}]}
    pod = trial_pod(Settings(trainer_image="t:1", output_pvc="outputs"), template)
    assert "/work/out/feature-cache" not in mounts(pod)
    assert objects.VOL_FEATURE_CACHE not in {v["name"] for v in pod["volumes"]}


@pytest.mark.parametrize("where", ["file/below", "x" * 300])  # ENOTDIR; ENAMETOOLONG (root ignores modes)
def test_an_unusable_cache_folder_costs_only_the_sharing(tmp_path, where):
    (tmp_path / "file").write_text("not a folder")
    spec = tiny_spec(tmp_path / "out", **{"training.featureCacheDir": str(tmp_path / where), "freeze.policy": "head"})
    result = fit(spec, Reporter(), tmp_path / "out")
    assert result.val_accuracy >= 0.0 and (tmp_path / "out" / "model.safetensors").exists()

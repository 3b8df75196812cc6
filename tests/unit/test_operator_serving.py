"""spec.serving on a cluster (serving.py): the InferenceService and smoke-test Job builders, the level-based
plan, and reconcile passes of a Succeeded FineTuneJob against a fake API playing KServe's part."""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
from typing import Any

import pytest
from test_operator_reconcile import FakeKube
from test_operator_status import STATUS_SCHEMA, assert_declared

from finetune_api.errors import JobFileError
from finetune_api.spec import parse_spec
from finetune_operator import drift, serving
from finetune_operator.parsed import FineTuneJob
from finetune_operator.reconcile import Runtime, reconcile
from finetune_operator.settings import Settings

pytestmark = pytest.mark.unit
NOW = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)
LOG = logging.getLogger("test")
SETTINGS = Settings(output_pvc="outputs", serve_image="finetune-serve:9")
FTJ_PATH = "/apis/finetune.dev/v1alpha1/namespaces/ml/finetunejobs/demo"
JOB_PATH = "/apis/batch/v1/namespaces/ml/jobs/demo"
SMOKE_PATH = "/apis/batch/v1/namespaces/ml/jobs/demo-smoke"
ISVC_PATH = "/apis/serving.kserve.io/v1beta1/namespaces/ml/inferenceservices/digits"
DISCOVERY = {"kind": "APIResourceList", "groupVersion": "serving.kserve.io/v1beta1",
             "resources": [{"name": "inferenceservices", "kind": "InferenceService", "namespaced": True}]}
DATA = {"name": "heldout", "mountPath": "/heldout", "persistentVolumeClaim": {"claimName": "images"}}
SPEC = {"dataset": {"builtin": "digits"}, "volumes": [DATA],
        "serving": {"inferenceService": {"name": "digits"},
                    "smokeTest": {"dataPath": "/heldout/digits", "samples": 50, "minAccuracy": 0.8}}}
SUCCEEDED = {"phase": "Succeeded", "reason": "Succeeded", "message": "training finished", "jobName": "demo",
             "output": {"path": "/output", "volume": "finetune-output", "ephemeral": False}}
URI = "pvc://outputs/demo"


class KServeFake(FakeKube):
    """FakeKube with RFC 7386 merge patches (nested spec.predictor) and, optionally, KServe's API."""

    def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("PATCH", path))
        target = self.objects[path.removesuffix("/status")]
        _merge(target, patch)
        return target


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def ftj_body(spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None, uid: str = "uid-1") -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "demo", "namespace": "ml", "uid": uid, "generation": 1},
            "spec": copy.deepcopy(spec or SPEC), "status": copy.deepcopy(status or SUCCEEDED)}


def cluster(spec: dict[str, Any] | None = None, kserve: bool = True) -> tuple[Runtime, KServeFake]:
    kube = KServeFake()
    kube.objects[FTJ_PATH] = ftj_body(spec)
    kube.objects[JOB_PATH] = {"metadata": {"name": "demo", "ownerReferences": [{"uid": "uid-1"}]},
                              "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}
    if kserve:
        kube.objects[serving.KSERVE_API] = DISCOVERY
    return Runtime(settings=SETTINGS, kube=kube, clock=lambda: NOW), kube  # type: ignore[arg-type]


def kserve_reports_ready(kube: KServeFake, url: str = "http://digits.ml.svc.cluster.local") -> None:
    """What KServe's controller does once the predictor's pods serve: Ready, with a URL, this generation."""
    isvc = kube.objects[ISVC_PATH]
    isvc["metadata"]["generation"] = isvc["metadata"].get("generation", 1)
    isvc["status"] = {"observedGeneration": isvc["metadata"]["generation"],
                      "url": url.replace(".svc.cluster.local", ""), "address": {"url": url},
                      "conditions": [{"type": "Ready", "status": "True"}]}


def smoke_finished(kube: KServeFake, code: int, line: dict[str, Any] | None) -> None:
    job = kube.objects[SMOKE_PATH]
    kind = "Complete" if code == 0 else "Failed"
    job["status"] = {"conditions": [{"type": kind, "status": "True", "reason": "BackoffLimitExceeded"}]}
    kube.objects["/api/v1/namespaces/ml/pods/demo-smoke-x"] = {
        "metadata": {"name": "demo-smoke-x", "labels": {serving.LABEL_SMOKE: "uid-1"}},
        "status": {"phase": "Succeeded" if code == 0 else "Failed", "containerStatuses": [
            {"name": "smoke", "state": {"terminated": {"exitCode": code,
                                                       "message": json.dumps(line) if line else ""}}}]}}


def served(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "Served")


def test_without_kserve_the_job_still_succeeded_and_says_kserve_is_not_installed() -> None:
    rt, kube = cluster(kserve=False)
    new = reconcile(rt, "ml", "demo", LOG).status
    assert (new["phase"], new["reason"]) == ("Succeeded", "Succeeded")
    cond = served(new)
    assert (cond["status"], cond["reason"]) == ("False", "KServeNotInstalled")
    assert "KServe is not installed" in cond["message"] and new["serving"] == {"name": "digits", "ready": False}
    assert not [p for m, p in kube.calls if m == "POST" and "/events" not in p], kube.calls
    assert ("Warning", "KServeNotInstalled") in kube.events()
    assert ("ml", "demo") in rt.queue.unfinished()  # still re-checked: KServe may be installed later
    assert_declared(new, STATUS_SCHEMA)


def test_creates_an_owned_inference_service_on_the_exports_pvc_with_the_projects_runtime() -> None:
    rt, kube = cluster()
    new = reconcile(rt, "ml", "demo", LOG).status
    isvc = kube.objects[ISVC_PATH]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    assert isvc["spec"]["predictor"] == {"model": {"modelFormat": {"name": "finetune-export"},
                                                   "runtime": "finetune-serve", "storageUri": URI}}
    assert isvc["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert new["serving"] == {"name": "digits", "storageUri": URI, "ready": False}
    assert served(new)["reason"] == "WaitingForInferenceService" and new["phase"] == "Succeeded"
    assert SMOKE_PATH not in kube.objects  # not before KServe says Ready
    again = reconcile(rt, "ml", "demo", LOG).status
    assert again["serving"]["ready"] is False and SMOKE_PATH not in kube.objects


def test_a_ready_inference_service_gets_a_restricted_smoke_test_job_in_the_serve_image() -> None:
    rt, kube = cluster()
    reconcile(rt, "ml", "demo", LOG)
    kserve_reports_ready(kube)
    new = reconcile(rt, "ml", "demo", LOG).status
    job = kube.objects[SMOKE_PATH]
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "finetune-serve:9" and c["command"][:2] == ["python", "-c"]
    assert "finetune_serve" in c["command"][2] and "/dev/termination-log" in c["command"][2]
    assert c["args"] == ["--url", "http://digits.ml.svc.cluster.local", "--model", "digits", "--data",
                         "/heldout/digits", "--samples", "50", "--min-accuracy", "0.8"]
    assert {"name": "data", "mountPath": "/heldout", "readOnly": True} in c["volumeMounts"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "images", "readOnly": True}} in pod["volumes"]
    assert c["securityContext"]["runAsNonRoot"] and c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False and job["spec"]["backoffLimit"] == 0
    assert job["metadata"]["labels"][serving.LABEL_SMOKE] == "uid-1"
    assert "finetune.dev/finetunejob-uid" not in job["metadata"]["labels"]  # not mistaken for a trainer Job
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert new["serving"]["ready"] is True and new["serving"]["url"] == "http://digits.ml.svc.cluster.local"
    assert served(new)["reason"] == "SmokeTesting"


def test_a_passing_smoke_test_promotes_and_the_decision_is_final() -> None:
    rt, kube = cluster()
    reconcile(rt, "ml", "demo", LOG)
    kserve_reports_ready(kube)
    reconcile(rt, "ml", "demo", LOG)
    smoke_finished(kube, 0, {"accuracy": 0.96, "samples": 50, "passed": True})
    new = reconcile(rt, "ml", "demo", LOG).status
    assert new["serving"]["promoted"] is True and new["serving"]["smokeAccuracy"] == 0.96
    assert new["serving"]["smokeSamples"] == 50 and new["serving"]["smokeJob"] == "demo-smoke"
    cond = served(new)
    assert (cond["status"], cond["reason"]) == ("True", "Promoted") and "0.9600 >= minAccuracy 0.8" in cond["message"]
    assert ("Normal", "Promoted") in kube.events()
    assert_declared(new, STATUS_SCHEMA)
    kube.calls.clear()
    del kube.objects[SMOKE_PATH]  # a TTL controller may take it: the decision stays on record
    later = reconcile(rt, "ml", "demo", LOG).status
    assert later["serving"] == new["serving"] and served(later)["status"] == "True"
    assert not [c for c in kube.calls if c[0] in ("POST", "PATCH") and "events" not in c[1]], kube.calls
    assert not [c for c in kube.calls if "kserve" in c[1] or "smoke" in c[1]], kube.calls  # nothing read either
    assert ("ml", "demo") not in rt.queue.unfinished()  # settled: the resync loop lets it be


def test_below_min_accuracy_is_not_promoted_and_says_why() -> None:
    rt, kube = cluster()
    reconcile(rt, "ml", "demo", LOG)
    kserve_reports_ready(kube)
    reconcile(rt, "ml", "demo", LOG)
    smoke_finished(kube, 1, {"accuracy": 0.5, "samples": 50, "passed": False})
    new = reconcile(rt, "ml", "demo", LOG).status
    assert new["serving"]["promoted"] is False and new["serving"]["smokeAccuracy"] == 0.5
    cond = served(new)
    assert (cond["status"], cond["reason"]) == ("False", "SmokeTestFailed")
    assert "0.5000 is below minAccuracy 0.8" in cond["message"] and "not promoted" in cond["message"]
    assert (new["phase"], new["reason"]) == ("Succeeded", "Succeeded")  # training itself is unaffected
    assert ("Warning", "SmokeTestFailed") in kube.events()


def test_a_smoke_test_that_cannot_run_is_an_error_not_a_verdict_on_the_model() -> None:
    rt, kube = cluster()
    reconcile(rt, "ml", "demo", LOG)
    kserve_reports_ready(kube)
    reconcile(rt, "ml", "demo", LOG)
    smoke_finished(kube, 2, {"error": "http://x: ConnectError: refused"})
    new = reconcile(rt, "ml", "demo", LOG).status
    assert new["serving"]["promoted"] is False and "smokeAccuracy" not in new["serving"]
    assert served(new)["reason"] == "SmokeTestError" and "ConnectError" in served(new)["message"]


def _second_revision(canary: int | None) -> tuple[Runtime, KServeFake]:
    """The InferenceService already serves an earlier FineTuneJob's export (`old`); this job retrains it."""
    spec = copy.deepcopy(SPEC)
    if canary is not None:
        spec["serving"]["canaryTrafficPercent"] = canary
    rt, kube = cluster(spec)
    kube.objects[ISVC_PATH] = {
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
        "metadata": {"name": "digits", "generation": 3,
                     "ownerReferences": [{"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                          "name": "old", "uid": "uid-old"}]},
        "spec": {"predictor": {"model": {"modelFormat": {"name": "finetune-export"}, "runtime": "finetune-serve",
                                         "storageUri": "pvc://outputs/old"}}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}], "url": "http://old", "observedGeneration": 3}}
    return rt, kube


@pytest.mark.parametrize("canary", [None, 20])
def test_a_new_export_takes_over_an_earlier_jobs_inference_service(canary: int | None) -> None:
    rt, kube = _second_revision(canary)
    new = reconcile(rt, "ml", "demo", LOG).status
    isvc = kube.objects[ISVC_PATH]
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == URI
    assert isvc["spec"]["predictor"].get("canaryTrafficPercent") == canary
    assert {r["uid"] for r in isvc["metadata"]["ownerReferences"]} == {"uid-old", "uid-1"}
    assert isvc["metadata"]["annotations"][serving.ANNOTATION_PREVIOUS] == "pvc://outputs/old"
    assert new["serving"]["previousStorageUri"] == "pvc://outputs/old" and new["serving"]["ready"] is False
    # KServe has not yet reconciled the new generation: the old Ready condition does not count.
    isvc["metadata"]["generation"] = 4
    assert reconcile(rt, "ml", "demo", LOG).status["serving"]["ready"] is False and SMOKE_PATH not in kube.objects


def test_a_failed_canary_is_rolled_back_to_the_previous_revision() -> None:
    rt, kube = _second_revision(20)
    reconcile(rt, "ml", "demo", LOG)
    kserve_reports_ready(kube)
    reconcile(rt, "ml", "demo", LOG)
    smoke_finished(kube, 1, {"accuracy": 0.1, "samples": 50})
    new = reconcile(rt, "ml", "demo", LOG).status
    predictor = kube.objects[ISVC_PATH]["spec"]["predictor"]
    assert predictor["canaryTrafficPercent"] == 0 and new["serving"]["promoted"] is False
    assert "canary rolled back" in served(new)["message"]
    assert new["serving"]["previousStorageUri"] == "pvc://outputs/old"
    assert_declared(new, STATUS_SCHEMA)


def test_a_passing_canary_is_promoted_to_all_the_traffic() -> None:
    rt, kube = _second_revision(20)
    reconcile(rt, "ml", "demo", LOG)
    kserve_reports_ready(kube)
    reconcile(rt, "ml", "demo", LOG)
    smoke_finished(kube, 0, {"accuracy": 0.9, "samples": 50})
    new = reconcile(rt, "ml", "demo", LOG).status
    predictor = kube.objects[ISVC_PATH]["spec"]["predictor"]
    assert "canaryTrafficPercent" not in predictor and predictor["model"]["storageUri"] == URI
    assert new["serving"]["promoted"] is True and "canary promoted" in served(new)["message"]


def test_without_a_canary_a_failed_smoke_test_restores_the_previous_storage_uri_once() -> None:
    rt, kube = _second_revision(None)
    reconcile(rt, "ml", "demo", LOG)
    kserve_reports_ready(kube)
    reconcile(rt, "ml", "demo", LOG)
    smoke_finished(kube, 1, {"accuracy": 0.1, "samples": 50})
    new = reconcile(rt, "ml", "demo", LOG).status
    assert kube.objects[ISVC_PATH]["spec"]["predictor"]["model"]["storageUri"] == "pvc://outputs/old"
    assert "rolled back to pvc://outputs/old" in served(new)["message"]
    reconcile(rt, "ml", "demo", LOG)  # no flip-flop: the restored revision is not taken over again
    assert kube.objects[ISVC_PATH]["spec"]["predictor"]["model"]["storageUri"] == "pvc://outputs/old"


def test_an_inference_service_not_made_by_a_finetunejob_is_left_alone() -> None:
    rt, kube = cluster()
    kube.objects[ISVC_PATH] = {"metadata": {"name": "digits"},
                               "spec": {"predictor": {"model": {"storageUri": "s3://someone/else"}}}}
    new = reconcile(rt, "ml", "demo", LOG).status
    assert served(new)["reason"] == "InferenceServiceNotOwned"
    assert kube.objects[ISVC_PATH]["spec"]["predictor"]["model"]["storageUri"] == "s3://someone/else"


def test_an_export_on_an_empty_dir_cannot_be_served() -> None:
    rt, kube = cluster()
    rt.settings = Settings()  # no output PVC: the model went to an emptyDir
    new = reconcile(rt, "ml", "demo", LOG).status
    assert served(new)["reason"] == "ExportNotServable" and "emptyDir" in served(new)["message"]
    assert new["serving"]["promoted"] is False and ISVC_PATH not in kube.objects


def test_nothing_is_served_before_the_training_succeeds() -> None:
    ftj = FineTuneJob.from_body(ftj_body(status={"phase": "Running"}))
    assert serving.wants_serving(ftj, "Running") is None
    assert serving.wants_serving(ftj, "Succeeded") is not None


def test_without_a_smoke_test_a_ready_service_is_promoted() -> None:
    spec = copy.deepcopy(SPEC)
    del spec["serving"]["smokeTest"]
    rt, kube = cluster(spec)
    reconcile(rt, "ml", "demo", LOG)
    kserve_reports_ready(kube)
    new = reconcile(rt, "ml", "demo", LOG).status
    assert new["serving"]["promoted"] is True and SMOKE_PATH not in kube.objects


def test_isvc_name_defaults_to_the_jobs_name_and_predictor_settings_pass_through() -> None:
    spec = {"dataset": {"builtin": "digits"}, "serving": {"inferenceService": {
        "runtime": "kserve-tritonserver", "modelFormat": "onnx", "minReplicas": 1, "maxReplicas": 2}}}
    ftj = FineTuneJob.from_body(ftj_body(spec))
    isvc = serving.build_inference_service(ftj, "pvc://outputs/demo/serving")
    assert isvc["metadata"]["name"] == "demo"
    assert isvc["spec"]["predictor"] == {"model": {"modelFormat": {"name": "onnx"}, "runtime": "kserve-tritonserver",
                                                   "storageUri": "pvc://outputs/demo/serving"},
                                         "minReplicas": 1, "maxReplicas": 2}


def test_storage_uri_of_an_export_on_a_users_volume_is_its_folder_in_that_claim() -> None:
    spec = {**SPEC, "output": {"path": "/models/run1"},
            "volumes": [DATA, {"name": "m", "mountPath": "/models", "persistentVolumeClaim": {"claimName": "models"}}]}
    assert serving.storage_uri(FineTuneJob.from_body(ftj_body(spec)), Settings()) == "pvc://models/run1"


def test_smoke_result_reads_the_termination_message() -> None:
    running = {"status": {}}
    assert serving.smoke_result(running, []).passed is None
    failed = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                                         "message": "Job was active longer than specified deadline"}]}}
    result = serving.smoke_result(failed, [])
    assert result.passed is False and "DeadlineExceeded" in (result.error or "")


def test_serving_is_neither_in_the_resume_fingerprint_nor_spec_drift() -> None:
    plain = parse_spec({"dataset": {"builtin": "digits"}, "volumes": [DATA]})
    with_serving = parse_spec(SPEC)
    assert plain.resume_fingerprint() == with_serving.resume_fingerprint()
    assert set(drift.spec_digest(plain.to_wire())) == set(drift.spec_digest(with_serving.to_wire()))


@pytest.mark.parametrize("bad, field", [
    ({"smokeTest": {"dataPath": "/elsewhere/x"}}, "must be inside one of spec.volumes"),
    ({"smokeTest": {"dataPath": "/heldoutx"}}, "must be inside one of spec.volumes"),
    ({"canaryTrafficPercent": 101}, "canaryTrafficPercent"),
    ({"smokeTest": {"dataPath": "/heldout", "minAccuracy": 1.5}}, "minAccuracy"),
    ({"inferenceService": {"name": "Not_A_Name"}}, "name"),
])
def test_bad_serving_specs_are_refused_naming_the_field(bad: dict[str, Any], field: str) -> None:
    with pytest.raises(JobFileError, match=field):
        parse_spec({**SPEC, "serving": bad})


def test_the_handoff_example_fits_the_crd_and_names_the_example_runtime_and_its_format() -> None:
    import yaml
    from test_examples import ROOT, _schema, structural_errors

    folder = ROOT / "examples/serving"
    doc = yaml.safe_load((folder / "finetunejob-handoff.yaml").read_text())
    assert structural_errors(doc["spec"], _schema()["properties"]["spec"]) == []
    ftj = FineTuneJob.from_body({**doc, "metadata": {**doc["metadata"], "namespace": "ml", "uid": "u"}})
    isvc = serving.build_inference_service(ftj, serving.storage_uri(ftj, SETTINGS))
    runtime = yaml.safe_load((folder / "servingruntime.yaml").read_text())
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    assert model["storageUri"] == "pvc://outputs/digits-v1" and isvc["metadata"]["name"] == "digits"
    by_hand = yaml.safe_load((folder / "inferenceservice.yaml").read_text())["spec"]["predictor"]["model"]
    assert {k: by_hand[k] for k in ("modelFormat", "runtime")} == {k: model[k] for k in ("modelFormat", "runtime")}


@pytest.mark.parametrize("tagged", [True, False])
def test_a_canarys_smoke_test_judges_the_new_revision_alone_when_kserve_tags_it(tagged: bool) -> None:
    rt, kube = _second_revision(20)
    reconcile(rt, "ml", "demo", LOG)
    isvc = kube.objects[ISVC_PATH]
    assert isvc["metadata"]["annotations"][serving.TAG_ROUTING] == "true"  # asks KServe for revision URLs
    kserve_reports_ready(kube)
    latest = "http://latest-digits-predictor.ml.svc.cluster.local"
    if tagged:  # KServe's traffic targets under tag routing: the previous revision and the new one, each its own URL
        isvc["status"]["components"] = {"predictor": {"traffic": [
            {"tag": "prev", "percent": 80, "url": "http://prev-digits-predictor.ml.svc.cluster.local"},
            {"tag": "latest", "percent": 20, "latestRevision": True, "url": latest}]}}
    new = reconcile(rt, "ml", "demo", LOG).status
    args = kube.objects[SMOKE_PATH]["spec"]["template"]["spec"]["containers"][0]["args"]
    sent_to = args[args.index("--url") + 1]
    if tagged:
        assert sent_to == latest and "the new revision alone" in served(new)["message"]
    else:  # no revision URL (tag routing off or an older KServe): the address, and the message says what it measures
        assert sent_to == "http://digits.ml.svc.cluster.local" and "traffic mix" in served(new)["message"]
    assert new["serving"]["smokeUrl"] == sent_to and new["serving"]["url"] == "http://digits.ml.svc.cluster.local"
    smoke_finished(kube, 1, {"accuracy": 0.1, "samples": 50})
    assert reconcile(rt, "ml", "demo", LOG).status["serving"]["smokeUrl"] == sent_to  # derived from the Job again
    assert_declared(new, STATUS_SCHEMA)


def test_a_first_revision_or_no_canary_asks_for_no_tag_routing() -> None:
    rt, kube = _second_revision(None)
    reconcile(rt, "ml", "demo", LOG)
    assert serving.TAG_ROUTING not in kube.objects[ISVC_PATH]["metadata"]["annotations"]

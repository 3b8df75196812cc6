"""The hand-off to KServe (issue 18, spec.serving) on the real API server, with KServe's released
InferenceService CRD (tests/e2e/kserve/, v0.20.0, vendored with its source) and no KServe controller.

What is real: the API server (the CRD's full structural schema validates what the operator writes), the
operator (the chart, its RBAC), the trainer pods, the smoke-test Job and its pod (from the project's serve
image, on the local cluster's node), and the predictor:
a `finetune-serve` process serving the job's export from the output PVC's folder, i.e. what KServe's storage
initializer would have copied to /mnt/models. What the test plays: KServe's controller — once the operator
has created (or updated) the InferenceService, the test starts the predictor and writes the
InferenceService's status as KServe does (Ready, url, address.url, observedGeneration). Knative/Istio
routing of canary traffic is KServe's and is not exercised: the test checks the canaryTrafficPercent the
operator sets (the rollout and the rollback KServe acts on).

Order matters: the first test runs before the CRD is installed (skipped on a cluster that has KServe).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

kubernetes = pytest.importorskip("kubernetes")
yaml = pytest.importorskip("yaml")
from kubernetes import client  # noqa: E402
from operator_env import TRAIN_TIMEOUT, wait_until  # noqa: E402
from operator_util import free_port, tiny_job  # noqa: E402

KSERVE_CRD = Path(__file__).parent / "kserve" / "serving.kserve.io_inferenceservices.yaml.gz"
CRD_NAME = "inferenceservices.serving.kserve.io"
ISVC = ("serving.kserve.io", "v1beta1", "inferenceservices")
HELDOUT_PVC = "heldout"
REPO = Path(__file__).resolve().parents[2]


def served_condition(status: dict) -> dict:
    return next((c for c in status.get("conditions") or [] if c.get("type") == "Served"), {})


def serving_job(name: str, data: str, min_accuracy: float, **serving) -> dict:
    """The tiny digits job (1 epoch) with spec.serving; the held-out images are on the `heldout` PVC."""
    return tiny_job(name, {
        "training": {"epochs": 1},
        "volumes": [{"name": "heldout", "mountPath": "/heldout", "persistentVolumeClaim": {"claimName": HELDOUT_PVC}}],
        "serving": {"smokeTest": {"dataPath": f"/heldout/{data}", "samples": 40, "minAccuracy": min_accuracy},
                    **serving},
    })


def _crd_installed(api) -> bool:
    try:
        client.ApiextensionsV1Api(api).read_custom_resource_definition(CRD_NAME)
        return True
    except client.ApiException as e:
        if e.status == 404:
            return False
        raise


@pytest.fixture(scope="module")
def local(operator_env):
    if operator_env.local_cluster is None or not operator_env.output_pvc:
        pytest.skip("needs the local control plane (the test writes the held-out images into the PVC's folder "
                    "on the node and serves the export from the output PVC's folder)")
    return operator_env


@pytest.fixture(scope="module")
def heldout(local) -> Path:
    """The `heldout` PVC with val images of the tiny job's classes: `good/<class>/` labelled right, `bad/` with
    the labels swapped (a model that is right on `good` is wrong on `bad`)."""
    from finetune_api.spec import parse_spec
    from finetune_trainer import data

    core = client.CoreV1Api(local.api)
    with contextlib.suppress(client.ApiException):  # left from an earlier run of this module: reused
        core.create_namespaced_persistent_volume_claim(local.namespace, client.V1PersistentVolumeClaim(
            metadata=client.V1ObjectMeta(name=HELDOUT_PVC),
            spec=client.V1PersistentVolumeClaimSpec(
                access_modes=["ReadWriteOnce"], resources=client.V1VolumeResourceRequirements(
                    requests={"storage": "1Gi"}))))
    wait_until(lambda: core.read_namespaced_persistent_volume_claim(
        HELDOUT_PVC, local.namespace).status.phase == "Bound", 60, "the heldout PVC to be Bound")
    folder = local.pvc_dir(HELDOUT_PVC)
    spec = parse_spec(tiny_job("x")["spec"])
    splits = data.load_splits(spec.dataset, spec.training.seed)
    swap = {c: splits.classes[(i + 1) % len(splits.classes)] for i, c in enumerate(splits.classes)}
    for k, sample in enumerate(splits.val[:40]):
        label = splits.classes[sample.label]
        for kind, cls in (("good", label), ("bad", swap[label])):
            (folder / kind / cls).mkdir(parents=True, exist_ok=True)
            sample.load().save(folder / kind / cls / f"{k}.png")
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


class Predictor:
    """`finetune-serve` on one export folder, on this host: the process KServe's predictor pod would run. Its
    URL is where the smoke-test pod reaches it: `address` (the node's address on the local cluster; KServe's
    server listens on every address)."""

    def __init__(self, export: Path, model_name: str, log: Path, address: str) -> None:
        self.port = free_port()
        self.url = f"http://{address}:{self.port}"
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "finetune-serve"), "--model", str(export), "--model_name", model_name,
             "--http_port", str(self.port), "--grpc_port", str(free_port()), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)
        wait_until(self._ready, 120, f"finetune-serve on {export} to be ready", give_up=self._exited)

    def _ready(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def _exited(self) -> str | None:
        return f"finetune-serve exited with {self.proc.returncode}" if self.proc.poll() is not None else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def predictors(tmp_path_factory, local):
    started: list[Predictor] = []
    logs = tmp_path_factory.mktemp("predictors")
    address = local.local_cluster.host_address

    def start(export: Path, model_name: str) -> Predictor:
        started.append(Predictor(export, model_name, logs / f"{model_name}-{len(started)}.log", address))
        return started[-1]

    yield start
    for p in started:
        p.stop()


def play_kserve(jobs, name: str, storage_uri: str, predictor: Predictor, canary_of: Predictor | None = None) -> dict:
    """KServe's part: wait for the InferenceService to ask for `storage_uri`, then report it Ready at the
    predictor's URL for its current generation (the status subresource, as KServe's controller writes it).
    `canary_of`: the revision before, as under tag routing: the address stays the old revision's (a stand-in
    for the traffic mix), and the traffic targets tagged prev and latest each carry their own URL."""
    def asking() -> dict | None:
        with contextlib.suppress(client.ApiException):
            isvc = jobs.co.get_namespaced_custom_object(*ISVC[:2], jobs.ns, ISVC[2], name)
            uri = isvc["spec"]["predictor"].get("model", {}).get("storageUri")
            return isvc if uri == storage_uri else None
        return None

    isvc = wait_until(asking, 60, f"InferenceService {name} with storageUri {storage_uri}")
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    address = (canary_of or predictor).url
    status = {"observedGeneration": isvc["metadata"]["generation"], "url": address, "address": {"url": address},
              "conditions": [{"type": t, "status": "True", "lastTransitionTime": now}
                             for t in ("PredictorReady", "IngressReady", "Ready")]}
    if canary_of is not None:
        status["components"] = {"predictor": {"traffic": [
            {"tag": "prev", "percent": 70, "url": canary_of.url},
            {"tag": "latest", "percent": 30, "latestRevision": True, "url": predictor.url}]}}
    jobs.co.patch_namespaced_custom_object_status(*ISVC[:2], jobs.ns, ISVC[2], name, {"status": status})
    return isvc


def test_without_kserves_crd_the_job_succeeds_and_says_kserve_is_not_installed(local, jobs, heldout, e2e_report):
    if _crd_installed(local.api):
        pytest.skip(f"this cluster has {CRD_NAME}: KServe is installed")
    jobs.create(serving_job("serve-nokserve", "good", 0.0))
    done = local.wait_phase(jobs, "serve-nokserve", ("Succeeded", "Failed"), TRAIN_TIMEOUT)["status"]
    assert (done["phase"], done["reason"]) == ("Succeeded", "Succeeded"), done
    cond = wait_until(lambda: served_condition(jobs.status("serve-nokserve")) or None, 30, "a Served condition")
    assert (cond["status"], cond["reason"]) == ("False", "KServeNotInstalled"), cond
    assert "KServe is not installed" in cond["message"], cond
    assert jobs.status("serve-nokserve")["phase"] == "Succeeded"
    e2e_report(f"serving without KServe's CRD: Succeeded, Served=False/KServeNotInstalled: {cond['message']}")


@pytest.fixture(scope="module")
def kserve_crd(local):
    """KServe's released InferenceService CRD (v0.20.0, full schema), installed for the module's later tests."""
    ext = client.ApiextensionsV1Api(local.api)
    installed_here = not _crd_installed(local.api)
    if installed_here:
        with gzip.open(KSERVE_CRD) as f:
            ext.create_custom_resource_definition(yaml.safe_load(f))
    wait_until(lambda: any(c.type == "Established" and c.status == "True"
                           for c in ext.read_custom_resource_definition(CRD_NAME).status.conditions or []),
               60, f"{CRD_NAME} to be Established")
    yield CRD_NAME
    if installed_here:
        with contextlib.suppress(client.ApiException):
            ext.delete_custom_resource_definition(CRD_NAME)


def _export(local, job: str) -> Path:
    return local.pvc_dir(local.output_pvc) / job


def _decided(jobs, name: str) -> dict | None:
    status = jobs.status(name)
    return status if (status.get("serving") or {}).get("promoted") is not None else None


def test_the_smoke_test_gates_promotion_and_a_failed_canary_is_rolled_back(local, jobs, heldout, kserve_crd,
                                                                            predictors, e2e_report):
    isvc_name, uri_a, uri_b = "digits-e2e", f"pvc://{local.output_pvc}/serve-a", f"pvc://{local.output_pvc}/serve-b"
    t0 = time.monotonic()
    # A: the first revision; its held-out images are labelled right and minAccuracy is 0: promoted.
    jobs.create(serving_job("serve-a", "good", 0.0, inferenceService={"name": isvc_name}))
    local.wait_phase(jobs, "serve-a", ("Succeeded",), TRAIN_TIMEOUT)
    pred_a = predictors(_export(local, "serve-a"), isvc_name)
    isvc = play_kserve(jobs, isvc_name, uri_a, pred_a)
    assert isvc["spec"]["predictor"]["model"] == {"modelFormat": {"name": "finetune-export"},
                                                  "runtime": "finetune-serve", "storageUri": uri_a}, isvc["spec"]
    owners = [(r["kind"], r["name"]) for r in isvc["metadata"]["ownerReferences"]]
    assert owners == [("FineTuneJob", "serve-a")], owners
    a = wait_until(lambda: _decided(jobs, "serve-a"), 180, "serve-a's smoke test to decide", give_up=local.forbidden)
    assert a["serving"]["promoted"] is True, (a["serving"], served_condition(a))
    assert a["serving"]["url"] == pred_a.url and a["serving"]["ready"] is True
    assert a["serving"]["smokeSamples"] == 40 and 0.0 <= a["serving"]["smokeAccuracy"] <= 1.0, a["serving"]
    assert (served_condition(a)["status"], served_condition(a)["reason"]) == ("True", "Promoted")
    smoke = jobs.batch.read_namespaced_job(a["serving"]["smokeJob"], jobs.ns)
    assert smoke.metadata.owner_references[0].name == "serve-a" and smoke.status.succeeded == 1

    # B: a retrained revision of the same InferenceService as a 30% canary, judged on swapped labels with
    # minAccuracy 1.0: below it, so not promoted, and the canary rolled back (0%: A's revision takes it all).
    jobs.create(serving_job("serve-b", "bad", 1.0, inferenceService={"name": isvc_name}, canaryTrafficPercent=30))
    local.wait_phase(jobs, "serve-b", ("Succeeded",), TRAIN_TIMEOUT)
    pred_b = predictors(_export(local, "serve-b"), isvc_name)
    isvc = play_kserve(jobs, isvc_name, uri_b, pred_b, canary_of=pred_a)
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 30, isvc["spec"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/enable-tag-routing"] == "true"
    assert isvc["metadata"]["annotations"]["finetune.dev/previous-storage-uri"] == uri_a
    assert {r["name"] for r in isvc["metadata"]["ownerReferences"]} == {"serve-a", "serve-b"}
    b = wait_until(lambda: _decided(jobs, "serve-b"), 180, "serve-b's smoke test to decide", give_up=local.forbidden)
    cond = served_condition(b)
    assert b["serving"]["promoted"] is False and (cond["status"], cond["reason"]) == ("False", "SmokeTestFailed"), b
    assert b["serving"]["smokeAccuracy"] < 1.0 and "below minAccuracy 1.0" in cond["message"], cond
    assert b["serving"]["previousStorageUri"] == uri_a and b["phase"] == "Succeeded"
    # The smoke test judged the canary revision alone (its tagged URL), not the address shared with A.
    assert b["serving"]["smokeUrl"] == pred_b.url and b["serving"]["url"] == pred_a.url, b["serving"]
    after = jobs.co.get_namespaced_custom_object(*ISVC[:2], jobs.ns, ISVC[2], isvc_name)
    assert after["spec"]["predictor"]["canaryTrafficPercent"] == 0, after["spec"]["predictor"]
    assert jobs.event_counts("serve-b").get(("Warning", "SmokeTestFailed")), jobs.event_counts("serve-b")
    e2e_report(f"serving with KServe's CRD v0.20.0: serve-a promoted (smoke accuracy "
               f"{a['serving']['smokeAccuracy']:.3f}), serve-b as a 30% canary not promoted "
               f"({b['serving']['smokeAccuracy']:.3f} < 1.0) and rolled back to 0% in {time.monotonic() - t0:.0f} s")

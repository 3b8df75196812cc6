"""spec.serving on a cluster: a Succeeded job's export served by a KServe InferenceService, smoke-tested, promoted.

Everything here is pure. A reconcile pass of a Succeeded FineTuneJob with spec.serving reads what exists
(whether the API server has KServe's InferenceService, the InferenceService, the smoke-test Job and its pod)
and hands it to `plan`, which says what to create or patch and what status.serving and the Served condition
are. The pass does exactly that and nothing else, so an operator restart or a missed event loses nothing:

* no KServe API → Served False, KServeNotInstalled (the training's own phase stays Succeeded);
* no InferenceService → create it (owned by the FineTuneJob, predictor on the export's PVC);
* one serving another export (an earlier FineTuneJob's) → patch it to this export, remembering the old
  storageUri in an annotation (as a canary taking canaryTrafficPercent of the traffic when that is set);
* Ready for this export → the smoke-test Job (the serve image running finetune_serve.smoke over v2);
* its outcome → promoted (canary → 100%), or not promoted and rolled back (canary → 0%, KServe's
  rollback to the previous revision; without a canary the previous storageUri is restored).

A decided outcome (status.serving.promoted true or false) is final, as a finished phase is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finetune_api.spec import API_GROUP, Serving, within
from finetune_api.status import ConditionType, Phase, ServingReason
from finetune_operator import observe
from finetune_operator.naming import ANNOTATION_NAME, MANAGED_BY, fit, job_name
from finetune_operator.parsed import FineTuneJob, Obj, ObjView
from finetune_operator.settings import Settings
from finetune_operator.teacher import export_location

KSERVE_GROUP = "serving.kserve.io"
KSERVE_VERSION = "v1beta1"
ISVC_PLURAL = "inferenceservices"
ISVC_API_VERSION = f"{KSERVE_GROUP}/{KSERVE_VERSION}"
KSERVE_API = f"/apis/{ISVC_API_VERSION}"  # discovery: its resource list names inferenceservices when installed
LABEL_SMOKE = f"{API_GROUP}/smoke-test-of"  # the FineTuneJob's uid on its smoke-test Job and pod
ANNOTATION_PREVIOUS = f"{API_GROUP}/previous-storage-uri"  # what the InferenceService served before this job
# KServe tags a canary's traffic targets "prev" and "latest", each with a URL of its own, when this is "true":
# the smoke test then judges the new revision alone, not the traffic mix.
TAG_ROUTING = f"{KSERVE_GROUP}/enable-tag-routing"
SMOKE_CONTAINER = "smoke"
TERMINATION_LOG = "/dev/termination-log"
# The smoke test prints one JSON line; this keeps it (the kubelet caps termination messages at 4 KiB) and
# the exit code, without a shell: nothing from the spec reaches one.
SMOKE_WRAPPER = (
    "import contextlib, io, sys\n"
    "from finetune_serve import smoke\n"
    "buf = io.StringIO()\n"
    "with contextlib.redirect_stdout(buf):\n"
    "    code = smoke.main(sys.argv[1:])\n"
    "sys.stdout.write(buf.getvalue())\n"
    f"open({TERMINATION_LOG!r}, 'w').write(buf.getvalue().strip().splitlines()[-1][-4000:] if buf.getvalue().strip()"
    " else '')\n"
    "sys.exit(code)\n"
)
EXIT_BELOW = 1  # finetune_serve.smoke: accuracy below --min-accuracy (2: the test could not run)


def isvc_path(namespace: str, name: str = "") -> str:
    return f"{KSERVE_API}/namespaces/{namespace}/{ISVC_PLURAL}" + (f"/{name}" if name else "")


def kserve_installed(discovery: ObjView | None) -> bool:
    """The API group version's discovery document (None: 404) lists inferenceservices."""
    return any(r.get("name") == ISVC_PLURAL for r in (discovery or {}).get("resources") or [])


def wants_serving(ftj: FineTuneJob, phase: str | None) -> Serving | None:
    """spec.serving of a valid spec whose training Succeeded (nothing is served before that)."""
    if ftj.spec is None or ftj.spec.serving is None or phase != Phase.SUCCEEDED:
        return None
    return ftj.spec.serving


def decided(ftj: FineTuneJob) -> bool:
    """status.serving.promoted is recorded (true or false): final, as a finished phase is."""
    return (ftj.status.get("serving") or {}).get("promoted") is not None


def isvc_name(ftj: FineTuneJob) -> str:
    serving = ftj.valid_spec().serving
    return (serving.inference_service.name if serving else None) or ftj.name


def smoke_job_name(ftj: FineTuneJob) -> str:
    return fit(f"{job_name(ftj.name)}-smoke", 63)


def storage_uri(ftj: FineTuneJob, settings: Settings) -> str:
    """pvc://<claim>/<folder> of the export (the folder with model.json); ValueError when no PVC holds it."""
    location = export_location(ftj, settings)
    if isinstance(location, str):
        raise ValueError(location.replace("teacher FineTuneJob", "FineTuneJob").replace(
            "the student's pod", "KServe's storage initializer"))
    claim, folder = location
    return f"pvc://{claim}/{folder}" if folder else f"pvc://{claim}"


def predictor(serving: Serving, uri: str) -> Obj:
    """spec.predictor: the project's runtime on the export (KServe mounts the PVC at /mnt/models)."""
    isvc = serving.inference_service
    spec: Obj = {"model": {"modelFormat": {"name": isvc.model_format}, "runtime": isvc.runtime, "storageUri": uri}}
    for key, value in (("minReplicas", isvc.min_replicas), ("maxReplicas", isvc.max_replicas),
                       ("serviceAccountName", isvc.service_account_name),
                       ("canaryTrafficPercent", serving.canary_traffic_percent)):
        if value is not None:
            spec[key] = value
    return spec


def build_inference_service(ftj: FineTuneJob, uri: str) -> Obj:
    """A new InferenceService for this job's export (the caller adds the owner reference)."""
    serving = ftj.valid_spec().serving
    assert serving is not None
    spec = predictor(serving, uri)
    spec.pop("canaryTrafficPercent", None)  # a first revision takes all the traffic: there is nothing to split
    return {
        "apiVersion": ISVC_API_VERSION,
        "kind": "InferenceService",
        "metadata": {"name": isvc_name(ftj), "namespace": ftj.namespace,
                     "labels": {"app.kubernetes.io/managed-by": MANAGED_BY},
                     "annotations": {ANNOTATION_NAME: ftj.name}},
        "spec": {"predictor": spec},
    }


def served_uri(isvc: ObjView) -> str | None:
    return (((isvc.get("spec") or {}).get("predictor") or {}).get("model") or {}).get("storageUri")


def owned_by_a_finetunejob(isvc: ObjView) -> bool:
    return any(r.get("kind") == "FineTuneJob" and str(r.get("apiVersion", "")).startswith(f"{API_GROUP}/")
               for r in (isvc.get("metadata") or {}).get("ownerReferences") or [])


def takeover_patch(ftj: FineTuneJob, isvc: ObjView, uri: str) -> Obj:
    """Merge patch moving an existing InferenceService to this export: this job becomes an owner too, and
    the storageUri it served is kept in an annotation (restored if this export fails its smoke test)."""
    serving = ftj.valid_spec().serving
    assert serving is not None
    refs = [dict(r) for r in (isvc.get("metadata") or {}).get("ownerReferences") or []]
    mine = {"apiVersion": ftj.api_version, "kind": "FineTuneJob", "name": ftj.name, "uid": ftj.uid,
            "blockOwnerDeletion": True}
    if not any(r.get("uid") == ftj.uid for r in refs):
        refs.append(mine)
    spec = predictor(serving, uri)
    annotations = {ANNOTATION_PREVIOUS: served_uri(isvc), ANNOTATION_NAME: ftj.name}
    if serving.canary_traffic_percent is None:
        spec["canaryTrafficPercent"] = None  # a canary left by an earlier job's spec would split the traffic
    else:
        annotations[TAG_ROUTING] = "true"
    return {"metadata": {"ownerReferences": refs, "annotations": annotations}, "spec": {"predictor": spec}}


def revision_url(isvc: ObjView) -> str | None:
    """The new revision's own URL: the predictor's traffic target KServe tags "latest" (tag routing)."""
    predictor_status = ((((isvc.get("status") or {}).get("components") or {}).get("predictor")) or {})
    for target in predictor_status.get("traffic") or []:
        if target.get("tag") == "latest" and target.get("url"):
            return str(target["url"])
    return None


def isvc_ready(isvc: ObjView, uri: str) -> tuple[bool, str | None]:
    """(Ready for this export, the URL to send requests to): KServe's Ready condition of the current
    generation, with the storageUri this job set. The cluster-local address is preferred over status.url."""
    status = isvc.get("status") or {}
    url = (status.get("address") or {}).get("url") or status.get("url")
    generation = (isvc.get("metadata") or {}).get("generation")
    current = status.get("observedGeneration") is None or generation is None or \
        status["observedGeneration"] >= generation
    ready = (observe.condition(isvc, "Ready") or {}).get("status") == "True"
    return bool(ready and current and url and served_uri(isvc) == uri), url


def smoke_url(smoke: ObjView) -> str | None:
    """The URL a smoke-test Job was given (its --url argument): status is derived from what exists."""
    for c in ((((smoke.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or []):
        args = list(c.get("args") or [])
        if "--url" in args[:-1]:
            return str(args[args.index("--url") + 1])
    return None


def build_smoke_job(ftj: FineTuneJob, settings: Settings, url: str) -> Obj:
    """The batch/v1 Job sending held-out images to the InferenceService (the caller adds the owner reference)."""
    spec = ftj.valid_spec()
    assert spec.serving is not None and spec.serving.smoke_test is not None
    smoke = spec.serving.smoke_test
    holder = max((v for v in spec.volumes if within(smoke.data_path, v.mount_path)), key=lambda v: len(v.mount_path))
    labels = {"app.kubernetes.io/name": "finetune-smoke-test", "app.kubernetes.io/managed-by": MANAGED_BY,
              LABEL_SMOKE: ftj.uid}
    container: Obj = {
        "name": SMOKE_CONTAINER,
        "image": settings.serve_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python", "-c", SMOKE_WRAPPER],
        "args": ["--url", url, "--model", isvc_name(ftj), "--data", smoke.data_path,
                 "--samples", str(smoke.samples), "--min-accuracy", str(smoke.min_accuracy)],
        "env": [{"name": "HOME", "value": "/tmp"}, {"name": "PYTHONUNBUFFERED", "value": "1"}],
        "volumeMounts": [{"name": "data", "mountPath": holder.mount_path, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
    }
    pod: Obj = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": settings.run_as_user,
                            "runAsGroup": settings.run_as_group, "fsGroup": settings.fs_group,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "data", **_read_only(holder.source())},
                    {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
    }
    if settings.trainer_service_account:
        pod["serviceAccountName"] = settings.trainer_service_account
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": smoke_job_name(ftj), "namespace": ftj.namespace, "labels": labels,
                     "annotations": {ANNOTATION_NAME: ftj.name}},
        "spec": {"backoffLimit": 0, "activeDeadlineSeconds": smoke.timeout_seconds,
                 "template": {"metadata": {"labels": labels, "annotations": {ANNOTATION_NAME: ftj.name}},
                              "spec": pod}},
    }


def _read_only(source: Mapping[str, Any]) -> Obj:
    out = {k: v for k, v in source.items() if k != "name"}
    if "persistentVolumeClaim" in out:
        out["persistentVolumeClaim"] = {**out["persistentVolumeClaim"], "readOnly": True}
    return out


@dataclass(frozen=True)
class SmokeResult:
    passed: bool | None  # None: still running
    accuracy: float | None = None
    samples: int | None = None
    error: str | None = None  # the test could not run (not a verdict on the model)


def smoke_result(job: ObjView, pods: Sequence[ObjView]) -> SmokeResult:
    """The smoke-test Job's outcome: its conditions, and the JSON line its pod left as termination message."""
    if not observe.job_finished(job):
        return SmokeResult(None)
    terminated = next((s["state"]["terminated"] for p in pods
                       for s in (p.get("status") or {}).get("containerStatuses") or []
                       if s.get("name") == SMOKE_CONTAINER and (s.get("state") or {}).get("terminated")), {})
    try:
        line = json.loads((terminated.get("message") or "").strip().splitlines()[-1])
    except (ValueError, IndexError):
        line = {}
    line = line if isinstance(line, dict) else {}
    accuracy, samples = line.get("accuracy"), line.get("samples")
    if observe.job_succeeded(job):
        return SmokeResult(True, accuracy, samples)
    if terminated.get("exitCode") == EXIT_BELOW and accuracy is not None:
        return SmokeResult(False, accuracy, samples)
    cond = observe.condition(job, "Failed") or {}
    why = line.get("error") or (terminated.get("message") or "").strip()[-300:] or \
        f"{cond.get('reason') or 'Failed'}: {cond.get('message') or 'no message'}"
    return SmokeResult(False, error=why)


@dataclass
class Plan:
    """What one pass does for spec.serving, and what status says afterwards."""

    serving: dict[str, Any]  # status.serving
    condition: tuple[bool, str, str]  # the Served condition: (status, reason, message)
    create_isvc: Obj | None = None
    patch_isvc: Obj | None = None
    create_smoke: Obj | None = None
    settled: bool = False  # nothing more will happen without a change: the resync loop may forget it


def plan(ftj: FineTuneJob, settings: Settings, installed: bool, isvc: ObjView | None,
         smoke: ObjView | None, smoke_pods: Sequence[ObjView]) -> Plan:
    """The level-based decision for a Succeeded job with spec.serving (see the module docstring)."""
    serving = ftj.valid_spec().serving
    assert serving is not None
    name = isvc_name(ftj)
    if decided(ftj):
        return Plan(dict(ftj.status["serving"]), _recorded_condition(ftj), settled=True)
    base: dict[str, Any] = {"name": name}
    if not installed:
        return Plan({**base, "ready": False}, (False, ServingReason.KSERVE_NOT_INSTALLED,
                    f"the cluster has no {ISVC_API_VERSION} InferenceService API (KServe is not installed); "
                    f"the trained model stays in {ftj.valid_spec().output.path} and is served once KServe is there"))
    try:
        uri = storage_uri(ftj, settings)
    except ValueError as err:
        return Plan({**base, "promoted": False}, (False, ServingReason.EXPORT_NOT_SERVABLE, str(err)), settled=True)
    base["storageUri"] = uri
    if isvc is None:
        return Plan({**base, "ready": False}, (False, ServingReason.WAITING_FOR_READY,
                    f"creating InferenceService {name}"), create_isvc=build_inference_service(ftj, uri))
    annotations = (isvc.get("metadata") or {}).get("annotations") or {}
    previous = annotations.get(ANNOTATION_PREVIOUS) if annotations.get(ANNOTATION_NAME) == ftj.name else None
    if previous:
        base["previousStorageUri"] = previous
    if served_uri(isvc) != uri and smoke is None:
        if not owned_by_a_finetunejob(isvc):
            return Plan({**base, "ready": False}, (False, ServingReason.NAME_TAKEN,
                        f"InferenceService {name} exists and was not made by a FineTuneJob: it is left alone "
                        "(set spec.serving.inferenceService.name to another name, or delete it)"))
        return Plan({**base, "ready": False, "previousStorageUri": served_uri(isvc)},
                    (False, ServingReason.WAITING_FOR_READY, f"updating InferenceService {name} to this export"
                     + (f" as a {serving.canary_traffic_percent}% canary" if serving.canary_traffic_percent
                        is not None else "")), patch_isvc=takeover_patch(ftj, isvc, uri))
    ready, url = isvc_ready(isvc, uri)
    base.update(ready=ready, **({"url": url} if url else {}))
    if smoke is None:
        if not ready:
            return Plan(base, (False, ServingReason.WAITING_FOR_READY,
                        f"waiting for KServe to report InferenceService {name} Ready with {uri}"))
        if serving.smoke_test is None:
            return _decide(ftj, base, SmokeResult(True), previous)
        target, what = str(url), ""
        if serving.canary_traffic_percent is not None:
            latest = revision_url(isvc)
            target, what = (latest, " (the new revision alone)") if latest else \
                (target, " (KServe reports no revision URL, so the traffic mix: is tag routing off?)")
        return Plan({**base, "smokeJob": smoke_job_name(ftj), "smokeUrl": target}, (False, ServingReason.SMOKE_TESTING,
                    f"smoke-testing InferenceService {name} at {target}{what}"),
                    create_smoke=build_smoke_job(ftj, settings, target))
    base["smokeJob"] = smoke["metadata"]["name"]
    if (sent_to := smoke_url(smoke)) is not None:
        base["smokeUrl"] = sent_to
    result = smoke_result(smoke, smoke_pods)
    if result.passed is None:
        return Plan(base, (False, ServingReason.SMOKE_TESTING, f"smoke test {base['smokeJob']} is running"))
    return _decide(ftj, base, result, previous)


def _decide(ftj: FineTuneJob, base: dict[str, Any], result: SmokeResult, previous: str | None) -> Plan:
    """Promote (a canary goes to 100%) or roll back (a canary to 0%, else the previous storageUri)."""
    serving = ftj.valid_spec().serving
    assert serving is not None
    name, canary = base["name"], serving.canary_traffic_percent
    status = {**base, "promoted": bool(result.passed),
              **({"smokeAccuracy": result.accuracy} if result.accuracy is not None else {}),
              **({"smokeSamples": result.samples} if result.samples is not None else {})}
    smoke = serving.smoke_test
    if result.passed:
        # KServe promotes a canary when canaryTrafficPercent goes away: the latest revision takes all traffic.
        patch = {"spec": {"predictor": {"canaryTrafficPercent": None}}} if canary is not None else None
        tested = f"smoke accuracy {result.accuracy:.4f} >= minAccuracy {smoke.min_accuracy} " \
            if smoke is not None and result.accuracy is not None else ""
        return Plan(status, (True, ServingReason.PROMOTED, f"{tested}InferenceService {name} serves this export"
                    + (" (canary promoted to 100%)" if canary is not None else "")), patch_isvc=patch, settled=True)
    if canary is not None:  # KServe's rollback: 0% to the latest revision, all traffic to the previous one
        patch, after = {"spec": {"predictor": {"canaryTrafficPercent": 0}}}, \
            "canary rolled back: the previous revision takes all the traffic"
    elif previous:
        patch, after = {"spec": {"predictor": {"model": {"storageUri": previous}}}}, f"rolled back to {previous}"
    else:
        patch, after = None, "there is no earlier revision to roll back to, so it still serves this export"
    if result.error is None:
        assert smoke is not None
        reason = ServingReason.SMOKE_TEST_FAILED
        why = f"smoke accuracy {result.accuracy:.4f} is below minAccuracy {smoke.min_accuracy} " \
            f"on {result.samples} held-out images"
    else:
        reason, why = ServingReason.SMOKE_TEST_ERROR, f"the smoke test could not run ({result.error})"
    message = f"{why}: not promoted; InferenceService {name}: {after}"
    return Plan(status, (False, reason, message), patch_isvc=patch, settled=True)


def _recorded_condition(ftj: FineTuneJob) -> tuple[bool, str, str]:
    served = next((c for c in ftj.status.get("conditions") or [] if c.get("type") == ConditionType.SERVED), {})
    promoted = bool((ftj.status.get("serving") or {}).get("promoted"))
    return promoted, served.get("reason") or ("Promoted" if promoted else "NotPromoted"), served.get("message", "")

"""Property tests (hypothesis): whatever the spec model accepts, the builders turn into a valid Job.

The generator deliberately mixes valid and hostile values (shell metacharacters, unicode, long
names, reserved volume names and mount paths, duplicate mounts). Each generated spec either fails
to parse with a one-line JobFileError, is refused by `cluster_problems` naming a field, or yields
a ConfigMap, Secret and Job that satisfy what the API server would check — names and labels, one
mount per path, restricted security context, args as a list — and a job file that parses back to
the same spec. Multi-worker specs (workers 1..4) also yield a headless Service, and every worker's
hostname and worker 0's DNS name are valid DNS names.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from finetune_api.errors import JobFileError
from finetune_api.spec import parse_job, parse_spec
from finetune_operator import admission, objects
from finetune_operator.parsed import FineTuneJob
from finetune_operator.settings import Settings

pytestmark = pytest.mark.unit

SETTINGS = [
    Settings(trainer_image="registry.local/trainer:1.0"),
    Settings(trainer_image="t:1", output_pvc="models", progress_url="http://op.ops.svc:8081/"),
]
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")

# Hostile but printable text: shell metacharacters, quotes, unicode, YAML syntax.
HOSTILE = st.text(
    alphabet=st.sampled_from(list("abc/._-$`;|&<>(){}[]'\"\\*?! ~#%:=,\u00e9\u4e2d\U0001f600")), min_size=1, max_size=40
)
PATHS = st.one_of(
    st.sampled_from(["/data", "/output", "/models/out", "/tmp", "/tmp/x", "/etc/finetune", "/dev/shm/a", "/", "out"]),
    HOSTILE.map(lambda s: "/" + s),
    HOSTILE,
)
VOLUME_NAMES = st.one_of(
    st.sampled_from(["data", "models", "finetune-tmp", "finetune-output", "Data", "a" * 64]),
    st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True),
)
SOURCES = st.sampled_from(
    [
        {"persistentVolumeClaim": {"claimName": "data"}},
        {"emptyDir": {}},
        {"configMap": {"name": "labels"}},
        {"hostPath": {"path": "/srv"}},
        {"nfs": {"server": "nfs.local", "path": "/x"}},
    ]
)
VOLUME = st.builds(
    lambda name, mount, ro, source: {"name": name, "mountPath": mount, "readOnly": ro, **source},
    VOLUME_NAMES,
    PATHS,
    st.booleans(),
    SOURCES,
)
QUANTITY = st.one_of(st.sampled_from(["500m", "2", "16Gi", "1.5", "4Ki"]), HOSTILE)


def optional(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A dict whose keys are each present or absent."""
    return st.fixed_dictionaries({}, optional=fields)


SPEC = st.fixed_dictionaries(
    {
        "dataset": st.one_of(
            optional(imageSize=st.integers(0, 2048), valFraction=st.floats(-1, 2)).map(
                lambda d: {"builtin": "digits", **d}
            ),
            st.builds(lambda p: {"path": p}, PATHS),
        )
    },
    optional=dict(
        model=optional(
            architecture=st.sampled_from(["resnet18", "mobilenet_v3_small", "vit_b_16", "resnet18; rm -rf /"]),
            weights=optional(source=st.sampled_from(["torchvision", "file", "none"]), path=PATHS, name=HOSTILE),
        ),
        freeze=optional(policy=st.sampled_from(["head", "partial", "full"]), trainableStages=st.integers(0, 40)),
        training=optional(
            epochs=st.integers(-1, 20000),
            batchSize=st.one_of(st.integers(0, 100000), st.sampled_from([24, 48, 240])),  # splittable ones too
            learningRate=st.floats(allow_nan=True, allow_infinity=True),
            precision=st.sampled_from(["auto", "bf16", "fp64"]),
        ),
        output=optional(path=PATHS),
        image=HOSTILE,
        resources=optional(cpu=QUANTITY, memory=QUANTITY, gpus=st.integers(-1, 20)),
        volumes=st.lists(VOLUME, max_size=4),
        scheduling=optional(
            nodeSelector=st.dictionaries(st.sampled_from(["pool", "gpu"]), HOSTILE, max_size=2),
            priorityClassName=st.sampled_from(["", "high"]),
        ),
        runPolicy=optional(backoffLimit=st.integers(-1, 200), suspend=st.booleans()),
        workers=st.integers(1, 4),
    ),
)
NAMES = st.one_of(
    st.sampled_from(["demo", "a" * 63, "a" * 64, "x" * 253, "my.job.v2", "a-" * 60 + "b"]),
    st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,100}[a-z0-9])?", fullmatch=True),
    st.from_regex(r"[a-z0-9]([-a-z0-9]{0,60}[a-z0-9])?", fullmatch=True),  # hostname-sized: multi-worker jobs
)


def manifest(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "ml", "uid": "0b7c1f4e-uid", "generation": 1},
        "spec": spec,
    }


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=NAMES, spec=SPEC, which=st.sampled_from(range(len(SETTINGS))))
def test_every_accepted_spec_builds_a_valid_job(name: str, spec: dict[str, Any], which: int) -> None:
    operator_settings = SETTINGS[which]
    try:
        parsed = parse_spec(spec)
    except JobFileError as err:
        # Refused: one line, naming a spec field.
        assert "\n" not in str(err) and str(err).startswith("spec")
        event("refused by the spec model")
        return
    problems = admission.cluster_problems(parsed, operator_settings, name)
    if problems:
        assert all(p.startswith("spec.") for p in problems)
        event("refused by cluster_problems")
        return
    event("built")
    ftj = FineTuneJob.from_body(manifest(name, spec))
    job = objects.build_job(ftj, operator_settings)
    config = objects.build_configmap(ftj)
    assert_valid_object(job, max_name=63)
    assert_valid_object(config, max_name=253)
    assert_valid_object(objects.build_token_secret(ftj, "t0ken"), max_name=253)
    assert_valid_pod(job["spec"]["template"]["spec"], job["spec"]["template"]["metadata"])
    if parsed.workers > 1:
        event("built with several workers")
        assert_valid_workers(ftj, job, parsed.workers)
    else:
        assert "completionMode" not in job["spec"] and "subdomain" not in job["spec"]["template"]["spec"]
    # The trainer reads back exactly the spec the operator validated.
    (text,) = config["data"].values()
    assert parse_job(yaml.safe_load(text)).spec == parsed


def assert_valid_object(obj: dict[str, Any], max_name: int) -> None:
    meta = obj["metadata"]
    assert len(meta["name"]) <= max_name and DNS_SUBDOMAIN.match(meta["name"]), meta["name"]
    assert_valid_labels(meta.get("labels") or {})
    assert sum(len(k) + len(v) for k, v in (meta.get("annotations") or {}).items()) < 256 * 1024


def assert_valid_labels(labels: dict[str, str]) -> None:
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        assert not prefix or (len(prefix) <= 253 and DNS_SUBDOMAIN.match(prefix)), key
        assert len(name) <= 63 and LABEL_NAME.match(name), key
        assert isinstance(value, str) and len(value) <= 63 and LABEL_VALUE.match(value), (key, value)


def assert_valid_pod(pod: dict[str, Any], meta: dict[str, Any]) -> None:
    assert_valid_labels(meta["labels"])
    names = [v["name"] for v in pod["volumes"]]
    assert len(names) == len(set(names)), names
    assert all(len(n) <= 63 and DNS_LABEL.match(n) for n in names), names
    (container,) = pod["containers"]
    mounts = container["volumeMounts"]
    paths = [m["mountPath"] for m in mounts]
    assert len(paths) == len(set(paths)), paths
    assert all(p.startswith("/") for p in paths), paths
    normalized = [posixpath.normpath(p) for p in paths]
    assert len(normalized) == len(set(normalized)), paths
    assert {m["name"] for m in mounts} <= set(names)
    assert all(isinstance(a, str) for a in container["command"] + container["args"])
    assert_restricted(pod, container)


def assert_restricted(pod: dict[str, Any], container: dict[str, Any]) -> None:
    """Pod Security Standard "restricted", plus a read-only root and no API token."""
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert "hostNetwork" not in pod and "hostPID" not in pod
    assert all("hostPath" not in v for v in pod["volumes"])


def assert_valid_workers(ftj: FineTuneJob, job: dict[str, Any], workers: int) -> None:
    """What the API server and cluster DNS need for N pods that find worker 0 by name."""
    service = objects.build_service(ftj)
    assert_valid_object(service, max_name=63)
    assert re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", service["metadata"]["name"])  # DNS-1035: a Service name
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completions"] == spec["parallelism"] == workers and spec["completionMode"] == "Indexed"
    assert pod["subdomain"] == service["metadata"]["name"]
    # The Job controller sets each pod's hostname to <job>-<index>; it must be a DNS label.
    for index in range(workers):
        host = f"{job['metadata']['name']}-{index}"
        assert len(host) <= 63 and DNS_LABEL.match(host), host
    (container,) = pod["containers"]
    master = f"--master-addr={job['metadata']['name']}-0.{service['metadata']['name']}"
    assert master in container["args"] and f"--nnodes={workers}" in container["args"]


@settings(max_examples=150, deadline=None)
@given(name=NAMES, workers=st.integers(1, 4), gpus=st.integers(0, 4), batch=st.integers(1, 512),
       which=st.sampled_from(range(len(SETTINGS))))
def test_every_accepted_worker_layout_builds_a_valid_group(name: str, workers: int, gpus: int, batch: int,
                                                           which: int) -> None:
    """Plain specs varying only the data-parallel layout: refused for a named reason, or a valid group."""
    spec = {"dataset": {"builtin": "digits"}, "workers": workers, "resources": {"gpus": gpus},
            "training": {"batchSize": batch}}
    try:
        parsed = parse_spec(spec)
    except JobFileError as err:
        assert str(err).startswith("spec: training.batchSize") and workers > 1
        assert batch % (workers * max(1, gpus))
        return
    problems = admission.cluster_problems(parsed, SETTINGS[which], name)
    if problems:
        assert workers > 1 and problems[0].startswith("spec.workers:")
        return
    ftj = FineTuneJob.from_body(manifest(name, spec))
    job = objects.build_job(ftj, SETTINGS[which])
    assert_valid_object(job, max_name=63)
    assert_valid_pod(job["spec"]["template"]["spec"], job["spec"]["template"]["metadata"])
    if workers > 1:
        assert_valid_workers(ftj, job, workers)
        assert f"--nproc-per-node={max(1, gpus)}" in job["spec"]["template"]["spec"]["containers"][0]["args"]

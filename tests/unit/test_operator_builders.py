"""build_job / build_configmap (objects), names (naming), admission and drift: deterministic, restricted,
and faithful to the spec."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml

from finetune_api.errors import EXIT_INVALID_JOB, EXIT_PREEMPTED, JobFileError
from finetune_api.spec import load_job
from finetune_operator import admission, drift, naming, objects
from finetune_operator.parsed import FineTuneJob
from finetune_operator.settings import Settings

pytestmark = pytest.mark.unit

SETTINGS = Settings(trainer_image="registry.local/trainer:1.0")


def body(spec: dict[str, Any] | None = None, name: str = "demo", **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "ml", "uid": "uid-123", "generation": 1, **meta},
        "spec": spec if spec is not None else {"dataset": {"builtin": "digits"}},
    }


def ftj(spec: dict[str, Any] | None = None, name: str = "demo", **meta: Any) -> FineTuneJob:
    return FineTuneJob.from_body(body(spec, name, **meta))


def container(job: dict[str, Any]) -> dict[str, Any]:
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return c


def test_job_is_deterministic_and_named_after_the_finetunejob() -> None:
    a, b = objects.build_job(ftj(), SETTINGS), objects.build_job(ftj(), SETTINGS)
    assert a == b
    assert a["metadata"]["name"] == "demo"
    assert a["metadata"]["namespace"] == "ml"
    assert "ownerReferences" not in a["metadata"]  # the handler adopts it


def test_long_names_are_hashed_to_63_characters_and_stay_unique() -> None:
    long_a, long_b = "a" * 100, "a" * 99 + "b"
    name_a = naming.job_name(ftj(name=long_a).name)
    assert len(name_a) <= 63
    assert name_a != naming.job_name(ftj(name=long_b).name)
    job = objects.build_job(ftj(name=long_a), SETTINGS)
    assert all(len(v) <= 63 for v in job["metadata"]["labels"].values())
    assert job["metadata"]["annotations"][naming.ANNOTATION_NAME] == long_a


def test_labels_select_by_uid_and_reach_the_pods() -> None:
    job = objects.build_job(ftj(), SETTINGS)
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert pod_labels[naming.LABEL_UID] == "uid-123"
    assert job["metadata"]["labels"][naming.LABEL_UID] == "uid-123"
    assert job["spec"]["template"]["metadata"]["annotations"][naming.ANNOTATION_NAME] == "demo"


def test_kueue_labels_pass_through_other_labels_do_not() -> None:
    labels = {"kueue.x-k8s.io/queue-name": "gpu-queue", "app.kubernetes.io/instance": "argo-app"}
    job = objects.build_job(ftj(labels=labels), SETTINGS)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert "app.kubernetes.io/instance" not in job["metadata"]["labels"]


def test_trainer_command_is_an_args_list_reading_the_mounted_job_file() -> None:
    c = container(objects.build_job(ftj(), SETTINGS))
    assert c["command"] == ["finetune-train"]
    assert c["args"] == ["-f", "/etc/finetune/job.yaml", "--report", "jsonl"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/etc/finetune"]["readOnly"] is True


def test_hostile_strings_never_reach_a_shell() -> None:
    spec = {"dataset": {"path": "/data/$(rm -rf ~); echo pwned"}, "image": "img; rm -rf /"}
    job = objects.build_job(ftj(spec), SETTINGS)
    c = container(job)
    assert c["args"] == ["-f", "/etc/finetune/job.yaml", "--report", "jsonl"]
    assert c["image"] == "img; rm -rf /"  # the runtime rejects it as InvalidImageName; no shell sees it
    assert "sh" not in c["command"] and "-c" not in c["args"]


def test_image_from_settings_overridable_by_spec() -> None:
    assert container(objects.build_job(ftj(), SETTINGS))["image"] == "registry.local/trainer:1.0"
    spec = {"dataset": {"builtin": "digits"}, "image": "mine:2"}
    assert container(objects.build_job(ftj(spec), SETTINGS))["image"] == "mine:2"


def test_gpu_resources_only_when_gpus_requested() -> None:
    cpu_only = container(objects.build_job(ftj(), SETTINGS))
    assert "nvidia.com/gpu" not in json.dumps(cpu_only["resources"])
    spec = {"dataset": {"builtin": "digits"}, "resources": {"gpus": 2, "cpu": "4", "memory": "16Gi"}}
    res = container(objects.build_job(ftj(spec), SETTINGS))["resources"]
    assert res["limits"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": 2}
    assert res["requests"] == {"cpu": "4", "memory": "16Gi"}


def test_scheduling_fields_are_passed_through() -> None:
    tol = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    spec = {
        "dataset": {"builtin": "digits"},
        "scheduling": {
            "nodeSelector": {"gpu": "a100"},
            "tolerations": [tol],
            "priorityClassName": "training",
        },
    }
    pod = objects.build_job(ftj(spec), SETTINGS)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["tolerations"] == [tol]
    assert pod["priorityClassName"] == "training"
    plain = objects.build_job(ftj(), SETTINGS)["spec"]["template"]["spec"]
    assert "nodeSelector" not in plain and "tolerations" not in plain and "priorityClassName" not in plain


def test_pod_is_restricted() -> None:
    pod = objects.build_job(ftj(), SETTINGS)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container({"spec": {"template": {"spec": pod}}})["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]  # the only writable scratch besides output
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert pod["terminationGracePeriodSeconds"] >= 60  # time to checkpoint on SIGTERM


def test_run_policy_maps_to_the_job() -> None:
    spec = {
        "dataset": {"builtin": "digits"},
        "runPolicy": {
            "backoffLimit": 5,
            "activeDeadlineSeconds": 3600,
            "ttlSecondsAfterFinished": 60,
            "suspend": True,
        },
    }
    job = objects.build_job(ftj(spec), SETTINGS)["spec"]
    assert job["backoffLimit"] == 5
    assert job["activeDeadlineSeconds"] == 3600
    assert job["ttlSecondsAfterFinished"] == 60
    assert job["suspend"] is True
    defaults = objects.build_job(ftj(), SETTINGS)["spec"]
    assert defaults["backoffLimit"] == 2 and defaults["suspend"] is False
    assert "activeDeadlineSeconds" not in defaults and "ttlSecondsAfterFinished" not in defaults


def test_pod_failure_policy_ignores_disruptions_and_preemption_fails_fast_on_invalid_job() -> None:
    rules = objects.build_job(ftj(), SETTINGS)["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    by_code = {r["onExitCodes"]["values"][0]: r for r in rules if "onExitCodes" in r}
    assert by_code[EXIT_INVALID_JOB]["action"] == "FailJob"
    assert by_code[EXIT_PREEMPTED]["action"] == "Ignore"
    assert all(r["onExitCodes"]["containerName"] == "trainer" for r in by_code.values())


def test_user_volumes_are_mounted() -> None:
    vol = {
        "name": "data",
        "mountPath": "/data",
        "readOnly": True,
        "persistentVolumeClaim": {"claimName": "imgs"},
    }
    spec = {"dataset": {"path": "/data/images"}, "volumes": [vol]}
    pod = objects.build_job(ftj(spec), SETTINGS)["spec"]["template"]["spec"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "imgs"}} in pod["volumes"]
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in pod["containers"][0]["volumeMounts"]


def _output_mount(job: dict[str, Any], path: str = "/output") -> tuple[dict[str, Any], dict[str, Any]]:
    pod = job["spec"]["template"]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == path)
    return mount, next(v for v in pod["volumes"] if v["name"] == mount["name"])


def test_output_defaults_to_an_emptydir_and_says_so() -> None:
    _, volume = _output_mount(objects.build_job(ftj(), SETTINGS))
    assert volume == {"name": objects.VOL_OUTPUT, "emptyDir": {}}
    assert objects.output_location(ftj(), SETTINGS)["ephemeral"] is True


def test_output_on_a_user_volume_gets_no_extra_mount() -> None:
    vol = {"name": "models", "mountPath": "/models", "persistentVolumeClaim": {"claimName": "m"}}
    spec = {"dataset": {"builtin": "digits"}, "output": {"path": "/models/run1"}, "volumes": [vol]}
    pod = objects.build_job(ftj(spec), SETTINGS)["spec"]["template"]["spec"]
    assert objects.VOL_OUTPUT not in {v["name"] for v in pod["volumes"]}
    loc = objects.output_location(ftj(spec), SETTINGS)
    assert loc == {"path": "/models/run1", "volume": "models", "ephemeral": False}


def test_output_pvc_setting_uses_a_subpath_per_job() -> None:
    settings = Settings(output_pvc="models")
    mount, volume = _output_mount(objects.build_job(ftj(), settings))
    assert volume["persistentVolumeClaim"] == {"claimName": "models"}
    assert mount["subPath"] == "demo"


def test_configmap_holds_the_resolved_job_file_the_trainer_can_load(tmp_path: Any) -> None:
    cm = objects.build_configmap(ftj({"dataset": {"builtin": "digits"}, "training": {"epochs": 3}}))
    assert cm["metadata"]["name"] == "demo-spec"
    assert cm["metadata"]["labels"][naming.LABEL_UID] == "uid-123"
    doc = yaml.safe_load(cm["data"]["job.yaml"])
    assert doc["spec"]["training"]["epochs"] == 3
    assert doc["spec"]["training"]["batchSize"] == 32  # defaults resolved
    path = tmp_path / "job.yaml"
    path.write_text(cm["data"]["job.yaml"])
    job_file = load_job(path)  # the trainer's own loader accepts it
    assert job_file.name == "demo" and job_file.spec.training.epochs == 3


def test_configmap_volume_points_at_the_configmap() -> None:
    job = objects.build_job(ftj(), SETTINGS)
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes[objects.VOL_JOB_FILE]["configMap"]["name"] == naming.configmap_name(ftj().name)


def test_invalid_spec_raises_a_field_naming_error() -> None:
    with pytest.raises(JobFileError, match=r"spec\.training\.epochs"):
        objects.build_job(ftj({"dataset": {"builtin": "digits"}, "training": {"epochs": 0}}), SETTINGS)


@pytest.mark.parametrize(
    ("spec_extra", "field"),
    [
        ({"volumes": [{"name": "finetune-tmp", "mountPath": "/x", "emptyDir": {}}]}, "spec.volumes[0].name"),
        ({"volumes": [{"name": "a", "mountPath": "/tmp/a", "emptyDir": {}}]}, "spec.volumes[0].mountPath"),
        ({"volumes": [{"name": "a", "mountPath": "/etc", "emptyDir": {}}]}, "spec.volumes[0].mountPath"),
        (
            {
                "volumes": [
                    {"name": "a", "mountPath": "/d", "emptyDir": {}},
                    {"name": "b", "mountPath": "/d/", "emptyDir": {}},
                ]
            },
            "spec.volumes[1].mountPath",
        ),
        (
            {"volumes": [{"name": "h", "mountPath": "/h", "hostPath": {"path": "/"}}]},
            "spec.volumes[0].hostPath",
        ),
        (
            {"volumes": [{"name": "o", "mountPath": "/output", "readOnly": True, "emptyDir": {}}]},
            "spec.output.path",
        ),
    ],
)
def test_cluster_problems_name_the_field(spec_extra: dict[str, Any], field: str) -> None:
    spec = ftj({"dataset": {"builtin": "digits"}, **spec_extra}).valid_spec()
    problems = admission.cluster_problems(spec, SETTINGS)
    assert any(p.startswith(field + ":") for p in problems), problems


def test_a_plain_spec_has_no_cluster_problems_and_hostpath_can_be_allowed() -> None:
    assert admission.cluster_problems(ftj().valid_spec(), SETTINGS) == []
    spec = {
        "dataset": {"builtin": "digits"},
        "volumes": [{"name": "h", "mountPath": "/h", "hostPath": {"path": "/d"}}],
    }
    assert admission.cluster_problems(ftj(spec).valid_spec(), Settings(allow_host_path=True)) == []


def test_changed_fields_names_what_changed_and_ignores_suspend() -> None:
    original = body({"dataset": {"builtin": "digits"}, "training": {"epochs": 3}})
    job = objects.build_job(FineTuneJob.from_body(original), SETTINGS)
    assert drift.changed_fields(FineTuneJob.from_body(original), job) == []
    suspended = copy.deepcopy(original)
    suspended["spec"]["runPolicy"] = {"suspend": True}
    assert drift.changed_fields(FineTuneJob.from_body(suspended), job) == []
    longer = copy.deepcopy(original)
    longer["spec"]["training"]["epochs"] = 30
    assert drift.changed_fields(FineTuneJob.from_body(longer), job) == ["training"]
    # A default written out explicitly is not a change (the server fills CRD defaults in).
    explicit = copy.deepcopy(original)
    explicit["spec"]["training"]["batchSize"] = 32
    assert drift.changed_fields(FineTuneJob.from_body(explicit), job) == []


def test_progress_wiring_mounts_only_this_jobs_token() -> None:
    settings = Settings(progress_url="http://finetune-operator.ops.svc:8081/")
    obj = ftj(namespace="team")
    job = objects.build_job(obj, settings)
    pod = job["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in container(job)["env"]}
    assert env["FINETUNE_PROGRESS_URL"] == "http://finetune-operator.ops.svc:8081/v1/progress/team/demo"
    assert env["FINETUNE_PROGRESS_TOKEN_FILE"] == objects.PROGRESS_TOKEN_FILE
    vol = next(v for v in pod["volumes"] if v["name"] == objects.VOL_PROGRESS)
    assert vol["secret"]["secretName"] == naming.token_secret_name(obj.name) == "demo-progress"
    mount = next(m for m in container(job)["volumeMounts"] if m["name"] == objects.VOL_PROGRESS)
    assert mount["readOnly"] is True and objects.PROGRESS_TOKEN_FILE.startswith(mount["mountPath"])
    assert pod["automountServiceAccountToken"] is False  # the token file is the only credential
    secret = objects.build_token_secret(obj, "abc")
    assert secret["stringData"] == {"token": "abc"} and secret["metadata"]["namespace"] == "team"
    assert naming.LABEL_UID in secret["metadata"]["labels"]


def test_torch_threads_follow_the_cpu_limit_not_the_node() -> None:
    job = objects.build_job(ftj({"dataset": {"builtin": "digits"}, "resources": {"cpu": "1500m"}}), SETTINGS)
    (omp,) = [e for e in container(job)["env"] if e["name"] == "OMP_NUM_THREADS"]
    assert omp["valueFrom"]["resourceFieldRef"] == {"containerName": "trainer", "resource": "limits.cpu",
                                                     "divisor": "1"}
    assert container(job)["resources"]["limits"]["cpu"] == "1500m"  # the kubelet rounds it up: 2 threads


def test_no_progress_url_means_no_token_and_no_push_env() -> None:
    job = objects.build_job(ftj(), Settings(progress_url=""))
    names = {e["name"] for e in container(job)["env"]}
    assert "FINETUNE_PROGRESS_URL" not in names and "FINETUNE_PROGRESS_TOKEN_FILE" not in names
    assert objects.VOL_PROGRESS not in {v["name"] for v in job["spec"]["template"]["spec"]["volumes"]}


def test_trainer_service_account_from_settings() -> None:
    pod = objects.build_job(ftj(), Settings(trainer_service_account="finetune-trainer"))["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "finetune-trainer" and pod["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in objects.build_job(ftj(), Settings())["spec"]["template"]["spec"]


# ------------------------------------------------------------------ multi-worker (spec.workers > 1)

WORKERS = {"dataset": {"builtin": "digits"}, "workers": 3, "training": {"batchSize": 30}}


def test_single_worker_job_stays_a_plain_job() -> None:
    job = objects.build_job(ftj(), SETTINGS)
    assert "completionMode" not in job["spec"] and "backoffLimitPerIndex" not in job["spec"]
    assert "subdomain" not in job["spec"]["template"]["spec"] and "ports" not in container(job)


def test_workers_make_an_indexed_job_that_fails_and_succeeds_as_a_group() -> None:
    spec = {**WORKERS, "runPolicy": {"backoffLimit": 4}}
    job = objects.build_job(ftj(spec), SETTINGS)["spec"]
    assert (job["completionMode"], job["completions"], job["parallelism"]) == ("Indexed", 3, 3)
    # Retries are counted per worker (each group restart fails every index once) and one worker out of
    # retries fails the whole Job: no half-alive group.
    assert job["backoffLimitPerIndex"] == 4 and job["maxFailedIndexes"] == 0 and "backoffLimit" not in job
    assert job["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}
    # The exit-code rules are the single-worker ones: exit 2 fails the Job, 75 and disruptions don't count.
    assert job["podFailurePolicy"] == objects.pod_failure_policy()


def test_workers_find_worker_0_through_a_headless_service() -> None:
    body = ftj(WORKERS, name="resnet-dp")
    svc = objects.build_service(body)
    assert svc["metadata"]["name"] == "resnet-dp" and svc["metadata"]["namespace"] == "ml"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == naming.selector_labels(body.uid)
    assert svc["spec"]["ports"][0]["port"] == objects.RENDEZVOUS_PORT
    job = objects.build_job(body, SETTINGS)
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == "resnet-dp"
    # The Job controller names pod i's host resnet-dp-i: worker 0 is resnet-dp-0.resnet-dp in the namespace.
    assert naming.master_address(body.name) == "resnet-dp-0.resnet-dp"
    assert naming.selector_labels(body.uid).items() <= job["spec"]["template"]["metadata"]["labels"].items()


def test_workers_run_the_trainer_under_torchrun_with_static_rendezvous_on_worker_0() -> None:
    settings = Settings(trainer_image="t:1", termination_grace_seconds=90, startup_deadline_seconds=300)
    c = container(objects.build_job(ftj(WORKERS, name="dp"), settings))
    assert c["command"] == ["finetune-train"]
    assert c["args"] == [
        "torchrun", "--nnodes=3", "--nproc-per-node=1", "--node-rank=$(JOB_COMPLETION_INDEX)",
        "--master-addr=dp-0.dp", "--master-port=29500", "--rdzv-conf=timeout=300", "--max-restarts=0",
        "--shutdown-timeout=90", "-m", "finetune_trainer", "-f", "/etc/finetune/job.yaml", "--report", "jsonl",
    ]
    assert c["ports"] == [{"name": "rendezvous", "containerPort": 29500, "protocol": "TCP"}]
    assert "JOB_COMPLETION_INDEX" not in {e["name"] for e in c["env"]}  # the Job controller sets it


def test_gpu_workers_run_one_process_per_gpu_and_resources_are_per_pod() -> None:
    spec = {**WORKERS, "workers": 2, "resources": {"gpus": 4, "cpu": "8", "memory": "32Gi"},
            "training": {"batchSize": 64}}
    c = container(objects.build_job(ftj(spec), SETTINGS))
    assert "--nproc-per-node=4" in c["args"]
    assert c["resources"]["limits"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 4}


def test_global_batch_must_split_evenly_over_the_training_processes() -> None:
    with pytest.raises(JobFileError, match=r"batchSize .*multiple of the 3 training processes"):
        ftj({**WORKERS, "training": {"batchSize": 32}}).valid_spec()
    with pytest.raises(JobFileError, match="multiple of the 8 training processes"):
        ftj({**WORKERS, "workers": 2, "resources": {"gpus": 4}, "training": {"batchSize": 36}}).valid_spec()
    ftj({"dataset": {"builtin": "digits"}, "resources": {"gpus": 3}}).valid_spec()  # one worker: as before


@pytest.mark.parametrize("name", ["my.job", "a" * 62, "b" * 100])
def test_worker_hostnames_need_a_short_dotless_name(name: str) -> None:
    spec = ftj(WORKERS, name=name).valid_spec()
    (problem,) = admission.cluster_problems(spec, SETTINGS, name)
    assert problem.startswith("spec.workers: a FineTuneJob with 3 workers needs a name without dots of at most 61")
    assert admission.cluster_problems(ftj({"dataset": {"builtin": "digits"}}).valid_spec(), SETTINGS, name) \
        == []  # one worker: any name


def test_a_name_starting_with_a_digit_gets_a_valid_service_name() -> None:
    body = ftj(WORKERS, name="1st-run")
    assert naming.service_name(body.name) == "ftj-1st-run"
    assert naming.master_address(body.name) == "1st-run-0.ftj-1st-run"
    assert objects.build_job(body, SETTINGS)["spec"]["template"]["spec"]["subdomain"] == "ftj-1st-run"

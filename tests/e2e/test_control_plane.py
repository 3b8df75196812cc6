"""The real API-server behaviour the operator relies on, proven against the cluster under test.

These need a real control plane (no mock has them): the Job controller creating pods, the scheduler binding
them, ownerReference garbage collection, CRD structural schema + CEL validation, the status subresource,
resourceVersion conflicts, label selectors and RBAC. They run unchanged on kind and on the local
control plane (there the kubelet node runs the Job's `sh -c "exit 0"` in the project's operator image, which
it has locally; on kind a real busybox container exits 0).
"""

from __future__ import annotations

import uuid

import pytest

pytestmark = pytest.mark.e2e

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client  # noqa: E402

JOB_IMAGE = "busybox:1.36"  # on clusters that can pull; the local node has only the project's own images


@pytest.fixture(scope="module")
def job_image(local_cluster) -> str:
    """An image with /bin/sh the cluster's node can run: the operator image on the local kubelet node."""
    return (getattr(local_cluster, "images", None) or {}).get("operator") or JOB_IMAGE


def _gone(fn, *args) -> bool:
    try:
        fn(*args)
    except client.ApiException as e:
        if e.status == 404:
            return True
        raise
    return False


def test_api_server_answers(k8s):
    version = client.VersionApi(k8s).get_code()
    assert int(version.major) == 1
    names = {ns.metadata.name for ns in client.CoreV1Api(k8s).list_namespace().items}
    assert {"default", "kube-system"} <= names


def test_namespace_gets_service_account_and_root_ca(k8s, namespace, wait_for):
    core = client.CoreV1Api(k8s)
    # serviceaccount controller + root-ca-certificate-publisher: what a pod in a new namespace needs.
    sa_default = "metadata.name=default"
    wait_for(
        lambda: core.list_namespaced_service_account(namespace, field_selector=sa_default).items,
        what="the default ServiceAccount",
    )
    cm = wait_for(
        lambda: core.list_namespaced_config_map(namespace, field_selector="metadata.name=kube-root-ca.crt").items,
        what="the kube-root-ca.crt ConfigMap",
    )
    assert "BEGIN CERTIFICATE" in cm[0].data["ca.crt"]


def _job(name: str, image: str, ttl: int | None = None) -> client.V1Job:
    return client.V1Job(
        metadata=client.V1ObjectMeta(name=name, labels={"app": "e2e-job"}),
        spec=client.V1JobSpec(
            backoff_limit=0,
            ttl_seconds_after_finished=ttl,
            template=client.V1PodTemplateSpec(
                spec=client.V1PodSpec(
                    restart_policy="Never",
                    containers=[client.V1Container(name="main", image=image, command=["sh", "-c", "exit 0"])],
                )
            ),
        ),
    )


def _conditions(job) -> dict[str, str]:
    return {c.type: c.status for c in (job.status.conditions or [])}


def test_job_controller_runs_a_job_to_completion(k8s, namespace, wait_for, job_image):
    batch, core = client.BatchV1Api(k8s), client.CoreV1Api(k8s)
    batch.create_namespaced_job(namespace, _job("ok", job_image))

    pods = wait_for(
        lambda: core.list_namespaced_pod(namespace, label_selector="batch.kubernetes.io/job-name=ok").items,
        what="the Job's pod",
    )
    assert pods[0].metadata.owner_references[0].kind == "Job"
    wait_for(lambda: core.read_namespaced_pod(pods[0].metadata.name, namespace).spec.node_name,
             what="the scheduler to bind the pod")  # fmt: skip

    job = wait_for(
        lambda: (
            (j := batch.read_namespaced_job_status("ok", namespace)) and _conditions(j).get("Complete") == "True" and j
        ),
        timeout=120,
        what="the Job to complete",
    )
    assert job.status.succeeded == 1
    assert job.status.completion_time is not None


def test_ttl_after_finished_deletes_job_and_pods(k8s, namespace, wait_for, job_image):
    batch, core = client.BatchV1Api(k8s), client.CoreV1Api(k8s)
    batch.create_namespaced_job(namespace, _job("ttl", job_image, ttl=0))
    wait_for(lambda: _gone(batch.read_namespaced_job, "ttl", namespace), timeout=120,
             what="ttl-after-finished to delete the Job")  # fmt: skip
    # The garbage collector removes the Job's pods (their ownerReference points at the deleted Job).
    selector = "batch.kubernetes.io/job-name=ttl"
    wait_for(
        lambda: not core.list_namespaced_pod(namespace, label_selector=selector).items,
        what="the Job's pods to be garbage-collected",
    )


def test_owner_reference_garbage_collection(k8s, namespace, wait_for):
    core = client.CoreV1Api(k8s)
    owner = core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"), data={"a": "b"})
    )
    ref = client.V1OwnerReference(
        api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid, controller=True,
        block_owner_deletion=True,
    )  # fmt: skip
    core.create_namespaced_secret(
        namespace,
        client.V1Secret(metadata=client.V1ObjectMeta(name="child", owner_references=[ref]), string_data={"k": "v"}),
    )
    unrelated = core.create_namespaced_secret(
        namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="unrelated"), string_data={"k": "v"})
    )
    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")
    wait_for(lambda: _gone(core.read_namespaced_secret, "child", namespace), what="the child to be collected")
    assert core.read_namespaced_secret("unrelated", namespace).metadata.uid == unrelated.metadata.uid


def test_label_selectors_filter_lists(k8s, namespace):
    core = client.CoreV1Api(k8s)
    for name, labels in (("a", {"tier": "x"}), ("b", {"tier": "y"}), ("c", {})):
        core.create_namespaced_config_map(
            namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name, labels=labels))
        )
    assert [c.metadata.name for c in core.list_namespaced_config_map(namespace, label_selector="tier=x").items] == ["a"]
    names = {c.metadata.name for c in core.list_namespaced_config_map(namespace, label_selector="tier").items}
    assert names == {"a", "b"}


# ---------------------------------------------------------------------------------------------- CRD
@pytest.fixture
def widget_crd(k8s, wait_for):
    """A throw-away namespaced CRD with a status subresource and a CEL rule."""
    ext = client.ApiextensionsV1Api(k8s)
    group = f"e{uuid.uuid4().hex[:6]}.e2e.finetune.dev"
    name = f"widgets.{group}"
    schema = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "required": ["minReplicas", "maxReplicas"],
                "properties": {
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer"},
                },
                "x-kubernetes-validations": [
                    {"rule": "self.minReplicas <= self.maxReplicas",
                     "message": "minReplicas must not exceed maxReplicas", "fieldPath": ".minReplicas"},
                ],
            },
            "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
        },
    }  # fmt: skip
    body = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": name},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
            "versions": [
                {"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": schema},
                 "subresources": {"status": {}}},
            ],
        },
    }  # fmt: skip
    ext.create_custom_resource_definition(body)

    def established():
        crd = ext.read_custom_resource_definition(name)
        return any(c.type == "Established" and c.status == "True" for c in (crd.status.conditions or []))

    wait_for(established, what=f"CRD {name} to be established")
    yield group
    ext.delete_custom_resource_definition(name)


def _widget(name: str, lo: int, hi: int, **extra) -> dict:
    return {
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": {"minReplicas": lo, "maxReplicas": hi},
        **extra,
    }


def _create_widget(co, group, namespace, body, wait_for):
    # A just-established CRD can take a moment to be served by every handler chain: retry 404/503 only.
    body = {"apiVersion": f"{group}/v1", **body}

    def attempt():
        try:
            return co.create_namespaced_custom_object(group, "v1", namespace, "widgets", body)
        except client.ApiException as e:
            if e.status in (404, 503):
                return None
            raise

    return wait_for(attempt, timeout=30, what="the CRD's endpoint to serve")


def test_crd_cel_rule_rejects_a_bad_object(k8s, namespace, widget_crd, wait_for):
    co = client.CustomObjectsApi(k8s)
    assert _create_widget(co, widget_crd, namespace, _widget("good", 1, 3), wait_for)
    with pytest.raises(client.ApiException) as err:
        _create_widget(co, widget_crd, namespace, _widget("bad", 5, 1), wait_for)
    assert err.value.status == 422
    assert "minReplicas must not exceed maxReplicas" in err.value.body
    assert "spec.minReplicas" in err.value.body  # the field is named
    # The structural schema too (OpenAPI minimum), not only CEL:
    with pytest.raises(client.ApiException) as err:
        _create_widget(co, widget_crd, namespace, _widget("negative", -1, 1), wait_for)
    assert err.value.status == 422 and "spec.minReplicas" in err.value.body


def test_status_subresource_and_resource_version_conflicts(k8s, namespace, widget_crd, wait_for):
    co = client.CustomObjectsApi(k8s)
    created = _create_widget(co, widget_crd, namespace, _widget("w", 1, 2, status={"phase": "Forged"}), wait_for)
    assert "status" not in created or not created["status"], "status is ignored on create with a /status subresource"
    assert created["metadata"]["generation"] == 1

    patched = co.patch_namespaced_custom_object_status(
        widget_crd, "v1", namespace, "widgets", "w", {"status": {"phase": "Running"}}
    )
    assert patched["status"]["phase"] == "Running"
    assert patched["metadata"]["generation"] == 1, "a status write does not bump metadata.generation"

    # An update with a stale resourceVersion is a 409 Conflict (what kopf's patches and our retries rely on).
    stale = dict(created)
    stale["spec"] = {"minReplicas": 1, "maxReplicas": 9}
    with pytest.raises(client.ApiException) as err:
        co.replace_namespaced_custom_object(widget_crd, "v1", namespace, "widgets", "w", stale)
    assert err.value.status == 409
    fresh = co.get_namespaced_custom_object(widget_crd, "v1", namespace, "widgets", "w")
    fresh["spec"]["maxReplicas"] = 9
    assert (
        co.replace_namespaced_custom_object(widget_crd, "v1", namespace, "widgets", "w", fresh)["metadata"][
            "generation"
        ]
        == 2
    )


# ---------------------------------------------------------------------------------------------- RBAC
def test_rbac_denies_until_a_role_grants(k8s, namespace, wait_for):
    core, rbac, authz = (
        client.CoreV1Api(k8s),
        client.RbacAuthorizationV1Api(k8s),
        client.AuthorizationV1Api(k8s),
    )
    core.create_namespaced_service_account(namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="bot")))
    user = f"system:serviceaccount:{namespace}:bot"

    def allowed(verb: str, resource: str, group: str = "batch") -> bool:
        review = client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(
                user=user,
                groups=[
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{namespace}",
                    "system:authenticated",
                ],
                resource_attributes=client.V1ResourceAttributes(
                    namespace=namespace, verb=verb, group=group, resource=resource
                ),
            )
        )
        return authz.create_subject_access_review(review).status.allowed

    assert not allowed("create", "jobs")
    rbac.create_namespaced_role(
        namespace,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="jobs"),
            rules=[client.V1PolicyRule(api_groups=["batch"], resources=["jobs"], verbs=["create", "get"])],
        ),
    )
    rbac.create_namespaced_role_binding(
        namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="bot-jobs"),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="jobs"),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="bot", namespace=namespace)],
        ),
    )
    wait_for(lambda: allowed("create", "jobs"), timeout=30, what="the RoleBinding to take effect")
    assert not allowed("delete", "jobs")
    assert not allowed("create", "secrets", group="")

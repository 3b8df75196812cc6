"""A small dict-in, dict-out Kubernetes client over the official client's ApiClient.

Handlers work with plain dicts (the JSON the API speaks), so this wraps
`ApiClient.call_api` with raw JSON instead of the generated model classes. Handlers are
sync; kopf runs them in its thread pool, and urllib3's pool is thread-safe.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import kubernetes
import urllib3

from finetune_api.spec import API_GROUP, API_VERSION
from finetune_operator.crd import PLURAL
from finetune_operator.parsed import Obj

# Every handler thread (kopf's max_workers), the resync loop and the progress server may call at once.
# The client's default (5 per CPU) is smaller: urllib3 then opens a throwaway connection — a TLS handshake
# on both ends — for each call over the limit, which under a burst costs the API server more than the calls.
POOL_SIZE = 32
REQUEST_TIMEOUT = (10, 60)  # connect, read (seconds)


class ApiError(Exception):
    """An API call failed; `status` is the HTTP status (0 when there was no response)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def ftj_path(namespace: str, name: str = "", subresource: str = "") -> str:
    return _path(f"/apis/{API_GROUP}/{API_VERSION}", namespace, PLURAL, name, subresource)


def job_path(namespace: str, name: str = "") -> str:
    return _path("/apis/batch/v1", namespace, "jobs", name)


def configmap_path(namespace: str, name: str = "") -> str:
    return _path("/api/v1", namespace, "configmaps", name)


def secret_path(namespace: str, name: str = "") -> str:
    return _path("/api/v1", namespace, "secrets", name)


def service_path(namespace: str, name: str = "") -> str:
    return _path("/api/v1", namespace, "services", name)


def pod_path(namespace: str) -> str:
    return _path("/api/v1", namespace, "pods")


def _path(base: str, namespace: str, plural: str, name: str = "", subresource: str = "") -> str:
    path = f"{base}/namespaces/{namespace}/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


class Kube:
    def __init__(self, api_client: kubernetes.client.ApiClient) -> None:
        self.api = api_client

    @classmethod
    def from_environment(cls) -> Kube:
        """In-cluster service account, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()
        config = kubernetes.client.Configuration.get_default_copy()
        config.connection_pool_maxsize = POOL_SIZE
        return cls(kubernetes.client.ApiClient(config))

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Obj:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            request = self.api.param_serialize(
                method,
                path,
                query_params=query or [],
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
            )
            response = self.api.call_api(*request, _request_timeout=REQUEST_TIMEOUT)
            data = response.read()
        except kubernetes.client.ApiException as err:
            raise ApiError(err.status or 0, str(err.reason)) from None
        except (OSError, urllib3.exceptions.HTTPError) as err:  # connection trouble: transient
            raise ApiError(0, str(err)) from None
        if not 200 <= response.status <= 299:
            raise ApiError(response.status, _reason(data, response.reason))
        return json.loads(data) if data else {}

    def get(self, path: str) -> Obj | None:
        """The object, or None when it does not exist."""
        try:
            return self._call("GET", path)
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def create(self, path: str, body: Mapping[str, Any]) -> Obj:
        return self._call("POST", path, body=dict(body))

    def merge_patch(self, path: str, patch: Mapping[str, Any]) -> Obj:
        return self._call("PATCH", path, body=dict(patch), content_type="application/merge-patch+json")

    def delete(self, path: str) -> None:
        """Delete with background propagation (the Job's pods go too); gone already is fine."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        try:
            self._call("DELETE", path, body=body)
        except ApiError as err:
            if err.status != 404:
                raise

    def list(self, path: str, labels: Mapping[str, str]) -> list[Obj]:
        """Objects matching all labels (the API server applies the selector)."""
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        return self._call("GET", path, query=[("labelSelector", selector)]).get("items") or []


def _reason(data: bytes | None, fallback: str | None) -> str:
    """The API's Status.message, which says what was wrong, else the HTTP reason phrase."""
    try:
        return str(json.loads(data or b"").get("message") or fallback)
    except (ValueError, AttributeError):
        return str(fallback)


def merge_patch_for(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The smallest JSON merge patch (RFC 7386) turning `old` into `new`.

    Only changed keys are sent, so fields written concurrently by someone else (e.g. the
    progress endpoint writing status.progress) are not overwritten with stale values.
    """
    patch: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            sub = merge_patch_for(before, value)
            if sub:
                patch[key] = sub
        elif before != value or key not in old:
            patch[key] = value
    for key in old:
        if key not in new:
            patch[key] = None
    return patch

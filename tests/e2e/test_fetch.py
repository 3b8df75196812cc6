"""dataset.uri end to end (issue 20): a FineTuneJob whose images are an archive in an S3-compatible bucket.

moto's S3 runs in server mode in this process (IAM authentication on: only the key in the Secret may read)
with a bucket holding a tiny ImageFolder .tar.gz; the Secret holding the key is created in the job's
namespace. The job reaches Succeeded through the fetch init container (`finetune-train fetch`), with the
archive's digest in status.output.sources; a wrong sha256 fails ChecksumMismatch, not retried, with a
Warning event — and the secret key appears in no status, event or pod termination message.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import urllib.request

import numpy as np
import pytest

pytestmark = pytest.mark.e2e

kubernetes = pytest.importorskip("kubernetes")
moto_server = pytest.importorskip("moto.server")
from kubernetes import client  # noqa: E402
from operator_env import TRAIN_TIMEOUT, wait_until  # noqa: E402
from operator_util import tiny_job  # noqa: E402
from PIL import Image  # noqa: E402

BUCKET, KEY, SECRET = "ml-data", "pets.tar.gz", "s3-reader"


def _archive() -> bytes:
    """Two learnable classes of 16 px PNGs as `<class>/<n>.png` in a .tar.gz."""
    rng, buf = np.random.default_rng(0), io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for k, name in enumerate(("cat", "dog")):
            for i in range(12):
                img = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
                img[:, k * 6:(k + 1) * 6] = 250
                png = io.BytesIO()
                Image.fromarray(img).save(png, format="PNG")
                info = tarfile.TarInfo(f"{name}/{i}.png")
                info.size = len(png.getvalue())
                tar.addfile(info, io.BytesIO(png.getvalue()))
    return buf.getvalue()


@pytest.fixture(scope="module")
def bucket(local_cluster):
    """(endpoint, access key id, secret key, archive bytes) of a moto S3 server on this host, where the local
    cluster's pods reach it (at the node's address; on kind, a pod would need the host's address instead:
    skipped there)."""
    import boto3
    from moto import settings

    data = _archive()
    address = getattr(local_cluster, "host_address", "127.0.0.1")
    server = moto_server.ThreadedMotoServer(ip_address=address, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto's backends are global to the process: a server started earlier in this run (another test module)
    # left its users and buckets there. Start from nothing.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30).close()
    admin = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "setup",
             "aws_secret_access_key": "setup"}
    iam = boto3.client("iam", **admin)
    iam.create_user(UserName="reader")
    iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument='{"Version": "2012-10-17", '
                        '"Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}')
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    s3 = boto3.client("s3", **admin)
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key=KEY, Body=data)
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from here on, signed by the reader's key or refused
    yield endpoint, key["AccessKeyId"], key["SecretAccessKey"], data
    settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")
    server.stop()


def _secret(jobs, key_id: str, secret: str) -> None:
    core = client.CoreV1Api(jobs.api)
    body = client.V1Secret(metadata=client.V1ObjectMeta(name=SECRET), string_data={
        "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        core.create_namespaced_secret(jobs.ns, body)
    except client.ApiException as err:
        if err.status != 409:
            raise


def _job(name: str, endpoint: str, sha256: str) -> dict:
    return tiny_job(name, {"dataset": {
        "builtin": None, "classes": None, "maxImagesPerClass": None, "valFraction": 0.25,
        "uri": f"s3://{BUCKET}/{KEY}", "sha256": sha256, "endpoint": endpoint,
        "credentials": {"secretName": SECRET}}})


def _everything_said(jobs, name: str, obj: dict) -> str:
    pods = jobs.pods(obj)
    terms = [json.dumps(client.ApiClient().sanitize_for_serialization(p.status)) for p in pods]
    events = [f"{e.reason} {e.message}" for e in jobs.events(name)]
    return json.dumps(obj.get("status")) + " ".join(terms) + " ".join(events)


def test_a_job_with_dataset_uri_on_s3_succeeds_through_the_fetch_init_container(operator_env, jobs, bucket,
                                                                               e2e_report):
    if operator_env.local_cluster is None:
        pytest.skip("the S3 server listens on this host, which only the local cluster's pods reach")
    endpoint, key_id, secret, data = bucket
    digest = hashlib.sha256(data).hexdigest()
    _secret(jobs, key_id, secret)
    jobs.create(_job("from-s3", endpoint, digest))
    obj = operator_env.wait_phase(jobs, "from-s3", ("Succeeded",), TRAIN_TIMEOUT)
    sources = obj["status"]["output"].get("sources")
    assert sources == [{"field": "dataset", "uri": f"s3://{BUCKET}/{KEY}", "sha256": digest, "size": len(data)}], \
        obj["status"]["output"]
    (pod,) = jobs.pods(obj)
    (init,) = pod.status.init_container_statuses
    assert init.name == "fetch" and init.state.terminated.exit_code == 0, init
    assert pod.spec.init_containers[0].args[:1] == ["fetch"]
    assert secret not in _everything_said(jobs, "from-s3", obj)
    logs = {c: operator_env.container_log(jobs.ns, pod.metadata.name, c) for c in ("fetch", "trainer")}
    fetch_log, trainer_log = logs["fetch"], logs["trainer"]
    assert "fetched and verified" in fetch_log and "reused from the verified cache" in trainer_log, logs
    assert not any(secret in text for text in logs.values())
    e2e_report(f"dataset.uri on moto S3: Succeeded with status.output.sources {sources}")


def test_a_wrong_sha256_fails_checksum_mismatch_in_the_init_container_and_is_not_retried(operator_env, jobs,
                                                                                        bucket):
    if operator_env.local_cluster is None:
        pytest.skip("the S3 server listens on this host, which only the local cluster's pods reach")
    endpoint, key_id, secret, _ = bucket
    _secret(jobs, key_id, secret)
    job = _job("bad-digest", endpoint, "0" * 64)
    job["spec"]["runPolicy"] = {**job["spec"].get("runPolicy", {}), "backoffLimit": 2}
    jobs.create(job)
    obj = operator_env.wait_phase(jobs, "bad-digest", ("Failed",), 120)
    status = obj["status"]
    assert status["reason"] == "ChecksumMismatch", status
    assert f"s3://{BUCKET}/{KEY}" in status["message"] and "does not match the expected" in status["message"], status
    assert (jobs.batch.read_namespaced_job(status["jobName"], jobs.ns).status.failed or 0) == 1
    wait_until(lambda: jobs.event_counts("bad-digest").get(("Warning", "ChecksumMismatch")), 15,
               f"a Warning event ChecksumMismatch: {jobs.event_counts('bad-digest')}")
    assert secret not in _everything_said(jobs, "bad-digest", obj)

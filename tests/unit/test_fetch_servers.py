"""dataset.uri / model.weights.uri against real servers on loopback, through `finetune-train` itself.

moto's S3 in server mode (IAM authentication on: a wrong key is refused as by AWS) holds an ImageFolder
archive and a backbone state_dict; a stdlib HTTPS server with a trustme CA serves the archive, a manifest
folder and a bearer-token-protected file. Jobs train from each; wrong digests, missing objects, bad
credentials and untrusted certificates fail before training with their reasons, and no credential appears
in stderr, the log, the termination message or model.json.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import pytest
import torch
import torchvision
from fetch_servers import image_folder_tar_gz, sha256, start_https, start_s3, stop_s3, write_secret
from trainer_util import write_job

from finetune_api.errors import EXIT_INVALID_JOB, EXIT_OK, EXIT_RUNTIME_ERROR
from finetune_trainer import cli

pytestmark = pytest.mark.slow

BAD_SECRET = "wrong-secret-value-0123456789"
TOKEN = "bearer-token-value-abcdef"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("data")
    buf = io.BytesIO()
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), buf)
    return {"images.tar.gz": image_folder_tar_gz(tmp), "resnet18.pt": buf.getvalue()}


@pytest.fixture(scope="module")
def s3(data):
    server, info = start_s3(data)
    yield info
    stop_s3(server)


@pytest.fixture(scope="module")
def https(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("https")
    files = {"images.tar.gz": data["images.tar.gz"]}
    src = tmp_path_factory.mktemp("folder")
    from trainer_util import make_image_folder

    root = make_image_folder(src / "imgs", {"a": 6, "b": 6}, size=16)
    lines = []
    for p in sorted(root.rglob("*.png")):
        rel = str(p.relative_to(root))
        files[f"folder/{rel}"] = p.read_bytes()
        lines.append(f"{sha256(p.read_bytes())}  {rel}")
    files["folder/SHA256SUMS"] = ("\n".join(lines) + "\n").encode()
    server, info = start_https(tmp, files)
    yield info
    server.shutdown()


@pytest.fixture
def secrets(tmp_path, monkeypatch, s3) -> Path:
    root = tmp_path / "secrets"
    write_secret(root, "s3-good", {"AWS_ACCESS_KEY_ID": s3.key_id, "AWS_SECRET_ACCESS_KEY": s3.secret})
    write_secret(root, "s3-bad", {"AWS_ACCESS_KEY_ID": s3.key_id, "AWS_SECRET_ACCESS_KEY": BAD_SECRET})
    monkeypatch.setenv("FINETUNE_SECRETS_DIR", str(root))
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    monkeypatch.setenv("FINETUNE_FETCH_BACKOFF_SECONDS", "0")
    return root


def _job(tmp_path: Path, dataset: dict, weights: dict | None = None) -> Path:
    spec = {
        "model": {"architecture": "resnet18", "weights": weights or {"source": "none"}},
        "dataset": {"imageSize": 16, "valFraction": 0.25, **dataset},
        "training": {"epochs": 1, "batchSize": 8, "device": "cpu", "precision": "fp32"},
        "output": {"path": str(tmp_path / "out")},
    }
    return write_job(tmp_path / "job.yaml", spec)


def _s3_dataset(s3, **extra) -> dict:
    return {"uri": f"s3://{s3.bucket}/images.tar.gz", "endpoint": s3.endpoint,
            "credentials": {"secretName": "s3-good"}, **extra}


def _run(argv: list[str], capsys, tmp_path: Path) -> tuple[int, str, str]:
    """Exit code, stderr and the termination message (the file FINETUNE_TERMINATION_LOG names), read once."""
    term = Path(os.environ["FINETUNE_TERMINATION_LOG"])
    term.unlink(missing_ok=True)
    rc = cli.main(argv)
    return rc, capsys.readouterr().err, term.read_text() if term.exists() else ""


def test_a_job_trains_from_s3_data_and_weights_with_lineage_in_model_json(tmp_path, capsys, s3, data, secrets):
    job = _job(tmp_path, _s3_dataset(s3, sha256=sha256(data["images.tar.gz"])),
               {"uri": f"s3://{s3.bucket}/resnet18.pt", "sha256": sha256(data["resnet18.pt"]), "endpoint": s3.endpoint,
                "credentials": {"secretName": "s3-good"}})
    rc, err, term = _run(["-f", str(job)], capsys, tmp_path)
    assert rc == EXIT_OK, err
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    by_field = {s["field"]: s for s in meta["sources"]}
    assert by_field["dataset"] == {"field": "dataset", "uri": f"s3://{s3.bucket}/images.tar.gz",
                                   "sha256": sha256(data["images.tar.gz"]), "size": len(data["images.tar.gz"])}
    assert by_field["model.weights"]["sha256"] == sha256(data["resnet18.pt"])
    assert meta["weightsSource"].startswith("file"), meta["weightsSource"]
    assert json.loads(term)["sources"] == meta["sources"]  # → status.output.sources on a cluster
    assert s3.secret not in err + term + json.dumps(meta)


def test_a_retry_reuses_the_verified_cache_and_a_tampered_entry_is_fetched_again(tmp_path, capsys, s3, data,
                                                                                 secrets, caplog):
    job = _job(tmp_path, _s3_dataset(s3, sha256=sha256(data["images.tar.gz"])))
    assert _run(["fetch", "-f", str(job)], capsys, tmp_path)[0] == EXIT_OK
    entry = next((tmp_path / "out" / "sources").iterdir())
    with caplog.at_level(logging.INFO, "finetune.fetch"):
        assert _run(["fetch", "-f", str(job)], capsys, tmp_path)[0] == EXIT_OK
    assert "reused from the verified cache" in caplog.text
    victim = next((entry / "data").rglob("*.png"))
    victim.write_bytes(b"tampered")
    caplog.clear()
    with caplog.at_level(logging.INFO, "finetune.fetch"):
        assert _run(["fetch", "-f", str(job)], capsys, tmp_path)[0] == EXIT_OK
    assert "does not match its source.json" in caplog.text and "fetched and verified" in caplog.text
    assert victim.read_bytes() != b"tampered"


def test_wrong_sha256_fails_with_checksum_mismatch_before_training(tmp_path, capsys, s3, secrets):
    job = _job(tmp_path, _s3_dataset(s3, sha256="0" * 64))
    rc, err, term = _run(["-f", str(job)], capsys, tmp_path)
    assert rc == EXIT_INVALID_JOB, err
    assert term.startswith("ChecksumMismatch: dataset.uri s3://ml-data/images.tar.gz"), term
    out = tmp_path / "out"
    assert not (out / "model.json").exists() and not (out / "checkpoints").exists()
    assert [p.name for p in (out / "sources").iterdir()] == []  # nothing published, no temp folder left


def test_a_missing_object_or_bucket_is_source_not_found(tmp_path, capsys, s3, secrets):
    for uri in (f"s3://{s3.bucket}/nope.tar.gz", "s3://no-such-bucket/images.tar.gz"):
        job = _job(tmp_path, _s3_dataset(s3, uri=uri))
        rc, err, term = _run(["fetch", "-f", str(job)], capsys, tmp_path)
        assert rc == EXIT_INVALID_JOB and term.startswith(f"SourceNotFound: dataset.uri {uri}"), (uri, term, err)


def test_bad_credentials_are_access_denied_and_never_printed(tmp_path, capsys, s3, secrets, caplog):
    job = _job(tmp_path, _s3_dataset(s3, credentials={"secretName": "s3-bad"}))
    with caplog.at_level(logging.DEBUG):
        rc, err, term = _run(["-f", str(job)], capsys, tmp_path)
    assert rc == EXIT_INVALID_JOB and term.startswith("AccessDenied: dataset.uri s3://ml-data/images.tar.gz"), term
    assert BAD_SECRET not in err + term + caplog.text
    missing = _job(tmp_path, _s3_dataset(s3, credentials={"secretName": "not-mounted"}))
    rc, _, term = _run(["fetch", "-f", str(missing)], capsys, tmp_path)
    assert rc == EXIT_INVALID_JOB and "Secret 'not-mounted' is not mounted" in term, term


def test_network_errors_are_retried_then_fetch_failed_exit_1(tmp_path, capsys, s3, secrets, monkeypatch):
    monkeypatch.setenv("FINETUNE_FETCH_ATTEMPTS", "2")
    job = _job(tmp_path, _s3_dataset(s3, uri="https://127.0.0.1:9/images.tar.gz", endpoint=None, credentials=None))
    rc, _, term = _run(["fetch", "-f", str(job)], capsys, tmp_path)
    assert rc == EXIT_RUNTIME_ERROR and term.startswith("FetchFailed: dataset.uri https://127.0.0.1:9/images.tar.gz: "
                                                        "gave up after 2 attempts"), term


def test_a_job_trains_from_https_with_the_ca_it_is_told_to_trust(tmp_path, capsys, https, data, secrets,
                                                                  monkeypatch):
    job = _job(tmp_path, {"uri": f"{https.url}/images.tar.gz", "sha256": sha256(data["images.tar.gz"])})
    rc, _, term = _run(["fetch", "-f", str(job)], capsys, tmp_path)
    assert rc == EXIT_INVALID_JOB and term.startswith("AccessDenied:") and "TLS certificate" in term, term
    monkeypatch.setenv("FINETUNE_CA_BUNDLE", str(https.ca_file))
    rc, err, _ = _run(["-f", str(job)], capsys, tmp_path)
    assert rc == EXIT_OK, err
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    assert meta["sources"][0]["uri"] == f"{https.url}/images.tar.gz" and sorted(meta["classes"]) == ["cat", "dog"]


def test_https_folder_with_a_manifest_verifies_every_file(tmp_path, capsys, https, secrets, monkeypatch):
    monkeypatch.setenv("FINETUNE_CA_BUNDLE", str(https.ca_file))
    manifest = https.files["folder/SHA256SUMS"]
    job = _job(tmp_path, {"uri": f"{https.url}/folder/", "manifest": "SHA256SUMS", "sha256": sha256(manifest)})
    assert _run(["fetch", "-f", str(job)], capsys, tmp_path)[0] == EXIT_OK
    entry = next((tmp_path / "out" / "sources").iterdir())
    assert sorted(p.name for p in (entry / "data").iterdir()) == ["a", "b"]
    victim = next(k for k in https.files if k.endswith(".png"))
    good = https.files[victim]
    https.files[victim] = b"not the listed bytes"
    try:
        job = _job(tmp_path, {"uri": f"{https.url}/folder/", "manifest": "SHA256SUMS"})
        rc, _, term = _run(["fetch", "-f", str(job)], capsys, tmp_path)
    finally:
        https.files[victim] = good
    assert rc == EXIT_INVALID_JOB and term.startswith("ChecksumMismatch:") and victim.split("/", 1)[1] in term, term
    job = _job(tmp_path, {"uri": f"{https.url}/folder/", "manifest": "MISSING"})
    assert _run(["fetch", "-f", str(job)], capsys, tmp_path)[2].startswith("SourceNotFound:")


def test_a_bearer_token_from_the_secret_is_sent_and_never_printed(tmp_path_factory, capsys, data, secrets,
                                                                   monkeypatch):
    tmp = tmp_path_factory.mktemp("token")
    server, info = start_https(tmp, {"w.pt": data["resnet18.pt"]}, token=TOKEN)
    try:
        monkeypatch.setenv("FINETUNE_CA_BUNDLE", str(info.ca_file))
        write_secret(secrets, "hub-good", {"BEARER_TOKEN": TOKEN})
        write_secret(secrets, "hub-bad", {"BEARER_TOKEN": TOKEN[::-1]})
        for name, code, head in (("hub-bad", EXIT_INVALID_JOB, "AccessDenied:"), ("hub-good", EXIT_OK, "")):
            job = _job(tmp, {"builtin": "digits"}, {"uri": f"{info.url}/w.pt", "credentials": {"secretName": name}})
            rc, err, term = _run(["fetch", "-f", str(job)], capsys, tmp)
            assert rc == code and term.startswith(head), (name, term, err)
            assert TOKEN not in err + term and TOKEN[::-1] not in err + term
    finally:
        server.shutdown()

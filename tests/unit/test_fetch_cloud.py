"""gs:// and hf:// (no network in tests: fsspec.filesystem is replaced by an in-memory one that records how it
was asked for), the mapping of cloud errors to reasons, and the spec rules of dataset.uri / weights.uri."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from pathlib import Path

import fsspec
import httpx2
import pytest
from fetch_servers import write_secret
from huggingface_hub import errors as hf_errors

from finetune_api.errors import JobFileError
from finetune_api.source import AccessDenied, SourceNotFound
from finetune_api.spec import parse_spec
from finetune_trainer import remote
from finetune_trainer.fetch import fetch_job


def _archive() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ("cat/1.png", "dog/1.png"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    return buf.getvalue()


@pytest.fixture
def memory(monkeypatch):
    """Every fsspec.filesystem(...) call answers with one in-memory filesystem; the calls are recorded."""
    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    fs.store.clear()
    calls: list[tuple[str, dict]] = []

    def fake(protocol, **kwargs):
        calls.append((protocol, kwargs))
        return fs

    monkeypatch.setattr(fsspec, "filesystem", fake)
    return fs, calls


def test_gs_uses_the_service_account_file_of_the_secret(tmp_path, memory, monkeypatch):
    fs, calls = memory
    data = _archive()
    fs.pipe("/my-bucket/sets/pets.tar.gz", data)
    monkeypatch.setenv("FINETUNE_SECRETS_DIR", str(write_secret(tmp_path / "s", "gcp", {
        "service-account.json": '{"type": "service_account"}'})))
    spec = parse_spec({"dataset": {"uri": "gs://my-bucket/sets/pets.tar.gz", "sha256": hashlib.sha256(data).hexdigest(),
                                   "credentials": {"secretName": "gcp"}}, "output": {"path": str(tmp_path / "out")}})
    local, records = fetch_job(spec)
    protocol, kwargs = calls[0]
    assert protocol == "gs" and kwargs["token"] == str(tmp_path / "s" / "gcp" / "service-account.json")
    assert kwargs["skip_instance_cache"] is True
    assert sorted(p.name for p in Path(local.dataset.path).iterdir()) == ["cat", "dog"]
    assert records[0]["uri"] == "gs://my-bucket/sets/pets.tar.gz" and records[0]["size"] == len(data)


def test_hf_dataset_file_at_a_revision_with_the_token(tmp_path, memory, monkeypatch):
    fs, calls = memory
    fs.pipe("/datasets/acme/pets@refs%2Fpr%2F3/data/pets.tar.gz", _archive())
    fs.pipe("/acme/backbone@v1.0/model.safetensors", b"weights")
    monkeypatch.setenv("FINETUNE_SECRETS_DIR", str(write_secret(tmp_path / "s", "hf", {"HF_TOKEN": "hf_abcdefgh"})))
    spec = parse_spec({
        "dataset": {"uri": "hf://datasets/acme/pets/data/pets.tar.gz", "revision": "refs/pr/3",
                    "credentials": {"secretName": "hf"}},
        "model": {"weights": {"uri": "hf://acme/backbone/model.safetensors", "revision": "v1.0"}},
        "output": {"path": str(tmp_path / "out")},
    })
    local, records = fetch_job(spec)
    assert [c[0] for c in calls] == ["hf", "hf"]
    assert calls[0][1]["token"] == "hf_abcdefgh" and "token" not in calls[1][1]
    assert local.model.weights.source == "file" and Path(local.model.weights.path).read_bytes() == b"weights"
    assert Path(local.model.weights.path).name == "model.safetensors"
    assert [r["field"] for r in records] == ["dataset", "model.weights"]


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/x"))


@pytest.mark.parametrize(("err", "reason"), [
    (hf_errors.GatedRepoError("gated", response=_response(403)), AccessDenied),
    (hf_errors.RepositoryNotFoundError("no repo", response=_response(404)), SourceNotFound),
    (hf_errors.RevisionNotFoundError("no rev", response=_response(404)), SourceNotFound),
    (hf_errors.EntryNotFoundError("no file"), SourceNotFound),
    (OSError("Forbidden: b/key\nno storage.objects.get access"), AccessDenied),  # gcsfs' 403
    (FileNotFoundError("b/key"), SourceNotFound),
    (PermissionError("denied"), AccessDenied),
])
def test_cloud_errors_map_to_permanent_reasons(err, reason):
    found = remote.classify(err, "dataset.uri gs://b/key")
    assert isinstance(found, reason) and str(found).startswith("dataset.uri gs://b/key: "), found


@pytest.mark.parametrize("err", [ConnectionResetError("reset"), TimeoutError("slow"), OSError("Service Unavailable")])
def test_network_errors_are_worth_retrying(err):
    assert remote.classify(err, "x") is None


def test_gcsfs_http_error_401_is_access_denied():
    from gcsfs.retry import HttpError

    err = HttpError({"code": 401, "message": "Invalid Credentials"})
    assert isinstance(remote.classify(err, "dataset.uri gs://b/k"), AccessDenied)


@pytest.mark.parametrize(("dataset", "message"), [
    ({"uri": "s3://b/images"}, "must name an archive"),
    ({"uri": "https://user:pass@host/x.zip"}, "should match pattern"),
    ({"uri": "ftp://host/x.zip"}, "should match pattern"),
    ({"uri": "s3://bucket-only"}, "needs a bucket or host and an object path"),
    ({"uri": "hf://acme/x.zip"}, "repository (org/name) and a file path"),
    ({"uri": "s3://b/x.zip", "sha256": "ABC"}, "should match pattern"),
    ({"uri": "s3://b/x.zip", "revision": "main"}, "revision is only for hf://"),
    ({"uri": "hf://a/b/x.zip", "endpoint": "http://minio:9000"}, "endpoint is only for s3://"),
    ({"uri": "s3://b/x.zip", "path": "/data"}, "exactly one of dataset.builtin, dataset.path or dataset.uri"),
    ({"path": "/data", "credentials": {"secretName": "s"}}, "credentials needs dataset.uri"),
    ({"uri": "s3://b/dir/", "manifest": "../SUMS"}, "'..'"),
    ({"uri": "s3://b/a/../x.zip"}, "'..'"),
])
def test_source_fields_are_checked_by_the_model(dataset, message):
    with pytest.raises(JobFileError, match=re.escape(message)):
        parse_spec({"dataset": dataset})


def test_weights_uri_implies_file_and_a_path_spec_keeps_its_fingerprint():
    spec = parse_spec({"dataset": {"builtin": "digits"}, "model": {"weights": {"uri": "s3://b/w.pt"}}})
    assert spec.model.weights.source == "file"
    with pytest.raises(JobFileError, match=r"weights\.uri needs weights\.source 'file'"):
        parse_spec({"dataset": {"builtin": "digits"}, "model": {"weights": {"source": "none", "uri": "s3://b/w.pt"}}})
    # Unused, the new fields leave the resume fingerprint alone; endpoint and credentials never enter it.
    plain = parse_spec({"dataset": {"path": "/data"}, "model": {"weights": {"source": "file", "path": "/w.pt"}}})
    assert plain.resume_fingerprint() == "d6a564b4cc67ec96"  # what the trainer before these fields computed
    a = parse_spec({"dataset": {"uri": "s3://b/x.zip", "endpoint": "http://a:1", "credentials": {"secretName": "a"}}})
    b = parse_spec({"dataset": {"uri": "s3://b/x.zip", "endpoint": "http://b:2"}})
    c = parse_spec({"dataset": {"uri": "s3://b/y.zip"}})
    assert a.resume_fingerprint() == b.resume_fingerprint() != c.resume_fingerprint()


def test_a_local_sweep_fetches_the_template_s_sources_once_for_every_trial(tmp_path, memory):
    from finetune_api.sweep import parse_sweep, trial_job_spec
    from finetune_trainer.fetch import prepare_sweep

    fs, _ = memory
    fs.pipe("/bucket/pets.tar.gz", _archive())
    sweep = parse_sweep({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneSweep", "metadata": {"name": "s"},
                         "spec": {"template": {"spec": {"dataset": {"uri": "s3://bucket/pets.tar.gz"},
                                                        "output": {"path": str(tmp_path / "sweep")}}},
                                  "parameters": [{"path": "training.learningRate", "categorical": [0.1, 0.01]}]}})
    prepare_sweep(sweep)
    trial = trial_job_spec(sweep.spec, "s-0", {"training.learningRate": 0.1})
    assert trial.dataset.uri is None and Path(trial.dataset.path).is_relative_to(tmp_path / "sweep" / "sources")
    assert sorted(p.name for p in Path(trial.dataset.path).iterdir()) == ["cat", "dog"]

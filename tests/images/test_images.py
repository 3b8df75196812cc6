"""Container images: build the Dockerfile targets from the locally made base and run them.

Opt-in (`make image-test`, or FINETUNE_IMAGE_TESTS=1): a cold build is minutes and ~10 GB of disk.
Needs a Docker engine: the one DOCKER_HOST points at, else the private engine hack/images/dockerd.sh
starts (root + Debian's docker.io; it is stopped again at the end if this test started it). Without one
the tests skip with the reason; FINETUNE_REQUIRE_DOCKER=1 turns that skip into a failure (for CI jobs
that are meant to build images). The first trainer build downloads torch (several GB, minutes); later
runs reuse the engine's layer cache.

Image sizes are printed and attached to the test report (`record_property`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

ROOT = Path(__file__).parents[2]
IMAGES = ROOT / "hack/images"
TINY_JOB = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "image-smoke"},
    "spec": {
        "model": {"architecture": "resnet18", "weights": {"source": "none"}},
        "dataset": {"builtin": "digits", "imageSize": 16},
        "freeze": {"policy": "full", "backboneLrScale": 1.0},
        "training": {"epochs": 1, "batchSize": 64, "device": "cpu"},
        "output": {"path": "/output"},
    },
}


def _docker_cli() -> str | None:
    # Debian's docker.io CLI drives BuildKit without the buildx plugin; build.sh makes the same choice.
    for candidate in (os.environ.get("DOCKER"), "/usr/bin/docker", shutil.which("docker")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def _unavailable(reason: str) -> None:
    message = f"no Docker engine for the image tests: {reason}"
    if os.environ.get("FINETUNE_REQUIRE_DOCKER", "") not in ("", "0", "false"):
        pytest.fail(message + " (FINETUNE_REQUIRE_DOCKER is set)")
    pytest.skip(message)


def _opted_in() -> bool:
    return any(os.environ.get(v, "") not in ("", "0", "false") for v in ("FINETUNE_IMAGE_TESTS",
                                                                          "FINETUNE_REQUIRE_DOCKER"))


@pytest.fixture(scope="session")
def docker() -> Iterator[list[str]]:
    if not _opted_in():
        # A cold trainer build is minutes and ~10 GB of layers (PyPI's CUDA torch): opt-in, not part of
        # every `make test`. `make image-test` sets FINETUNE_REQUIRE_DOCKER=1.
        pytest.skip("image builds are opt-in: run `make image-test` (or set FINETUNE_IMAGE_TESTS=1)")
    cli = _docker_cli()
    if cli is None:
        _unavailable("no docker CLI (apt-get install docker.io)")
    env = dict(os.environ)
    started = False
    if subprocess.run([cli, "version"], capture_output=True, env=env, timeout=30).returncode != 0:
        res = subprocess.run([str(IMAGES / "dockerd.sh"), "start"], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            _unavailable(f"hack/images/dockerd.sh start failed: {res.stderr.strip()[-800:]}")
        env["DOCKER_HOST"] = res.stdout.strip().split("=", 1)[1]
        os.environ["DOCKER_HOST"] = env["DOCKER_HOST"]
        started = True
    yield [cli]
    if started:
        subprocess.run([str(IMAGES / "dockerd.sh"), "stop"], timeout=120, check=False)


@pytest.fixture(scope="session")
def images(docker: list[str]) -> dict[str, str]:
    res = subprocess.run(
        [str(IMAGES / "build.sh"), "operator", "trainer"],
        capture_output=True, text=True, timeout=3000, env={**os.environ, "DOCKER": docker[0]},
    )
    assert res.returncode == 0, f"hack/images/build.sh failed:\n{res.stderr[-4000:]}"
    built = dict(line.split("=", 1) for line in res.stdout.split() if "=" in line)
    assert set(built) == {"operator", "trainer"}, res.stdout
    return built


def run(docker: list[str], *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*docker, *args], capture_output=True, text=True, timeout=timeout)


def in_image(docker: list[str], image: str, *command: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run like Kubernetes runs our pods: read-only root, writable /tmp, no network, non-root."""
    return run(docker, "run", "--rm", "--read-only", "--tmpfs", "/tmp", "--network", "none",
               "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--entrypoint", command[0],
               image, *command[1:], timeout=timeout)


def test_image_sizes(docker: list[str], images: dict[str, str], record_property) -> None:
    for target, image in images.items():
        size = int(run(docker, "image", "inspect", "--format", "{{.Size}}", image).stdout.strip())
        record_property(f"{target}_image_bytes", size)
        print(f"{image}: {size / 2**20:.0f} MiB")
        assert size > 0


@pytest.mark.parametrize("target, uid", [("operator", "65532"), ("trainer", "1000")])
def test_images_run_as_a_numeric_non_root_user(docker: list[str], images: dict[str, str], target: str, uid: str):
    config = json.loads(run(docker, "image", "inspect", images[target]).stdout)[0]["Config"]
    assert config["User"].split(":")[0] == uid
    res = in_image(docker, images[target], "id", "-u")
    assert res.stdout.strip() == uid


@pytest.mark.parametrize("target", ["operator", "trainer"])
def test_no_build_tools_in_the_final_images(docker: list[str], images: dict[str, str], target: str) -> None:
    probe = "for t in pip pip3 gcc cc make git; do command -v $t; done; true"
    res = in_image(docker, images[target], "sh", "-c", probe)
    assert res.stdout.strip() == "", f"build tools in {images[target]}: {res.stdout}"


def test_operator_image_has_no_torch(docker: list[str], images: dict[str, str]) -> None:
    res = in_image(docker, images["operator"], "python3", "-c", "import torch")
    assert res.returncode != 0 and "No module named 'torch'" in res.stderr


def test_operator_image_runs_the_operator_code(docker: list[str], images: dict[str, str]) -> None:
    res = in_image(docker, images["operator"], "python3", "-c",
                   "import kopf, finetune_operator.handlers, finetune_operator.server; print(kopf.__name__)")
    assert res.returncode == 0, res.stderr
    # The CRD generated inside the image is the chart's CRD: same code, same spec model.
    res = in_image(docker, images["operator"], "python3", "-m", "finetune_operator.crd")
    assert res.returncode == 0, res.stderr
    assert res.stdout == (ROOT / "charts/finetune-operator/crds/finetunejobs.finetune.dev.yaml").read_text()
    res = in_image(docker, images["operator"], "kopf", "run", "--help")
    assert res.returncode == 0 and "--liveness" in res.stdout


def test_trainer_image_runs_a_tiny_job(docker: list[str], images: dict[str, str], tmp_path: Path) -> None:
    jobdir, out = tmp_path / "job", tmp_path / "out"
    jobdir.mkdir()
    out.mkdir()
    out.chmod(0o777)  # the trainer runs as uid 1000; pytest's tmp dirs are 0700 root
    jobdir.chmod(0o755)
    (jobdir / "job.yaml").write_text(yaml.safe_dump(TINY_JOB))
    (jobdir / "job.yaml").chmod(0o644)
    res = run(docker, "run", "--rm", "--read-only", "--tmpfs", "/tmp", "--network", "none", "--cap-drop", "ALL",
              "--security-opt", "no-new-privileges", "-v", f"{jobdir}:/etc/finetune:ro", "-v", f"{out}:/output",
              images["trainer"], "-f", "/etc/finetune/job.yaml", timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    model = json.loads((out / "model.json").read_text())
    assert model["architecture"] == "resnet18"
    assert len(model["classes"]) == 10
    assert 0.0 <= model["metrics"]["valAccuracy"] <= 1.0
    assert (out / model["weightsFile"]).exists()


def test_trainer_image_rejects_a_bad_job_file_with_exit_code_2(docker: list[str], images: dict[str, str],
                                                              tmp_path: Path) -> None:
    bad = {**TINY_JOB, "spec": {**TINY_JOB["spec"], "training": {"epochs": 0}}}
    tmp_path.chmod(0o755)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(bad))
    (tmp_path / "job.yaml").chmod(0o644)
    res = run(docker, "run", "--rm", "--read-only", "--tmpfs", "/tmp", "--network", "none",
              "-v", f"{tmp_path}:/etc/finetune:ro", images["trainer"], "-f", "/etc/finetune/job.yaml")
    assert res.returncode == 2, res.stderr
    assert "epochs" in res.stderr + res.stdout


SERVE_PROBE = """
import base64, io, subprocess, time, httpx
from PIL import Image
server = subprocess.Popen(["finetune-serve", "--model", "/mnt/models", "--http_port", "8080", "--enable_grpc", "false"])
for _ in range(300):
    try:
        if httpx.get("http://127.0.0.1:8080/v2/health/ready").status_code == 200:
            break
    except httpx.HTTPError:
        time.sleep(0.2)
buf = io.BytesIO()
Image.new("RGB", (16, 16), (255, 255, 255)).save(buf, "PNG")
r = httpx.post("http://127.0.0.1:8080/v1/models/served:predict",
               json={"instances": [{"b64": base64.b64encode(buf.getvalue()).decode()}]}, timeout=60)
print(r.status_code, r.json()["predictions"][0]["class"])
server.terminate()
"""


@pytest.fixture(scope="session")
def serve_image(docker: list[str]) -> str:
    res = subprocess.run([str(IMAGES / "build.sh"), "serve"], capture_output=True, text=True, timeout=3000,
                         env={**os.environ, "DOCKER": docker[0]})
    assert res.returncode == 0, f"hack/images/build.sh serve failed:\n{res.stderr[-4000:]}"
    return dict(line.split("=", 1) for line in res.stdout.split() if "=" in line)["serve"]


def test_serve_image_has_no_torch_and_serves_an_onnx_export(docker: list[str], serve_image: str,
                                                            tmp_path: Path) -> None:
    from finetune_api.spec import parse_spec
    from finetune_trainer.fit import fit
    from finetune_trainer.report import Reporter

    res = in_image(docker, serve_image, "python3", "-c", "import torch")
    assert res.returncode != 0 and "No module named 'torch'" in res.stderr
    out = tmp_path / "export"
    spec = {**TINY_JOB["spec"], "dataset": {"builtin": "digits", "classes": ["0", "1"], "imageSize": 16},
            "output": {"path": str(out), "formats": ["safetensors", "onnx"]}}
    fit(parse_spec(spec), Reporter(), out, name="served")
    for p in (out, *out.rglob("*")):
        p.chmod(0o755 if p.is_dir() else 0o644)
    tmp_path.chmod(0o755)
    res = run(docker, "run", "--rm", "--read-only", "--tmpfs", "/tmp", "--network", "none", "--cap-drop", "ALL",
              "--security-opt", "no-new-privileges", "-v", f"{out}:/mnt/models:ro", "--entrypoint", "python3",
              serve_image, "-c", SERVE_PROBE, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    status, label = res.stdout.split()[-2:]
    assert status == "200" and label in ("0", "1")  # served by an image where `import torch` fails

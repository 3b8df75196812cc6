#!/usr/bin/env python3
"""Write requirements/*.lock: every Python dependency pinned, each with the sha256 of every file PyPI has for it.

    make lock                    # (re)generate after changing dependencies in pyproject.toml

The locks are resolved once, together, by `uv pip compile` (dev.lock: every extra, what `make venv`
installs) and the image locks are cut from the same versions (-c), so the venv and the images never
disagree. The current venv's versions are preferred, so a relock changes only what pyproject.toml
changed. Files written (pip install --require-hashes -r …):

  dev.lock       every extra + pip/setuptools/wheel (the build backend: installs run --no-build-isolation)
  operator.lock  the operator image      serve.lock  the serve image
  trainer.lock   the trainer image without torch, torchvision and the CUDA wheels only PyPI's torch pulls in
  torch.lock     those: the trainer image when torch comes from PyPI (TORCH_INDEX_URL empty)
  operator-dev.lock  the operator and the test tools, no torch (the kind e2e workflow)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "requirements"
PYTHON = "3.11"  # the images' Python (Dockerfile BASE_IMAGE) and the oldest requires-python allows
BUILD = ["pip", "setuptools", "wheel"]
IMAGES = {"operator": ["operator"], "serve": ["serve"], "trainer": ["trainer"]}
# The kind e2e workflow (.github/workflows/e2e-kind.yaml): operator and test tools, no torch (it runs in images).
OTHERS = {"operator-dev": ["operator", "dev"]}
# What PyPI's Linux torch wheel depends on that a CPU build does not: the CUDA runtime wheels and triton.
TORCH_FAMILY = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")


def uv() -> list[str]:
    return [sys.executable, "-m", "uv"]


def compile_lock(extras: list[str], out: Path, constraints: list[Path]) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".in", delete=False) as build:
        build.write("\n".join(BUILD) + "\n")
    cmd = [*uv(), "pip", "compile", str(ROOT / "pyproject.toml"), build.name, "--generate-hashes",
           "--python-version", PYTHON, "--universal", "--quiet", "--output-file", str(out),
           "--custom-compile-command", "make lock", "--no-strip-extras"]
    for extra in extras:
        cmd += ["--extra", extra]
    for c in constraints:
        cmd += ["--constraint", str(c)]
    try:
        subprocess.run(cmd, check=True, cwd=ROOT)
    finally:
        os.unlink(build.name)
    # uv writes temp files' names into the `# via` notes: say what they stand for (a relock is then a clean diff).
    text = out.read_text().replace(build.name, "build tools (hack/lock.py)")
    text = re.sub(r"-c \S+/venv\.txt", "-c the venv's versions", text)
    out.write_text(re.sub(r"-c \S+/dev\.txt", "-c dev.lock", text))


def entries(text: str) -> list[tuple[str, str]]:
    """(normalized name, the entry's lines) of a lock: a requirement line, its hashes and its `# via` notes."""
    out: list[tuple[str, str]] = []
    for block in re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 1)[1] if text.startswith("#") else text):
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)", block)
        if match:
            out.append((re.sub(r"[-_.]+", "-", match.group(1)).lower(), block.rstrip("\n")))
    return out


def pin(block: str) -> str:
    """An entry's requirement as a constraint: `name==version ; markers`, without extras (-c takes none)."""
    return re.sub(r"\[[^\]]*\]", "", block.splitlines()[0].rstrip(" \\"))


def header(text: str) -> str:
    return "".join(line + "\n" for line in text.splitlines() if line.startswith("#") and not line.startswith("#    "))


def main() -> int:
    OUT.mkdir(exist_ok=True)
    constraints = []
    venv_python = ROOT / ".venv" / "bin" / "python"
    with tempfile.TemporaryDirectory() as tmp:
        if venv_python.exists():  # prefer what is installed: a relock moves only what pyproject.toml moved
            freeze = subprocess.run([str(venv_python), "-m", "pip", "freeze", "--all", "--exclude-editable"],
                                    capture_output=True, text=True, check=True).stdout
            pins = Path(tmp) / "venv.txt"
            pins.write_text("".join(line + "\n" for line in freeze.splitlines() if "==" in line
                                    and not line.lower().startswith(("finetune-operator", "uv=="))))
            constraints.append(pins)
        extras = sorted({e for group in IMAGES.values() for e in group} | {"dev", "demo"})
        compile_lock(extras, OUT / "dev.lock", constraints)
        dev_pins = Path(tmp) / "dev.txt"
        dev_pins.write_text("".join(pin(block) + "\n" for _, block in entries((OUT / "dev.lock").read_text())))
        for name, group in {**IMAGES, **OTHERS}.items():
            compile_lock(group, OUT / f"{name}.lock", [dev_pins])
    trainer = (OUT / "trainer.lock").read_text()
    blocks = entries(trainer)
    (OUT / "torch.lock").write_text(header(trainer) + "# torch, torchvision and what only PyPI's torch wheel needs"
                                    " (cut from trainer.lock).\n"
                                    + "".join(b + "\n" for n, b in blocks if TORCH_FAMILY.match(n)))
    (OUT / "trainer.lock").write_text(header(trainer) + "# torch, torchvision and their CUDA wheels are in torch.lock"
                                      " (or come from TORCH_INDEX_URL).\n"
                                      + "".join(b + "\n" for n, b in blocks if not TORCH_FAMILY.match(n)))
    for lock in sorted(OUT.glob("*.lock")):
        print(f"{lock.relative_to(ROOT)}: {len(entries(lock.read_text()))} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())

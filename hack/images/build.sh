#!/usr/bin/env bash
# Build both images from the local base image (no registry needed):
#
#   hack/images/build.sh                 # finetune-operator:$TAG and finetune-trainer:$TAG
#   hack/images/build.sh operator        # one target (operator, trainer or serve)
#
# Versions and hashes come from requirements/*.lock (`make lock` rewrites them from pyproject.toml).
#
# Steps: start the private Docker engine if none is reachable (dockerd.sh), make the base image
# (build-base.sh), then `docker build --target operator|trainer --build-arg BASE_IMAGE=...` with BuildKit
# (layer cache and a pip cache mount persist in the engine's data root between runs).
#
# Env: TAG (default: the version in pyproject.toml), FINETUNE_BASE_IMAGE (skip build-base.sh and use this),
# TORCH_INDEX_URL (default empty = PyPI's torch, the CUDA build: these machines reach PyPI only; set it to
# https://download.pytorch.org/whl/cpu for the ~1 GB smaller CPU image where that index is reachable),
# DOCKER (docker CLI to use; one with BuildKit support).
# Prints one `target=image` line per image built.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(operator trainer)
tag="${TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/pyproject.toml" | head -1)}"

# A docker CLI that can drive BuildKit without the buildx plugin: Debian's docker.io CLI can.
if [[ -z "${DOCKER:-}" ]]; then
  if docker buildx version >/dev/null 2>&1; then DOCKER=docker
  elif [[ -x /usr/bin/docker ]]; then DOCKER=/usr/bin/docker
  else DOCKER=docker; fi
fi
export DOCKER_BUILDKIT=1

if ! "$DOCKER" version >/dev/null 2>&1; then
  eval "$("$here/dockerd.sh" start)"
fi

base="${FINETUNE_BASE_IMAGE:-$("$here/build-base.sh")}"

for target in "${targets[@]}"; do
  case "$target" in operator|trainer|serve) ;; *) echo "build.sh: unknown target $target" >&2; exit 2 ;; esac
  image="finetune-$target:$tag"
  args=(build "$root" --target "$target" --tag "$image" --build-arg "BASE_IMAGE=$base")
  [[ $target == trainer ]] && args+=(--build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-}")
  echo "build.sh: $DOCKER ${args[*]}" >&2
  "$DOCKER" "${args[@]}" >&2
  echo "$target=$image"
done

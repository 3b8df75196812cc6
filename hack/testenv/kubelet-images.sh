#!/usr/bin/env bash
# The project's images for the real kubelet node (hack/testenv/kubelet_node.py), built once per content:
#
#   hack/testenv/kubelet-images.sh                    # operator + trainer + serve (the smoke-test Job's)
#   hack/testenv/kubelet-images.sh operator           # one target
#
# Each image is tagged finetune-<target>:c<key>, where <key> hashes everything that goes into it: the
# Dockerfile and .dockerignore, the base-image recipe (hack/images/build-base.sh), the build arguments
# (TORCH_INDEX_URL) and every file of the build context (pyproject.toml, README.md, requirements/, api/,
# trainer/, operator/, serve/ — what .dockerignore lets through). A tag that exists is not built again
# (warm: hashing only); a new key builds with hack/images/build.sh (BuildKit's layer cache keeps the big
# dependency layers when only sources changed) and removes the older c* tags of that target, then prunes
# BuildKit's cache down to FINETUNE_BUILD_CACHE_KEEP (default 6GB: the trainer's pip cache fits).
# The node imports the images by name at start-up (`docker save | ctr -n k8s.io images import -`: no
# archive on disk).
#
# Prints one `target=image` line per target. Env: TORCH_INDEX_URL (default empty = PyPI's CUDA torch:
# download.pytorch.org is unreachable on the CI machines), FINETUNE_BUILD_CACHE_KEEP, and what
# hack/images/build.sh reads. The private Docker engine (hack/images/dockerd.sh) is started if none is
# reachable and left running: the node needs it to export the images (stop it with `dockerd.sh stop`).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
images="$root/hack/images"
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(operator trainer serve)
export TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"

if [[ -z "${DOCKER:-}" ]]; then
  if [[ -x /usr/bin/docker ]]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
fi
export DOCKER
if ! "$DOCKER" version >/dev/null 2>&1; then
  eval "$("$images/dockerd.sh" start)"
fi

# The content key: file names and contents of the build context, recipe files and build arguments.
content_key() { # target
  (
    cd "$root"
    printf 'target=%s TORCH_INDEX_URL=%s\n' "$1" "$TORCH_INDEX_URL"
    find pyproject.toml README.md requirements api trainer operator serve -type f \
      ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path '*.egg-info/*' -print0 | LC_ALL=C sort -z \
      | xargs -0 sha256sum
    sha256sum Dockerfile .dockerignore hack/images/build-base.sh
  ) | sha256sum | cut -c1-16
}

for target in "${targets[@]}"; do
  case "$target" in operator|trainer|serve) ;; *) echo "kubelet-images.sh: unknown target $target" >&2; exit 2 ;; esac
  tag="c$(content_key "$target")"
  image="finetune-$target:$tag"
  if "$DOCKER" image inspect "$image" >/dev/null 2>&1; then
    echo "kubelet-images.sh: $image is current" >&2
  else
    t0=$SECONDS
    TAG="$tag" "$images/build.sh" "$target" >/dev/null
    echo "kubelet-images.sh: built $image in $((SECONDS - t0)) s" >&2
    # Older content keys of this target: nothing runs them again.
    "$DOCKER" image ls --format '{{.Repository}}:{{.Tag}}' "finetune-$target" | grep -E ":c[0-9a-f]{16}$" \
      | { grep -vx "$image" || true; } | while read -r old; do
        echo "kubelet-images.sh: removing $old" >&2
        "$DOCKER" image rm "$old" >/dev/null
      done
    "$DOCKER" image prune -f >/dev/null
    "$DOCKER" builder prune -f --keep-storage "${FINETUNE_BUILD_CACHE_KEEP:-6GB}" >/dev/null
  fi
  echo "$target=$image"
done

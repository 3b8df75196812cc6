#!/usr/bin/env bash
# Images for the real kubelet node (hack/testenv/kubelet_node.py): build them with hack/images/build.sh and
# leave `docker save` archives where cluster.py imports them from (every *.tar there goes into the node's
# containerd with `ctr -n k8s.io images import`):
#
#   hack/testenv/kubelet-images.sh              # the operator image (272 MB; build ~2 min cold, warm seconds)
#   hack/testenv/kubelet-images.sh operator trainer   # + the trainer (5.9 GB with PyPI's CUDA torch: the
#                                                      # archive, and each node's containerd, need 6 + 12 GB)
#
# The archive is rewritten only when the image ID changed (a stamp next to it). A Docker engine this script
# had to start (hack/images/dockerd.sh) is stopped again at the end, by its PID file.
# Env: FINETUNE_TESTENV_CACHE (archives go to $FINETUNE_TESTENV_CACHE/images), TAG, and what
# hack/images/build.sh reads.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
images="$here/../images"
CACHE="${FINETUNE_TESTENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator/testenv}"
out="$CACHE/images"
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(operator)

if [[ -z "${DOCKER:-}" ]]; then
  if [[ -x /usr/bin/docker ]]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
fi
export DOCKER
started=0
if ! "$DOCKER" version >/dev/null 2>&1; then
  eval "$("$images/dockerd.sh" start)"
  started=1
fi
stop_dockerd() { [[ $started == 1 ]] && "$images/dockerd.sh" stop || true; }
trap stop_dockerd EXIT

mkdir -p "$out"
built="$("$images/build.sh" "${targets[@]}")"
while IFS='=' read -r target image; do
  [[ -n "$image" ]] || continue
  id="$("$DOCKER" image inspect --format '{{.Id}}' "$image")"
  tar="$out/finetune-$target.tar"
  if [[ -f "$tar" && -f "$tar.id" && "$(cat "$tar.id")" == "$image $id" ]]; then
    echo "kubelet-images.sh: $tar is current ($image)" >&2
  else
    echo "kubelet-images.sh: docker save $image -> $tar" >&2
    rm -f "$tar.id"
    nice -n 10 "$DOCKER" save "$image" -o "$tar.tmp"
    mv "$tar.tmp" "$tar"
    echo "$image $id" >"$tar.id"
  fi
  echo "$target=$tar"
done <<<"$built"

#!/usr/bin/env bash
# Build the pod sandbox ("pause") image without a registry: Kubernetes' own build/pause/linux/pause.c
# (from the k8s.io/kubernetes module at K8S_VERSION, hack/testenv/versions.env) compiled statically with
# gcc, packed into a one-layer OCI archive by oci-image.py. Cached, keyed by version:
#
#   hack/images/build-pause.sh      # prints `pause-image=<name>` and `pause-tar=<path>`; warm: < 0.1 s
#   ctr -n k8s.io images import "$(hack/images/build-pause.sh | sed -n 's/^pause-tar=//p')"
#
# The image runs /pause as 65535:65535 (as upstream's does). `/pause -v` prints `pause.c <version>` and
# exits 0, so the same image doubles as a tiny test image.
# Env: FINETUNE_TESTENV_CACHE (default ~/.cache/finetune-operator/testenv), GO, CC (default gcc).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../testenv/versions.env
source "$here/../testenv/versions.env"
CACHE="${FINETUNE_TESTENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator/testenv}"
dir="$CACHE/pause-$K8S_VERSION"
name="localhost/finetune-pause:$K8S_VERSION"
stamp="$K8S_VERSION $(sha256sum "$here/oci-image.py" | cut -c1-16)"

if [[ -f "$dir/.stamp" && "$(cat "$dir/.stamp")" == "$stamp" && -f "$dir/pause.tar" ]]; then
  echo "pause-image=$name"
  echo "pause-tar=$dir/pause.tar"
  exit 0
fi

GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
CC="${CC:-gcc}"
command -v "$CC" >/dev/null || { echo "build-pause.sh: no C compiler (apt-get install gcc libc6-dev)" >&2; exit 3; }
# The source comes from the Go module cache (downloaded there by hack/testenv/build.sh; fetched if not).
src="$(GOFLAGS=-mod=mod GOTOOLCHAIN=local "$GO" mod download -json "k8s.io/kubernetes@$K8S_VERSION" \
  | sed -n 's/^\s*"Dir": "\(.*\)",\?$/\1/p')/build/pause/linux/pause.c"
[[ -f "$src" ]] || { echo "build-pause.sh: $src not found" >&2; exit 1; }

mkdir -p "$dir"
rm -f "$dir/.stamp"
echo "build-pause.sh: $CC -static $src" >&2
nice -n "${FINETUNE_TESTENV_NICE:-10}" "$CC" -Os -Wall -Werror -static -DVERSION="$K8S_VERSION-finetune" \
  -o "$dir/pause" "$src"
strip "$dir/pause"
python3 "$here/oci-image.py" --name "$name" --output "$dir/pause.tar" \
  --file "/pause=$dir/pause:0755" --entrypoint /pause --user 65535:65535
echo "$stamp" >"$dir/.stamp"
echo "pause-image=$name"
echo "pause-tar=$dir/pause.tar"

#!/usr/bin/env bash
# Build (once) and cache the command-line tools the packaging work needs; print the binary's path.
#
#   hack/tools.sh helm        # -> /root/.cache/finetune-operator/testenv/helm-v3.22.0/bin/helm
#
# helm comes from the Go module proxy (`go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION`); its version
# is the one pinned for the e2e environment in hack/testenv/versions.env, and it is cached where
# hack/testenv/build.sh caches it (same directory, same stamp), so whichever runs first builds it and the
# other reuses it. Nothing is written inside the repository.
#
# Env: GO (path to go; Go >= 1.22), FINETUNE_TESTENV_CACHE (cache root), GOFLAGS.
# Exit codes: 0 ok (path on stdout), 2 usage, 3 no Go toolchain, other: the build failed (log on stderr).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage() { echo "usage: $0 helm" >&2; exit 2; }
[[ $# -eq 1 ]] || usage

# shellcheck source=testenv/versions.env
source "$here/testenv/versions.env"

GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
CACHE="${FINETUNE_TESTENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator/testenv}"
LDFLAGS_BASE="-s -w"

go_install() { # name version package binary [extra ldflags]
  local name="$1" version="$2" pkg="$3" bin="$4" extra="${5:-}" dir="$CACHE/$1-$2"
  if [[ -x "$dir/bin/$bin" && -f "$dir/.stamp" ]]; then
    echo "$dir/bin/$bin"
    return
  fi
  if ! [[ -x "$GO" ]]; then
    echo "tools.sh: no Go toolchain to build $name $version (set GO=/path/to/go)" >&2
    exit 3
  fi
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.lock"   # the lock hack/testenv/build.sh takes too
  flock 9
  if ! [[ -x "$dir/bin/$bin" && -f "$dir/.stamp" ]]; then
    echo "tools.sh: go install $pkg@$version (first time only; a few minutes)" >&2
    rm -f "$dir/.stamp"
    mkdir -p "$dir/bin"
    GOTOOLCHAIN=local CGO_ENABLED=0 GOBIN="$dir/bin" nice -n 10 \
      "$GO" install -trimpath -ldflags "$LDFLAGS_BASE $extra" "$pkg@$version" >&2
    echo "$version $("$GO" env GOVERSION) $LDFLAGS_BASE" >"$dir/.stamp"
  fi
  flock -u 9
  echo "$dir/bin/$bin"
}

case "$1" in
  helm) go_install helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm helm \
          "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" ;;
  *) usage ;;
esac

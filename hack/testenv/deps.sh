#!/usr/bin/env bash
# System packages the local e2e cluster's pod runner (hack/testenv/runner.py) needs, installed when missing:
#   bwrap    (Debian: bubblewrap)  private mount/PID namespace per container, bind-mounted volumes
#   setpriv  (Debian: util-linux)  runAsUser/runAsGroup/fsGroup, dropping capabilities
# Idempotent: a no-op (no apt, no network) when everything is present. Installing needs root and apt-get.
# Exit codes: 0 ready, 1 could not install (the message says what to install).
set -euo pipefail

declare -A pkg_of=([bwrap]=bubblewrap [setpriv]=util-linux)
missing=()
for bin in "${!pkg_of[@]}"; do
  command -v "$bin" >/dev/null 2>&1 || missing+=("${pkg_of[$bin]}")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

echo "[testenv/deps] installing: ${missing[*]}" >&2
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[testenv/deps] cannot install ${missing[*]} (needs root and apt-get); install them and retry" >&2
  exit 1
fi
# One install at a time (several test sessions may start at once).
exec 9>/tmp/.finetune-testenv-deps.lock
flock 9
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2 || true  # stale lists: the install below may still succeed from the cache
apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
for bin in "${!pkg_of[@]}"; do
  command -v "$bin" >/dev/null 2>&1 || { echo "[testenv/deps] $bin still missing after installing" >&2; exit 1; }
done

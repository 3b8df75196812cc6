#!/usr/bin/env bash
# System packages of the local e2e cluster's node, installed when missing:
#
#   hack/testenv/deps.sh           # the real node (kubelet_node.py) and its images (hack/images/)
#
# Idempotent: a no-op (no apt, no network) when everything is present. Installing needs root and apt-get.
# Exit codes: 0 ready, 1 could not install (the message says what to install).
set -euo pipefail

declare -A pkg_of
case "${1:-kubelet}" in
  kubelet)
    # containerd + ctr (CRI runtime, image import), runc, the CNI plugins (bridge, host-local, loopback),
    # iptables (kube-proxy, the pod bridge's rules), ip, unshare/nsenter (the node's mount namespace), gcc
    # (the pause image), debootstrap + dockerd (the base image and the image builds).
    pkg_of=([containerd]=containerd [ctr]=containerd [runc]=runc [/usr/lib/cni/bridge]=containernetworking-plugins
            [iptables]=iptables [ip]=iproute2 [nsenter]=util-linux [unshare]=util-linux [gcc]=gcc
            [debootstrap]=debootstrap [dockerd]=docker.io)
    ;;
  *) echo "usage: $0 [kubelet]" >&2; exit 2 ;;
esac
have() { if [[ $1 == /* ]]; then [[ -e $1 ]]; else command -v "$1" >/dev/null 2>&1; fi; }
missing=()
for bin in "${!pkg_of[@]}"; do
  have "$bin" || missing+=("${pkg_of[$bin]}")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)

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
  have "$bin" || { echo "[testenv/deps] $bin still missing after installing" >&2; exit 1; }
done

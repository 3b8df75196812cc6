#!/usr/bin/env bash
# Make the local base image both Dockerfile targets build FROM on machines that cannot pull images:
# a Debian bookworm rootfs made with debootstrap (python3, venv, CA certificates), plus this host's CA
# bundle so pip inside `docker build` trusts the same TLS chain the host does (PyPI through a proxy).
#
#   hack/images/build-base.sh            # -> prints the image name, e.g. finetune-base:bookworm-1
#   hack/images/build-base.sh --force    # rebuild even if the image exists
#
# Env: FINETUNE_BASE_IMAGE (name:tag, default finetune-base:$BASE_VERSION), DEBIAN_MIRROR,
# HOST_CA_BUNDLE (default /etc/ssl/certs/ca-certificates.crt), DOCKER_HOST (see dockerd.sh).
# Needs root (debootstrap, chroot) and a running Docker engine.
set -euo pipefail

BASE_VERSION="bookworm-1"   # bump when the package list below changes
SUITE=bookworm
# tini: an init for ENTRYPOINTs that want one (the Dockerfile does not rely on it: public bases lack it);
# libgomp1: OpenMP runtime some CPU wheels link against.
PACKAGES=python3,python3-venv,ca-certificates,libgomp1,tini
image="${FINETUNE_BASE_IMAGE:-finetune-base:$BASE_VERSION}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ca_bundle="${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

if [[ "${1:-}" != "--force" ]] && docker image inspect "$image" >/dev/null 2>&1; then
  echo "$image"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "build-base.sh: apt-get install debootstrap" >&2; exit 3; }
[[ $(id -u) == 0 ]] || { echo "build-base.sh: debootstrap needs root" >&2; exit 3; }

work="$(mktemp -d "${TMPDIR:-/tmp}/finetune-base.XXXXXX")"
rootfs="$work/rootfs"
cleanup() {
  # debootstrap mounts /proc and /sys in the rootfs; an interrupted run can leave them mounted.
  # (grep finds nothing on a clean run: `|| true`, or set -e/pipefail would end the trap before rm.)
  { findmnt -rno TARGET | grep "^$rootfs/" || true; } | sort -r | while read -r m; do umount -l "$m" || true; done
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

echo "build-base.sh: debootstrap $SUITE ($PACKAGES) from $mirror" >&2
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -n 30 "$work/debootstrap.log" >&2; exit 1; }

# Trust what the host trusts (a TLS-intercepting proxy's CA, if any, comes along).
cp "$ca_bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"
# Same apt sources as a Debian image would have (apt works inside builds that need it).
cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror $SUITE main
deb $mirror $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
SOURCES
# Slim it: no apt lists, caches, docs, man pages or locales in the image.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log \
  "$rootfs"/usr/share/locale/*
find "$rootfs/usr/lib/python3"* -name __pycache__ -prune -exec rm -rf {} + 2>/dev/null || true

tar --numeric-owner --one-file-system -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["python3"]' \
  --message "debootstrap $SUITE minbase + $PACKAGES + host CA bundle" \
  - "$image" >/dev/null
echo "$image"

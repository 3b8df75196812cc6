#!/usr/bin/env bash
# Start or stop a private Docker engine for building and testing the images (no systemd needed).
#
#   hack/images/dockerd.sh start   # prints `export DOCKER_HOST=unix://...`; idempotent
#   hack/images/dockerd.sh stop    # stops the dockerd this script started (by its PID file)
#   hack/images/dockerd.sh status
#
# Uses Debian's docker.io (dockerd, containerd, runc). The runc wrapper next to this script is the
# default runtime: it drops CAP_SYS_RESOURCE and negative oom_score_adj from containers, which a VM
# without CAP_SYS_RESOURCE cannot grant (DESIGN §6). Its own socket, pid file and data root, so it
# never disturbs a system Docker:
#   FINETUNE_DOCKER_DIR   state (socket, pid, log, exec-root)     default /run/finetune-docker
#   FINETUNE_DOCKER_ROOT  images and layers (keeps the layer cache) default /var/lib/finetune-docker
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir="${FINETUNE_DOCKER_DIR:-/run/finetune-docker}"
root="${FINETUNE_DOCKER_ROOT:-/var/lib/finetune-docker}"
sock="$dir/docker.sock"
pidfile="$dir/dockerd.pid"
export DOCKER_HOST="unix://$sock"

running() { [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case "${1:-}" in
  start)
    if running && docker version >/dev/null 2>&1; then
      echo "export DOCKER_HOST=$DOCKER_HOST"
      exit 0
    fi
    command -v dockerd >/dev/null || { echo "dockerd.sh: no dockerd (apt-get install docker.io)" >&2; exit 3; }
    [[ $(id -u) == 0 ]] || { echo "dockerd.sh: dockerd needs root" >&2; exit 3; }
    mkdir -p "$dir" "$root"
    cat >"$dir/daemon.json" <<JSON
{
  "runtimes": {"finetune-runc": {"path": "$here/runc-wrapper"}},
  "default-runtime": "finetune-runc",
  "data-root": "$root",
  "exec-root": "$dir/exec",
  "pidfile": "$pidfile",
  "hosts": ["unix://$sock"],
  "storage-driver": "overlay2",
  "iptables": true,
  "log-level": "warn",
  "features": {"buildkit": false}
}
JSON
    # setsid: dockerd outlives this script; it is stopped by PID with `dockerd.sh stop`.
    setsid dockerd --config-file "$dir/daemon.json" >"$dir/dockerd.log" 2>&1 </dev/null &
    for _ in $(seq 1 60); do
      docker version >/dev/null 2>&1 && { echo "export DOCKER_HOST=$DOCKER_HOST"; exit 0; }
      sleep 0.5
    done
    echo "dockerd.sh: dockerd did not come up; last log lines:" >&2
    tail -n 20 "$dir/dockerd.log" >&2
    exit 1
    ;;
  stop)
    if running; then
      pid="$(cat "$pidfile")"
      kill -TERM "$pid"
      for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$pidfile"
    ;;
  status)
    running && docker version --format 'dockerd {{.Server.Version}} at '"$DOCKER_HOST" || { echo "not running"; exit 1; }
    ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# End-to-end on kind, for users and GitHub Actions (it cannot run on machines without a registry: kind's
# node image comes from Docker Hub). Creates a kind cluster, builds both images from public bases and
# loads them into the nodes, installs the chart (its own ServiceAccount and RBAC, no cluster-admin), runs
# the shared e2e suite (tests/e2e, the same tests CI runs against the local control plane) against it,
# and deletes the cluster.
#
#   hack/kind-e2e.sh                 # everything, cluster deleted at the end
#   KEEP_CLUSTER=1 hack/kind-e2e.sh  # leave the cluster for debugging (kind delete cluster --name ...)
#
# Env: KIND_CLUSTER (default finetune-e2e), KIND_NODE_IMAGE (kindest/node:vX.Y.Z, default: kind's),
# TAG (default e2e), TORCH_INDEX_URL (default the CPU wheel index), BASE_IMAGE (default: the Dockerfile's),
# KIND, HELM, PYTHON (tools; helm defaults to hack/tools.sh helm), PYTEST_ARGS.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cluster="${KIND_CLUSTER:-finetune-e2e}"
tag="${TAG:-e2e}"
namespace=finetune-system
kind="${KIND:-kind}"
helm="${HELM:-$("$root/hack/tools.sh" helm)}"
python="${PYTHON:-$root/.venv/bin/python}"
workdir="$(mktemp -d "${TMPDIR:-/tmp}/finetune-kind.XXXXXX")"
export KUBECONFIG="$workdir/kubeconfig"

log() { printf '\n== %s\n' "$*" >&2; }

teardown() {
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    log "failed (exit $rc): operator logs and FineTuneJobs"
    kubectl -n "$namespace" logs deployment/finetune-operator --tail=200 >&2 || true
    kubectl get finetunejobs -A -o wide >&2 || true
  fi
  if [[ "${KEEP_CLUSTER:-0}" == 1 ]]; then
    log "keeping cluster $cluster (KUBECONFIG=$KUBECONFIG)"
  else
    "$kind" delete cluster --name "$cluster" >&2 || true
    rm -rf "$workdir"
  fi
  exit $rc
}
trap teardown EXIT

log "kind cluster $cluster"
create=(create cluster --name "$cluster" --kubeconfig "$KUBECONFIG" --wait 180s)
[[ -n "${KIND_NODE_IMAGE:-}" ]] && create+=(--image "$KIND_NODE_IMAGE")
"$kind" "${create[@]}"

log "images finetune-operator:$tag, finetune-trainer:$tag"
build_args=()
[[ -n "${BASE_IMAGE:-}" ]] && build_args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
for target in operator trainer; do
  extra=()
  [[ $target == trainer ]] && extra+=(--build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}")
  DOCKER_BUILDKIT=1 docker build "$root" --target "$target" --tag "finetune-$target:$tag" \
    "${build_args[@]}" "${extra[@]}"
  "$kind" load docker-image "finetune-$target:$tag" --name "$cluster"
done

log "helm install (chart CRDs, RBAC, restricted operator)"
kubectl create namespace "$namespace"
kubectl label namespace "$namespace" pod-security.kubernetes.io/enforce=restricted
"$helm" install finetune-operator "$root/charts/finetune-operator" --namespace "$namespace" \
  --set image.tag="$tag" --set image.pullPolicy=Never \
  --set trainer.image.tag="$tag" --set trainer.image.pullPolicy=Never \
  --wait --timeout 5m
kubectl -n "$namespace" rollout status deployment/finetune-operator --timeout=180s

log "e2e suite against the installed operator"
# The suite's contract for an existing cluster (tests/e2e/conftest.py): FINETUNE_E2E_KUBECONFIG selects the
# cluster; FINETUNE_E2E_OPERATOR=installed says the chart's operator is running there (no in-process one).
FINETUNE_E2E_KUBECONFIG="$KUBECONFIG" FINETUNE_E2E_OPERATOR=installed \
FINETUNE_E2E_OPERATOR_NAMESPACE="$namespace" FINETUNE_E2E_TRAINER_IMAGE="finetune-trainer:$tag" CI="${CI:-}" \
  "$python" -m pytest "$root/tests/e2e" -m e2e ${PYTEST_ARGS:-}
log "passed"

# The two commands a newcomer runs: `make demo` and `make test`. Each sets itself up.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements/dev.lock | sha256sum | cut -c1-12)
DEMO_OUT ?= demo-output
PYTEST_ARGS ?=

TESTENV := hack/testenv

.PHONY: demo demo-distill test venv lock lint fmt crd deploy chart-test images image-test unit integration e2e testenv cluster-up kind-e2e bench clean

venv: $(STAMP)

# Every dependency (pip and the build backend included) from requirements/dev.lock, each downloaded file checked
# against its sha256; then the project itself, built by the locked setuptools (build isolation would fetch an
# unpinned one).
$(STAMP): pyproject.toml requirements/dev.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r requirements/dev.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-* && touch $@

# requirements/*.lock from pyproject.toml (uv pip compile; see hack/lock.py): after changing a dependency.
# Needs the package index; a unit test (tests/unit/test_lock.py) fails while the locks lag pyproject.toml.
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv==0.13.8
	$(PY) hack/lock.py

demo: $(STAMP)
	$(PY) -m finetune_trainer.demo --output $(DEMO_OUT)

# Knowledge distillation: the fine-tuned ImageNet model teaches a small random-init student (with/without side by side).
demo-distill: $(STAMP)
	$(PY) -m finetune_trainer.demo --distill --output $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: $(STAMP)
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

# e2e against KUBECONFIG / FINETUNE_E2E_KUBECONFIG when set, else the local cluster, started and stopped by the
# fixture: the control plane (apiserver, controller-manager, scheduler, etcd) and one real node (Debian containerd
# + the upstream kubelet, CNI, kube-proxy, CoreDNS; hack/testenv/kubelet_node.py) running the project's operator,
# trainer and serve images, built once per content by hack/testenv/kubelet-images.sh. Needs root.
e2e: $(STAMP)
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

# Build/cache the local cluster's binaries (cold ~25 min on 2 cores, warm < 1 s).
testenv:
	$(TESTENV)/build.sh --with-kubelet

# A local cluster with its node and the project's images, to poke at by hand; Ctrl-C stops it.
cluster-up: $(STAMP)
	$(TESTENV)/deps.sh
	$(TESTENV)/build.sh --with-kubelet >/dev/null
	export DOCKER_HOST=$${DOCKER_HOST:-unix:///run/finetune-docker/docker.sock}; \
	  FINETUNE_KUBELET_IMAGES="$$($(TESTENV)/kubelet-images.sh | cut -d= -f2 | paste -sd:)" \
	  $(PY) $(TESTENV)/cluster.py up --kubelet-node

# For users with kind (cannot run on the CI machines: no kindest/node image there).
kind-e2e:
	hack/kind-e2e.sh

lint: $(STAMP)
	$(PY) -m ruff check .

fmt: $(STAMP)
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

# Regenerate the CRD from the spec model (a unit test fails when they drift).
crd: $(STAMP)
	$(PY) -m finetune_operator.crd > charts/finetune-operator/crds/finetunejobs.finetune.dev.yaml
	$(PY) -m finetune_operator.sweep_crd > charts/finetune-operator/crds/finetunesweeps.finetune.dev.yaml
	hack/gen-deploy.sh

# deploy/base (kustomize) is generated from the chart; a unit test fails when it drifts.
deploy:
	hack/gen-deploy.sh

chart-test: $(STAMP)
	$(PY) -m pytest tests/unit/test_chart.py tests/unit/test_chart_deploy.py tests/unit/test_argocd_health.py

# Container images from a locally made Debian base (no registry needed); see hack/images/.
images:
	hack/images/build.sh

image-test: $(STAMP)
	FINETUNE_REQUIRE_DOCKER=1 $(PY) -m pytest tests/images -m e2e

bench: $(STAMP)
	$(PY) bench/train_loop.py

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache

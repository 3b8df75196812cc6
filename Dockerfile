# Three images from one file (BuildKit: `docker buildx build`, or DOCKER_BUILDKIT=1 with Docker >= 20.10):
#
#   docker build --target operator -t finetune-operator:0.1.0 .   # kopf operator, no torch (small)
#   docker build --target trainer  -t finetune-trainer:0.1.0 .    # torch + torchvision, CPU build by default
#   docker build --target serve    -t finetune-serve:0.1.0 .      # finetune-serve for ONNX exports: kserve +
#                                                                  # onnxruntime, no torch (the trainer image
#                                                                  # also has finetune-serve, for any export)
#
# Build arguments:
#   BASE_IMAGE       any Debian-based image with python3 (>= 3.11) and its venv module. Default: the public
#                    python slim image. Machines that cannot pull images make one with
#                    hack/images/build-base.sh (debootstrap + docker import) and pass
#                    --build-arg BASE_IMAGE=finetune-base:bookworm-1 (hack/images/build.sh does).
#   TORCH_INDEX_URL  where torch/torchvision come from. Default: PyTorch's CPU wheel index (~200 MB torch).
#                    PyPI's Linux torch wheel is the CUDA build (several GB with its nvidia-* wheels):
#                    pass --build-arg TORCH_INDEX_URL= (empty) to take PyPI's, or a CUDA index such as
#                    https://download.pytorch.org/whl/cu128 for a specific CUDA version.
#
# Dependencies come from requirements/*.lock (`make lock`): every version pinned, every downloaded file checked
# against its sha256 (pip --require-hashes), the build backend included (the project is built without build
# isolation). The one exception is a torch/torchvision pair taken from TORCH_INDEX_URL: same versions as the
# lock, but that index's files are not in it. Final stages hold the base image plus one virtual environment:
# no compiler, no pip, no build cache; all run as a non-root numeric user.

ARG BASE_IMAGE=python:3.11.11-slim-bookworm

# ---------------------------------------------------------------------------------------------- build base
FROM ${BASE_IMAGE} AS venv
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
# The locks first: dependency layers stay cached while the source changes.
COPY requirements/ /tmp/requirements/
WORKDIR /src
COPY pyproject.toml README.md ./

# ------------------------------------------------------------------------------------------ operator build
FROM venv AS operator-build
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --require-hashes -r /tmp/requirements/operator.lock
COPY api/ api/
COPY trainer/ trainer/
COPY operator/ operator/
COPY serve/ serve/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps --no-build-isolation . \
 && pip check \
 && pip uninstall -y pip setuptools wheel \
 && python3 -m compileall -q -j 0 /opt/venv \
 && ! python3 -c "import torch" 2>/dev/null

# ------------------------------------------------------------------------------------------- trainer build
FROM venv AS trainer-build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# torch + torchvision: the locked pair from that index (its build, e.g. CPU-only: no CUDA wheels), or, with
# TORCH_INDEX_URL empty, PyPI's build with its CUDA wheels, hash-checked from torch.lock. Then the rest.
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ -n "$TORCH_INDEX_URL" ]; then \
      pip install --no-deps --index-url "$TORCH_INDEX_URL" \
        $(grep -Eo '^(torch|torchvision)==[^ ;]+' /tmp/requirements/torch.lock); \
    else \
      pip install --require-hashes --no-deps -r /tmp/requirements/torch.lock; \
    fi \
 && pip install --require-hashes -r /tmp/requirements/trainer.lock
COPY api/ api/
COPY trainer/ trainer/
COPY operator/ operator/
COPY serve/ serve/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps --no-build-isolation . \
 && pip check \
 && pip uninstall -y pip setuptools wheel \
 && python3 -m compileall -q -j 0 -x 'torch/testing/_internal/py3[0-9]+_' /opt/venv \
 && ! python3 -c "import kopf" 2>/dev/null

# --------------------------------------------------------------------------------------------- serve build
FROM venv AS serve-build
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --require-hashes -r /tmp/requirements/serve.lock
COPY api/ api/
COPY trainer/ trainer/
COPY operator/ operator/
COPY serve/ serve/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps --no-build-isolation . \
 && pip check \
 && pip uninstall -y pip setuptools wheel \
 && python3 -m compileall -q -j 0 /opt/venv \
 && ! python3 -c "import torch" 2>/dev/null \
 && python3 -c "import finetune_serve.server, finetune_serve.predictor, onnxruntime"

# ---------------------------------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
# Numeric users (Kubernetes' runAsNonRoot checks the number) with passwd entries (getpass works).
# 1000 is the trainer's default runAsUser (operator setting FINETUNE_RUN_AS_USER); 65532 the operator's.
RUN groupadd --system --gid 65532 finetune && useradd --system --uid 65532 --gid 65532 --home-dir /tmp --shell /usr/sbin/nologin finetune \
 && groupadd --gid 1000 trainer && useradd --uid 1000 --gid 1000 --home-dir /tmp --shell /usr/sbin/nologin trainer

# -------------------------------------------------------------------------------------- operator image
FROM runtime AS operator
LABEL org.opencontainers.image.title="finetune-operator" \
      org.opencontainers.image.description="kopf operator for FineTuneJobs (no torch)" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=operator-build /opt/venv /opt/venv
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["finetune-operator"]

# --------------------------------------------------------------------------------------- trainer image
FROM runtime AS trainer
LABEL org.opencontainers.image.title="finetune-trainer" \
      org.opencontainers.image.description="PyTorch fine-tuning trainer (finetune-train)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV TORCH_HOME=/tmp/torch \
    XDG_CACHE_HOME=/tmp/.cache
COPY --from=trainer-build /opt/venv /opt/venv
USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["finetune-train"]
CMD ["--help"]

# ----------------------------------------------------------------------------------------- serve image
# KServe mounts an InferenceService's storageUri at /mnt/models: point it at the export folder (model.json).
FROM runtime AS serve
LABEL org.opencontainers.image.title="finetune-serve" \
      org.opencontainers.image.description="KServe predictor for FineTuneJob ONNX exports (no torch)" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=serve-build /opt/venv /opt/venv
USER 1000:1000
WORKDIR /tmp
EXPOSE 8080 8081
ENTRYPOINT ["finetune-serve"]
CMD ["--model", "/mnt/models"]

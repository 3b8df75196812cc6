"""`python -m finetune_operator` / `finetune-operator`: run the operator.

Cluster-wide unless FINETUNE_NAMESPACES lists namespaces (kopf patterns). The liveness
endpoint (FINETUNE_LIVENESS_ENDPOINT, default http://0.0.0.0:8080/healthz) answers while
kopf's watchers are alive.
"""

from __future__ import annotations

import argparse
import logging
import sys

import kopf

from finetune_operator.handlers import register
from finetune_operator.settings import Settings, SettingsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="finetune-operator",
        description="Run the FineTuneJob operator. All settings come from FINETUNE_* environment variables "
        "(see operator/finetune_operator/settings.py and the Helm chart's values).",
    )
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env()
    except SettingsError as err:
        print(f"finetune-operator: {err}", file=sys.stderr)
        return 2
    registry = kopf.get_default_registry()  # includes kopf's login via kubeconfig / in-cluster
    register(registry, settings)
    kopf.run(
        registry=registry,
        clusterwide=settings.clusterwide,
        namespaces=settings.namespaces,
        liveness_endpoint=settings.liveness_endpoint or None,
        standalone=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

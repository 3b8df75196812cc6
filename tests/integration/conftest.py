"""Fixtures for the integration tier: a fresh kmock API per test."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import kmock
import pytest
from kmock_cluster import RESOURCES, VERBS, Cluster


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as server:
        for key, info in RESOURCES.items():
            k8s.resources[key] = kmock.ResourceInfo(verbs=VERBS, **info)
        yield Cluster(k8s, server)


@pytest.fixture(autouse=True)
def _quiet_kopf(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kopf")

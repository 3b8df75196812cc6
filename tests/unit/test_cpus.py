"""cpus: cores come from the affinity mask and the cgroup v2 quota, never the node's count alone."""

from __future__ import annotations

import os

import pytest

from finetune_trainer import cpus


@pytest.fixture
def mask(monkeypatch):
    def set_mask(n: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)))
        monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the node: never what is used
    return set_mask


def _cpu_max(tmp_path, text: str):
    path = tmp_path / f"cpu.max.{abs(hash(text))}"
    path.write_text(text)
    return path


def test_a_quota_caps_the_cores_rounded_down(tmp_path, mask) -> None:
    mask(16)
    assert cpus.usable_cores(_cpu_max(tmp_path, "200000 100000\n")) == 2
    assert cpus.usable_cores(_cpu_max(tmp_path, "150000 100000\n")) == 1  # 1.5 CPUs: one whole core
    assert cpus.usable_cores(_cpu_max(tmp_path, "50000 100000\n")) == 1  # half a CPU still runs
    assert cpus.usable_cores(_cpu_max(tmp_path, "max 100000\n")) == 16  # no quota: the mask
    assert cpus.usable_cores(tmp_path / "absent") == 16  # cgroup v1 or no cgroup fs
    assert cpus.usable_cores(_cpu_max(tmp_path, "garbage\n")) == 16
    mask(3)
    assert cpus.usable_cores(_cpu_max(tmp_path, "800000 100000\n")) == 3  # the mask is smaller than the quota


def test_threads_are_capped_only_under_a_quota_nothing_else_set(tmp_path, mask) -> None:
    mask(16)
    limited = _cpu_max(tmp_path, "400000 100000")
    env: dict = {}
    assert cpus.cap_threads(env, limited) == 4 and env == {"OMP_NUM_THREADS": "4"}
    env = {"OMP_NUM_THREADS": "8"}  # the operator's (limits.cpu) or the user's: kept
    assert cpus.cap_threads(env, limited) is None and env == {"OMP_NUM_THREADS": "8"}
    env = {}
    assert cpus.cap_threads(env, _cpu_max(tmp_path, "max 100000")) is None and env == {}
    mask(2)
    assert cpus.cap_threads(env, limited) is None and env == {}  # the mask already fits inside the quota


def test_the_frozen_pass_plans_workers_by_the_quota_not_the_node(tmp_path, mask, monkeypatch) -> None:
    import torch

    from finetune_trainer import pass_input

    mask(16)
    monkeypatch.setattr(cpus, "CPU_MAX", _cpu_max(tmp_path, "200000 100000"))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert pass_input.pass_plan(None, 32, None, 0, torch.device("cpu")).workers == 0  # 2 cores: none spare
    monkeypatch.setattr(cpus, "CPU_MAX", tmp_path / "absent")
    assert pass_input.pass_plan(None, 32, None, 0, torch.device("cpu")).workers == 4  # 16 cores, no quota

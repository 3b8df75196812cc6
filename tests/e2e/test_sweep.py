"""FineTuneSweep on the installed operator (issue 19): trials are real FineTuneJobs with real trainer pods.

  * a 4-trial grid sweep with trials.parallel 2 Succeeds with status.best pointing at the trial with the best
    metric and its export's digest; a FineTuneJob watch shows never more than 2 unfinished trials at once;
    the operator is killed (grace 0) twice mid-sweep and exactly 4 FineTuneJobs are ever created (by name and
    uid); `kubectl get fts` (the API's Table view) is printed into the session summary; deleting the sweep
    deletes its trials (ownerReferences, the garbage collector);
  * trials that fail in the trainer (a dataset.path the validation accepts but that does not exist in the pod)
    count against trials.maxFailed: one more fails the sweep with TooManyFailedTrials and the trial still
    running is stopped (reason Stopped, its Job deleted).
"""

from __future__ import annotations

import threading
import time

import pytest

pytestmark = pytest.mark.e2e

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client, watch  # noqa: E402
from operator_env import TRAIN_TIMEOUT, kill_operator, wait_until  # noqa: E402
from operator_util import GROUP, TABLE_ACCEPT, TERMINAL, VERSION, deep_merge, raw_json, table_rows, tiny_job  # noqa: E402

SWEEPS = "finetunesweeps"
LABEL = "finetune.dev/sweep"
RATES = [0.003, 0.001, 0.0003, 0.01]


def sweep_manifest(name: str, spec: dict) -> dict:
    template = tiny_job(name)["spec"]  # examples/cpu-demo.yaml shrunk to seconds of CPU
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneSweep", "metadata": {"name": name},
            "spec": deep_merge({"template": {"spec": template}}, spec)}


class Sweeps:
    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.api, self.ns, self.co = api, namespace, client.CustomObjectsApi(api)

    def create(self, body: dict) -> dict:
        return self.co.create_namespaced_custom_object(GROUP, VERSION, self.ns, SWEEPS, body)

    def status(self, name: str) -> dict:
        try:
            return self.co.get_namespaced_custom_object(GROUP, VERSION, self.ns, SWEEPS, name).get("status") or {}
        except client.ApiException as e:
            if e.status == 404:
                return {}
            raise

    def delete(self, name: str) -> None:
        try:
            self.co.delete_namespaced_custom_object(GROUP, VERSION, self.ns, SWEEPS, name,
                                                    propagation_policy="Background")
        except client.ApiException as e:
            if e.status != 404:
                raise

    def trials(self, name: str) -> list[dict]:
        return self.co.list_namespaced_custom_object(GROUP, VERSION, self.ns, "finetunejobs",
                                                     label_selector=f"{LABEL}={name}")["items"]

    def table(self) -> list[dict]:
        """What `kubectl get fts` prints: the API server's Table view of the sweeps (its printer columns)."""
        return table_rows(raw_json(self.api, "GET", f"/apis/{GROUP}/{VERSION}/namespaces/{self.ns}/{SWEEPS}",
                                   headers={"Accept": TABLE_ACCEPT}))

    def wait_phase(self, name: str, phases: tuple[str, ...], timeout: float, give_up=None) -> dict:
        def done():
            status = self.status(name)
            return status if status.get("phase") in phases or status.get("phase") in TERMINAL else None

        status = wait_until(done, timeout, f"sweep {name} to reach {'/'.join(phases)}", give_up=give_up)
        assert status["phase"] in phases, f"sweep {name}: {status.get('phase')} {status.get('reason')}: " \
                                          f"{status.get('message')} trials {status.get('trials')}"
        return status


class TrialWatch(threading.Thread):
    """Every FineTuneJob event in the namespace: which were ever ADDED (name, uid), and the most that were
    unfinished at the same time (a watch sees every state a poll could miss)."""

    def __init__(self, api: client.ApiClient, namespace: str, sweep: str) -> None:
        super().__init__(daemon=True)
        self.co, self.ns, self.selector = client.CustomObjectsApi(api), namespace, f"{LABEL}={sweep}"
        self.added: dict[str, str] = {}  # uid -> name
        self.phase: dict[str, str | None] = {}  # uid -> its latest phase (None: no status yet)
        self.max_unfinished = 0
        self.watch = watch.Watch()
        self.ready, self.stopped = threading.Event(), threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        version = self.co.list_namespaced_custom_object(GROUP, VERSION, self.ns, "finetunejobs",
                                                        label_selector=self.selector)["metadata"]["resourceVersion"]
        self.ready.set()
        while not self.stopped.is_set():
            try:  # resumed from the last version seen: a dropped connection loses no event
                for ev in self.watch.stream(self.co.list_namespaced_custom_object, GROUP, VERSION, self.ns,
                                            "finetunejobs", label_selector=self.selector,
                                            resource_version=version, timeout_seconds=60):
                    obj = ev["object"]
                    meta = obj["metadata"]
                    version = meta["resourceVersion"]
                    if ev["type"] == "DELETED":
                        self.phase.pop(meta["uid"], None)
                        continue
                    self.added.setdefault(meta["uid"], meta["name"])
                    self.phase[meta["uid"]] = (obj.get("status") or {}).get("phase")
                    unfinished = sum(p not in TERMINAL for p in self.phase.values())
                    self.max_unfinished = max(self.max_unfinished, unfinished)
            except Exception as e:  # anything but a stop is recorded, then the watch resumes
                if not self.stopped.is_set():
                    self.errors.append(repr(e))
                    time.sleep(0.5)

    def stop(self) -> None:
        self.stopped.set()
        self.watch.stop()
        self.join(timeout=65)


@pytest.fixture
def sweeps(operator_env, jobs):
    s = Sweeps(operator_env.api, operator_env.namespace)
    yield s
    for item in s.co.list_namespaced_custom_object(GROUP, VERSION, s.ns, SWEEPS)["items"]:
        s.delete(item["metadata"]["name"])


def _format_table(rows: list[dict]) -> str:
    cols = [c for c in ("Name", "Phase", "Trials", "Best", "Best-Job", "Reason", "Age") if c in rows[0]]
    cells = [[c.upper() for c in cols]] + [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("   ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def test_a_four_trial_sweep_two_at_a_time_succeeds_with_best_through_operator_kills(operator_env, sweeps,
                                                                                   e2e_report):
    env, name = operator_env, "lr"
    trials = TrialWatch(env.api, sweeps.ns, name)
    trials.start()
    assert trials.ready.wait(30)
    t0 = time.monotonic()
    sweep = sweeps.create(sweep_manifest(name, {
        "parameters": [{"path": "training.learningRate", "categorical": RATES}],
        "algorithm": {"grid": {}},
        "trials": {"max": 4, "parallel": 2, "maxFailed": 0},
    }))
    killed: set[str] = set()
    kills = []
    for created in (2, 3):  # once both first trials exist, once right after the third one is created
        wait_until(lambda n=created: sweeps.status(name).get("created", 0) >= n, TRAIN_TIMEOUT * 2,
                   f"sweep {name} to create trial {created}", interval=0.2, give_up=env.forbidden)
        assert sweeps.status(name).get("phase") not in TERMINAL, "the sweep finished before the kill"
        kills.append(kill_operator(env, killed))
    status = sweeps.wait_phase(name, ("Succeeded",), TRAIN_TIMEOUT * 4, give_up=env.forbidden)
    took = time.monotonic() - t0
    time.sleep(1)  # the watch's last events
    trials.stop()

    expected = [f"{name}-{i:03d}" for i in range(4)]
    current = {t["metadata"]["uid"]: t["metadata"]["name"] for t in sweeps.trials(name)}
    assert sorted(trials.added.values()) == expected, f"FineTuneJobs ever created: {trials.added}"
    assert trials.added == current, f"a trial was replaced: ever {trials.added}, now {current}"
    assert trials.max_unfinished <= 2, f"{trials.max_unfinished} trials unfinished at once with parallel 2"
    assert (status["reason"], status["trialsText"], status["succeeded"]) == ("TrialsCompleted", "4/4", 4), status
    jobs = {t["metadata"]["name"]: t for t in sweeps.trials(name)}
    metrics = {n: t["status"]["output"]["valAccuracy"] for n, t in jobs.items()}
    best = status["best"]
    assert metrics[best["job"]] == max(metrics.values()) == best["metric"], (best, metrics)
    assert best["model"]["sha256"] == jobs[best["job"]]["status"]["output"]["sha256"], best
    assert best["model"]["path"] == f"/output/{best['job']}", best
    assert best["parameters"] == {"training.learningRate": RATES[expected.index(best["job"])]}, best
    for t in jobs.values():  # owned by the sweep: deleting it deletes them
        (ref,) = t["metadata"]["ownerReferences"]
        assert ref["uid"] == sweep["metadata"]["uid"] and ref["controller"] and ref["blockOwnerDeletion"], ref
    table = sweeps.table()
    e2e_report(f"sweep {name}: 4 trials, parallel 2, Succeeded in {took:.0f} s through {len(kills)} operator "
               f"kills; FineTuneJobs ever created {len(trials.added)}, most unfinished at once "
               f"{trials.max_unfinished}; best {best['job']} valAccuracy {best['metric']}")
    e2e_report("kubectl get fts (the API's Table view):\n" + _format_table(table))
    (row,) = table
    assert (row["Phase"], row["Trials"], row["Best-Job"], row["Reason"]) == (
        "Succeeded", "4/4", best["job"], "TrialsCompleted"), row

    sweeps.delete(name)
    wait_until(lambda: not sweeps.trials(name), 90, f"the trials of {name} to be deleted with it")


def test_failed_trials_past_max_failed_fail_the_sweep_and_stop_the_running_trial(operator_env, sweeps, jobs,
                                                                                 e2e_report):
    env, name = operator_env, "broken"
    # The paths pass validation; the trainer finds no such folder (exit 2, InvalidJobFile). The third trial
    # starts after the first failure (1 is tolerated) and is stopped when the second one fails.
    missing = ["/data/missing-a", "/data/missing-b", "/data/missing-c"]
    sweeps.create(sweep_manifest(name, {
        "template": {"spec": {"dataset": {"builtin": None, "path": "/data/x", "classes": None},
                              "volumes": [{"name": "data", "mountPath": "/data", "emptyDir": {}}]}},
        "parameters": [{"path": "dataset.path", "categorical": missing}],
        "algorithm": {"grid": {}},
        "trials": {"max": 3, "parallel": 2, "maxFailed": 1},
    }))
    status = sweeps.wait_phase(name, ("Failed",), TRAIN_TIMEOUT * 2, give_up=env.forbidden)
    assert status["reason"] == "TooManyFailedTrials" and status["failed"] == 2, status
    assert "more than trials.maxFailed (1)" in status["message"], status
    reasons = {t["name"]: t.get("reason") for t in status["trials"]}
    assert list(reasons.values()).count("InvalidJobFile") == 2, reasons

    def all_finished():
        items = sweeps.trials(name)
        return items if items and all((t.get("status") or {}).get("phase") in TERMINAL for t in items) else None

    items = wait_until(all_finished, 60, f"every trial of {name} to finish")
    for t in items:
        st = t["status"]
        if st.get("reason") == "Stopped":  # the one started after the first failure (if it had not failed yet)
            assert "TooManyFailedTrials" in st["message"], st
            assert jobs.batch.list_namespaced_job(jobs.ns, label_selector=f"finetune.dev/finetunejob-uid="
                                                                          f"{t['metadata']['uid']}").items == []
        else:
            assert (st["phase"], st["reason"]) == ("Failed", "InvalidJobFile"), st
    e2e_report(f"sweep {name}: Failed {status['reason']} ({status['message']}); trials "
               + ", ".join(f"{t['metadata']['name']} {t['status'].get('reason')}" for t in items))
    events = {(e.type, e.reason) for e in jobs.core.list_namespaced_event(
        jobs.ns, field_selector=f"involvedObject.kind=FineTuneSweep,involvedObject.name={name}").items}
    assert ("Warning", "TooManyFailedTrials") in events and ("Normal", "TrialCreated") in events, events

"""The FineTuneSweep controller's pure pass (finetune_operator.sweep.plan) and the trial side of stopping.

Trials are FineTuneJob bodies as the API would return them: made from the plan's own `create` output, with
the status a FineTuneJob would have (phase, reason, progress, output). Every status planned here is also
checked against the CRD's generated status schema.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from typing import Any

import pytest
from test_examples import structural_errors

from finetune_api.search import TrialView, suggest, to_prune
from finetune_api.status import STOP_ANNOTATION
from finetune_api.sweep import parse_sweep_spec
from finetune_api.sweep_status import FineTuneSweepStatus
from finetune_operator import crd
from finetune_operator.metrics import Metrics
from finetune_operator.parsed import FineTuneJob
from finetune_operator.status import derive_status, should_stop_job, transition_events
from finetune_operator.sweep import ANNOTATION_INDEX, ANNOTATION_PARAMETERS, LABEL_SWEEP, plan
from finetune_operator.sweep_crd import sweep_status_schema

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
RATES = [0.1, 0.01, 0.001, 0.0001]
JOB_SCHEMA = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
STATUS_SCHEMA = sweep_status_schema()


def sweep_body(status: dict | None = None, **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneSweep",
        "metadata": {"name": "lr", "namespace": "ml", "uid": "sweep-uid", "generation": 1},
        "spec": {
            "template": {"metadata": {"labels": {"team": "vision"}, "annotations": {"note": "copied"}},
                         "spec": {"dataset": {"builtin": "digits"}, "training": {"epochs": 3},
                                  "output": {"path": "/output"}}},
            "parameters": [{"path": "training.learningRate", "categorical": RATES}],
            "algorithm": {"grid": {}},
            "trials": {"max": 4, "parallel": 2, "maxFailed": 1},
            **spec,
        },
    }
    if status is not None:
        body["status"] = status
    return body


def run(body: dict, trials: list[dict]) -> Any:
    """One pass; its status must be declared by the CRD (a strict schema would silently drop the rest)."""
    out = plan(body, trials, NOW)
    FineTuneSweepStatus.model_validate(out.status)
    assert structural_errors(out.status, STATUS_SCHEMA) == []
    return out


def as_created(obj: dict, phase: str | None = None, reason: str | None = None, **status: Any) -> dict:
    """A planned trial as the API returns it later, with a FineTuneJob status."""
    body = copy.deepcopy(obj)
    body["metadata"]["uid"] = f"uid-{body['metadata']['name']}"
    if phase:
        body["status"] = {"phase": phase, **({"reason": reason} if reason else {}), **status}
    return body


def succeeded(obj: dict, accuracy: float, sha: str = "ab" * 32) -> dict:
    output = {"path": f"/output/{obj['metadata']['name']}", "volume": "output", "weightsFile": "model.safetensors",
              "sha256": sha, "valAccuracy": accuracy, "valLoss": 1 - accuracy}
    return as_created(obj, "Succeeded", "Succeeded", output=output)


def at_epoch(obj: dict, epoch: int, accuracy: float) -> dict:
    return as_created(obj, "Running", "Running", progress={"epoch": epoch, "valAccuracy": accuracy, "valLoss": 0.5})


def next_pass(body: dict, out: Any) -> dict:
    """The sweep as the next pass reads it: the status this one wrote."""
    later = copy.deepcopy(body)
    later["status"] = out.status
    return later


# ------------------------------------------------------------------------------------------- creation
def test_the_first_pass_creates_parallel_trials_named_by_index_owned_and_labelled() -> None:
    out = run(sweep_body(), [])
    assert [t["metadata"]["name"] for t in out.create] == ["lr-000", "lr-001"]
    first = out.create[0]
    meta = first["metadata"]
    assert meta["labels"] == {"team": "vision", LABEL_SWEEP: "lr"}
    assert meta["annotations"]["note"] == "copied" and meta["annotations"][ANNOTATION_INDEX] == "0"
    assert json.loads(meta["annotations"][ANNOTATION_PARAMETERS]) == {"training.learningRate": 0.1}
    (ref,) = meta["ownerReferences"]
    assert ref == {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneSweep", "name": "lr", "uid": "sweep-uid",
                   "controller": True, "blockOwnerDeletion": True}
    assert first["spec"]["training"]["learningRate"] == 0.1
    assert first["spec"]["output"]["path"] == "/output/lr-000"
    assert first["spec"]["training"]["featureCacheDir"] == "/output/feature-cache"
    assert structural_errors(first["spec"], JOB_SCHEMA) == [], "a trial's spec must pass the FineTuneJob CRD"
    assert out.status["phase"] == "Pending" and out.status["created"] == 2 and out.status["trialsText"] == "0/4"
    assert not out.stop and not out.invalid


def test_never_more_than_parallel_active_and_a_finished_trial_makes_room_for_exactly_one() -> None:
    body = sweep_body()
    first = run(body, [])
    trials = [at_epoch(t, 1, 0.5) for t in first.create]
    assert run(body, trials).create == [], "two active trials, parallel 2: nothing more"
    trials[0] = succeeded(first.create[0], 0.8)
    again = run(body, trials)
    assert [t["metadata"]["name"] for t in again.create] == ["lr-002"]
    assert json.loads(again.create[0]["metadata"]["annotations"][ANNOTATION_PARAMETERS]) == {
        "training.learningRate": 0.001}


def test_never_more_than_total_however_parallel() -> None:
    body = sweep_body(trials={"max": 3, "parallel": 10})
    out = run(body, [])
    assert [t["metadata"]["name"] for t in out.create] == ["lr-000", "lr-001", "lr-002"]
    assert run(body, [as_created(t, "Running") for t in out.create]).create == []
    grid = sweep_body(trials={"max": 50, "parallel": 50})  # the grid has 4 points
    assert len(run(grid, []).create) == 4


def test_a_restarted_operator_plans_the_same_names_and_values_and_creates_nothing_twice() -> None:
    body = sweep_body(algorithm={"random": {"seed": 7}},
                      parameters=[{"path": "training.learningRate", "logUniform": {"low": 1e-4, "high": 1e-1}}])
    a, b = run(body, []), run(body, [])
    assert a.create == b.create
    # Restart after creating trial 0 but before writing status: it is found, only trial 1 is created.
    only_first = [as_created(a.create[0], "Pending")]
    again = run(body, only_first)
    assert [t["metadata"]["name"] for t in again.create] == ["lr-001"]
    assert again.create[0]["metadata"]["annotations"] == a.create[1]["metadata"]["annotations"]
    spec = parse_sweep_spec(body["spec"])
    assert json.loads(a.create[1]["metadata"]["annotations"][ANNOTATION_PARAMETERS]) == suggest(spec, 1, [])


def test_a_trial_deleted_before_it_finished_is_not_created_again_and_counts_as_failed() -> None:
    body = sweep_body()
    first = run(body, [])
    trials = [at_epoch(t, 1, 0.5) for t in first.create]
    recorded = run(body, trials)
    out = run(next_pass(body, recorded), trials[1:])  # lr-000 is gone
    names = [t["metadata"]["name"] for t in out.create]
    assert "lr-000" not in names and names == ["lr-002"]
    gone = next(t for t in out.status["trials"] if t["name"] == "lr-000")
    assert gone["phase"] == "Failed" and gone["reason"] == "TrialDeleted" and out.status["failed"] == 1


def test_trials_of_another_sweep_with_the_label_are_not_ours() -> None:
    stranger = as_created(run(sweep_body(), []).create[0], "Running")
    stranger["metadata"]["ownerReferences"][0]["uid"] = "someone-else"
    out = run(sweep_body(), [stranger])
    assert [t["metadata"]["name"] for t in out.create] == ["lr-000", "lr-001"]


# ------------------------------------------------------------------------------------------- pruning
def test_pruning_stops_exactly_the_trials_to_prune_chooses() -> None:
    body = sweep_body(trials={"max": 4, "parallel": 4}, pruning={"medianStop": {"startEpoch": 1, "minTrials": 2}})
    created = run(body, []).create
    trials = [at_epoch(t, 1, acc) for t, acc in zip(created, [0.9, 0.8, 0.2, 0.8], strict=True)]
    out = run(body, trials)
    spec = parse_sweep_spec(body["spec"])
    views = [TrialView(i, {}, "Running", None, {1: acc}) for i, acc in enumerate([0.9, 0.8, 0.2, 0.8])]
    assert list(out.stop) == [f"lr-{i:03d}" for i in to_prune(spec, views)] == ["lr-002"], out.stop
    assert out.stop["lr-002"].startswith("Pruned: valAccuracy 0.2 at epoch 1 is worse than the median")
    assert out.create == []
    # Once stopping, it is not chosen again; once its FineTuneJob says Pruned, it is counted as pruned.
    trials[2]["metadata"].setdefault("annotations", {})[STOP_ANNOTATION] = out.stop["lr-002"]
    assert run(body, trials).stop == {}
    trials[2]["status"] = {"phase": "Failed", "reason": "Pruned", "progress": {"epoch": 1, "valAccuracy": 0.2}}
    after = run(body, trials)
    assert after.status["pruned"] == 1 and after.status["running"] == 3
    assert next(t for t in after.status["trials"] if t["name"] == "lr-002")["phase"] == "Pruned"


def test_the_per_epoch_history_is_merged_and_never_loses_an_epoch() -> None:
    body = sweep_body()
    created = run(body, []).create
    first = run(body, [at_epoch(created[0], 1, 0.4), at_epoch(created[1], 1, 0.5)])
    later = run(next_pass(body, first), [at_epoch(created[0], 2, 0.6), at_epoch(created[1], 3, 0.7)])
    history = {t["name"]: t["history"] for t in later.status["trials"]}
    assert history["lr-000"] == [{"epoch": 1, "value": 0.4}, {"epoch": 2, "value": 0.6}]
    assert history["lr-001"] == [{"epoch": 1, "value": 0.5}, {"epoch": 3, "value": 0.7}]


# ------------------------------------------------------------------------------------------- outcomes
def test_more_failed_trials_than_max_failed_fails_the_sweep_and_stops_the_running_ones() -> None:
    body = sweep_body(trials={"max": 4, "parallel": 3, "maxFailed": 1})
    created = run(body, []).create
    trials = [as_created(created[0], "Failed", "InvalidJobFile"), as_created(created[1], "Failed", "TrainerError"),
              at_epoch(created[2], 1, 0.5)]
    out = run(body, trials)
    assert out.status["phase"] == "Failed" and out.status["reason"] == "TooManyFailedTrials"
    assert out.create == [] and list(out.stop) == ["lr-002"] and out.stop["lr-002"].startswith("Stopped:")
    assert ("Warning", "TooManyFailedTrials", out.status["message"]) in out.events
    assert {c["type"] for c in out.status["conditions"] if c["status"] == "True"} == {"Stalled", "Failed"}
    # Sticky: a later pass creates nothing, and posts no second event.
    later = run(next_pass(body, out), [*trials[:2], as_created(created[2], "Failed", "Stopped")])
    assert later.status["reason"] == "TooManyFailedTrials" and later.create == [] and later.events == []
    assert later.status["pruned"] == 1 and later.status["failed"] == 2


def test_max_failed_failures_are_tolerated() -> None:
    body = sweep_body(trials={"max": 4, "parallel": 2, "maxFailed": 1})
    created = run(body, []).create
    out = run(body, [as_created(created[0], "Failed", "TrainerError"), at_epoch(created[1], 1, 0.5)])
    assert out.status["phase"] == "Running" and [t["metadata"]["name"] for t in out.create] == ["lr-002"]


def test_reaching_the_target_succeeds_and_stops_the_running_trials() -> None:
    body = sweep_body(objective={"metric": "valAccuracy", "target": 0.9})
    created = run(body, []).create
    out = run(body, [succeeded(created[0], 0.95), at_epoch(created[1], 1, 0.3)])
    assert out.status["phase"] == "Succeeded" and out.status["reason"] == "TargetReached"
    assert list(out.stop) == ["lr-001"] and out.create == []
    assert out.status["best"]["job"] == "lr-000"


def test_all_trials_done_succeeds_with_the_best_trial_and_its_export_digest() -> None:
    body = sweep_body()
    first = run(body, []).create
    second = run(body, [succeeded(first[0], 0.7), succeeded(first[1], 0.9, sha="99" * 32)]).create
    trials = [succeeded(first[0], 0.7), succeeded(first[1], 0.9, sha="99" * 32),
              succeeded(second[0], 0.8), as_created(second[1], "Failed", "TrainerError")]
    out = run(body, trials)
    assert out.status["phase"] == "Succeeded" and out.status["reason"] == "TrialsCompleted"
    best = out.status["best"]
    assert best["job"] == "lr-001" and best["metric"] == 0.9 and best["parameters"] == {"training.learningRate": 0.01}
    assert best["model"] == {"path": "/output/lr-001", "volume": "output", "weightsFile": "model.safetensors",
                             "sha256": "99" * 32}
    assert out.status["trialsText"] == "4/4" and out.status["succeeded"] == 3 and out.status["failed"] == 1
    assert ("Normal", "Succeeded", out.status["message"]) in out.events
    assert {c["type"] for c in out.status["conditions"] if c["status"] == "True"} == {"Ready", "Succeeded"}


def test_minimising_val_loss_picks_the_lowest_loss() -> None:
    body = sweep_body(objective={"metric": "valLoss"}, trials={"max": 2, "parallel": 2})
    created = run(body, []).create
    out = run(body, [succeeded(created[0], 0.9), succeeded(created[1], 0.6)])  # valLoss 0.1 and 0.4
    assert out.status["best"]["job"] == "lr-000" and out.status["best"]["metric"] == pytest.approx(0.1)


def test_all_done_without_a_success_fails_no_successful_trial() -> None:
    body = sweep_body(trials={"max": 2, "parallel": 2, "maxFailed": 5})
    created = run(body, []).create
    out = run(body, [as_created(t, "Failed", "TrainerError") for t in created])
    assert out.status["phase"] == "Failed" and out.status["reason"] == "NoSuccessfulTrial"
    assert "best" not in out.status


def test_an_invalid_spec_fails_with_invalid_spec_and_creates_nothing() -> None:
    body = sweep_body(parameters=[{"path": "training.learningRat", "categorical": [0.1]}])
    out = run(body, [])
    assert out.create == [] and out.status["phase"] == "Failed" and out.status["reason"] == "InvalidSpec"
    assert "training.learningRat" in out.invalid
    assert [e[:2] for e in out.events] == [("Warning", "InvalidSpec")]
    fixed = sweep_body(out.status)  # the spec fixed: the sweep starts
    assert len(run(fixed, []).create) == 2


def test_a_range_that_makes_an_invalid_trial_is_refused_before_any_trial() -> None:
    out = run(sweep_body(parameters=[{"path": "training.epochs", "int": {"low": 0, "high": 3}}]), [])
    assert out.create == [] and out.status["reason"] == "InvalidSpec" and "training.epochs" in out.invalid


def test_sweep_metrics_follow_the_status() -> None:
    m = Metrics()
    m.observe_sweep("ml", "lr", "Running", "Running", {"running": 2, "succeeded": 1, "failed": 0, "pruned": 1},
                    "valAccuracy", 0.9)
    text = m.exposition().decode()
    assert 'finetune_sweep_trials{name="lr",namespace="ml",state="running"} 2.0' in text
    assert 'finetune_sweep_best_metric{metric="valAccuracy",name="lr",namespace="ml"} 0.9' in text
    m.forget_sweep("ml", "lr", ("running", "succeeded", "failed", "pruned"))
    assert 'name="lr"' not in m.exposition().decode()


# ------------------------------------------------------------------------------------------- the trial's side
def _trial_ftj(stop: str | None, status: dict | None = None) -> FineTuneJob:
    body = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "lr-002", "namespace": "ml", "uid": "u", "generation": 1,
                         "annotations": {STOP_ANNOTATION: stop} if stop else {}},
            "spec": {"dataset": {"builtin": "digits"}}, "status": status or {}}
    return FineTuneJob.from_body(body)


def _job(succeeded: bool = False) -> dict:
    conds = [{"type": "Complete", "status": "True"}] if succeeded else []
    return {"metadata": {"name": "lr-002"}, "spec": {}, "status": {"active": 0 if succeeded else 1,
                                                                  "conditions": conds}}


def test_a_stop_annotation_fails_the_trial_pruned_deletes_its_job_and_never_runs_again() -> None:
    from finetune_operator.settings import Settings

    ftj = _trial_ftj("Pruned: valAccuracy 0.2 at epoch 1 is worse than the median 0.8",
                     {"phase": "Running", "reason": "Running", "jobName": "lr-002"})
    new = derive_status(ftj, _job(), [], NOW, Settings())
    assert new["phase"] == "Failed" and new["reason"] == "Pruned" and "worse than the median" in new["message"]
    assert should_stop_job(new, _job())
    assert transition_events(dict(ftj.status), new)[-1][:2] == ("Normal", "Pruned")
    # Its Job deleted: still Pruned (not JobDeleted), and a Running pod seen late changes nothing.
    gone = derive_status(_trial_ftj(ftj.stop, new), None, [], NOW, Settings())
    assert (gone["phase"], gone["reason"]) == ("Failed", "Pruned")


def test_a_trial_that_succeeded_before_the_stop_keeps_its_result_and_other_stops_are_stopped() -> None:
    from finetune_operator.settings import Settings

    done = derive_status(_trial_ftj("Stopped: sweep lr TargetReached"), _job(succeeded=True), [], NOW, Settings())
    assert done["phase"] == "Succeeded"
    stopped = derive_status(_trial_ftj("Stopped: sweep lr TargetReached"), _job(), [], NOW, Settings())
    assert stopped["reason"] == "Stopped"


def test_finished_trials_count_in_the_median() -> None:
    body = sweep_body(trials={"max": 4, "parallel": 2}, pruning={"medianStop": {"startEpoch": 1, "minTrials": 2}})
    first = run(body, []).create
    done = [succeeded(first[0], 0.9), succeeded(first[1], 0.8)]
    for t, h in zip(done, (0.9, 0.8), strict=True):
        t["status"]["progress"] = {"epoch": 1, "valAccuracy": h}
    second = run(body, done).create
    out = run(body, [*done, at_epoch(second[0], 1, 0.3), at_epoch(second[1], 1, 0.95)])
    assert list(out.stop) == ["lr-002"]

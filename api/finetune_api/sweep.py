"""The FineTuneSweep spec: a FineTuneJob template, the parameters to search and how to search them.

Shared, like the FineTuneJob spec, by the operator (which turns trials into FineTuneJobs and generates
the CRD from these models) and the trainer (`finetune-train sweep`, the same file without a cluster).
No torch, no kubernetes and no Optuna here: the search itself is finetune_api.search.

Every trial's spec is the template with the trial's values set at the parameters' paths, validated by the
FineTuneJob model before anything is created (`check_ranges` refuses, by name, a path that does not exist
and a range whose values make an invalid spec).
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from finetune_api.base import _Model
from finetune_api.errors import JobFileError, format_validation_error
from finetune_api.spec import FineTuneJobSpec, check_type, parse_spec

SWEEP_KIND = "FineTuneSweep"
MAX_TRIALS = 1000
MAX_GRID = 10000  # grid points a grid sweep may enumerate (the product of the parameters' value counts)
PATH_PATTERN = r"^[a-z][A-Za-z0-9]*(\.[a-z][A-Za-z0-9]*)*$"
Scalar = str | bool | int | float


class Bounds(_Model):
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class IntBounds(_Model):
    low: int = Field(ge=-(2**31), le=2**31 - 1)
    high: int = Field(ge=-(2**31), le=2**31 - 1)
    step: int = Field(1, ge=1, le=2**31 - 1)

    @model_validator(mode="after")
    def _ordered(self) -> IntBounds:
        if not self.low <= self.high:
            raise ValueError(f"low ({self.low}) must be at most high ({self.high})")
        return self

    def values(self) -> list[int]:
        return list(range(self.low, self.high + 1, self.step))


class Parameter(_Model):
    """One searched field: its path in the FineTuneJob spec and exactly one kind of range."""

    path: str = Field(..., max_length=256, pattern=PATH_PATTERN,
                      description="camelCase path into template.spec, e.g. training.learningRate or head.dropout")
    categorical: list[Scalar] | None = Field(None, min_length=1, max_length=256,
                                             description="the values to choose from (strings, numbers, booleans)")
    uniform: Bounds | None = Field(None, description="a float drawn uniformly from [low, high]")
    log_uniform: Bounds | None = Field(None, description="a float drawn log-uniformly from [low, high] (low > 0)")
    int_range: IntBounds | None = Field(None, alias="int", description="an integer from low to high (inclusive)")

    @model_validator(mode="after")
    def _one_range(self) -> Parameter:
        kinds = [k for k in ("categorical", "uniform", "log_uniform", "int_range") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"parameter {self.path}: set exactly one of categorical, uniform, logUniform or int")
        if self.log_uniform is not None and self.log_uniform.low <= 0:
            raise ValueError(f"parameter {self.path}: logUniform.low must be above 0")
        if self.categorical is not None and len({repr(v) for v in self.categorical}) != len(self.categorical):
            raise ValueError(f"parameter {self.path}: categorical has duplicates")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("categorical", "uniform", "logUniform", "int")
                    if getattr(self, {"logUniform": "log_uniform", "int": "int_range"}.get(k, k)) is not None)

    def probe_values(self) -> list[Scalar]:
        """Values that stand for the whole range when checking it: every choice, or both ends."""
        if self.categorical is not None:
            return list(self.categorical)
        if self.int_range is not None:
            return sorted({self.int_range.low, self.int_range.values()[-1]})
        bounds = self.uniform or self.log_uniform
        assert bounds is not None
        return [bounds.low, bounds.high]

    def grid_values(self) -> list[Scalar]:
        if self.categorical is not None:
            return list(self.categorical)
        if self.int_range is not None:
            return list(self.int_range.values())
        raise JobFileError(f"algorithm grid: parameter {self.path} is a continuous range; give it categorical "
                           "values or an int range")


class Objective(_Model):
    metric: Literal["valAccuracy", "valLoss", "testAccuracy"] = Field(
        "valAccuracy", description="valAccuracy / valLoss: of the trial's best epoch; testAccuracy: its held-out "
        "test split (the template needs one)")
    direction: Literal["maximize", "minimize"] | None = Field(
        None, description="default: maximize accuracies, minimize valLoss")
    target: float | None = Field(None, description="a trial reaching it ends the sweep (default: run all trials)")

    @property
    def maximize(self) -> bool:
        return (self.direction or ("minimize" if self.metric == "valLoss" else "maximize")) == "maximize"

    def better(self, a: float, b: float) -> bool:
        return a > b if self.maximize else a < b

    def reached(self, value: float) -> bool:
        return self.target is not None and (value >= self.target if self.maximize else value <= self.target)


class Seeded(_Model):
    seed: int = Field(0, ge=0, le=2**31 - 1)


class Grid(_Model):
    pass


class Algorithm(_Model):
    grid: Grid | None = Field(None, description="every combination, in order (categorical and int parameters)")
    random: Seeded | None = Field(None, description="independent random draws (Optuna's RandomSampler)")
    tpe: Seeded | None = Field(None, description="Optuna's TPESampler: later trials learn from earlier ones")

    @model_validator(mode="after")
    def _one(self) -> Algorithm:
        chosen = [k for k in ("grid", "random", "tpe") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError("set one of algorithm.grid, algorithm.random or algorithm.tpe")
        if not chosen:
            self.random = Seeded()
        return self

    @property
    def name(self) -> str:
        return next(k for k in ("grid", "random", "tpe") if getattr(self, k) is not None)

    @property
    def seed(self) -> int:
        chosen = self.random or self.tpe
        return chosen.seed if chosen else 0


class Trials(_Model):
    max: int = Field(10, ge=1, le=MAX_TRIALS, description="trials in all (a grid stops at its size)")
    parallel: int = Field(1, ge=1, le=100, description="trials running at the same time")
    max_failed: int = Field(3, ge=0, le=MAX_TRIALS, description="failed trials tolerated; one more fails the sweep")


class MedianStop(_Model):
    start_epoch: int = Field(1, ge=1, le=10000, description="the epoch whose metric is compared")
    min_trials: int = Field(2, ge=1, le=MAX_TRIALS,
                            description="trials that must have reported that epoch before any is pruned")


class Pruning(_Model):
    median_stop: MedianStop | None = Field(
        None, description="stop a trial whose metric at startEpoch is worse than the median of the other trials' "
        "at that epoch")


class Template(_Model):
    metadata: dict[str, dict[str, str]] | None = Field(
        None, description="labels and annotations for every trial FineTuneJob")
    spec: FineTuneJobSpec


class FineTuneSweepSpec(_Model):
    """spec of a FineTuneSweep (v1alpha1)."""

    template: Template
    parameters: list[Parameter] = Field(..., min_length=1, max_length=32)
    objective: Objective = Field(default_factory=Objective)
    algorithm: Algorithm = Field(default_factory=Algorithm)
    trials: Trials = Field(default_factory=Trials)
    pruning: Pruning = Field(default_factory=Pruning)

    @model_validator(mode="after")
    def _consistent(self) -> FineTuneSweepSpec:
        paths = [p.path for p in self.parameters]
        if len(set(paths)) != len(paths):
            raise ValueError("parameters[].path must be unique")
        if self.template.metadata and set(self.template.metadata) - {"labels", "annotations"}:
            raise ValueError("template.metadata may hold only labels and annotations")
        return self

    def total_trials(self) -> int:
        """How many trials the sweep runs: trials.max, or the grid's size when that is smaller."""
        if self.algorithm.grid is None:
            return self.trials.max
        return min(self.trials.max, grid_size(self.parameters))


def grid_size(parameters: list[Parameter]) -> int:
    return math.prod(len(p.grid_values()) for p in parameters)


def check_path(path: str) -> None:
    """Refuse, by name, a parameter path that is not a field of the FineTuneJob spec (or not a leaf)."""
    model: type[BaseModel] | None = FineTuneJobSpec
    walked = []
    for part in path.split("."):
        if model is None:
            raise JobFileError(f"parameters: {'.'.join(walked)} is not an object, so {path} does not exist")
        field = next((f for name, f in model.model_fields.items() if (f.alias or name) == part), None)
        if field is None:
            where = ".".join(walked) or "spec"
            raise JobFileError(f"parameters: {path} is not a FineTuneJob field ({where} has no field {part!r})")
        walked.append(part)
        model = _model_of(field.annotation)
    if model is not None:
        raise JobFileError(f"parameters: {path} is an object; name one of its fields (e.g. {path}.…)")


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (also inside `X | None`), or None for a leaf."""
    candidates = getattr(annotation, "__args__", None) or (annotation,)
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def with_values(template: dict[str, Any], values: dict[str, Scalar]) -> dict[str, Any]:
    """The template's wire dict with each path set to its value (parents created as needed)."""
    spec = copy.deepcopy(template)
    for path, value in values.items():
        node = spec
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return spec


def trial_spec(sweep: FineTuneSweepSpec, values: dict[str, Scalar], prefix: str = "template.spec") -> FineTuneJobSpec:
    """The validated FineTuneJob spec of one trial; a JobFileError names the value that broke it."""
    return parse_spec(with_values(sweep.template.spec.to_wire(), values), prefix)


CACHE_FOLDER = "feature-cache"


def trial_job_spec(sweep: FineTuneSweepSpec, trial: str, values: dict[str, Scalar]) -> FineTuneJobSpec:
    """A trial as it runs: the template with its values, its export in <output.path>/<trial> (trials never
    share an output folder), and the feature cache in <output.path>/feature-cache unless the template names
    one — trials with the same frozen part, data and preprocessing then share one frozen pass."""
    spec = with_values(sweep.template.spec.to_wire(), values)
    root = sweep.template.spec.output.path.rstrip("/") or "/"
    spec.setdefault("output", {})["path"] = f"{root.rstrip('/')}/{trial}"
    spec.setdefault("training", {}).setdefault("featureCacheDir", f"{root.rstrip('/')}/{CACHE_FOLDER}")
    return parse_spec(spec, "template.spec")


def trial_name(sweep_name: str, index: int) -> str:
    """Deterministic: a restarted operator finds trial i under the same name and never creates it twice."""
    return f"{sweep_name}-{index:03d}"


def check_ranges(sweep: FineTuneSweepSpec) -> None:
    """Before any trial exists: every path is a spec field and every probed value gives a valid spec."""
    for p in sweep.parameters:
        check_path(p.path)
    if sweep.algorithm.grid is not None and grid_size(sweep.parameters) > MAX_GRID:
        raise JobFileError(f"algorithm grid: {grid_size(sweep.parameters)} combinations (at most {MAX_GRID})")
    for i, p in enumerate(sweep.parameters):
        for value in p.probe_values():
            try:
                trial_spec(sweep, {p.path: value})
            except JobFileError as err:
                raise JobFileError(f"parameters[{i}] ({p.path}): the value {value!r} makes an invalid trial: "
                                   f"{err}") from None


def parse_sweep_spec(data: Any, prefix: str = "spec") -> FineTuneSweepSpec:
    """Validate a sweep spec dict (camelCase) and its ranges; one readable line on any problem."""
    if not isinstance(data, dict):
        raise JobFileError(f"{prefix}: must be a mapping, got {type(data).__name__}")
    try:
        sweep = FineTuneSweepSpec.model_validate(data)
    except ValidationError as err:
        raise JobFileError(format_validation_error(err, prefix)) from None
    check_ranges(sweep)
    return sweep


class SweepFile(BaseModel):
    name: str = "sweep"
    spec: FineTuneSweepSpec


NAME_PATTERN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def parse_sweep(doc: Any) -> SweepFile:
    """A full FineTuneSweep manifest (kind, apiVersion, metadata.name, spec)."""
    if not isinstance(doc, dict):
        raise JobFileError("sweep file must be a YAML mapping (a FineTuneSweep)")
    check_type(doc, SWEEP_KIND)
    name = str((doc.get("metadata") or {}).get("name") or "sweep")
    if not NAME_PATTERN.match(name) or len(name) > 48:
        raise JobFileError(f"metadata.name: {name!r} must be a DNS label of at most 48 characters")
    return SweepFile(name=name, spec=parse_sweep_spec(doc.get("spec")))

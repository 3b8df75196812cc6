"""Progress pushed by trainers: per-job credentials, rate limits and status math (the body model is
finetune_api.progress).

Pure and synchronous: the HTTP server (server.py) and the reconciler call into this module, and
unit tests drive it with explicit clocks. Reference design: Kubeflow KEP-2779 — trainers push to
the control plane with a per-job credential and hold no Kubernetes API rights.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from finetune_api.progress import MAX_BODY_BYTES, CheckpointNote, ProgressEvent, parse_event

# Re-exported for the server: the wire format itself lives in finetune_api.progress.
__all__ = ["MAX_BODY_BYTES", "CheckpointNote", "JobProgress", "ProgressEvent", "parse_event"]

TOKEN_BYTES = 32
# The measured numbers of a push that status.progress shows as sent (the best accuracy is kept here instead).
MEASURED = tuple(name for name, f in ProgressEvent.model_fields.items()
                 if f.annotation == float | None and name != "bestValAccuracy")
TOKEN_KEY = "token"  # key inside the per-job Secret


def status_fields(push: ProgressEvent, progress: dict[str, Any]) -> dict[str, Any]:
    """The status fields one push sets: progress, and the resume bookkeeping when the trainer sent it."""
    out: dict[str, Any] = {"progress": progress}
    if push.resumeCount is not None:
        out["resumeCount"] = push.resumeCount
    if push.lastCheckpoint is not None:
        out["lastCheckpoint"] = push.lastCheckpoint.model_dump()  # nulls: a merge patch drops an old step
    return out


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_digest(token: str) -> str:
    """The operator keeps digests in memory, never tokens."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(expected_digest: str, presented: str | None) -> bool:
    if not presented or not expected_digest:
        return False
    return hmac.compare_digest(expected_digest, token_digest(presented))


def bearer(header: str | None) -> str | None:
    if not header or not header.startswith("Bearer "):
        return None
    token = header[len("Bearer "):].strip()
    return token or None


@dataclass
class TokenBucket:
    """Per-job rate limit: `rate` pushes per second on average, bursts up to `burst`."""

    rate: float = 2.0
    burst: float = 10.0
    tokens: float = 10.0
    updated: float = 0.0

    def allow(self, now: float) -> bool:
        if self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def fraction_done(p: ProgressEvent) -> float:
    """0..1 of the whole run: completed epochs plus the share of the current one."""
    if p.event in ("epoch", "end", "start") or not p.totalSteps:
        done = p.epoch
    else:  # a step event's `epoch` is the epoch in progress (1-based)
        done = max(p.epoch - 1, 0) + min(p.step / p.totalSteps, 1.0)
    return max(0.0, min(done / p.totalEpochs, 1.0))


@dataclass
class JobProgress:
    """What the operator remembers about one job's pushes (lost on restart: it is only a cache)."""

    first_time: float = 0.0
    first_fraction: float = 0.0
    best: float | None = None
    last: dict[str, Any] = field(default_factory=dict)
    checkpoint: CheckpointNote | None = None

    def update(self, p: ProgressEvent, now: float) -> dict[str, Any]:
        """The new status.progress for this push (numbers, not strings, except the column texts)."""
        frac = fraction_done(p)
        if not self.first_time or frac < self.first_fraction:  # first push, or a restart from earlier
            self.first_time, self.first_fraction = now, frac
        for acc in (p.valAccuracy, p.bestValAccuracy):
            if acc is not None:
                self.best = acc if self.best is None else max(self.best, acc)
        completed = p.epoch if p.event in ("epoch", "end", "start") else max(p.epoch - 1, 0)
        out: dict[str, Any] = {
            "epoch": completed,
            "totalEpochs": p.totalEpochs,
            "epochText": f"{completed}/{p.totalEpochs}",
            "step": p.step,
            "totalSteps": p.totalSteps,
            "percent": round(frac * 100, 2),
            "lastUpdateTime": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        for key in MEASURED:
            value = getattr(p, key)
            if value is not None:
                out[key] = round(value, 6)
        if self.best is not None:
            out["bestValAccuracy"] = round(self.best, 6)
        eta = estimate_eta(self.first_time, self.first_fraction, now, frac)
        if eta is not None:
            out["etaSeconds"] = round(eta, 1)
            out["etaText"] = format_duration(eta)
        self.last = out
        return out


def estimate_eta(t0: float, f0: float, t1: float, f1: float) -> float | None:
    """Remaining seconds at the average rate observed since the first push (None until measurable)."""
    if f1 >= 1.0:
        return 0.0
    if t1 <= t0 or f1 <= f0:
        return None
    rate = (f1 - f0) / (t1 - t0)
    return (1.0 - f1) / rate


def format_duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"

"""The operator's work queue: one reconcile pass at a time per FineTuneJob, watch-event bursts coalesced,
and the unfinished jobs the resync loop revisits.

Like controller-runtime's work queue: a key (namespace, name) is either idle, or busy with a pass; an
event for a busy key only marks it dirty, and the pass runs once more when it ends. So a burst of N
events costs at most two passes, not N, and the last pass always starts after the last event.

Kept rather than replaced by kopf indexes of the owned Jobs and Pods: every pass reads what exists
itself (one GET of the FineTuneJob and its Job, one label-selected LIST of its pods), so the same pass
runs from kopf handlers, from the resync loop and in unit tests against a fake API, and never mixes a
watch cache with live reads. Indexes would save that LIST but not the coalescing: each watch event
would still ask for a pass.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

Key = tuple[str, str]  # (namespace, name) of a FineTuneJob
Result = TypeVar("Result")


@dataclass
class WorkQueue:
    _guard: threading.Lock = field(default_factory=threading.Lock)
    _locks: dict[Key, threading.Lock] = field(default_factory=dict)
    _busy: set[Key] = field(default_factory=set)  # a pass is running
    _dirty: set[Key] = field(default_factory=set)  # events arrived while it ran
    _last_pass: dict[Key, float] = field(default_factory=dict)  # monotonic end time of the last pass
    _unfinished: set[Key] = field(default_factory=set)

    def run(self, key: Key, one_pass: Callable[[], Result]) -> Result:
        """Run `one_pass` for `key`, again while events asked for more meanwhile; the last result."""
        with self._lock(key):
            self._begin(key)
            try:
                result = one_pass()
                while self._again(key):
                    result = one_pass()
            finally:
                self._end(key)
        return result

    def run_unless_busy(self, key: Key, one_pass: Callable[[], object]) -> None:
        """For watch events: while a pass for `key` runs, only ask it for one more; else run one now."""
        with self._guard:
            if key in self._busy:
                self._dirty.add(key)
                return
        self.run(key, one_pass)

    def track(self, key: Key, unfinished: bool) -> None:
        """Remember unfinished jobs: the resync loop re-derives them (deadlines need a clock)."""
        with self._guard:
            if unfinished:
                self._unfinished.add(key)
            else:
                self._unfinished.discard(key)

    def unfinished(self) -> list[Key]:
        with self._guard:
            return sorted(self._unfinished)

    def due(self, older_than: float) -> list[Key]:
        """Unfinished jobs whose last pass is older than `older_than` seconds (the others are fresh)."""
        now = time.monotonic()
        with self._guard:
            return sorted(k for k in self._unfinished if now - self._last_pass.get(k, 0.0) >= older_than)

    def forget(self, key: Key) -> None:
        """The FineTuneJob is gone: drop its lock and bookkeeping."""
        with self._guard:
            self._locks.pop(key, None)
            self._unfinished.discard(key)
            self._last_pass.pop(key, None)

    def _lock(self, key: Key) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def _begin(self, key: Key) -> None:
        with self._guard:
            self._busy.add(key)
            self._dirty.discard(key)

    def _again(self, key: Key) -> bool:
        """After a pass: run another if events came meanwhile; else the key stops being busy."""
        with self._guard:
            self._last_pass[key] = time.monotonic()
            if key in self._dirty:
                self._dirty.discard(key)
                return True
            self._busy.discard(key)
            return False

    def _end(self, key: Key) -> None:
        with self._guard:
            self._busy.discard(key)

"""HttpReporter: push progress to the operator (Kubeflow KEP-2779 style) without Kubernetes rights.

The pod gets a URL and a per-job bearer token (a mounted Secret); no service-account token. Pushes
run on a background thread with the newest update winning, so a slow or absent operator never
blocks or fails training: failed pushes are retried with exponential backoff and then dropped.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from finetune_api.progress import PROGRESS_FIELDS, ProgressEvent
from finetune_trainer.report import Reporter

log = logging.getLogger(__name__)

URL_ENV = "FINETUNE_PROGRESS_URL"
TOKEN_FILE_ENV = "FINETUNE_PROGRESS_TOKEN_FILE"
FIELDS = PROGRESS_FIELDS


class HttpReporter(Reporter):
    def __init__(self, url: str, token: str, interval: float = 10.0, timeout: float = 5.0,
                 max_backoff: float = 60.0, give_up_after: float = 300.0):
        self.url, self.token = url, token
        self.interval, self.timeout = interval, timeout
        self.max_backoff, self.give_up_after = max_backoff, give_up_after
        self._pending: dict[str, Any] | None = None
        self._last_sent = 0.0
        self._known: dict[str, Any] = {}
        self._cond = threading.Condition()
        self._closed = False
        self.sent = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._loop, name="progress-push", daemon=True)
        self._thread.start()

    @classmethod
    def from_environment(cls) -> HttpReporter | None:
        url, token_file = os.environ.get(URL_ENV), os.environ.get(TOKEN_FILE_ENV)
        if not url or not token_file:
            return None
        try:
            token = Path(token_file).read_text().strip()
        except OSError as err:
            log.warning("progress push disabled: cannot read %s (%s)", token_file, err.strerror)
            return None
        return cls(url, token)

    def event(self, kind: str, **fields: Any) -> None:
        if kind not in ("start", "step", "epoch", "end", "checkpoint"):
            return
        if kind == "end":  # the final report describes the exported (best) epoch, not the last one
            fields = {"bestValAccuracy": fields.get("valAccuracy"), "epoch": fields.get("epoch"),
                      "totalEpochs": fields.get("totalEpochs")}
        self._known.update({k: fields[k] for k in FIELDS if fields.get(k) is not None})
        if kind == "start":
            self._known.update(epoch=fields.get("startEpoch", 1) - 1, totalEpochs=fields["totalEpochs"])
        # A checkpoint taken on SIGTERM goes out as a step push (the operator knows four kinds), at once.
        try:  # the operator parses the body with this model: what it would refuse is not sent
            body = ProgressEvent.model_validate({"event": "step" if kind == "checkpoint" else kind, **self._known})
        except ValueError as err:
            log.warning("progress push skipped: %s", str(err).splitlines()[0])
            return
        payload = {**body.model_dump(mode="json", exclude_none=True), "sentAt": time.time()}
        urgent = kind in ("epoch", "end", "start", "checkpoint")
        with self._cond:
            self._pending = payload
            if urgent or time.monotonic() - self._last_sent >= self.interval:
                self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None and self._closed:
                    return
                payload, self._pending = self._pending, None
            self._send_with_retries(payload)

    def _send_with_retries(self, payload: dict[str, Any]) -> None:
        delay, start = 0.5, time.monotonic()
        while True:
            if self._post(payload):
                self.sent += 1
                self._last_sent = time.monotonic()
                return
            self.failed += 1
            with self._cond:  # a newer update replaces a failing one instead of queueing behind it
                if self._pending is None and not self._closed:
                    # Woken early by an urgent update or close(): after a long outage the backoff must not
                    # outlast the run and lose the final push (close() waits only so long).
                    self._cond.wait(delay)
                newer = self._pending is not None
            if newer or time.monotonic() - start > self.give_up_after or self._closed:
                return
            delay = min(delay * 2, self.max_backoff)

    def _post(self, payload: dict[str, Any]) -> bool:
        req = urllib.request.Request(
            self.url, data=json.dumps(payload).encode(), method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return 200 <= resp.status < 300
        except urllib.error.HTTPError as err:
            if err.code in (400, 401, 403, 404, 413):  # the operator refused it: retrying cannot help
                log.warning("progress push refused: HTTP %s", err.code)
                return True
            return False
        except (OSError, ValueError):
            return False

    def close(self, wait: float = 10.0) -> None:
        """Flush the last update (bounded wait), then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=wait)

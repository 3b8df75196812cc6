"""The operator's HTTP side: trainers POST progress here, Prometheus scrapes /metrics.

POST /v1/progress/{namespace}/{name}   Authorization: Bearer <that job's token>
  204 accepted · 400 bad body · 401 no credential · 403 wrong credential (or unknown job: the
  answer does not reveal which) · 413 too large · 429 over the job's rate limit.
A credential only ever opens its own job: the token is looked up by the namespace/name in the
URL, so another job's token fails the comparison and nothing is written.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from finetune_operator.metrics import Metrics
from finetune_operator.progress import (
    MAX_BODY_BYTES,
    JobProgress,
    TokenBucket,
    bearer,
    parse_event,
    status_fields,
    token_matches,
)
from finetune_operator.server_limits import ConnectionGuard, Limits

log = logging.getLogger(__name__)

# (namespace, name) -> sha256 digest of the job's token, or None when there is no such job.
DigestLookup = Callable[[str, str], Awaitable[str | None]]
# (namespace, name, {"progress": ..., "resumeCount": ..., ...}) -> None: merges them into that job's status.
ProgressWriter = Callable[[str, str, dict[str, Any]], Awaitable[None]]


class ProgressService:
    def __init__(self, metrics: Metrics, lookup: DigestLookup, write: ProgressWriter,
                 min_write_interval: float = 5.0, clock: Callable[[], float] = time.time,
                 limits: Limits | None = None):
        self.metrics, self.lookup, self.write = metrics, lookup, write
        self.limits = limits or Limits()
        self.min_write_interval, self.clock = min_write_interval, clock
        self.jobs: dict[tuple[str, str], JobProgress] = {}
        self.buckets: dict[tuple[str, str], TokenBucket] = {}
        self.last_write: dict[tuple[str, str], float] = {}
        self.pending: dict[tuple[str, str], dict[str, Any]] = {}

    def _reject(self, status: int, reason: str) -> web.Response:
        self.metrics.pushes.labels("rejected", reason).inc()
        return web.json_response({"error": reason}, status=status)

    async def handle_push(self, request: web.Request) -> web.Response:
        ns, name = request.match_info["namespace"], request.match_info["name"]
        key = (ns, name)
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return self._reject(413, "too_large")
        token = bearer(request.headers.get("Authorization"))
        if token is None:
            return self._reject(401, "no_credential")
        digest = await self.lookup(ns, name)
        if digest is None or not token_matches(digest, token):
            return self._reject(403, "bad_credential")
        # Limited after authentication, so nobody without the token can use up a job's budget.
        if not self.buckets.setdefault(key, TokenBucket()).allow(time.monotonic()):
            return self._reject(429, "rate_limited")
        try:
            # The whole body (read(n) may return a first part only), bounded by client_max_size; a body
            # trickled in byte by byte would hold the handler (and its connection) for ever.
            raw = await asyncio.wait_for(request.read(), self.limits.body_timeout)
            push = parse_event(raw)
        except TimeoutError:
            return self._reject(408, "slow_body")
        except web.HTTPRequestEntityTooLarge:
            return self._reject(413, "too_large")
        except ValueError as err:
            return self._reject(400 if "larger" not in str(err) else 413, "bad_body")
        state = self.jobs.setdefault(key, JobProgress())
        new_checkpoint = push.lastCheckpoint is not None and push.lastCheckpoint != state.checkpoint
        state.checkpoint = push.lastCheckpoint or state.checkpoint
        progress = state.update(push, self.clock())
        self.metrics.observe_progress(ns, name, progress)
        self.metrics.pushes.labels("accepted", "").inc()
        await self._maybe_write(key, status_fields(push, progress), urgent=push.event != "step" or new_checkpoint)
        return web.Response(status=204)

    async def _maybe_write(self, key: tuple[str, str], fields: dict[str, Any], urgent: bool) -> None:
        """Status writes are throttled per job; epoch ends, checkpoints and the final push always go through."""
        now = self.clock()
        if not urgent and now - self.last_write.get(key, 0.0) < self.min_write_interval:
            self.pending[key] = fields
            return
        self.pending.pop(key, None)
        self.last_write[key] = now
        try:
            await self.write(*key, fields)
        except Exception as err:  # the push was valid; a failed write must not fail the trainer
            log.warning("writing progress of %s/%s failed (retried): %s", *key, err)
            # Kept for flush_pending: the API server may be down while the trainer sends its last push.
            self.pending.setdefault(key, fields)

    async def flush_pending(self) -> None:
        """Write throttled updates whose interval has passed (called periodically)."""
        now = self.clock()
        for key, fields in list(self.pending.items()):
            if now - self.last_write.get(key, 0.0) >= self.min_write_interval:
                await self._maybe_write(key, fields, urgent=True)

    def forget(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        for table in (self.jobs, self.buckets, self.last_write, self.pending):
            table.pop(key, None)
        self.metrics.forget(namespace, name)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": "text/plain; version=0.0.4"})


async def _healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok")


def make_app(service: ProgressService, guard: ConnectionGuard | None = None) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[guard.middleware] if guard else [])
    app.router.add_post("/v1/progress/{namespace}/{name}", service.handle_push)
    app.router.add_get("/metrics", service.handle_metrics)
    app.router.add_get("/healthz", _healthz)
    return app


async def serve(service: ProgressService, host: str, port: int, flush_every: float = 2.0) -> None:
    """Run until cancelled (kopf cancels its startup-spawned tasks at shutdown)."""
    server, runner = await start_server(service, host, port)
    log.info("progress and metrics server on %s:%d", host, port)
    try:
        while True:
            await asyncio.sleep(flush_every)
            await service.flush_pending()
    finally:
        server.close()
        await runner.cleanup()


async def start_server(service: ProgressService, host: str, port: int) -> tuple[asyncio.Server, web.AppRunner]:
    """The app behind a ConnectionGuard (server_limits.py) on host:port; the caller closes both."""
    guard = ConnectionGuard(service.limits, on_drop=lambda why: service.metrics.http_dropped.labels(why).inc())
    runner = web.AppRunner(make_app(service, guard), access_log=None, **service.limits.handler_args())
    await runner.setup()
    guard.factory = runner.server  # aiohttp's protocol factory exists once the runner is set up
    server = await asyncio.get_running_loop().create_server(guard.protocol, host, port)
    return server, runner

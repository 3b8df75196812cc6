"""Explicit limits of the operator's HTTP server against hostile or broken clients.

aiohttp bounds header lines and counts, but not how many connections are open nor how long a client
may take to send a request head (a slowloris holds a connection with a byte every few seconds). The
guard sits between the listening socket and aiohttp's protocol:

* every connection must deliver a complete request head within `head_timeout` seconds of opening (or
  of its previous response), else it is dropped; a request being handled is never cut;
* at `max_connections`, a new connection evicts the oldest one still waiting for its request head —
  legitimate pushes send their whole request at once, so they are never the ones waiting — and is
  refused only when every connection is in a handler;
* the request line and each header field are at most `max_field_bytes`, at most `max_headers` fields
  (aiohttp answers 400/431), and a push body must arrive within `body_timeout` (see server.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_connections: int = 128  # a cluster's trainers push every few seconds and hold no connection open
    head_timeout: float = 10.0
    body_timeout: float = 10.0
    max_field_bytes: int = 8190  # aiohttp's default, explicit: URLs and bearer tokens are far shorter
    max_headers: int = 32

    def handler_args(self) -> dict[str, Any]:
        """aiohttp's own per-request bounds; idle keep-alive connections end with the head timeout."""
        return {"max_line_size": self.max_field_bytes, "max_field_size": self.max_field_bytes,
                "max_headers": self.max_headers, "keepalive_timeout": self.head_timeout}


@dataclass(eq=False)
class _Conn:
    transport: asyncio.Transport | None = None
    waiting_since: float = field(default_factory=time.monotonic)
    busy: int = 0  # requests of this connection inside a handler
    timer: asyncio.TimerHandle | None = None


class _GuardedProtocol(asyncio.Protocol):
    """aiohttp's protocol for one connection, wrapped: the guard sees it open, idle and close."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol):
        self.guard, self.inner, self.conn = guard, inner, _Conn()
        self.admitted = False  # a refused connection never reaches aiohttp

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn.transport = transport  # type: ignore[assignment]
        self.admitted = self.guard.admit(self.conn)
        if not self.admitted:
            transport.abort()  # type: ignore[attr-defined]
            return
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.release(self.conn)
        if self.admitted:
            self.inner.connection_lost(exc)


class ConnectionGuard:
    """Counts connections, drops slow ones, evicts idle ones at the limit (one per listening server)."""

    def __init__(self, limits: Limits, factory: Callable[[], asyncio.Protocol] | None = None,
                 on_drop: Callable[[str], None] = lambda why: None):
        self.factory, self.limits, self.on_drop = factory, limits, on_drop
        self.conns: set[_Conn] = set()
        self.by_transport: dict[object, _Conn] = {}
        self.dropped = {"slow": 0, "evicted": 0, "refused": 0}

    def protocol(self) -> asyncio.Protocol:
        assert self.factory is not None, "set the guard's factory (aiohttp's runner.server) before serving"
        return _GuardedProtocol(self, self.factory())

    def admit(self, conn: _Conn) -> bool:
        if len(self.conns) >= self.limits.max_connections:
            idle = [c for c in self.conns if not c.busy]
            if not idle:
                self.dropped["refused"] += 1
                self.on_drop("refused")
                return False
            self._drop(min(idle, key=lambda c: c.waiting_since), "evicted")
        self.conns.add(conn)
        self.by_transport[conn.transport] = conn
        self._arm(conn)
        return True

    def release(self, conn: _Conn) -> None:
        if conn.timer:
            conn.timer.cancel()
        self.conns.discard(conn)
        self.by_transport.pop(conn.transport, None)

    def _arm(self, conn: _Conn) -> None:
        if conn.timer:
            conn.timer.cancel()
        conn.waiting_since = time.monotonic()
        conn.timer = asyncio.get_running_loop().call_later(self.limits.head_timeout, self._expire, conn)

    def _expire(self, conn: _Conn) -> None:
        if conn in self.conns and not conn.busy:
            self._drop(conn, "slow")

    def _drop(self, conn: _Conn, why: str) -> None:
        self.dropped[why] += 1
        self.on_drop(why)
        log.debug("dropping a %s HTTP connection", why)
        self.release(conn)
        if conn.transport is not None:
            conn.transport.abort()

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """A request head arrived: its connection is busy (never cut) until the handler returns."""
        conn = self.by_transport.get(request.transport)
        if conn is None:
            return await handler(request)
        conn.busy += 1
        if conn.timer:
            conn.timer.cancel()
        try:
            return await handler(request)
        finally:
            conn.busy -= 1
            if not conn.busy and conn in self.conns:
                self._arm(conn)  # the next request head on a kept-alive connection gets the same time

"""The progress server against hostile clients on real sockets: slowloris, huge headers, a connection flood,
garbage bytes, a trickled body. Each time the attacker is cut off and a legitimate push still gets 204."""

from __future__ import annotations

import asyncio
import json
import os
import re

import pytest

from finetune_operator.metrics import Metrics
from finetune_operator.progress import token_digest
from finetune_operator.server import ProgressService, start_server
from finetune_operator.server_limits import Limits

pytestmark = pytest.mark.unit

TOKEN = "tok-cats"
BODY = json.dumps({"event": "epoch", "epoch": 1, "totalEpochs": 3, "step": 4, "totalSteps": 4}).encode()
LIMITS = Limits(max_connections=8, head_timeout=0.5, body_timeout=0.5, max_field_bytes=1024, max_headers=16)
WAIT = 10.0  # how long a test waits for the server to act (a bound, not a measurement)


@pytest.fixture
async def server():
    written: list = []

    async def lookup(ns: str, name: str) -> str | None:
        return token_digest(TOKEN) if (ns, name) == ("team-a", "cats") else None

    async def write(ns: str, name: str, fields: dict) -> None:
        written.append(fields)

    service = ProgressService(Metrics(), lookup, write, min_write_interval=0.0, limits=LIMITS)
    srv, runner = await start_server(service, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    yield port, written, srv
    srv.close()
    await runner.cleanup()


def _push_request(body: bytes = BODY) -> bytes:
    return (b"POST /v1/progress/team-a/cats HTTP/1.1\r\nHost: operator\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n" + body)


async def _status_of(reader: asyncio.StreamReader) -> int | None:
    """The status code of the server's answer, None when it closed the connection without one."""
    line = await asyncio.wait_for(reader.readline(), WAIT)
    return int(line.split()[1]) if line.startswith(b"HTTP/1.1 ") else None


async def _push(port: int) -> int | None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_push_request())
        await writer.drain()
        return await _status_of(reader)
    finally:
        writer.close()


async def _get(port: int, path: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: operator\r\nConnection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), WAIT)
    writer.close()
    return data.decode(errors="replace")


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True once the server closed (EOF or reset) — waited for up to WAIT seconds."""
    try:
        while await asyncio.wait_for(reader.read(65536), WAIT):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    return True


async def test_a_legitimate_push_is_accepted(server):
    port, written, _ = server
    assert await _push(port) == 204
    assert written and written[-1]["progress"]["epoch"] == 1


async def test_slowloris_is_dropped_and_pushes_go_on(server):
    port, _, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/progress/team-a/cats HTTP/1.1\r\nHost: operator\r\n")

    async def drip() -> None:  # a header byte at a time, never the blank line that ends the head
        for _ in range(int(WAIT / 0.1)):
            writer.write(b"X")
            await writer.drain()
            await asyncio.sleep(0.1)

    dripping = asyncio.create_task(drip())
    assert await _push(port) == 204, "a push while the slowloris holds its connection"
    assert await _closed_by_server(reader)
    dripping.cancel()
    with pytest.raises((asyncio.CancelledError, ConnectionError)):
        await dripping
    writer.close()
    assert await _push(port) == 204


@pytest.mark.parametrize("head", [
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
    b"GET /" + b"a" * 50_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
], ids=["huge-field", "too-many-fields", "huge-request-line"])
async def test_oversized_heads_are_refused_and_pushes_go_on(server, head):
    port, _, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    try:
        status = await _status_of(reader)
    except ConnectionResetError:
        status = None
    assert status in (400, 413, 431, None), status
    assert await _closed_by_server(reader)
    writer.close()
    assert await _push(port) == 204


@pytest.mark.parametrize("junk", [
    os.urandom(4096),
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(200),  # a TLS ClientHello to a plain port
    b"\x00" * 1000,
    b"POST /v1/progress/team-a/cats HTTP/9.9\r\n\r\n",
    b"POST /v1/progress/team-a/cats HTTP/1.1\r\nContent-Length: -5\r\nContent-Length: 3\r\n\r\nabc",
], ids=["random", "tls-hello", "nul", "bad-version", "bad-length"])
async def test_garbage_bytes_get_an_error_or_a_close_and_pushes_go_on(server, junk):
    port, written, _ = server
    before = len(written)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(junk)
    try:
        status = await _status_of(reader)
    except (ConnectionResetError, ValueError, IndexError):
        status = None
    assert status is None or status >= 400, status
    writer.close()
    assert len(written) == before, "garbage wrote status"
    assert await _push(port) == 204


async def test_a_connection_flood_evicts_idle_connections_and_pushes_go_on(server):
    port, _, _ = server
    flood = [await asyncio.open_connection("127.0.0.1", port) for _ in range(LIMITS.max_connections * 4)]
    assert await _push(port) == 204, "a push while the flood holds every connection it can"
    # Only the newest idle connections stay open; the rest were evicted as newer ones arrived.
    closed = 0
    for reader, _ in flood:
        try:
            data = await asyncio.wait_for(reader.read(1), 0.05)
            closed += data == b""
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed += 1
    assert closed >= len(flood) - LIMITS.max_connections, (closed, len(flood))
    for _, writer in flood:
        writer.close()
    assert await _push(port) == 204
    metrics = await _get(port, "/metrics")
    evicted = re.search(r'^finetune_http_connections_dropped_total\{reason="evicted"\} (\S+)$', metrics, re.M)
    assert evicted and float(evicted.group(1)) >= len(flood) - LIMITS.max_connections, metrics[-600:]


async def test_a_trickled_body_times_out_with_408_and_pushes_go_on(server):
    port, written, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = _push_request()
    writer.write(request[: len(request) - len(BODY) + 3])  # the head and three bytes of the body
    assert await _status_of(reader) == 408
    writer.close()
    assert not written
    assert await _push(port) == 204


async def test_a_push_whose_status_write_failed_is_written_once_the_api_server_answers_again():
    """The API server down while the trainer sends its last push: accepted (204), written later."""
    api_up, written = False, []

    async def lookup(ns: str, name: str) -> str | None:
        return token_digest(TOKEN)

    async def write(ns: str, name: str, fields: dict) -> None:
        if not api_up:
            raise ConnectionRefusedError("the API server is down")
        written.append(fields)

    clock = [1000.0]
    service = ProgressService(Metrics(), lookup, write, min_write_interval=5.0, clock=lambda: clock[0])
    srv, runner = await start_server(service, "127.0.0.1", 0)
    try:
        assert await _push(srv.sockets[0].getsockname()[1]) == 204
        await service.flush_pending()
        assert not written
        api_up, clock[0] = True, clock[0] + 5
        await service.flush_pending()
        assert [f["progress"]["epoch"] for f in written] == [1]
        await service.flush_pending()
        assert len(written) == 1, "written once"
    finally:
        srv.close()
        await runner.cleanup()


async def test_a_request_in_its_handler_is_never_cut_by_the_head_timeout():
    """A slow digest lookup (the API server answering slowly) holds the handler past head_timeout: the push
    still gets its answer, since only connections waiting for a request head are dropped."""

    async def slow_lookup(ns: str, name: str) -> str | None:
        await asyncio.sleep(LIMITS.head_timeout * 3)
        return token_digest(TOKEN)

    async def write(ns: str, name: str, fields: dict) -> None:
        pass

    service = ProgressService(Metrics(), slow_lookup, write, min_write_interval=0.0, limits=LIMITS)
    srv, runner = await start_server(service, "127.0.0.1", 0)
    try:
        assert await _push(srv.sockets[0].getsockname()[1]) == 204
    finally:
        srv.close()
        await runner.cleanup()

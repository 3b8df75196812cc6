"""Adaptive batching across requests: concurrent requests share one network call.

A request's images wait at most `max_wait_ms` for others to join; a batch never exceeds `max_batch`
images (a request larger than that runs in chunks of it). One batch runs at a time, in a worker thread,
so the event loop keeps answering health checks and metrics while the network runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class _Pending:
    pixels: np.ndarray
    done: asyncio.Future


class Batcher:
    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch: int = 32, max_wait_ms: float = 2.0):
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait_ms / 1000.0
        self.queue: asyncio.Queue[_Pending] | None = None
        self.worker: asyncio.Task | None = None
        self.batches = 0  # network calls made, for tests and the bench

    async def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if self.queue is None:  # created in the server's event loop, on the first request
            self.queue = asyncio.Queue()
            self.worker = asyncio.get_running_loop().create_task(self._work())
        parts = []
        for start in range(0, len(pixels), self.max_batch):
            done = asyncio.get_running_loop().create_future()
            await self.queue.put(_Pending(pixels[start:start + self.max_batch], done))
            parts.append(done)
        return np.concatenate(await asyncio.gather(*parts))

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            size = len(batch[0].pixels)
            deadline = loop.time() + self.max_wait
            while size < self.max_batch:
                try:
                    nxt = self.queue.get_nowait() if self.max_wait <= 0 else await asyncio.wait_for(
                        self.queue.get(), max(deadline - loop.time(), 0))
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                if size + len(nxt.pixels) > self.max_batch:
                    await self._run(loop, batch)
                    batch, size = [nxt], len(nxt.pixels)
                    deadline = loop.time() + self.max_wait
                    continue
                batch.append(nxt)
                size += len(nxt.pixels)
            await self._run(loop, batch)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        try:
            probs = await loop.run_in_executor(None, self.run, np.concatenate([p.pixels for p in batch]))
        except Exception as err:  # the network failed: every waiting request gets the error, the worker lives on
            for p in batch:
                if not p.done.done():
                    p.done.set_exception(err)
            return
        self.batches += 1
        offset = 0
        for p in batch:
            if not p.done.done():
                p.done.set_result(probs[offset:offset + len(p.pixels)])
            offset += len(p.pixels)

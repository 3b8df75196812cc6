"""An inference pass over images as several streams on a few-core CPU: each stream decodes a batch of its own
and runs the network on it with one torch thread, the streams side by side.

Why: with one stream the pass alternates between the network (every core, one OpenMP fork/join per op, a
core waiting while Python dispatches the next op) and decoding the next batch (one core, the others idle).
A DataLoader worker does not help when there is no spare core: its process competes with the network's
threads inside every parallel region. One single-threaded stream per core keeps every core busy with
either and needs no fork/join. This is the "throughput streams" of OpenVINO's CPU plugin and of
intel-extension-for-pytorch's MultiStreamModule, done with a thread pool: torch ops and Pillow's decoders
release the GIL. Measured in bench/frozen_pass.py (bench/README.md).

The numbers: every batch runs on `threads` torch threads whichever stream takes it, so a pass is the
same run to run; outputs come back in batch order. They are not bit-for-bit those of one
stream on every core (the reductions split differently), which is why fp32 passes default to one stream
(pass_input.pass_plan).
"""

from __future__ import annotations

import collections
import contextlib
import gc
import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from finetune_trainer import startup
from finetune_trainer.engine import Compute
from finetune_trainer.pass_input import as_pass_input, batches

Step = Callable[[torch.Tensor], torch.Tensor]
Decide = Callable[[torch.Tensor], None]

_paused = {"passes": 0, "was_enabled": False}
_pausing = threading.Lock()


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the pass (reference counting still frees every tensor).

    A pass makes almost no reference cycles, but a full collection of a process holding torch, torchvision
    and a model walks every object it has, holding the GIL: 0.36-0.47 s for ~750,000 objects measured on
    2 cores, in one pass of 2.9 s out of three or four, stalling every stream that needs the GIL to dispatch
    its next op. torchtitan turns automatic collection off in its training loop for the same reason. Nested
    and concurrent passes share one count: the collector comes back, as it was, when the last one ends."""
    with _pausing:
        if _paused["passes"] == 0:
            _paused["was_enabled"] = gc.isenabled()
            gc.disable()
        _paused["passes"] += 1
    try:
        yield
    finally:
        with _pausing:
            _paused["passes"] -= 1
            if _paused["passes"] == 0 and _paused["was_enabled"]:
                gc.enable()


def map_batches(loader, compute: Compute, decide: Decide | None,
                step: Step) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(step's output, labels) per readable batch of `loader` (a pass_input.PassInput, or a float-image
    DataLoader: one stream), in order: map_splits over that one split."""
    for _, out, labels in map_splits([loader], compute, decide, step):
        yield out, labels


def map_splits(loaders: Sequence, compute: Compute, decide: Decide | None,
               step: Step) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(split index, step's output, labels) per readable batch of each of `loaders` (pass_input.PassInputs or
    float-image DataLoaders), split after split, each in order.

    `decide`, when given, sees the first readable batch of all before any batch is computed, in the calling
    thread with all its torch threads (it may choose the path `step` takes: frozen_pass.FastPrefix). With
    the first split's `streams` > 1, `step` runs in that many threads of its `threads` torch threads each,
    decoding included, at most two batches per stream ahead of the consumer; the streams decode while
    `decide` runs and compute once it returns. The splits share one pool, so the streams run on from one
    split's last batches into the next split's first ones instead of waiting for each other (the frozen
    pass's train and val: one pool start and one drain, not two)."""
    with gc_paused():
        yield from _map_splits([as_pass_input(loader) for loader in loaders], compute, decide, step)


def _map_splits(sources: list, compute: Compute, decide: Decide | None,
                step: Step) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    streams, threads = sources[0].streams, sources[0].threads
    if streams <= 1:
        for s, source in enumerate(sources):
            for images, labels in batches(source, compute):
                if decide is not None:
                    decide(images)
                    decide = None
                yield s, step(images), labels
        return
    jobs = [(s, order) for s, source in enumerate(sources) for order in source.loader.batch_sampler]

    def load(job) -> tuple[torch.Tensor, torch.Tensor] | None:
        source, order = sources[job[0]], job[1]
        batch = source.loader.collate_fn([source.loader.dataset[j] for j in order])
        if batch is None:
            return None
        startup.first_batch()
        return source.on_device(batch[0], compute), batch[1]

    decided = threading.Event()  # the path is chosen: the streams may compute

    def run(job, loaded=None):
        with torch.inference_mode():  # a thread-local mode: the caller's does not reach the pool's threads
            loaded = loaded or load(job)
            decided.wait()
            return None if loaded is None else (job[0], step(loaded[0]), loaded[1])

    start, head = 0, None
    while decide is not None and start < len(jobs):  # the first readable batch, for decide()
        loaded, start = load(jobs[start]), start + 1
        if loaded is not None:
            head = jobs[start - 1], loaded
            break
    if head is None:
        decided.set()
    every = torch.get_num_threads()
    pool = ThreadPoolExecutor(streams, "pass-stream", initializer=torch.set_num_threads, initargs=(threads,))
    pending: collections.deque[Future] = collections.deque()
    later = iter(jobs[start:])
    try:
        if head is not None:
            pending.append(pool.submit(run, *head))
        # the streams decode their first batches while the calling thread decides
        pending.extend(pool.submit(run, job) for job in itertools.islice(later, 2 * streams))
        if head is not None:
            try:
                decide(head[1][0])
            finally:
                decided.set()
        for job in later:
            pending.append(pool.submit(run, job))
            if len(pending) > 2 * streams:
                done = pending.popleft().result()
                if done is not None:
                    yield done
        while pending:
            done = pending.popleft().result()
            if done is not None:
                yield done
    finally:
        decided.set()  # a failing decide(): the streams' waiting batches finish (and are dropped)
        pool.shutdown(wait=True, cancel_futures=True)
        # torch keeps one process-wide thread count besides each thread's own: the pool's threads set it
        # to `threads`; the caller's threads (and any started later) get theirs back
        torch.set_num_threads(every)

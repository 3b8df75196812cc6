"""An inference pass over images as several streams on a few-core CPU: each stream decodes a batch of its own
and runs the network on it with one torch thread, the streams side by side.

Why: with one stream the pass alternates between the network (every core, one OpenMP fork/join per op, a
core waiting while Python dispatches the next op) and decoding the next batch (one core, the others idle).
A DataLoader worker does not help when there is no spare core: its process competes with the network's
threads inside every parallel region. One single-threaded stream per core keeps every core busy with
either and needs no fork/join. This is the "throughput streams" of OpenVINO's CPU plugin and of
intel-extension-for-pytorch's MultiStreamModule, done with a thread pool: torch ops and Pillow's decoders
release the GIL. Measured in bench/frozen_pass.py (bench/README.md).

The numbers: every batch after the first runs on `threads` torch threads whichever stream takes it, so a
pass is the same run to run; outputs come back in batch order. They are not bit-for-bit those of one
stream on every core (the reductions split differently), which is why fp32 passes default to one stream
(pass_input.pass_plan).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from finetune_trainer import startup
from finetune_trainer.engine import Compute
from finetune_trainer.pass_input import as_pass_input, batches

Step = Callable[[torch.Tensor], torch.Tensor]


def map_batches(loader, compute: Compute, first: Step, rest: Step) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(step's output, labels) per readable batch of `loader` (a pass_input.PassInput, or a float-image
    DataLoader: one stream), in order: map_splits over that one split."""
    for _, out, labels in map_splits([loader], compute, first, rest):
        yield out, labels


def map_splits(loaders: Sequence, compute: Compute, first: Step,
               rest: Step) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(split index, step's output, labels) per readable batch of each of `loaders` (pass_input.PassInputs or
    float-image DataLoaders), split after split, each in order.

    `first` computes the first readable batch of all in the calling thread with all its torch threads (it
    may choose the path the others take: frozen_pass.FastPrefix); `rest` computes the others — with the
    first split's `streams` > 1 in that many threads of its `threads` torch threads each, decoding included,
    at most two batches per stream ahead of the consumer. The splits share one pool, so the streams run on
    from one split's last batches into the next split's first ones instead of waiting for each other (the
    frozen pass's train and val: one pool start and one drain, not two)."""
    sources = [as_pass_input(loader) for loader in loaders]
    streams, threads = sources[0].streams, sources[0].threads
    if streams <= 1:
        done_first = False
        for s, source in enumerate(sources):
            for images, labels in batches(source, compute):
                yield s, (rest if done_first else first)(images), labels
                done_first = True
        return
    jobs = [(s, order) for s, source in enumerate(sources) for order in source.loader.batch_sampler]

    def load(job) -> tuple[torch.Tensor, torch.Tensor] | None:
        source, order = sources[job[0]], job[1]
        batch = source.loader.collate_fn([source.loader.dataset[j] for j in order])
        return None if batch is None else (source.on_device(batch[0], compute), batch[1])

    def run(job):
        with torch.inference_mode():  # a thread-local mode: the caller's does not reach the pool's threads
            loaded = load(job)
            return None if loaded is None else (job[0], rest(loaded[0]), loaded[1])

    start = 0
    while start < len(jobs):  # the first readable batch, here: it may decide the path of the rest
        loaded, start = load(jobs[start]), start + 1
        if loaded is not None:
            startup.first_batch()
            yield jobs[start - 1][0], first(loaded[0]), loaded[1]
            break
    every = torch.get_num_threads()
    pool = ThreadPoolExecutor(streams, "pass-stream", initializer=torch.set_num_threads, initargs=(threads,))
    pending: collections.deque[Future] = collections.deque()
    try:
        for job in jobs[start:]:
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
        pool.shutdown(wait=True, cancel_futures=True)
        # torch keeps one process-wide thread count besides each thread's own: the pool's threads set it
        # to `threads`; the caller's threads (and any started later) get theirs back
        torch.set_num_threads(every)

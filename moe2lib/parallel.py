"""Independent jobs spread over processes.

On a small CPU box, two models with one thread each get through more work per second than one model with
two threads (their matrices are too small to keep two cores busy): measured here on 2 cores, 1.26-1.41x
for llama.cpp choice scoring and 1.57x for LoRA training. Threads are not enough for this: llama.cpp's
scoring loop and torch's training loop both spend enough time in Python to serialise on the GIL.
"""
from __future__ import annotations

import contextlib
import functools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Sequence

from .errors import InputError


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's (process-wide) intra-op thread count set to ``n`` inside the block and restored after it;
    ``n`` None or 0 leaves it as it is."""
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_workers(workers) -> int:
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise InputError(f"must be a positive integer, not {workers!r}", param="workers")
    return workers


def run(fn: Callable, jobs: Sequence[tuple], workers: int = 1, *, desc: str | None = None, **kwargs) -> list:
    """``[fn(*job, **kwargs) for job in jobs]``, in ``workers`` fresh (spawned) processes when ``workers > 1``.

    ``fn`` must be importable (a module-level function) and the jobs plain, picklable data; results come
    back in the jobs' order. The first error is raised once the running jobs end; jobs not yet started are
    cancelled. ``desc`` shows a progress bar over the jobs.
    """
    jobs = [tuple(j) for j in jobs]
    workers = check_workers(workers)
    call = functools.partial(fn, **kwargs)
    bar = None
    if desc:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(jobs), desc=desc, unit="job")
    try:
        if workers == 1 or len(jobs) <= 1:
            out = []
            for job in jobs:
                out.append(call(*job))
                if bar is not None:
                    bar.update(1)
            return out
        ctx = multiprocessing.get_context("spawn")  # fork would copy torch's and llama.cpp's thread pools
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
            futures = {pool.submit(call, *job): i for i, job in enumerate(jobs)}
            out = [None] * len(jobs)
            try:
                for f in as_completed(futures):
                    out[futures[f]] = f.result()
                    if bar is not None:
                        bar.update(1)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
            return out
    finally:
        if bar is not None:
            bar.close()

"""Independent jobs spread over processes.

On a small CPU box, two models with one thread each get through more work per second than one model with
two threads (their matrices are too small to keep two cores busy): measured here on 2 cores, 1.26-1.41x
for llama.cpp choice scoring in two processes (1.0-1.2x in two threads: the scoring loop holds the GIL
between decodes) and 1.57x for two LoRA trainings in two threads. Training runs in processes too: one of
the threaded trials ended in a NaN loss, and torch's thread count and RNG are process-wide.
"""
from __future__ import annotations

import contextlib
import functools
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Sequence

from ..errors import InputError, check_int


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


_WORKER_MODULES: set[str] = set()


def worker_modules() -> set[str]:
    """The moe2lib modules that worker processes started from here have imported: a stage's record of the
    library it used (``StageRun.finish``) covers the code its workers ran, not only this process's."""
    return set(_WORKER_MODULES)


def _traced(call: Callable, *job):
    """``call(*job)`` in a worker, and the moe2lib modules the worker has imported."""
    return call(*job), sorted(m for m in sys.modules if m.split(".")[0] == "moe2lib")


def _untraced(traced):
    result, modules = traced
    _WORKER_MODULES.update(modules)
    return result


def check_workers(workers) -> int:
    return check_int(workers, "workers")


def submission_order(cost: Sequence[float] | None, n: int) -> list[int]:
    """Job indices, costliest first (ties and ``cost`` None: the given order)."""
    if cost is None:
        return list(range(n))
    cost = [float(c) for c in cost]
    if len(cost) != n:
        raise InputError(f"{len(cost)} cost estimates for {n} jobs", param="cost")
    return sorted(range(n), key=lambda i: -cost[i])


def run(fn: Callable, jobs: Sequence[tuple], workers: int = 1, *, desc: str | None = None,
        scheduler: str | None = None, on_result: Callable | None = None, cost: Sequence[float] | None = None,
        **kwargs) -> list:
    """``[fn(*job, **kwargs) for job in jobs]``, in ``workers`` fresh (spawned) processes when ``workers > 1``.

    ``fn`` must be importable (a module-level function) and the jobs plain, picklable data; results come
    back in the jobs' order, and ``on_result(i, result)`` is called in this process as each job ends (to
    save it at once, so a rerun resumes). The first error is raised once the running jobs end; jobs not
    yet started are cancelled. ``desc`` shows a progress bar over the jobs.

    ``cost`` (one estimate per job) starts the costliest jobs first: a long job started last would run
    alone while the other workers idle (longest-processing-time-first scheduling).

    ``scheduler`` sends the jobs to Dask distributed instead: ``"local"`` starts a cluster of ``workers``
    single-thread worker processes on 127.0.0.1 for this call; ``"tcp://host:8786"`` uses a running
    scheduler, whose workers need moe2lib, the models and the data at the same paths as here.
    """
    jobs = [tuple(j) for j in jobs]
    workers = check_workers(workers)
    order = submission_order(cost, len(jobs))
    call = functools.partial(fn, **kwargs)
    out = [None] * len(jobs)
    bar = None
    if desc:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(jobs), desc=desc, unit="job")

    def done(i, result):
        out[i] = result
        if on_result is not None:
            on_result(i, result)
        if bar is not None:
            bar.update(1)

    try:
        if scheduler is not None:
            _run_dask(call, jobs, workers, scheduler, done, order)
        elif workers == 1 or len(jobs) <= 1:
            for i in order:
                done(i, call(*jobs[i]))
        else:
            ctx = multiprocessing.get_context("spawn")  # fork would copy torch's and llama.cpp's thread pools
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
                futures = {pool.submit(_traced, call, *jobs[i]): i for i in order}
                try:
                    for f in as_completed(futures):
                        done(futures[f], _untraced(f.result()))
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
        return out
    finally:
        if bar is not None:
            bar.close()


def _run_dask(call, jobs, workers: int, scheduler: str, done, order: list[int]) -> None:
    if not isinstance(scheduler, str) or not (scheduler == "local" or "://" in scheduler):
        raise InputError(f"must be 'local' or a scheduler address such as 'tcp://host:8786', not {scheduler!r}",
                         param="scheduler")
    try:
        from distributed import Client, LocalCluster
        from distributed import as_completed as dask_completed
    except ImportError as e:
        raise InputError("scheduler needs Dask distributed: pip install 'distributed' (pinned in requirements.txt)",
                         param="scheduler") from e
    with contextlib.ExitStack() as stack:
        if scheduler == "local":
            cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                       host="127.0.0.1", dashboard_address=None))
            client = stack.enter_context(Client(cluster))
        else:
            client = stack.enter_context(Client(scheduler))
        futures = [client.submit(_traced, call, *jobs[i], pure=False, priority=len(jobs) - rank)
                   for rank, i in enumerate(order)]
        index = {f.key: i for f, i in zip(futures, order)}
        try:
            for f in dask_completed(futures):
                done(index[f.key], _untraced(f.result()))
        except BaseException:
            client.cancel(futures)
            raise

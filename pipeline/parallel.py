"""Chunks of text work (normalizing, segmenting) in worker processes, results in input order, memory bounded.

``Pool.imap`` alone takes every job from its input at once (its feeder thread queues them all), so a corpus streamed
from disk would be held in memory whole on its way to the workers. ``ordered_map`` keeps at most ``ahead`` jobs per
worker submitted and not yet returned: enough to keep every worker busy, and a fixed amount whatever the corpus.
It runs on ``concurrent.futures.ProcessPoolExecutor``, which notices a worker that dies (killed for memory, say),
where a ``multiprocessing.Pool`` waits for its result for ever.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import deque
from typing import Callable, Iterable, Iterator, TypeVar

from sokhan import SokhanError

J = TypeVar("J")
R = TypeVar("R")
_END = object()


def batched(items: Iterable[J], size: int) -> Iterator[list[J]]:
    """``items`` in lists of ``size`` (the last may be shorter), taken one list at a time."""
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _worker_signals() -> None:
    """Worker initializer: Ctrl-C is the caller's to handle, and SIGTERM kills the worker as it would any process
    (the caller's handler, inherited through fork, would turn it into a KeyboardInterrupt traceback here). The worker
    was forked with both blocked (``_signals_blocked``), so one sent before this ran is pending: the handlers are set
    first, the signals unblocked second, so a pending SIGINT is dropped and a SIGTERM ends the worker."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


@contextlib.contextmanager
def _signals_blocked():
    """SIGINT and SIGTERM held back in this thread while the pool starts its processes and threads (they inherit the
    mask): a Ctrl-C that lands mid-start could otherwise kill a worker before its initializer ran (its traceback
    printed), break the executor's start-up, or hang it. The signals are delivered when the block ends."""
    import signal

    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks (and no fork)
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ordered_map(fn: Callable[[J], R], jobs: Iterable[J], workers: int, ahead: int = 16) -> Iterator[R]:
    """``fn(job)`` for every job, in order: here when ``workers`` ≤ 1, else in ``workers`` processes (forked where the
    platform can, so that what the caller loaded before, such as hazm's or jieba's dictionaries, is shared), with at
    most ``ahead * workers`` jobs in flight. ``fn`` must be a module-level function (it is pickled for spawn).
    A worker that dies is a one-line SokhanError; an exception raised in ``fn`` is raised here."""
    if workers <= 1:
        for job in jobs:
            yield fn(job)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    # A terminal's Ctrl-C reaches the workers too: they ignore it (each would otherwise print its own traceback over
    # the one-line interruption) and the caller, interrupted, shuts them down.
    jobs = iter(jobs)
    first = next(jobs, _END)
    if first is _END:
        return
    pool, pending = None, deque()
    try:
        # The first submit forks every worker and starts the executor's threads; a Ctrl-C or SIGTERM held back
        # meanwhile is raised as the block ends, inside this try, so the pool is still shut down.
        with _signals_blocked():
            pool = ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=_worker_signals)
            pending.append(pool.submit(fn, first))
        for job in jobs:
            pending.append(pool.submit(fn, job))
            if len(pending) >= ahead * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise SokhanError(f"a worker process died before finishing its work (out of memory?); {workers} were running: "
                          "lower the stage's workers setting, or give it more memory") from None
    finally:
        # Leaving early (an error, Ctrl-C, a closed generator): drop what is queued, let the running jobs end.
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

"""Chunks of text work (normalizing, segmenting) in worker processes, results in input order, memory bounded.

``Pool.imap`` alone takes every job from its input at once (its feeder thread queues them all), so a corpus streamed
from disk would be held in memory whole on its way to the workers. ``ordered_map`` keeps at most ``ahead`` jobs per
worker submitted and not yet returned: enough to keep every worker busy, and a fixed amount whatever the corpus.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Callable, Iterable, Iterator, TypeVar

J = TypeVar("J")
R = TypeVar("R")


def batched(items: Iterable[J], size: int) -> Iterator[list[J]]:
    """``items`` in lists of ``size`` (the last may be shorter), taken one list at a time."""
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _ignore_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def ordered_map(fn: Callable[[J], R], jobs: Iterable[J], workers: int, ahead: int = 16) -> Iterator[R]:
    """``fn(job)`` for every job, in order: here when ``workers`` ≤ 1, else in ``workers`` processes (forked where the
    platform can, so that what the caller loaded before, such as hazm's or jieba's dictionaries, is shared), with at
    most ``ahead * workers`` jobs in flight. ``fn`` must be a module-level function (it is pickled for spawn)."""
    if workers <= 1:
        for job in jobs:
            yield fn(job)
        return
    import multiprocessing as mp

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    pending: deque = deque()
    # A terminal's Ctrl-C reaches the workers too; they ignore it (each would otherwise print its own traceback over
    # the one-line interruption), and leaving the pool (an error, Ctrl-C, a closed generator) terminates them.
    with mp.get_context(method).Pool(workers, initializer=_ignore_sigint) as pool:
        for job in jobs:
            pending.append(pool.apply_async(fn, (job,)))
            if len(pending) >= ahead * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

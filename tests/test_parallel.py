"""ordered_map: results in input order from worker processes, errors raised in the caller, input taken lazily."""

from __future__ import annotations

import itertools
import time

import pytest

from sokhan import SokhanError
from sokhan.pipeline.parallel import batched, ordered_map


def _slow_square(x: int) -> int:
    time.sleep(0.02 if x % 3 == 0 else 0.0)  # later jobs finish first: the order must come from the caller
    return x * x


def _fails_at_five(x: int) -> int:
    if x == 5:
        raise SokhanError("job 5: bad input")
    return x


@pytest.mark.parametrize("workers", [1, 2])
def test_results_in_input_order(workers):
    assert list(ordered_map(_slow_square, range(40), workers, ahead=2)) == [x * x for x in range(40)]


@pytest.mark.parametrize("workers", [1, 2])
def test_an_error_in_a_job_reaches_the_caller(workers):
    with pytest.raises(SokhanError, match="job 5: bad input"):
        list(ordered_map(_fails_at_five, range(10), workers))


def test_input_is_taken_a_bounded_number_ahead():
    taken = 0

    def endless():
        nonlocal taken
        for i in itertools.count():
            taken += 1
            yield i

    results = ordered_map(_slow_square, endless(), 2, ahead=3)
    assert [next(results) for _ in range(4)] == [0, 1, 4, 9]
    results.close()  # terminates the workers
    assert taken <= 4 + 3 * 2


def test_batched():
    assert list(batched(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched([], 3)) == []


def _worker_signals(_: int) -> bool:
    import signal

    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the mask, unchanged
    return (signal.getsignal(signal.SIGINT) == signal.SIG_IGN and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
            and not {signal.SIGINT, signal.SIGTERM} & blocked)


def test_workers_leave_ctrl_c_to_the_caller():
    """A terminal's Ctrl-C reaches every process of the group: the workers ignore it (each would print a traceback
    of its own); the caller's KeyboardInterrupt ends the map and terminates them."""
    import signal

    # Forked with SIGINT and SIGTERM blocked (a Ctrl-C mid-start must not kill a worker before it ignores the
    # signal), each worker ignores SIGINT, takes SIGTERM's default (not the caller's handler: the CLI turns SIGTERM
    # into an interruption, which would print a traceback in a worker) and unblocks both; the caller's mask is back
    # as it was once the workers are running.
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a handler of the caller's, inherited through fork
    try:
        results = ordered_map(_worker_signals, range(4), 2)
        assert next(results) and signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
        assert all(results)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _dies_at_three(x: int) -> int:
    import os
    import signal

    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would
    return x


def test_a_worker_that_dies_is_an_error_not_a_hang():
    with pytest.raises(SokhanError, match="a worker process died"):
        list(ordered_map(_dies_at_three, range(10), 2))


class _TwoArgError(Exception):
    def __init__(self, a, b):  # cannot be rebuilt from its args alone
        super().__init__(f"{a} {b}")


def _raises_unpicklable(x: int) -> int:
    if x == 2:
        raise _TwoArgError("job", x)
    return x


def test_an_exception_that_cannot_be_sent_back_is_still_an_error():
    with pytest.raises(Exception):
        list(ordered_map(_raises_unpicklable, range(6), 2))

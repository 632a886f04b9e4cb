"""Worker pools sized by a rule's ``threads``, with native thread pools pinned to one thread.

Snakemake exports OMP_NUM_THREADS and friends set to the rule's ``threads``; a pool of N
processes each running N-threaded BLAS or OpenMP code would then use N x N threads. Workers
started here pin every native pool (OpenBLAS, MKL, OpenMP) to one thread, so a pool of N
workers uses N cores.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# what Snakemake sets to a job's threads (snakemake.shell)
NATIVE_THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "GOTO_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)

START_METHOD_VARIABLE = "MEDPREP_START_METHOD"
DEFAULT_START_METHOD = "spawn"


def pin_native_threads(count: int = 1) -> None:
    """Limit native thread pools of this process (already loaded or loaded later) to ``count``."""
    for name in NATIVE_THREAD_VARIABLES:
        os.environ[name] = str(count)
    from threadpoolctl import threadpool_limits

    # The returned object restores the old limits only if used as a context manager.
    threadpool_limits(limits=count)


def start_method() -> str:
    """The multiprocessing start method: ``$MEDPREP_START_METHOD`` or ``spawn``.

    ``spawn`` is the default because it is safe with threads in the parent; the code also
    runs under ``fork`` and ``forkserver`` (tests cover fork and spawn).
    """
    method = os.environ.get(START_METHOD_VARIABLE, DEFAULT_START_METHOD)
    if method not in multiprocessing.get_all_start_methods():
        raise ValueError(
            f"{START_METHOD_VARIABLE}={method!r} is not a start method here; "
            f"choose one of {multiprocessing.get_all_start_methods()}"
        )
    return method


def _initialise_worker(initializer: Callable[..., None] | None, initargs: tuple) -> None:
    pin_native_threads(1)
    if initializer is not None:
        initializer(*initargs)


def process_pool(
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
    method: str | None = None,
) -> ProcessPoolExecutor:
    """A process pool of ``workers`` whose workers run ``initializer(*initargs)`` once.

    Open per-worker resources (an OpenSlide handle, say) in ``initializer``: they cannot
    be pickled and are expensive to open per task.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    context = multiprocessing.get_context(method or start_method())
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_initialise_worker,
        initargs=(initializer, initargs),
    )


def bounded_map(
    executor: Executor,
    function: Callable[[T], R],
    items: Iterable[T],
    max_in_flight: int,
) -> Iterator[R]:
    """Like ``executor.map`` but with at most ``max_in_flight`` tasks submitted at once.

    Results come back in input order; memory stays bounded whatever the number of items.
    On the first exception the remaining tasks are cancelled and the exception is raised.
    """
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
    pending: collections.deque[Future] = collections.deque()
    iterator = iter(items)
    try:
        for item in iterator:
            pending.append(executor.submit(function, item))
            if len(pending) >= max_in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def run_parallel(
    function: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
    max_in_flight: int | None = None,
) -> Iterator[R]:
    """Map ``function`` over ``items`` in input order on ``workers`` processes.

    With one worker everything runs in this process (after ``initializer``), which avoids
    pool start-up and pickling and gives the same results.
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for item in items:
            yield function(item)
        return
    with process_pool(workers, initializer, initargs) as pool:
        yield from bounded_map(pool, function, items, max_in_flight or 2 * workers)


def thread_map(
    function: Callable[[T], R], items: Iterable[T], workers: int, max_in_flight: int | None = None
) -> Iterator[R]:
    """Map ``function`` over ``items`` in input order on ``workers`` threads (for I/O)."""
    from concurrent.futures import ThreadPoolExecutor

    if workers <= 1:
        for item in items:
            yield function(item)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from bounded_map(pool, function, items, max_in_flight or 4 * workers)

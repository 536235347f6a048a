"""The next step's host-side data preparation, done in a background thread during this step.

A Vision-OPD or GRPO step starts with tens of milliseconds of CPU work that needs no weights:
rendering each sample's views (PIL: load, crop, resize) and encoding them (chat template and the
HF image processor), while the GPU idles. Like a DataLoader worker, one thread prepares batch N+1
while the main thread runs batch N, which is mostly waiting on the GPU with the GIL released.

It is only a cache: `get(key, fn)` returns what `fn()` returns, computed ahead by the worker when
`ahead` was given that key, else computed now on the caller's thread. The key must name all that
the result depends on. An error raised by `fn` in the worker is raised again by `get` for that key,
as calling `fn` there would raise it; work ahead for a key that is never asked for is dropped,
result or error, as the synchronous path would never have done it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")


class Prefetcher:
    """At most one result computed ahead, in one worker thread (started by the first `ahead`).
    Called from one thread only (the training loop's)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[Hashable, Future] | None = None
        self.hits = self.misses = 0  # `get`s served by the worker, and computed on the caller's thread

    def get(self, key: Hashable, fn: Callable[[], T]) -> T:
        """`fn()`'s result for `key`: the one computed ahead for that key (waited for), else `fn()` now."""
        pending, self._pending = self._pending, None
        if pending is not None:
            if pending[0] == key:
                self.hits += 1
                return pending[1].result()  # an error in the worker is raised here
            pending[1].cancel()  # a wrong guess: not started, it never runs; running, it is dropped
        self.misses += 1
        return fn()

    def ahead(self, key: Hashable, fn: Callable[[], T]) -> None:
        """Start `fn()` in the worker for a later `get(key, ...)`; it replaces any pending one."""
        if self._pending is not None:
            self._pending[1].cancel()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zoomless-prefetch")
        self._pending = (key, self._pool.submit(fn))

    def wait(self) -> None:
        """Until the work ahead, if any, has finished (its result or error is kept for `get`)."""
        if self._pending is not None:
            wait([self._pending[1]])

    def close(self) -> None:
        """Stop the worker (after the job it is running, if any) and drop what is pending; a later
        `ahead` starts a new one."""
        self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

"""The prefetch cache: what `get` returns is what computing it there gives, errors included; the
worker runs beside the caller; a wrong guess is recomputed; `close` leaves no thread behind."""

import threading

import pytest

from zoomless.train.prefetch import Prefetcher


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("zoomless-prefetch")]


def test_get_returns_the_result_computed_ahead_or_now() -> None:
    p = Prefetcher()
    callers: list[str] = []

    def fn(x: int):
        return lambda: (callers.append(threading.current_thread().name), x * x)[1]

    assert p.get("a", fn(2)) == 4 and (p.hits, p.misses) == (0, 1)  # nothing ahead: computed here
    p.ahead("b", fn(3))
    assert p.get("b", fn(-1)) == 9 and (p.hits, p.misses) == (1, 1)  # the worker's, not the fallback's
    assert p.get("b", fn(5)) == 25 and p.misses == 2  # used once, then dropped
    main = threading.current_thread().name
    assert callers[0] == main and callers[1].startswith("zoomless-prefetch") and callers[2] == main
    p.close()


def test_a_key_mismatch_recomputes_and_a_newer_guess_replaces_the_older() -> None:
    p = Prefetcher()
    p.ahead(("views", (1, 2)), lambda: "one-two")
    assert p.get(("views", (2, 1)), lambda: "two-one") == "two-one" and p.hits == 0
    p.ahead("x", lambda: "old")
    p.ahead("y", lambda: "new")
    assert p.get("x", lambda: "x now") == "x now"  # "x" was replaced by "y"
    p.ahead("y", lambda: "new")
    assert p.get("y", lambda: "y now") == "new"
    p.close()


def test_an_error_in_the_worker_is_raised_where_the_key_is_used() -> None:
    p = Prefetcher()

    def broken():
        raise ValueError("sample s3: cannot decode")

    p.ahead("k", broken)
    with pytest.raises(ValueError, match="sample s3: cannot decode"):
        p.get("k", lambda: "never called")
    p.ahead("k", broken)  # a guess that is never used: its error goes with it, as the work would not run
    assert p.get("other", lambda: 1) == 1
    p.close()


def test_the_worker_runs_while_the_caller_goes_on() -> None:
    p = Prefetcher()
    started, release = threading.Event(), threading.Event()

    def slow():
        started.set()
        assert release.wait(10)
        return "done"

    p.ahead("k", slow)
    assert started.wait(10)  # running in the worker while this thread is still here
    release.set()
    assert p.get("k", lambda: "recomputed") == "done"
    assert len(_prefetch_threads()) == 1
    p.close()
    assert not _prefetch_threads()
    p.close()  # twice is fine; a later `ahead` starts a new worker
    p.ahead("k", lambda: 7)
    assert p.get("k", lambda: 0) == 7
    p.close()
    assert not _prefetch_threads()


def test_close_drops_what_is_pending() -> None:
    p = Prefetcher()
    p.ahead("k", lambda: "ahead")
    p.close()
    assert p.get("k", lambda: "now") == "now"
    assert not _prefetch_threads()


def test_wait_returns_when_the_work_ahead_is_done_and_keeps_it() -> None:
    import time

    p = Prefetcher()
    p.wait()  # nothing ahead: returns at once
    done = threading.Event()

    def slow():
        time.sleep(0.2)
        done.set()
        return "ready"

    p.ahead("k", slow)
    p.wait()
    assert done.is_set() and p.get("k", lambda: "recomputed") == "ready" and p.hits == 1
    p.close()

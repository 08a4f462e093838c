"""The driver's job scheduling: bounded submission of tasks, tile leases, failure reports.

:func:`run_jobs` submits the jobs a source hands out with a bounded number in flight and
collects the workers' reports; :class:`TileSource` hands out the missing tiles of a store,
each only once this job holds its lease (:mod:`deqntk_dist.store.lease`);
:func:`raise_failures` turns failure reports into the exception the caller sees.

A failure report is ``{"ok": False, "what": str, "error": exception}``: the worker's own
exception object (a :class:`~deqntk_dist.errors.DeqntkError`, pickled with its attributes,
see :mod:`deqntk_dist.tasks`) or, for a task dask gave up on (an error after its retries, a
lost worker), the exception ``Future.result()`` raised on the driver.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from .errors import DeqntkError, StoreError
from .store import KernelStore
from .store.lease import NoLeases, TileLeases

__all__ = [
    "HEALTH_POLL_SECONDS",
    "LEASE_POLL_SECONDS",
    "TileSource",
    "failure_error",
    "jobs_of",
    "raise_failures",
    "run_jobs",
]

#: Seconds between checks of tiles leased by another job.
LEASE_POLL_SECONDS = 1.0
#: seconds between runtime health checks while the driver waits for a tile (batch queues)
HEALTH_POLL_SECONDS = 0.05

_KEPT = "; finished tiles are kept in the store"


def failure_error(failures: list[dict]) -> DeqntkError:
    """The exception for failure reports: the first failure's, of its own type.

    A :class:`DeqntkError` from a worker comes back as a copy of itself (same type and
    attributes, e.g. ``FixedPointError.entries``) whose message says what failed:
    ``"tile (i, j) rows [...] x cols [...] failed: <message>; finished tiles are kept in the
    store"``.  Any other exception (an error dask gave up on after its retries, a lost
    worker) becomes a :class:`StoreError` with that message.  ``__cause__`` is the
    original exception in both cases (:func:`raise_failures` chains it).
    """
    first = failures[0]
    exc = first["error"]
    more = f" (and {len(failures) - 1} more failed tasks)" if len(failures) > 1 else ""
    if isinstance(exc, DeqntkError):
        return exc.with_message(f"{first['what']} failed: {exc}{more}{_KEPT}")
    detail = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc)
    return StoreError(f"{first['what']} failed: {detail}{more}{_KEPT}")


def raise_failures(failures: list[dict]) -> NoReturn:
    """Raise :func:`failure_error` of ``failures``, chained to the original exception."""
    error = failures[0]["error"]
    raise failure_error(failures) from (error if isinstance(error, BaseException) else None)


def run_jobs(
    client,
    fn,
    next_job: Callable[[], Any],
    *,
    limit: int,
    retries: int,
    token: str,
    on_result: Callable[[Any, dict], None],
    on_failure: Callable[[Any], None] = lambda job: None,
    more_later: Callable[[], bool] = lambda: False,
    poll: float = LEASE_POLL_SECONDS,
    health: Callable[[], None] | None = None,
) -> list[dict]:
    """Submit the jobs ``next_job()`` hands out (None: none now) with at most ``limit`` in
    flight; ``on_result(job, report)`` per success.  While nothing is in flight and
    ``more_later()`` says jobs may still come (tiles leased by another job), poll.
    ``health()`` (if given) is called while waiting and raises when the runtime gave up
    (a batch queue whose worker jobs keep failing to start).

    Returns the failure reports (submission stops at the first failure; tasks already in
    flight finish, so their work is kept).
    """
    from distributed import as_completed

    failures: list[dict] = []
    ac = as_completed()
    jobs: dict[str, Any] = {}
    count = 0

    def fill() -> None:
        nonlocal count
        while len(jobs) < limit and not failures:
            job = next_job()
            if job is None:
                return
            key = f"deqntk-{fn.__name__}-{token}-{count}"
            count += 1
            jobs[key] = job
            ac.add(client.submit(fn, job, key=key, retries=retries, pure=False))

    fill()
    while True:
        if ac.is_empty():
            if failures or not more_later():
                break
            time.sleep(poll)
            fill()
            continue
        if health is not None:
            while not ac.has_ready():
                health()
                time.sleep(HEALTH_POLL_SECONDS)
        fut = next(ac)
        job = jobs.pop(fut.key)
        try:
            out = fut.result()
        except Exception as exc:  # remote error after retries, or a lost worker
            out = {"ok": False, "what": job.describe(), "error": exc}
        fut.release()
        if out.get("ok"):
            on_result(job, out)
        else:
            on_failure(job)
            failures.append(out)
        fill()
    return failures


def jobs_of(items: Iterable) -> Callable[[], Any]:
    """A ``next_job`` for :func:`run_jobs` handing out ``items`` in order."""
    it = iter(items)
    return lambda: next(it, None)


class TileSource:
    """Hands out the missing tiles in order, each only once this job holds its lease and
    it is still not done; tiles leased by another job wait and are checked again."""

    def __init__(
        self, ks: KernelStore, order, leases: TileLeases | NoLeases, *, max_tiles, poll, say
    ):
        self.ks, self.leases, self.say, self.poll = ks, leases, say, poll
        self.queue = deque(order)
        self.waiting: dict[tuple[int, int], Any] = {}
        self.left = max_tiles if max_tiles is not None else len(self.queue)
        self.by_others = 0
        self.next_check = 0.0
        self.announced = False

    def _take(self, t: tuple[int, int]) -> bool:
        got, holder = self.leases.acquire(*t)
        if not got:
            self.waiting[t] = holder
            return False
        if self.ks.tile_done(*t):  # finished by another job before we leased it
            self.leases.release(*t)
            self.by_others += 1
            return False
        return True

    def __call__(self) -> tuple[int, int] | None:
        if self.left <= 0:
            return None
        while self.queue:
            t = self.queue.popleft()
            if self._take(t):
                self.left -= 1
                return t
        if self.waiting and not self.announced:
            holders = {h.describe() for h in self.waiting.values() if h is not None}
            self.say(
                f"deqntk: {len(self.waiting)} tiles are being computed by another job "
                f"({', '.join(sorted(holders)) or 'unknown'}); waiting for them"
            )
            self.announced = True
        now = time.monotonic()
        if self.waiting and now >= self.next_check:
            self.next_check = now + self.poll
            for t in list(self.waiting):
                if self.ks.tile_done(*t):
                    del self.waiting[t]
                    self.by_others += 1
                elif self._take(t):
                    del self.waiting[t]
                    self.left -= 1
                    return t
        return None

    def more_later(self) -> bool:
        return self.left > 0 and bool(self.waiting)

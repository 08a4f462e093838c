"""Watch the worker jobs of a batch-queue (dask-jobqueue) cluster.

dask-jobqueue submits a worker job and then only waits for its worker to connect: a job
that leaves the queue without ever starting a worker (an admin's ``scancel`` while it is
pending, a job script that fails before ``dask worker`` runs, a node failure at launch) is
still counted as requested, so neither ``scale`` nor adaptive scaling replaces it and the
driver waits for workers until its timeout.  :class:`JobWatch` asks the batch system, every
``interval`` seconds, which of the cluster's jobs are still queued or running; a job that is
gone is dropped from the cluster's plan, so it is replaced (by adaptive scaling, or by
rescaling to the fixed job count).  Jobs that end before their worker joined are *failed
starts*; after ``max_failed_starts`` of them in a row (no worker joined in between) the
watch stops replacing and :meth:`JobWatch.check` raises :class:`ClusterError` naming the
jobs and their log files, so the driver stops with a clear message instead of waiting.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

from .errors import ClusterError

__all__ = ["JobWatch", "pbs_states", "slurm_states"]

#: SLURM job states in which the job may still start or is running (squeue ``%T``).
SLURM_ALIVE = frozenset(
    "PENDING CONFIGURING RUNNING COMPLETING SUSPENDED RESIZING REQUEUED REQUEUE_FED "
    "REQUEUE_HOLD RESV_DEL_HOLD SIGNALING STAGE_OUT STOPPED".split()
)
#: PBS job states (qstat ``S`` column) of a job that is queued, held, running or exiting.
PBS_ALIVE = frozenset("Q H W T R E S U B M".split())

#: ``{job_id: (alive, state)}`` for the ids asked about that the batch system knows, or
#: None when it did not answer (then nothing is concluded this round).
States = dict[str, tuple[bool, str]]


def _run(cmd: list[str]) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


def parse_squeue(text: str) -> States:
    """Parse ``squeue -h -o '%i %T'`` output (one ``JOBID STATE`` per line)."""
    out: States = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            out[parts[0]] = (parts[1] in SLURM_ALIVE, parts[1])
    return out


def slurm_states(job_ids: Sequence[str]) -> States | None:
    """States of SLURM jobs from ``squeue`` (finished jobs stay listed for ``MinJobAge``)."""
    r = _run(["squeue", "-h", "--states=all", "-o", "%i %T", "-j", ",".join(job_ids)])
    if r is None:
        return None
    if r.returncode != 0:
        # every id unknown (purged after MinJobAge): they are all gone
        return {} if "Invalid job id" in r.stderr else None
    return parse_squeue(r.stdout)


def parse_qstat(text: str) -> States:
    """Parse ``qstat`` table output (``Job id  Name  User  Time  S  Queue``)."""
    out: States = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[0][:1].isdigit():
            state = parts[4]
            out[parts[0].split(".")[0]] = (state in PBS_ALIVE, state)
    return out


def pbs_states(job_ids: Sequence[str]) -> States | None:
    """States of PBS Pro / Torque jobs from ``qstat`` (table output).

    Only what ``qstat`` says is concluded: a job listed in a finished state (``F``, ``C``,
    ``X``) or named in its errors as unknown or finished is gone; a job it neither lists
    nor names is taken as still there (the output format varies between PBS flavours).
    """
    r = _run(["qstat", *job_ids])
    if r is None:
        return None
    states = parse_qstat(r.stdout)
    for line in r.stderr.splitlines():
        if "Unknown Job Id" in line or "has finished" in line:
            for job_id in job_ids:
                if re.search(rf"\b{re.escape(job_id)}\b", line):
                    states[job_id] = (False, "finished")
    if r.returncode != 0 and not states:
        return None
    return {j: states.get(j, (True, "not listed")) for j in job_ids}


STATE_QUERIES: dict[str, Callable[[Sequence[str]], States | None]] = {
    "slurm": slurm_states,
    "pbs": pbs_states,
}


class JobWatch:
    """Replace a jobqueue cluster's worker jobs that left the queue; give up on failed starts.

    Parameters
    ----------
    cluster : dask_jobqueue.JobQueueCluster
        The cluster (its scheduler runs in this process).
    kind : {"slurm", "pbs"}
        The batch system (how job states are queried).
    jobs : int, optional
        The fixed job count the cluster was scaled to; None when it scales adaptively.
    interval : float
        Seconds between two queries of the batch system.
    max_failed_starts : int
        Jobs in a row that may end before their worker joins before the watch gives up.
    say : callable, optional
        Where one-line notices go (default: stderr).
    states : callable, optional
        ``states(job_ids) -> {job_id: (alive, state)} | None`` (default: by ``kind``).
    """

    def __init__(
        self,
        cluster,
        kind: str,
        *,
        jobs: int | None,
        interval: float = 30.0,
        max_failed_starts: int = 3,
        say: Callable[[str], None] | None = None,
        states: Callable[[Sequence[str]], States | None] | None = None,
    ) -> None:
        self.cluster = cluster
        self.kind = kind
        self.jobs = jobs
        self.interval = float(interval)
        self.max_failed_starts = int(max_failed_starts)
        self.say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._states = states or STATE_QUERIES[kind]
        self._lock = threading.Lock()
        self._joined: set[str] = set()  # ids of jobs whose worker joined the scheduler
        self._handled: set[str] = set()  # job ids already replaced
        self.failed: list[dict] = []  # failed starts since the last worker joined
        self.replaced = 0
        self.error: ClusterError | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> JobWatch:
        """Record joining workers (a scheduler plugin) and poll in a daemon thread."""
        from distributed.diagnostics.plugin import SchedulerPlugin

        watch = self

        class _Joins(SchedulerPlugin):
            name = "deqntk-job-watch"

            def add_worker(self, scheduler, worker):  # noqa: D102 - plugin hook
                ws = scheduler.workers.get(worker)
                watch.worker_joined(str(ws.name) if ws is not None else worker)

        self.cluster.scheduler.add_plugin(_Joins())
        for ws in list(self.cluster.scheduler.workers.values()):
            self.worker_joined(str(ws.name))
        self._thread = threading.Thread(target=self._loop, name="deqntk-job-watch", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop polling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 65)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception as exc:  # pragma: no cover - never kill the driver from here
                self.say(f"deqntk: job watch: {type(exc).__name__}: {exc}")
            if self.error is not None:
                return

    # ---------------------------------------------------------------- state
    def worker_joined(self, name: str) -> None:
        """A worker joined: its job started, and the failed-start streak ends.

        Job names are reused after a replacement, so the join is recorded for the job id
        that the name belongs to now.
        """
        for spec_name, job in list(self.cluster.workers.items()):
            if name == spec_name or name.startswith(f"{spec_name}-"):
                with self._lock:
                    self._joined.add(str(getattr(job, "job_id", None)))
                    self.failed.clear()
                return
        with self._lock:
            self.failed.clear()

    def _has_joined(self, job) -> bool:
        with self._lock:
            return str(job.job_id) in self._joined

    def check(self) -> None:
        """Raise the :class:`ClusterError` the watch gave up with, if any."""
        if self.error is not None:
            raise self.error

    def _log_of(self, job) -> str:
        directory = getattr(job, "log_directory", None)
        name = getattr(job, "job_name", None) or "worker"
        if not directory:
            return "no log-directory configured"
        return f"{directory}/{name}-{job.job_id}.err"

    # ---------------------------------------------------------------- one round
    def poll(self) -> None:
        """Query the batch system once; replace the jobs that are gone."""
        jobs = {
            name: job
            for name, job in list(self.cluster.workers.items())
            if getattr(job, "job_id", None) and str(job.job_id) not in self._handled
        }
        if not jobs or self.error is not None:
            return
        states = self._states(sorted({str(j.job_id) for j in jobs.values()}))
        if states is None:  # the batch system did not answer: try again next round
            return
        gone = []
        for name, job in jobs.items():
            alive, state = states.get(str(job.job_id), (False, "gone from the queue"))
            if alive:
                continue
            job_id = str(job.job_id)
            self._handled.add(job_id)
            gone.append(name)
            log = self._log_of(job)
            if self._has_joined(job):
                self.say(f"deqntk: worker job {job_id} ended ({state}); submitting a replacement")
                continue
            with self._lock:
                self.failed.append({"job_id": job_id, "state": state, "log": log})
                streak = len(self.failed)
            if streak >= self.max_failed_starts:
                self._give_up()
                return
            self.say(
                f"deqntk: worker job {job_id} ended ({state}) before its worker joined "
                f"(log: {log}); submitting a replacement ({streak} failed start"
                f"{'s' if streak > 1 else ''} in a row, giving up at {self.max_failed_starts})"
            )
        if gone:
            self.replaced += len(gone)
            self.cluster.loop.add_callback(self._replace, gone)

    async def _replace(self, names: list[str]) -> None:
        """On the cluster's event loop: drop the jobs from the plan and top it up again."""
        for name in names:
            self.cluster.worker_spec.pop(name, None)
        # forget the jobs now (their cancel is a no-op, a stale worker entry is retired), so
        # that a replacement may reuse the name
        await self.cluster._correct_state()
        if self.jobs is not None:
            self.cluster.scale(jobs=self.jobs)
        # adaptive scaling sees the plan below its target at its next interval

    def _give_up(self) -> None:
        with self._lock:
            failed = list(self.failed)
        listing = "; ".join(f"job {f['job_id']} ({f['state']}, log: {f['log']})" for f in failed)
        self.error = ClusterError(
            f"{len(failed)} {self.kind} worker jobs in a row ended before their dask worker "
            f"joined the scheduler: {listing}. Giving up instead of waiting for workers "
            f"(dask config deqntk.max-failed-starts = {self.max_failed_starts}). Check those "
            "logs and the job-script-prologue, queue, account and resources in jobqueue.yaml; "
            "finished tiles are kept in the store, so rerunning the same command resumes.",
            jobs=failed,
        )
        self.say(f"deqntk: {self.error}")

"""JobWatch logic and batch-system output parsing, without a batch system (the real SLURM
tests are in test_slurm.py)."""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace

import psutil
import pytest

from deqntk_dist.batchjobs import JobWatch, parse_qstat, parse_squeue
from deqntk_dist.errors import ClusterError, InputError


def test_parse_squeue_and_qstat():
    states = parse_squeue("12 PENDING\n13 RUNNING\n14 CANCELLED\n15 COMPLETED\n16 FAILED\n\n")
    assert states == {
        "12": (True, "PENDING"),
        "13": (True, "RUNNING"),
        "14": (False, "CANCELLED"),
        "15": (False, "COMPLETED"),
        "16": (False, "FAILED"),
    }
    table = (
        "Job id            Name             User              Time Use S Queue\n"
        "----------------  ---------------- ----------------  -------- - -----\n"
        "101.pbs01         deqntk-worker    ana               00:00:00 Q batch\n"
        "102.pbs01         deqntk-worker    ana               00:01:10 R batch\n"
        "103.pbs01         deqntk-worker    ana               00:00:00 F batch\n"
    )
    assert parse_qstat(table) == {
        "101": (True, "Q"),
        "102": (True, "R"),
        "103": (False, "F"),
    }


class FakeCluster:
    """The parts of a JobQueueCluster the watch uses; the 'loop' runs callbacks at once."""

    def __init__(self):
        self.workers: dict = {}
        self.worker_spec: dict = {}
        self.next_id = 100
        self.loop = SimpleNamespace(add_callback=self._run)

    def _run(self, fn, *args):
        out = fn(*args)
        if asyncio.iscoroutine(out):
            asyncio.run(out)

    def submit(self, name: str):
        self.next_id += 1
        self.worker_spec[name] = {}
        self.workers[name] = SimpleNamespace(
            job_id=str(self.next_id), log_directory="logs", job_name="deqntk-worker"
        )

    async def _correct_state(self):
        for name in set(self.workers) - set(self.worker_spec):
            del self.workers[name]

    def scale(self, jobs):
        i = 0
        while len(self.worker_spec) < jobs:
            while f"job-{i}" in self.worker_spec:
                i += 1
            self.submit(f"job-{i}")


def test_watch_replaces_gone_jobs_and_gives_up_after_failed_starts():
    cluster = FakeCluster()
    cluster.scale(2)
    queue: dict[str, tuple[bool, str]] = {"101": (True, "RUNNING"), "102": (True, "PENDING")}
    said: list[str] = []
    watch = JobWatch(
        cluster,
        "slurm",
        jobs=2,
        max_failed_starts=2,
        say=said.append,
        states=lambda ids: {i: queue[i] for i in ids if i in queue},
    )
    watch.worker_joined("job-0")  # job 101 runs a worker
    watch.poll()
    assert said == [] and watch.replaced == 0

    # 101 (had a worker) preempted, 102 cancelled while pending: both replaced
    queue.update({"101": (False, "CANCELLED"), "102": (False, "CANCELLED")})
    watch.poll()
    assert watch.replaced == 2
    assert {j.job_id for j in cluster.workers.values()} == {"103", "104"}
    assert "worker job 101 ended (CANCELLED); submitting a replacement" in said[0]
    assert (
        "worker job 102 ended (CANCELLED) before its worker joined (log: "
        "logs/deqntk-worker-102.err)" in said[1]
    )
    watch.check()  # one failed start: no error

    # a worker joins (job 103): the streak ends; then 104 and 105 fail to start in a row
    queue.update({"103": (True, "RUNNING"), "104": (False, "FAILED")})
    watch.worker_joined("job-0")
    watch.poll()
    assert len(watch.failed) == 1 and watch.failed[0]["job_id"] == "104"
    queue["105"] = (False, "FAILED")
    watch.poll()
    with pytest.raises(
        ClusterError,
        match=r"2 slurm worker jobs in a row .* job 104 \(FAILED, "
        r"log: logs/deqntk-worker-104\.err\); job 105 \(FAILED",
    ) as info:
        watch.check()
    assert [j["job_id"] for j in info.value.jobs] == ["104", "105"]
    assert isinstance(info.value, RuntimeError)
    # a batch system that does not answer concludes nothing
    quiet = JobWatch(cluster, "slurm", jobs=2, say=said.append, states=lambda ids: None)
    quiet.poll()
    assert quiet.replaced == 0


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("max-failed-starts", 0, "deqntk.max-failed-starts must be an integer >= 1, got 0"),
        ("max-failed-starts", "x", "max-failed-starts must be an integer >= 1, got 'x'"),
        ("max-failed-starts", True, "max-failed-starts must be an integer >= 1, got True"),
        ("job-check-interval", "0s", "job-check-interval must be a positive duration"),
        ("job-check-interval", "soon", "job-check-interval must be a positive duration"),
    ],
)
def test_watch_settings_are_validated(key, value, match):
    import dask

    from deqntk_dist.runtime import _watch_settings

    with dask.config.set({f"deqntk.{key}": value}), pytest.raises(InputError, match=match):
        _watch_settings()
    with dask.config.set({"deqntk.job-check-interval": "2s", "deqntk.max-failed-starts": "4"}):
        assert _watch_settings() == (2.0, 4)


def _external_ipv4() -> tuple[str, str] | None:
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family.name == "AF_INET" and not a.address.startswith("127."):
                return name, a.address
    return None


def test_scheduler_on_the_configured_interface_dashboard_on_loopback():
    """Workers reach the scheduler on the jobqueue interface; the dashboard stays local."""
    pytest.importorskip("dask_jobqueue")
    found = _external_ipv4()
    if found is None:
        pytest.skip("no non-loopback IPv4 interface")
    iface, ip = found
    from deqntk_dist.runtime import jobqueue_cluster

    cluster = jobqueue_cluster("slurm", cores=1, memory="1GiB", interface=iface)
    try:
        assert cluster.scheduler.address.startswith(f"tcp://{ip}:")
        port = cluster.scheduler.services["dashboard"].port
        mine = [
            c.laddr
            for c in psutil.Process(os.getpid()).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        ]
        assert mine and {a.ip for a in mine} == {"127.0.0.1"}
        assf = "--interface " + iface
        assert assf in cluster.job_script()
    finally:
        cluster.close()


def test_pbs_states_conclude_only_what_qstat_says(monkeypatch):
    import subprocess

    from deqntk_dist import batchjobs

    def fake(stdout, stderr, rc):
        return lambda cmd: subprocess.CompletedProcess(cmd, rc, stdout, stderr)

    table = (
        "Job id            Name             User              Time Use S Queue\n"
        "----------------  ---------------- ----------------  -------- - -----\n"
        "101.pbs01         deqntk-worker    ana               00:00:00 Q batch\n"
    )
    err = "qstat: Unknown Job Id 102.pbs01\nqstat: 104.pbs01 Job has finished, use -x\n"
    monkeypatch.setattr(batchjobs, "_run", fake(table, err, 35))
    assert batchjobs.pbs_states(["101", "102", "103", "104"]) == {
        "101": (True, "Q"),
        "102": (False, "finished"),
        "103": (True, "not listed"),  # neither listed nor named: not concluded gone
        "104": (False, "finished"),
    }
    monkeypatch.setattr(batchjobs, "_run", fake("", "qstat: cannot connect to server\n", 1))
    assert batchjobs.pbs_states(["101"]) is None

"""The dashboard link that every run prints serves a page while the job runs, and listens
on the loopback interface only unless the user asks otherwise."""

import re
import subprocess
import sys
import time
import urllib.request

import numpy as np
import psutil
import pytest

from deqntk_dist import write_dataset_store

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_the_printed_dashboard_url_serves_a_page_while_compute_runs(tmp_path, rng):
    n = 160
    x = rng.normal(size=(n, 10))
    ds = write_dataset_store(tmp_path / "ds", x, np.zeros(n, int), n_train=n, name="t")
    cmd = [
        sys.executable,
        "-m",
        "deqntk_dist.cli",
        "compute",
        ds.path,
        str(tmp_path / "ks"),
        "--activation",
        "gelu",
        "--kernels",
        "ntk",
        "--tile",
        "16",
        "--workers",
        "1",
        "--no-progress",
    ]  # fmt: skip  (gelu: slow quadrature tiles, so the job is still running when fetched)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            m = re.search(r"dashboard: (http://\S+)", line)
            url = m.group(1) if m else None
        assert url is not None, "no dashboard link printed"
        assert url.startswith("http://127.0.0.1:"), url
        with urllib.request.urlopen(url, timeout=30) as resp:
            status, body = resp.status, resp.read()
        assert proc.poll() is None, "the job ended before the page was fetched"
        assert status == 200 and b"<html" in body.lower() and len(body) > 1000
        port = int(re.search(r":(\d+)/", url).group(1))
        listening = [
            c.laddr.ip
            for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        ]
        assert listening and set(listening) <= {"127.0.0.1"}, listening
    finally:
        proc.kill()
        proc.communicate(timeout=60)

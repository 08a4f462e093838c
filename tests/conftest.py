import os
import subprocess

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


class SmallFilesystem:
    """A directory on its own small tmpfs (root only), which tests can make read-only or
    fill up; without root, read-only falls back to permission bits."""

    def __init__(self, path, size):
        self.path = path
        self.mounted = False
        path.mkdir()
        if os.geteuid() == 0:
            opts = f"size={size}"
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)])
            self.mounted = r.returncode == 0

    def readonly(self, on: bool = True) -> None:
        if self.mounted:
            mode = "ro" if on else "rw"
            subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], check=True)
        elif os.geteuid() != 0:
            for d, _, _ in os.walk(self.path):
                os.chmod(d, 0o555 if on else 0o755)
        else:
            pytest.skip("needs a tmpfs mount (root ignores permission bits)")

    def fill(self) -> None:
        """Use up the free space (root with a tmpfs only)."""
        if not self.mounted:
            pytest.skip("needs a tmpfs mount to fill a filesystem")
        with open(self.path / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)])
        elif os.geteuid() != 0:
            self.readonly(False)


@pytest.fixture
def small_fs(tmp_path):
    """Factory: ``small_fs(size="8m")`` gives a :class:`SmallFilesystem`."""
    made = []

    def make(size="8m"):
        fs = SmallFilesystem(tmp_path / f"fs{len(made)}", size)
        made.append(fs)
        return fs

    yield make
    for fs in made:
        fs.close()


def _direct_opener():
    """A urllib opener that ignores ``http_proxy`` (the server is on 127.0.0.1)."""
    import urllib.request

    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


class S3Server:
    """A moto S3 server in its own process on 127.0.0.1 (it survives clients killed with
    SIGKILL); ``bucket()`` makes a fresh bucket and returns its ``s3://`` URL."""

    def __init__(self, endpoint, proc, log):
        self.endpoint = endpoint
        self.proc = proc
        self.log = log

    def bucket(self, name=None):
        import urllib.request
        import uuid

        name = name or f"test-{uuid.uuid4().hex[:16]}"
        req = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        with _direct_opener().open(req, timeout=30) as r:
            assert r.status == 200, r.status
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server (``python -m moto.server``) on a free port of 127.0.0.1; sets
    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` and
    ``AWS_ENDPOINT_URL`` for this process and its subprocesses while it runs."""
    import importlib.util
    import socket
    import sys
    import time
    import urllib.error

    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("s3fs") is None:
        pytest.skip("needs moto[server] and s3fs (pip install -e '.[test]')")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto server exited ({proc.returncode}):\n{log.read_text()}")
            try:
                with _direct_opener().open(f"{endpoint}/", timeout=2):
                    break
            except urllib.error.HTTPError:  # it answered
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"moto server did not answer on {endpoint}:\n{log.read_text()}")
                time.sleep(0.1)
        with pytest.MonkeyPatch.context() as mp:
            for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
                mp.delenv(k, raising=False)
            no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1"]))
            mp.setenv("NO_PROXY", no_proxy)
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            mp.setenv("AWS_ENDPOINT_URL", endpoint)
            mp.setenv("AWS_CONFIG_FILE", os.devnull)
            mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
            yield S3Server(endpoint, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

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

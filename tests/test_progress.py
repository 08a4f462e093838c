"""The driver's progress line (deqntk_dist.progress)."""

import io

import pytest

from deqntk_dist.progress import Progress, format_hms


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_format_hms():
    assert format_hms(0) == "0:00:00"
    assert format_hms(59.6) == "0:01:00"
    assert format_hms(3 * 3600 + 25 * 60 + 7) == "3:25:07"
    assert format_hms(100 * 3600) == "100:00:00"


def test_pipe_gets_full_lines_at_the_interval(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("deqntk_dist.progress.time.perf_counter", lambda: now[0])
    out = io.StringIO()
    bar = Progress(10, 2, 1000, 200, stream=out)
    assert bar.interval == 10.0 and not bar.tty
    now[0] = 104.0
    bar.update(100)  # first line: shown at once
    assert out.getvalue() == (
        "[######              ] 3/10 tiles  300/1e+03 entries  25 entries/s  ETA 0:00:28\n"
    )
    now[0] = 108.0
    bar.update(100)  # within the interval: nothing
    assert out.getvalue().count("\n") == 1
    now[0] = 120.0
    bar.update(100)
    assert out.getvalue().count("\n") == 2 and "5/10 tiles" in out.getvalue()
    bar.close()  # forced final line, no extra newline on a pipe
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[-1] == lines[-2]


def test_terminal_redraws_in_place_and_ends_the_line():
    out = _Tty()
    bar = Progress(4, 0, 16, 0, stream=out)
    assert bar.tty and bar.interval == 0.5
    bar.update(4, force=True)
    assert out.getvalue().startswith("\r[#####") and "\n" not in out.getvalue()
    bar.close()
    assert out.getvalue().endswith("\n") and out.getvalue().count("\r") == 2


def test_disabled_writes_nothing_but_counts():
    out = io.StringIO()
    bar = Progress(4, 1, 16, 4, stream=out, enabled=False)
    bar.update(4, force=True)
    bar.close()
    assert out.getvalue() == "" and (bar.tiles, bar.entries) == (2, 8)


@pytest.mark.parametrize("total", [0, 10])
def test_no_rate_yet_gives_unknown_eta(total, monkeypatch):
    monkeypatch.setattr("deqntk_dist.progress.time.perf_counter", lambda: 5.0)
    out = io.StringIO()
    Progress(1, 0, total, 0, stream=out).show(force=True)
    assert "ETA ?" in out.getvalue() and "0 entries/s" in out.getvalue()

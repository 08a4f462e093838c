"""The driver's one-line progress display: tiles done / total, entries per second, ETA.

On a terminal the line is redrawn in place (``\\r``) about twice a second; on a pipe or a
log file a full line is written about every ten seconds.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "format_hms"]


class Progress:
    """One-line progress bar on a stream: tiles done/total, entries/s, ETA.

    Parameters
    ----------
    total_tiles, done_tiles : int
        Tiles in the store, and those done before this run.
    total_entries, done_entries : int
        The same in store entries (the rate and ETA count entries, not tiles).
    stream : text stream, optional
        Where the line goes (default: ``sys.stderr``).
    enabled : bool
        Write nothing when false (the counters are still kept).
    interval : float, optional
        Seconds between lines unless forced (default: 0.5 on a terminal, 10 otherwise).
    """

    def __init__(
        self,
        total_tiles: int,
        done_tiles: int,
        total_entries: int,
        done_entries: int,
        *,
        stream: TextIO | None = None,
        enabled: bool = True,
        interval: float | None = None,
    ):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.5 if self.tty else 10.0)
        self.total_tiles, self.tiles = total_tiles, done_tiles
        self.total_entries, self.entries = total_entries, done_entries
        self.start_entries = done_entries
        self.t0 = time.perf_counter()
        self.last = -1e9

    def update(self, entries: int, *, force: bool = False) -> None:
        """One more tile done, with ``entries`` store entries."""
        self.tiles += 1
        self.entries += entries
        self.show(force=force)

    def rate(self) -> float:
        """Entries per second computed since this display started."""
        dt = time.perf_counter() - self.t0
        return (self.entries - self.start_entries) / dt if dt > 0 else 0.0

    def line(self) -> str:
        """The progress line (without a line end)."""
        rate = self.rate()
        left = self.total_entries - self.entries
        eta = format_hms(left / rate) if rate > 0 else "?"
        frac = self.entries / self.total_entries if self.total_entries else 1.0
        bar = "#" * int(20 * frac)
        return (
            f"[{bar:<20}] {self.tiles}/{self.total_tiles} tiles  "
            f"{self.entries:.3g}/{self.total_entries:.3g} entries  {rate:.3g} entries/s  "
            f"ETA {eta}"
        )

    def show(self, *, force: bool = False) -> None:
        """Write the line if enabled and ``interval`` has passed since the last (or forced)."""
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < self.interval):
            return
        self.last = now
        line = self.line()
        self.stream.write("\r" + line if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Write the final line (and end the in-place line on a terminal)."""
        self.show(force=True)
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def format_hms(seconds: float) -> str:
    """``H:MM:SS`` of a duration (rounded to the second)."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"

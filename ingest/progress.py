"""A plain-text progress bar on stderr (no new dependency for one line of output).

On a terminal it redraws one line in place; otherwise (CI logs, a pod) it logs
a line every ``log_every_s`` seconds so the log stays readable.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

_LOG = logging.getLogger(__name__)


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Shows done/total, rate and ETA.

    Args:
      total: lines in one pass, or 0 when unknown (no percentage, no ETA).
      stream: where to draw; stderr by default.
      tty: draw in place; defaults to ``stream.isatty()``.
      looping: the input repeats, so there is no ETA.
    """

    def __init__(self, total: int, stream: TextIO | None = None, tty: bool | None = None,
                 looping: bool = False, log_every_s: float = 10.0, width: int = 30):
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.looping = looping
        self.log_every_s = log_every_s
        self.width = width
        self._start = time.monotonic()
        self._last = 0.0

    def line(self, done: int, published: int) -> str:
        """The text of the bar for ``done`` lines read, ``published`` messages settled."""
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = done / elapsed
        parts = []
        if self.total and not self.looping:
            frac = min(1.0, done / self.total)
            filled = int(frac * self.width)
            parts.append(f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} "
                         f"{frac:4.0%}")
        else:
            parts.append(f"{done} lines")
        parts.append(f"{published} published")
        parts.append(f"{rate:.1f} lines/s")
        if self.total and not self.looping:
            eta = (self.total - done) / rate if rate > 0 else float("inf")
            parts.append(f"ETA {_clock(eta) if eta != float('inf') else '?'}")
        parts.append(f"elapsed {_clock(elapsed)}")
        return "  ".join(parts)

    def update(self, done: int, published: int, force: bool = False) -> None:
        now = time.monotonic()
        every = 0.2 if self.tty else self.log_every_s
        if not force and now - self._last < every:
            return
        self._last = now
        if self.tty:
            self.stream.write("\r" + self.line(done, published) + "\x1b[K")
            self.stream.flush()
        else:
            _LOG.info("replay: %s", self.line(done, published))

    def finish(self, done: int, published: int) -> None:
        self.update(done, published, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

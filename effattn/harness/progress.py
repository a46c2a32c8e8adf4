"""A one-line progress report for a long measurement: which point, n/total, and an ETA."""

from __future__ import annotations

import dataclasses
import sys
from typing import TextIO


@dataclasses.dataclass
class Progress:
    """A one-line progress report on a stream: point, n/total, ETA."""

    total: int  # points (or jobs) in the run
    # Looked up when a Progress is made, not at import (tests and callers swap sys.stderr).
    stream: TextIO = dataclasses.field(default_factory=lambda: sys.stderr)
    done: int = 0
    passes: int = 1  # settings.passes: the ETA counts point-passes
    measured_s: float = 0.0  # wall time of the point-passes measured in this session
    measured: int = 0  # point-passes measured in this session
    partial: int = 0  # point-passes done of the points not done yet

    def add_pass(self, seconds: float, points: int, last: bool) -> None:
        """A pass of a group's ``points`` took ``seconds``; ``last``: their rows are done."""
        self.measured_s += seconds
        self.measured += points
        self.partial += -points * (self.passes - 1) if last else points

    def show(self, text: str) -> None:
        left = (self.total - self.done) * self.passes - self.partial
        eta = ""
        if self.measured:
            eta = f" ETA {duration(self.measured_s / self.measured * max(left, 0))}"
        end = "\r" if self.stream.isatty() else "\n"
        line = f"[{self.done + 1}/{self.total}]{eta} {text}"
        self.stream.write(f"{line[:150]:<150}{end}" if end == "\r" else line + end)
        self.stream.flush()


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"

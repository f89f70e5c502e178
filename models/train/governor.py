"""How many threads a training run uses on a shared machine."""

from __future__ import annotations

import os
from pathlib import Path

import torch


class ThreadGovernor:
    """Uses ``max_threads`` while the machine is otherwise idle and 1 thread while other processes
    keep a core busy: two OpenMP threads sharing a core with another job run several times slower
    than one thread (each parallel region waits for the descheduled thread). Reads ``/proc``; a
    no-op where that is missing."""

    def __init__(self, max_threads: int, log) -> None:
        self.max_threads, self.log, self.threads = max_threads, log, max_threads
        torch.set_num_threads(max_threads)
        self.prev = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        """(busy ticks of all CPUs, all ticks of all CPUs, ticks of this process) so far."""
        try:
            cpu = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:8]]
            fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
            mine = float(fields[11]) + float(fields[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            return None
        return sum(cpu) - cpu[3] - cpu[4], sum(cpu), mine

    def update(self) -> None:
        """Re-decide from the CPU use since the last call."""
        now = self._sample()
        if now is None or self.prev is None or self.max_threads == 1:
            return
        busy, total, mine = (a - b for a, b in zip(now, self.prev))
        self.prev = now
        if total <= 0:
            return
        others = max(0.0, busy - mine) / total * (os.cpu_count() or 1)  # cores busy with other work
        want = 1 if others > 0.5 else self.max_threads
        if want != self.threads:
            torch.set_num_threads(want)
            self.log(f"other processes use {others:.1f} cores: {want} thread(s)")
            self.threads = want

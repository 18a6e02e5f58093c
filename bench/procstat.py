"""Server resource use from /proc: CPU seconds and peak resident memory.

The peak (VmHWM) is reset before each measurement by writing 5 to
/proc/PID/clear_refs, so every scenario reports its own peak. A server that
runs worker processes is measured as the sum over its process tree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """Return `pid` and its descendants that are alive now."""
    found = [pid]
    index = 0
    while index < len(found):
        for task in Path(f"/proc/{found[index]}/task").glob("*/children"):
            try:
                found.extend(int(child) for child in task.read_text().split())
            except OSError:
                continue
        index += 1
    return found


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds used by the process tree of `pid`."""
    total = 0.0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICKS
    return total


def peak_rss_bytes(pid: int) -> int:
    """Sum of VmHWM over the process tree of `pid`."""
    total = 0
    for member in process_tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) * 1024
    return total


def pss_bytes(pid: int) -> int:
    """Sum of proportional set sizes: pages shared between workers count once."""
    total = 0
    for member in process_tree(pid):
        try:
            rollup = Path(f"/proc/{member}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in rollup.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
    return total


def reset_peak(pid: int) -> None:
    for member in process_tree(pid):
        try:
            Path(f"/proc/{member}/clear_refs").write_text("5")
        except OSError:
            continue


@dataclass
class Usage:
    cpu_seconds: float
    peak_rss_bytes: int
    pss_bytes: int


class UsageMeter:
    """Measures one server's CPU time and peak memory over a block of work."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._cpu_before = 0.0

    def start(self) -> None:
        reset_peak(self.pid)
        self._cpu_before = cpu_seconds(self.pid)

    def stop(self) -> Usage:
        return Usage(
            cpu_seconds(self.pid) - self._cpu_before,
            peak_rss_bytes(self.pid),
            pss_bytes(self.pid),
        )

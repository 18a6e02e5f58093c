"""Server resource use from /proc: CPU seconds and peak resident memory.

The peak (VmHWM) is reset before each measurement by writing 5 to
/proc/PID/clear_refs, so every scenario reports its own peak. A server that
runs worker processes is measured as the sum over its process tree. That sum
counts the pages the forked workers share once per worker, so the meter also
samples the tree's summed proportional set size (PSS, from
/proc/PID/smaps_rollup, where a page shared by n processes counts 1/n in each)
while the work runs, and reports its highest sample.
"""

from __future__ import annotations

import os
import threading
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
    # Sum of VmHWM over the process tree.
    peak_rss_bytes: int
    # Summed PSS of the tree when the work had ended.
    pss_bytes: int
    # Highest summed PSS among the samples taken while the work ran.
    peak_pss_bytes: int


# Seconds between PSS samples. Reading smaps_rollup of an 85-110 MiB worker
# took 0.8-1 ms of the reading process's CPU time on the 2-core benchmark
# machine under load, because the kernel walks the page tables. Sampling a
# three-process tree ten times a second so takes about 3% of a core, charged
# to the benchmark process and not to the server. A peak shorter than the
# interval can be missed.
PSS_INTERVAL_SECONDS = 0.1


class PssSampler:
    """Sampler of a process tree's summed PSS, run in a thread, that keeps the
    highest sample."""

    def __init__(self, pid: int, interval: float = PSS_INTERVAL_SECONDS) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_bytes = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> int:
        """Stop sampling, take one last sample and return the highest."""
        self._stopped.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, pss_bytes(self.pid))
        return self.peak_bytes

    def _run(self) -> None:
        while True:
            self.peak_bytes = max(self.peak_bytes, pss_bytes(self.pid))
            if self._stopped.wait(self.interval):
                return


class UsageMeter:
    """Measures one server's CPU time and peak memory over a block of work."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._cpu_before = 0.0
        self._sampler: PssSampler | None = None

    def start(self) -> None:
        reset_peak(self.pid)
        self._sampler = PssSampler(self.pid)
        self._sampler.start()
        self._cpu_before = cpu_seconds(self.pid)

    def stop(self) -> Usage:
        cpu = cpu_seconds(self.pid) - self._cpu_before
        assert self._sampler is not None, "stop() without start()"
        peak_pss = self._sampler.stop()
        self._sampler = None
        return Usage(cpu, peak_rss_bytes(self.pid), pss_bytes(self.pid), peak_pss)

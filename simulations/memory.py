"""Peak memory of a process tree: summed RSS and PSS, sampled in a background thread.

RSS counts shared pages (torch's libraries in every Ray worker) once per process, so its
sum overstates what the tree needs; PSS splits each shared page among its users, so its sum
is the tree's real footprint. Both are reported.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryPeak:
    """The largest sums seen over the sampled processes."""

    rss_bytes: int
    pss_bytes: int
    processes: int  # processes in the sample with the largest PSS sum
    samples: int
    others_pss_bytes: int = 0  # the largest PSS sum without the sampling process itself

    def as_dict(self) -> dict[str, float | int]:
        """JSON-ready, in MiB."""
        return {
            "peak_rss_mib": round(self.rss_bytes / 2**20, 1),
            "peak_pss_mib": round(self.pss_bytes / 2**20, 1),
            "processes_at_peak": self.processes,
            "samples": self.samples,
            "peak_pss_without_runner_mib": round(self.others_pss_bytes / 2**20, 1),
        }


def tree_memory(pids: Iterable[int]) -> tuple[int, int, int, int]:
    """(summed RSS, summed PSS, process count, PSS of all but this process) of ``pids``."""
    import psutil

    me = os.getpid()
    rss = pss = n = others = 0
    for pid in set(pids):
        try:
            info = psutil.Process(pid).memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        rss += int(info.rss)
        pss += int(getattr(info, "pss", info.rss))
        n += 1
        if pid != me:
            others += int(getattr(info, "pss", info.rss))
    return rss, pss, n, others


def own_tree() -> list[int]:
    """The pids of the current process and all its live descendants."""
    import psutil

    me = psutil.Process(os.getpid())
    try:
        return [me.pid, *(c.pid for c in me.children(recursive=True))]
    except psutil.NoSuchProcess:
        return [me.pid]


class MemorySampler:
    """Samples ``pids()`` every ``interval`` seconds until `stop`; a context manager."""

    def __init__(self, pids: Callable[[], Iterable[int]], interval: float = 1.0) -> None:
        self._pids = pids
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self.rss = self.pss = self.processes = self.samples = self.others = 0

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def sample(self) -> None:
        """Take one sample now."""
        rss, pss, n, others = tree_memory(self._pids())
        self.samples += 1
        self.rss = max(self.rss, rss)
        self.others = max(self.others, others)
        if pss > self.pss:
            self.pss, self.processes = pss, n

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)

    def stop(self) -> MemoryPeak:
        """Stop sampling; returns the peak."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        return self.peak

    @property
    def peak(self) -> MemoryPeak:
        """The peak so far."""
        return MemoryPeak(self.rss, self.pss, self.processes, self.samples, self.others)

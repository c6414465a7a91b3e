"""Is the machine quiet enough to time on? Copy bandwidth and other processes' CPU use.

A benchmark on a machine that other work shares measures that work as much as
its own. Two signs give it away, and both are cheap to read:

- copy bandwidth: `dst.copy_(src)` of a fixed 32 MiB float32 tensor, timed
  for about 0.1 s. It falls when other processes use the memory bus or the
  cores (and it is what the %copy column of the tables is set against);
- other processes' CPU use: the machine's busy CPU time (/proc/stat) minus
  this process's own (os.times), over the wall time of a case, in cores.
  os.getloadavg() is reported as well, but as a minute-long average it lags
  and includes this process, so it does not decide anything.

A case is flagged when, while it ran, the others used more than OTHERS_MAX
cores, or when the copy bandwidth measured right after it is more than
COPY_MARGIN away from the one measured at the start. bench.py reruns a
flagged case once; a case still flagged after that, or a start and end
copy bandwidth more than COPY_MARGIN apart, makes the whole run BUSY.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

COPY_MARGIN = 0.25  # relative change of the copy bandwidth that flags a case
OTHERS_MAX = 0.25  # cores used by other processes during a case that flag it
PROBE_NUMEL = 8 * 1024 * 1024  # 32 MiB of float32


def load_average() -> tuple | None:
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def _busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine spent busy since boot (Linux), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class OthersMeter:
    """Cores used by other processes between start() and stop() (None where /proc/stat is missing)."""

    def start(self):
        self.wall, self.busy, self.own = time.perf_counter(), _busy_cpu_seconds(), _own_cpu_seconds()
        return self

    def stop(self) -> float | None:
        busy = _busy_cpu_seconds()
        if busy is None or self.busy is None:
            return None
        wall = time.perf_counter() - self.wall
        others = (busy - self.busy) - (_own_cpu_seconds() - self.own)
        return max(0.0, others / wall) if wall > 0 else None


def copy_probe_gbps(seconds: float = 0.1) -> float:
    """Bandwidth of a 32 MiB float32 `dst.copy_(src)` (read + write), median of repeated calls."""
    src = torch.ones(PROBE_NUMEL)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    samples, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(samples) < 5:
        start = time.perf_counter()
        dst.copy_(src)
        samples.append(time.perf_counter() - start)
    samples.sort()
    return 2 * PROBE_NUMEL * 4 / samples[len(samples) // 2] / 1e9


@dataclass
class Probe:
    """The machine's state at one moment."""

    copy_gbps: float
    load: tuple | None

    @classmethod
    def now(cls) -> "Probe":
        return cls(copy_probe_gbps(), load_average())

    def describe(self) -> str:
        load = "n/a" if self.load is None else "%.2f %.2f %.2f" % self.load
        return f"copy {self.copy_gbps:.1f} GB/s, load average {load}"


def copy_moved(reference: Probe, probe: Probe) -> bool:
    return abs(probe.copy_gbps / reference.copy_gbps - 1) > COPY_MARGIN


def why_flagged(reference: Probe, after: Probe, others: float | None) -> str:
    """'' when a case ran undisturbed, else what disturbed it."""
    reasons = []
    if others is not None and others > OTHERS_MAX:
        reasons.append(f"other processes used {others:.2f} cores")
    if copy_moved(reference, after):
        reasons.append(f"copy bandwidth {after.copy_gbps:.1f} GB/s against {reference.copy_gbps:.1f} at the start")
    return "; ".join(reasons)

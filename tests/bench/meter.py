"""CPU and memory of a scenario's processes over a load window, and the machine's other load.

``Meter.snapshot()`` reads each process's ``cpu_times`` (user + system) and RSS, and the
machine's busy CPU time (``psutil.cpu_times()``: everything but idle, iowait and steal);
``Window`` is the difference of two snapshots: CPU seconds per process and "foreign cores",
the cores other processes on the machine kept busy meanwhile (noise to look out for).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import psutil

DRIVER = "driver"
SETTLE_IDLE_PERCENT = 10.0
"""A process below this share of one core over ``SETTLE_STEP`` seconds counts as idle."""
SETTLE_STEP = 0.5


@dataclass(frozen=True)
class Snapshot:
    at: float
    cpu: dict[str, float]
    rss: dict[str, int]
    machine_busy: float


@dataclass(frozen=True)
class Window:
    seconds: float
    cpu: dict[str, float]
    """CPU seconds used in the window, by process name."""
    foreign_cores: float
    """Average cores busy in processes that are not ours."""

    def ms_per(self, name: str, count: int) -> float:
        return 1000.0 * self.cpu.get(name, 0.0) / max(count, 1)

    def cores(self, name: str) -> float:
        return self.cpu.get(name, 0.0) / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "seconds": round(self.seconds, 3),
            **{f"cpu_s_{name}": round(value, 3) for name, value in self.cpu.items()},
            **{f"cores_{name}": round(self.cores(name), 3) for name in self.cpu},
            "foreign_cores": round(self.foreign_cores, 3),
        }


def _busy() -> float:
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


class Meter:
    """Snapshots of named processes (the driver itself is always ``driver``)."""

    def __init__(self, processes: dict[str, psutil.Process]) -> None:
        self.processes = {DRIVER: psutil.Process(), **processes}

    def snapshot(self) -> Snapshot:
        cpu: dict[str, float] = {}
        rss: dict[str, int] = {}
        for name, proc in self.processes.items():
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    cpu[name] = times.user + times.system
                    rss[name] = proc.memory_info().rss
            except psutil.Error:
                cpu[name], rss[name] = 0.0, 0
        return Snapshot(time.monotonic(), cpu, rss, _busy())

    def window(self, start: Snapshot, end: Snapshot) -> Window:
        seconds = end.at - start.at
        cpu = {name: end.cpu[name] - start.cpu.get(name, 0.0) for name in end.cpu}
        ours = sum(cpu.values())
        foreign = (end.machine_busy - start.machine_busy - ours) / seconds if seconds > 0 else 0.0
        return Window(seconds, cpu, max(foreign, 0.0))

    async def settle(self, names: tuple[str, ...], timeout: float = 10.0) -> Snapshot:
        """Wait until the named processes are idle (the server finishes its deferred tasks
        after the last workflow closes); return the snapshot that ends the load window."""
        last = self.snapshot()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(SETTLE_STEP)
            now = self.snapshot()
            step = now.at - last.at
            busy = [100.0 * (now.cpu[n] - last.cpu[n]) / step for n in names]
            if max(busy) < SETTLE_IDLE_PERCENT:
                return last  # the load ended before this idle step
            last = now
        return last

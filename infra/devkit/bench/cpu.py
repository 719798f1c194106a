"""CPU clocks of the processes doing the work: per tick, they move far less than wall-clock rates when other
work shares the cores (a busy neighbour delays a process, it does not make it spend more CPU per tick).

* :func:`proc_cpu_seconds` — user + system CPU of a running process, all its threads, from ``/proc/<pid>/stat``;
* :class:`CpuWindow` — the CPU a set of processes spent between two readings;
* :func:`pg_backend_pids` — the PostgreSQL server processes serving the connections of one application name
  (the worker's share of the database's CPU, when the database runs on this machine).

The bench's own in-process work (the raw consumer, the Stripe sender) is timed with ``time.process_time()``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["CpuWindow", "pg_backend_pids", "proc_cpu_seconds", "stat_cpu_seconds"]

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of process ``pid`` (every thread, not its children), in seconds; None when it is gone
    or cannot be read. The kernel counts in clock ticks (10 ms at the usual 100 Hz)."""
    try:
        return stat_cpu_seconds(Path(f"/proc/{pid}/stat").read_bytes())
    except OSError:
        return None


def stat_cpu_seconds(stat: bytes) -> float | None:
    """utime + stime, in seconds, from the text of a ``/proc/<pid>/stat`` file (None if it is not one)."""
    # Field 2 (the command) is in parentheses and may hold spaces or ')': split after the last ')'.
    # Then fields[0] is field 3 (state), so utime (field 14) is fields[11] and stime (field 15) fields[12].
    end = stat.rfind(b")")
    fields = stat[end + 2 :].split() if end >= 0 else []
    try:
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (IndexError, ValueError):
        return None


class CpuWindow:
    """The CPU seconds a set of processes spent between :meth:`start` and :meth:`stop`.

    ``pids`` is called at both readings, so processes may come and go (a database's backends): one that
    appears in between counts from its start, one that exits in between is lost (its CPU since the first
    reading is not counted), and :attr:`lost` says how many were.
    """

    def __init__(self, pids: Callable[[], Iterable[int]]) -> None:
        self._pids = pids
        self._start: dict[int, float] = {}
        self.seconds: float | None = None
        self.processes = 0
        self.lost = 0

    def _read(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for pid in self._pids():
            cpu = proc_cpu_seconds(pid)
            if cpu is not None:
                out[pid] = cpu
        return out

    def start(self) -> CpuWindow:
        self._start = self._read()
        return self

    def stop(self) -> float | None:
        """Seconds spent since :meth:`start` (None when no process could be read at the end)."""
        end = self._read()
        self.processes = len(end)
        self.lost = len(set(self._start) - set(end))
        self.seconds = sum(cpu - self._start.get(pid, 0.0) for pid, cpu in end.items()) if end else None
        return self.seconds


def pg_backend_pids(query: Callable[[str, dict[str, str]], list[int]], application_name: str) -> list[int]:
    """Process ids of the PostgreSQL backends whose connections set ``application_name``.

    ``query(sql, params)`` runs ``sql`` on a connection to the same server and returns the first column.
    Only meaningful when the server runs on this machine (its pids are then readable in ``/proc``).
    """
    return query(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %(name)s AND pid <> pg_backend_pid()",
        {"name": application_name},
    )

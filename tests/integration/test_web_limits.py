"""The worker's web server under hostile clients, over real sockets against a real worker.

One worker with small limits (so each deadline is seconds, not minutes): every hostile client is answered as
the README's "Web" settings say, and ``/healthz`` keeps answering within a second while it happens. And what
an unauthenticated caller reads from ``/healthz``, ``/readyz`` and ``/metrics``: no org id, no customer id.
Every loop is bounded; every socket is closed at the end of its test.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from parity_stack import ParityStack, parity_stack

from infra.devkit.simulator import FleetSpec, build_fleet

pytestmark = pytest.mark.integration

H = 3600
IDLE_S = 2.0
BODY_S = 2.0
MAX_CONNECTIONS = 16
MAX_LINE = 1024
MAX_FIELD = 1024
MAX_HEADERS = 16
SLACK_S = 2.5  # a shared, busy test machine


@pytest.fixture(scope="module")
def worker(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ParityStack, list[str]]]:
    tmp: Path = tmp_path_factory.mktemp("web-limits")
    env = {
        "EDGEBILL_WEB_IDLE_TIMEOUT": str(IDLE_S),
        "EDGEBILL_WEB_BODY_TIMEOUT": str(BODY_S),
        "EDGEBILL_WEB_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "EDGEBILL_WEB_MAX_LINE": str(MAX_LINE),
        "EDGEBILL_WEB_MAX_HEADER": str(MAX_FIELD),
        "EDGEBILL_WEB_MAX_HEADERS": str(MAX_HEADERS),
        "EDGEBILL_STRIPE_WEBHOOK_MAX_BODY": "4096",
    }
    with parity_stack(kafka_bootstrap, tmp, **env) as stack:
        now = int(time.time())
        fleet = build_fleet(FleetSpec(orgs=3, hours=2, start=(now // H - 3) * H, seed=7, free_orgs=0))
        n_scale = stack.publish_fleet(fleet)
        stack.start_worker()
        stack.wait_parity(len(fleet.ticks), n_scale)
        stack.wait(stack.web_up, 30, "the web server")
        yield stack, [o.org_id for o in fleet.orgs]


def _connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def _answer(sock: socket.socket, limit: int = 65536) -> bytes:
    """What the server sends until it closes or a whole head has come (b"" when it closes without a word)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while b"\r\n\r\n" not in data and len(data) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def _status(data: bytes) -> int:
    line = data.split(b"\r\n", 1)[0]
    assert line.startswith(b"HTTP/1."), data[:200]
    return int(line.split()[1])


def _request(port: int, head: bytes, body: bytes = b"") -> bytes:
    with _connect(port) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(head + body)
        return _answer(s)


def _get(path: str) -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def _healthz(port: int) -> tuple[int, float]:
    t0 = time.monotonic()
    data = _request(port, _get("/healthz"))
    return _status(data), time.monotonic() - t0


class HealthzWatch:
    """Asks /healthz every 0.2 s on a new connection in a thread, until stopped; records status and time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: list[tuple[int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.seen) < 500:
            self.seen.append(_healthz(self.port))
            self._stop.wait(0.2)

    def __enter__(self) -> HealthzWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def assert_responsive(self) -> None:
        assert len(self.seen) >= 3, self.seen
        assert all(status == 200 and took < 1.0 for status, took in self.seen), self.seen


def _metric(port: int, name: str) -> float:
    with _connect(port) as s:  # the whole body, not only the head
        s.sendall(_get("/metrics"))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    text = data.split(b"\r\n\r\n", 1)[1].decode()
    (line,) = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
    return float(line.rsplit(" ", 1)[1])


# ------------------------------------------------------------------------------------------ request head


def test_an_oversize_request_line_header_or_header_count_is_answered_400(worker: tuple[ParityStack, list[str]]) -> None:
    port = worker[0].web_port
    with HealthzWatch(port) as watch:
        long_line = b"GET /healthz?x=" + b"a" * MAX_LINE + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        assert _status(_request(port, long_line)) == 400
        long_value = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"v" * (MAX_FIELD + 1) + b"\r\n\r\n"
        assert _status(_request(port, long_value)) == 400
        long_name = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-" + b"n" * (MAX_FIELD + 1) + b": v\r\n\r\n"
        assert _status(_request(port, long_name)) == 400
        many = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(
            b"X-H%d: v\r\n" % i for i in range(MAX_HEADERS + 1)
        )
        assert _status(_request(port, many + b"\r\n")) == 400
        # just under each limit: served
        fits = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Big: " + b"v" * (MAX_FIELD - 10)
        assert _status(_request(port, fits + b"\r\n\r\n")) == 200
        time.sleep(0.6)
    watch.assert_responsive()


# ----------------------------------------------------------------------------------- slow or silent clients


def _slowloris(port: int) -> tuple[float, bytes]:
    """Sends a request line, then one header line every 0.25 s, never the end of the head: when the server
    closes, and what it answered."""
    with _connect(port) as s:
        t0 = time.monotonic()
        s.sendall(b"GET /dashboard HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        s.settimeout(0.25)
        for i in range(int((IDLE_S + 2 * SLACK_S) / 0.25)):
            try:
                s.sendall(b"X-Slow-%d: v\r\n" % i)
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - t0, b""
            try:
                data = s.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                data = b""
            return time.monotonic() - t0, data
        return time.monotonic() - t0, b"still open"


def test_a_slowloris_client_is_closed_at_the_idle_deadline_and_holds_nothing(
    worker: tuple[ParityStack, list[str]],
) -> None:
    port = worker[0].web_port
    with HealthzWatch(port) as watch, ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: _slowloris(port), range(6)))
    for took, data in results:
        assert data == b"", data[:200]  # closed without an answer
        assert IDLE_S - 0.3 <= took <= IDLE_S + SLACK_S, results
    watch.assert_responsive()


def test_a_slow_webhook_body_is_answered_408_at_the_body_deadline(worker: tuple[ParityStack, list[str]]) -> None:
    port = worker[0].web_port
    head = (
        b"POST /webhooks/stripe HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nStripe-Signature: t=1,v1=00\r\nContent-Length: 1000\r\n\r\n"
    )

    def slow_body() -> tuple[float, bytes]:
        with _connect(port) as s:
            t0 = time.monotonic()
            s.sendall(head + b'{"id": ')
            s.settimeout(0.25)
            for _ in range(int((BODY_S + 2 * SLACK_S) / 0.25)):
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    s.sendall(b" ")
                try:
                    data = s.recv(65536)
                except TimeoutError:
                    continue
                return time.monotonic() - t0, data
            return time.monotonic() - t0, b"no answer"

    with HealthzWatch(port) as watch, ThreadPoolExecutor(4) as pool:
        dash = pool.submit(lambda: _status(_request(port, _get("/dashboard"))))  # 401 unsigned, but answered
        results = list(pool.map(lambda _: slow_body(), range(3)))
        assert dash.result() == 401
    for took, data in results:
        assert _status(data) == 408 and b"not received within" in data, data[:300]
        assert BODY_S - 0.3 <= took <= BODY_S + SLACK_S, results
    watch.assert_responsive()


def test_many_idle_connections_make_room_for_new_ones_and_are_closed_at_the_idle_deadline(
    worker: tuple[ParityStack, list[str]],
) -> None:
    port = worker[0].web_port
    evicted_before = _metric(port, "edgebill_web_connections_evicted_total")
    idle = [_connect(port) for _ in range(3 * MAX_CONNECTIONS)]
    try:
        t0 = time.monotonic()
        # Beyond the cap, each new connection closes the longest-idle one: /healthz always gets in.
        for _ in range(10):
            status, took = _healthz(port)
            assert status == 200 and took < 1.0, (status, took)
        evicted = _metric(port, "edgebill_web_connections_evicted_total") - evicted_before
        assert evicted >= 2 * MAX_CONNECTIONS, evicted
        # The survivors are closed at the idle deadline, without an answer.
        for s in idle:
            s.settimeout(max(0.1, IDLE_S + SLACK_S - (time.monotonic() - t0)))
            assert _answer(s) == b""
        assert time.monotonic() - t0 <= IDLE_S + SLACK_S + 1
    finally:
        for s in idle:
            s.close()


def test_when_every_connection_has_a_request_in_progress_a_new_one_is_answered_503(
    worker: tuple[ParityStack, list[str]],
) -> None:
    port = worker[0].web_port
    time.sleep(IDLE_S + 0.5)  # leftovers of earlier tests closed
    head = (
        b"POST /webhooks/stripe HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    )
    busy = [_connect(port) for _ in range(MAX_CONNECTIONS)]
    try:
        for s in busy:
            s.sendall(head)  # the receiver waits for the rest of the body (until the body deadline)
        time.sleep(0.5)
        refused = _request(port, _get("/healthz"))
        assert _status(refused) == 503 and b"Retry-After: 1" in refused, refused
        # Once the bodies time out (408), the connections are free again.
        for s in busy:
            s.settimeout(BODY_S + SLACK_S)
            assert _status(_answer(s)) == 408
        assert _healthz(port)[0] == 200
    finally:
        for s in busy:
            s.close()
    assert _metric(port, "edgebill_web_connections_refused_total") >= 1


# ------------------------------------------------------------------------------------------------ bodies


def test_a_body_a_page_does_not_take_is_answered_413(worker: tuple[ParityStack, list[str]]) -> None:
    port = worker[0].web_port
    get_with_body = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello"
    assert _status(_request(port, get_with_body)) == 413
    chunked = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    assert _status(_request(port, chunked)) == 413
    big = b"POST /webhooks/stripe HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4097\r\n\r\n"
    assert _status(_request(port, big, b"x" * 100)) == 413  # declared over the limit: refused unread
    assert _healthz(port)[0] == 200


# ------------------------------------------------------------------------- what an unauthenticated caller reads


def test_unauthenticated_pages_name_no_org_and_faust_pages_are_not_served(
    worker: tuple[ParityStack, list[str]],
) -> None:
    stack, orgs = worker
    for path in ("/healthz", "/readyz", "/metrics"):
        r = stack.get(path)
        assert r.status == 200, (path, r.status)
        for org in orgs:
            assert org.encode() not in r.body, (path, org)
        assert b"cus_" not in r.body, path
    assert b"edgebill_parity_worst_drift" in stack.get("/metrics").body
    assert b"edgebill_parity_drift{" not in stack.get("/metrics").body
    for path in ("/router/", "/router/topics", "/table/", "/stats/", "/graph/"):
        assert stack.get(path).status == 404, path
    # the signed internal endpoint does name them: the data is there, the open pages do not show it
    window = stack.signed_get(f"/internal/usage-parity?from={(int(time.time()) // H - 3) * H}&to={int(time.time())}")
    assert window.status == 200 and all(org.encode() in window.body for org in orgs)

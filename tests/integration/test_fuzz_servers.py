"""Odd bytes never give a 500: the worker's web pages and the local Stripe server, over HTTP.

Hypothesis writes raw requests (odd bytes in the path, query, headers, cookies, signature, token and body) to
a real socket; every answer must be a proper HTTP response below 500, and the server must still serve a normal
request afterwards. Each run is bounded (a fixed number of examples, each request with a timeout). The fixed
cases the issue names come first, as plain tests.
"""

from __future__ import annotations

import contextlib
import socket
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from parity_stack import SECRET, ParityStack, parity_stack

from infra.devkit.simulator import FleetSpec, build_fleet
from infra.devkit.stripe_fake import StripeServerThread
from models.parity import dashboard_token, sign_request

pytestmark = pytest.mark.integration

H = 3600
FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def raw_request(
    port: int,
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
    body: bytes = b"",
    *,
    content_length: int | None = None,
    timeout: float = 20.0,
) -> tuple[int, bytes]:
    """Send one request as raw bytes; (status, head of the response). Fails when nothing proper comes back."""
    head = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    head += [k + b": " + v for k, v in headers]
    if body or content_length is not None:
        head.append(b"Content-Length: %d" % (len(body) if content_length is None else content_length))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a 413 may close before the body ends
            sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 65536:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    status_line = data.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1."), f"no HTTP answer to {method!r} {target[:200]!r}: {data[:300]!r}"
    return int(status_line.split()[1]), data


# ------------------------------------------------------------------------------------------ strategies

_LATIN1 = [chr(c) for c in range(0x20, 0x7F)] + ["\t"] + [chr(c) for c in range(0x80, 0x100)]
_TARGET = [chr(c) for c in range(0x21, 0x7F) if chr(c) not in "#?&="]  # other bytes: percent-encoded
# Mostly bytes a server must accept in a header value (visible ASCII, space, tab, obs-text), some UTF-8 text
# (digits and letters of other scripts), some known troublemakers, and a few entirely random byte strings.
ODD_TEXT = st.one_of(
    st.text(alphabet=_LATIN1, max_size=40).map(lambda t: t.encode("latin-1")),
    st.text(alphabet=st.characters(blacklist_categories=["Cc", "Cs"]), max_size=20).map(lambda t: t.encode()),
    st.sampled_from([b"\xff\xfe", b"\xc3\x28", "é".encode(), "²".encode(), "١٢".encode(), b"%ff%fe", b""]),
)
ANY_BYTES = st.binary(max_size=30).filter(lambda b: b"\r" not in b and b"\n" not in b)
HEADER_VALUE = st.one_of(ODD_TEXT, ODD_TEXT, ODD_TEXT, ANY_BYTES)  # random bytes: mostly refused by the parser
# What can stand in a request target unescaped (no space or control byte).
TARGET_TEXT = st.text(alphabet=_TARGET, max_size=30).map(lambda t: t.encode("latin-1"))


def _pct(b: bytes) -> bytes:
    return urllib.parse.quote_from_bytes(b, safe="").encode()


QUERY_VALUE = st.one_of(TARGET_TEXT, ODD_TEXT.map(_pct), st.integers(-(10**20), 10**20).map(lambda i: str(i).encode()))


# Mostly a known page (a suffix makes most paths unknown: 404), sometimes odd bytes after it.
SUFFIX = st.integers(0, 5).flatmap(lambda i: st.just(b"") if i < 4 else ODD_TEXT.map(_pct) if i == 4 else TARGET_TEXT)


def _query(pairs: list[tuple[bytes, bytes]]) -> bytes:
    return b"&".join(k + b"=" + v for k, v in pairs)


# ---------------------------------------------------------------------------------- the worker's pages


@pytest.fixture(scope="module")
def worker(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ParityStack]:
    tmp: Path = tmp_path_factory.mktemp("fuzz-worker")
    with parity_stack(kafka_bootstrap, tmp) as stack:
        now = int(time.time())
        fleet = build_fleet(FleetSpec(orgs=3, hours=2, start=(now // H - 3) * H, seed=5, free_orgs=0))
        n_scale = stack.publish_fleet(fleet)
        stack.start_worker()
        stack.wait_parity(len(fleet.ticks), n_scale)
        stack.wait(stack.web_up, 30, "the web server")
        yield stack


WORKER_PATHS = [
    b"/healthz",
    b"/metrics",
    b"/internal/usage-parity",
    b"/dashboard",
    b"/dashboard/data.json",
    b"/dashboard/app.js",
    b"/dashboard/app.css",
    b"/dashboard/",
    b"/",
]


def _signed(path_qs: bytes, now: int) -> list[tuple[bytes, bytes]]:
    text = path_qs.decode("utf-8", "surrogateescape")
    return [(b"X-Timestamp", str(now).encode()), (b"X-Signature", sign_request(SECRET.encode(), now, text).encode())]


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([(b"X-Timestamp", b"1700000000"), (b"X-Signature", "é".encode())], id="non-ascii-signature"),
        pytest.param([(b"X-Timestamp", b"1700000000"), (b"X-Signature", b"\xff\xfe\xfd")], id="non-utf8-signature"),
        pytest.param([(b"X-Timestamp", "١٧٠٠٠٠٠٠٠٠".encode()), (b"X-Signature", b"ab")], id="arabic-digits-ts"),
        pytest.param([(b"X-Timestamp", "²".encode()), (b"X-Signature", b"ab")], id="superscript-ts"),
        pytest.param([(b"Cookie", "edgebill_dashboard=é.é".encode())], id="non-ascii-cookie"),
        pytest.param([(b"Cookie", b"edgebill_dashboard=\xff\xfe")], id="non-utf8-cookie"),
        pytest.param([(b"Cookie", "edgebill_dashboard=²9.ab".encode())], id="superscript-cookie"),
        pytest.param([(b"Cookie", b'edgebill_dashboard="\\\\\\"; x')], id="quoted-cookie"),
    ],
)
@pytest.mark.parametrize("path", [b"/internal/usage-parity?from=0&to=3600", b"/dashboard", b"/dashboard/data.json"])
def test_odd_bytes_in_headers_and_cookies_are_refused_not_500(
    worker: ParityStack, path: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    status, _ = raw_request(worker.web_port, b"GET", path, headers)
    assert status in (400, 401), status


@pytest.mark.parametrize(
    "token",
    [
        b"%C3%A9.abc",
        b"\xc3\xa9.abc",
        "²9.ab".encode(),
        b"%B2.ab",
        b"9" * 5000 + b".ab",
        b"%FF%FE",
        b".",
        b"1." + b"a" * 64,
    ],
)
def test_odd_dashboard_tokens_are_refused_not_500(worker: ParityStack, token: bytes) -> None:
    status, _ = raw_request(worker.web_port, b"GET", b"/dashboard?token=" + token)
    assert status in (400, 401), status


@FUZZ
@given(
    method=st.sampled_from([b"GET"] * 8 + [b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS"]),
    path=st.sampled_from(WORKER_PATHS),
    suffix=SUFFIX,
    query=st.lists(
        st.tuples(st.sampled_from([b"from", b"to", b"hours", b"token", b"x", b""]), QUERY_VALUE), max_size=4
    ),
    headers=st.lists(
        st.tuples(
            st.sampled_from([b"X-Timestamp", b"X-Signature", b"Cookie", b"Accept", b"User-Agent", b"X-Odd"]),
            HEADER_VALUE,
        ),
        max_size=4,
    ),
    auth=st.sampled_from(["none", "cookie", "signed"]),
)
def test_worker_pages_never_answer_500(
    worker: ParityStack,
    method: bytes,
    path: bytes,
    suffix: bytes,
    query: list[tuple[bytes, bytes]],
    headers: list[tuple[bytes, bytes]],
    auth: str,
) -> None:
    target = path + suffix + (b"?" + _query(query) if query else b"")
    now = int(time.time())
    extra: list[tuple[bytes, bytes]] = []
    if auth == "cookie":  # a valid session, so the odd values reach the page's own parameter handling
        extra = [(b"Cookie", f"edgebill_dashboard={dashboard_token(SECRET.encode(), now + 600)}".encode())]
    elif auth == "signed":
        extra = _signed(target, now)
    status, data = raw_request(worker.web_port, method, target, extra + headers)
    event(f"{path.decode()} -> {status}")
    assert status < 500, (target, headers, data[:500])


def test_worker_still_serves_after_the_fuzz(worker: ParityStack) -> None:
    assert worker.get("/healthz").status == 200
    assert all(p.poll() is None for p in worker.procs)


# ------------------------------------------------------------------------------------ the local Stripe


@pytest.fixture(scope="module")
def stripe_port() -> Iterator[int]:
    with StripeServerThread() as srv:
        yield srv.port


AUTH = (b"Authorization", b"Bearer sk_test_fuzz")
FORM = (b"Content-Type", b"application/x-www-form-urlencoded")


def test_stripe_non_utf8_form_body_is_400(stripe_port: int) -> None:
    status, data = raw_request(stripe_port, b"POST", b"/v1/customers", [AUTH, FORM], b"name=\xff\xfe&email=a%40b.c")
    assert status == 400, data
    assert b"invalid_request_error" in data or status == 400


def test_stripe_percent_encoded_non_utf8_is_400(stripe_port: int) -> None:
    status, data = raw_request(stripe_port, b"POST", b"/v1/customers", [AUTH, FORM], b"name=%ff%fe")
    assert status in (200, 400), data  # Stripe decodes %ff as U+FFFD or refuses it; never a 500


def test_stripe_2000_deep_brackets_are_400(stripe_port: int) -> None:
    body = b"metadata" + b"[a]" * 2000 + b"=x"
    status, data = raw_request(stripe_port, b"POST", b"/v1/customers", [AUTH, FORM], body)
    assert status == 400, data[:500]
    q = b"/v1/customers?expand" + b"[0]" * 2000 + b"=x"
    status, data = raw_request(stripe_port, b"GET", q, [AUTH])
    assert status == 400, data[:500]


def test_stripe_20_mb_body_is_413(stripe_port: int) -> None:
    body = b"name=" + b"a" * (20 * 1024 * 1024)
    status, data = raw_request(stripe_port, b"POST", b"/v1/customers", [AUTH, FORM], body)
    assert status == 413, data[:500]
    assert b"application/json" in data


def test_stripe_deep_json_on_v2_is_400(stripe_port: int) -> None:
    body = b"[" * 2000 + b"]" * 2000
    status, data = raw_request(
        stripe_port, b"POST", b"/v2/billing/meter_events", [AUTH, (b"Content-Type", b"application/json")], body
    )
    assert status == 400, data[:500]


STRIPE_PATHS = [
    b"/v1/customers",
    b"/v1/customers/cus_x",
    b"/v1/customers/search",
    b"/v1/billing/meters",
    b"/v1/billing/meter_events",
    b"/v1/billing/meters/mtr_x/event_summaries",
    b"/v1/prices",
    b"/v1/subscriptions",
    b"/v1/checkout/sessions",
    b"/v1/events",
    b"/v2/billing/meter_event_session",
    b"/v2/billing/meter_events",
    b"/v2/billing/meter_event_stream",
    b"/v2/core/events",
    b"/_fake/faults",
    b"/_fake/clock",
    b"/nope",
]
FORM_KEY = st.one_of(
    st.sampled_from([b"name", b"email", b"metadata[k]", b"expand[]", b"payload[value]", b"event_name", b"limit"]),
    st.lists(st.sampled_from([b"[a]", b"[0]", b"[]", b"[", b"]"]), max_size=8).map(lambda p: b"metadata" + b"".join(p)),
    ODD_TEXT.map(_pct),
)


@FUZZ
@given(
    method=st.sampled_from([b"GET", b"POST", b"POST", b"DELETE", b"PUT"]),
    path=st.sampled_from(STRIPE_PATHS),
    suffix=SUFFIX,
    query=st.lists(st.tuples(FORM_KEY, QUERY_VALUE), max_size=3),
    form=st.lists(st.tuples(FORM_KEY, QUERY_VALUE), max_size=5),
    raw_body=st.one_of(st.none(), st.none(), st.binary(max_size=200)),
    content_type=st.sampled_from([b"application/x-www-form-urlencoded", b"application/json", b"text/plain", b"\xff"]),
    headers=st.lists(
        st.tuples(
            st.sampled_from([b"Authorization", b"Idempotency-Key", b"Stripe-Version", b"Stripe-Account", b"X-Odd"]),
            HEADER_VALUE,
        ),
        max_size=3,
    ),
    authorized=st.booleans(),
)
def test_local_stripe_never_answers_500(
    stripe_port: int,
    method: bytes,
    path: bytes,
    suffix: bytes,
    query: list[tuple[bytes, bytes]],
    form: list[tuple[bytes, bytes]],
    raw_body: bytes | None,
    content_type: bytes,
    headers: list[tuple[bytes, bytes]],
    authorized: bool,
) -> None:
    target = path + suffix + (b"?" + _query(query) if query else b"")
    body = raw_body if raw_body is not None else _query(form)
    hs = ([AUTH] if authorized else []) + [(b"Content-Type", content_type)] + headers
    status, data = raw_request(stripe_port, method, target, hs, body if method != b"GET" else b"")
    event(f"{status}")
    assert status < 500, (method, target, hs, body[:200], data[:500])


def test_local_stripe_still_serves_after_the_fuzz(stripe_port: int) -> None:
    status, data = raw_request(stripe_port, b"GET", b"/v1/billing/meters?limit=1", [AUTH])
    assert status == 200, data

"""The worker's HTTP server: Faust's aiohttp driver, run with limits a hostile client cannot get around.

The limits are :class:`streams.config.WebLimits`: request head sizes (400), the idle deadline for a request
head (closed), body size per path (413, closed; :data:`LINGER_S` of discard), ``max_connections`` (the
longest-idle closed, else 503). :class:`LimitedWeb` (the app's web driver) serves Faust's routes through
its own runner and :class:`CappedSite`. In detail: docs/architecture.md, "Module notes".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Any, Final

from aiohttp import web
from faust.web.drivers.aiohttp import Web as AiohttpWeb
from prometheus_client import Counter, Gauge

from sinks.observe import REGISTRY
from streams.config import WebLimits

__all__ = ["LINGER_S", "CappedSite", "ConnectionCap", "LimitedWeb"]

log = logging.getLogger(__name__)

#: Seconds the server keeps reading (and discarding) what a client sends after its answer, then closes.
LINGER_S: Final = 2.0
#: Seconds a refused connection is kept open for the client to read its 503.
REFUSED_LINGER_S: Final = 1.0
LOG_INTERVAL_S: Final = 60.0

_open_connections: Final = Gauge(
    "edgebill_web_connections", "Open connections of the worker's web server.", registry=REGISTRY
)
_evicted: Final = Counter(
    "edgebill_web_connections_evicted",
    "Idle connections closed to make room for a new one (at EDGEBILL_WEB_MAX_CONNECTIONS).",
    registry=REGISTRY,
)
_refused: Final = Counter(
    "edgebill_web_connections_refused",
    "Connections answered 503 because every open one had a request in progress.",
    registry=REGISTRY,
)

_TOO_MANY_BODY: Final = b"too many connections; retry\n"
_TOO_MANY: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_TOO_MANY_BODY), _TOO_MANY_BODY)
)


class ConnectionCap:
    """At most ``limit`` open connections; the decision for one more (docs/architecture.md, "Module notes").

    Connections are any hashable objects (aiohttp's request handlers in the server). :meth:`begin` and
    :meth:`end` bracket each request (a connection with a request in progress is never closed for room).
    A connection counts from its creation (:meth:`created`, before the event loop reports it open; then
    :meth:`opened`) until it is no longer among the open ones passed to :meth:`admit`. Event-loop only.
    """

    #: Seconds a created connection counts without being reported open (one that failed before opening).
    PENDING_S: Final = 10.0

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._busy: dict[Hashable, int] = {}
        self._last: dict[Hashable, float] = {}  # connection -> its last answer (or creation)
        self._pending: dict[Hashable, float] = {}  # created, not yet reported open
        self._closing: set[Hashable] = set()
        self.evicted = 0
        self.refused = 0
        self._logged_at = float("-inf")
        self._unlogged = 0

    def created(self, conn: Hashable) -> None:
        now = self._clock()
        self._pending[conn] = now
        self._last[conn] = now

    def opened(self, conn: Hashable) -> None:
        """``conn`` is among the open ones now, or already closed: it no longer counts as pending."""
        self._pending.pop(conn, None)

    def begin(self, conn: Hashable) -> None:
        self._busy[conn] = self._busy.get(conn, 0) + 1

    def end(self, conn: Hashable) -> None:
        n = self._busy.get(conn, 0) - 1
        if n > 0:
            self._busy[conn] = n
        else:
            self._busy.pop(conn, None)
        self._last[conn] = self._clock()

    def admit(self, open_conns: Iterable[Hashable], close: Callable[[Hashable], None]) -> bool:
        """Room for one more connection beside ``open_conns``: True (after closing the longest-idle one
        through ``close`` when at the limit), or False when every connection has a request in progress."""
        now = self._clock()
        live = set(open_conns)
        self._pending = {c: t for c, t in self._pending.items() if c not in live and now - t < self.PENDING_S}
        self._closing &= live
        self._busy = {c: n for c, n in self._busy.items() if c in live}
        self._last = {c: t for c, t in self._last.items() if c in live or c in self._pending}
        counted = len(live - self._closing) + len(self._pending)
        _open_connections.set(counted)
        if counted < self.limit:
            return True
        idle = [c for c in live if c not in self._closing and not self._busy.get(c)]
        if not idle and self._pending:
            # Only connections of this burst of accepts are idle, and they are not open yet to be closed: let
            # this one in too (the next connections make room among them once they are open).
            return True
        if not idle:
            self.refused += 1
            _refused.inc()
            self._note("answered 503: all %d connections have a request in progress", counted)
            return False
        # Back to one below the limit (a burst of accepts may have let a few more in), longest idle first.
        victims = sorted(idle, key=lambda c: self._last.get(c, 0.0))[: counted - self.limit + 1]
        for victim in victims:
            self._closing.add(victim)
            close(victim)
        self.evicted += len(victims)
        _evicted.inc(len(victims))
        self._note("closed %d idle connection(s) to make room (%d open)", len(victims), counted)
        return True

    def _note(self, msg: str, *args: Any) -> None:
        now = self._clock()
        self._unlogged += 1
        if now - self._logged_at >= LOG_INTERVAL_S:
            log.warning(
                "web server at EDGEBILL_WEB_MAX_CONNECTIONS=%d: " + msg + " (%d time(s) since the last report)",
                self.limit,
                *args,
                self._unlogged,
            )
            self._logged_at = now
            self._unlogged = 0

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.BaseProtocol]:
        """The listening socket's protocol factory: aiohttp's handler when admitted, else the 503."""

        def make() -> asyncio.BaseProtocol:
            if not self.admit(server.connections, lambda h: h.force_close()):  # type: ignore[attr-defined]
                return _TooMany()
            handler = server()
            self.created(handler)
            # The transport reports the connection open (call_soon) after this returns: two turns of the
            # loop later it is among the server's connections, or closed already.
            loop = asyncio.get_running_loop()
            loop.call_soon(loop.call_soon, self.opened, handler)
            return handler

        return make


class _TooMany(asyncio.Protocol):
    """A connection beyond the cap: 503, then closed once the client closes or after a second."""

    def __init__(self) -> None:
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self._transport = transport
        transport.write(_TOO_MANY)
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # the request is not read

    def eof_received(self) -> bool:
        if self._transport is not None:
            self._transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()


class CappedSite(web.BaseSite):
    """aiohttp's TCP site with the :class:`ConnectionCap` in front of its protocol factory."""

    __slots__ = ("_cap", "_host", "_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, cap: ConnectionCap) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._cap = cap

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert isinstance(server, web.Server)
        self._server = await asyncio.get_running_loop().create_server(
            self._cap.protocol_factory(server), self._host, self._port, backlog=self._backlog, reuse_address=True
        )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def limits_middleware(limits: WebLimits, cap: ConnectionCap) -> Any:
    """Marks each request in progress for the cap, and refuses a body its path does not take (413)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        conn = request.protocol
        cap.begin(conn)
        try:
            limit = limits.body_limit(request.path)
            declared = request.content_length
            if (declared is not None and declared > limit) or (declared is None and limit == 0 and request.body_exists):
                what = f"a body of at most {limit} bytes" if limit else "no body"
                resp = web.json_response({"error": f"{request.path} takes {what}"}, status=413)
                resp.force_close()
                return resp
            return await handler(request)
        finally:
            cap.end(conn)

    return middleware


class LimitedWeb(AiohttpWeb):
    """Faust's aiohttp web driver, serving through a runner and a site with :class:`WebLimits`.

    The limits are read from the app (``web_limits``, set by :func:`streams.app.configure`) when the server
    starts. Faust's own runner is left unused.
    """

    def __init__(self, app: Any, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._limited_runner: web.AppRunner | None = None
        self.cap: ConnectionCap | None = None

    async def start_server(self) -> None:
        limits: WebLimits = getattr(self.app, "web_limits", None) or WebLimits()
        cap = ConnectionCap(limits.max_connections)
        self.cap = cap
        self.web_app.middlewares.append(limits_middleware(limits, cap))
        runner = web.AppRunner(
            self.web_app,
            access_log=None,
            keepalive_timeout=limits.idle_timeout_s,
            max_line_size=limits.max_line_bytes,
            max_field_size=limits.max_field_bytes,
            max_headers=limits.max_headers,
            lingering_time=LINGER_S,
        )
        await runner.setup()
        self._limited_runner = runner
        await CappedSite(runner, self.app.conf.web_bind, self.app.conf.web_port, cap).start()

    async def stop_server(self) -> None:
        if self._limited_runner is not None:
            await self._limited_runner.cleanup()  # the application's cleanup included
            self._limited_runner = None

"""Running the server: in the foreground (the CLI), or in a background thread (tests)."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from types import TracebackType

from aiohttp import web

from infra.devkit.stripe_fake._faults import FaultConfig
from infra.devkit.stripe_fake._routes import build_app
from infra.devkit.stripe_fake._state import FakeStripe

__all__ = ["StripeServerThread", "run_foreground"]

log = logging.getLogger("infra.devkit.stripe_fake")

SHUTDOWN_TIMEOUT_S = 2.0


def run_foreground(
    host: str = "127.0.0.1",
    port: int = 12111,
    *,
    faults: FaultConfig | None = None,
    webhook_speed: float | None = None,
) -> int:
    """Serve a fresh fake Stripe account on ``host:port`` until SIGINT/SIGTERM; returns 0."""
    state = FakeStripe(faults=faults, webhook_speed=webhook_speed)

    async def main() -> None:
        runner = web.AppRunner(build_app(state), shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            log.info("local Stripe server listening on http://%s:%d (faults: %s)", host, port, state.faults.config)
            for sig in signals:
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            log.info("local Stripe server stopping")
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            await runner.cleanup()

    asyncio.run(main())
    return 0


class StripeServerThread:
    """The fake served from a background thread on 127.0.0.1 (a free port by default), for tests.

    ``with StripeServerThread() as srv: client = StripeClient("sk_test_x", base_addresses={"api":
    srv.base_url, "meter_events": srv.base_url})``; ``srv.state`` is the live :class:`FakeStripe`.
    """

    def __init__(
        self,
        state: FakeStripe | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: FaultConfig | None = None,
        webhook_speed: float | None = None,
    ) -> None:
        self.state = state if state is not None else FakeStripe(faults=faults, webhook_speed=webhook_speed)
        if state is not None and faults is not None:
            self.state.set_faults(faults)
        self.host = host
        self.port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        if not self._ready.is_set() or self._error is not None:
            raise RuntimeError("the server is not running")
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> StripeServerThread:
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._run, name="stripe-fake", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the local Stripe server did not start in time")
        if self._error is not None:
            self._thread.join()
            raise RuntimeError(f"the local Stripe server failed to start: {self._error}") from self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError("the local Stripe server did not stop in time")
        self._thread = None

    def __enter__(self) -> StripeServerThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        runner: web.AppRunner | None = None
        try:
            stop = self._stop = asyncio.Event()
            runner = web.AppRunner(build_app(self.state), shutdown_timeout=SHUTDOWN_TIMEOUT_S, access_log=None)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port)
            loop.run_until_complete(site.start())
            server = getattr(site, "_server", None)
            sockets = getattr(server, "sockets", None) or []
            if sockets:
                self.port = int(sockets[0].getsockname()[1])
        except BaseException as exc:
            self._error = exc
        self._ready.set()
        try:
            if self._error is None:
                loop.run_until_complete(stop.wait())
        finally:
            if runner is not None:
                loop.run_until_complete(runner.cleanup())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

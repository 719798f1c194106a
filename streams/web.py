"""The worker's web views, registered by :func:`install_web` (bound to ``EDGEBILL_WEB_HOST``, 127.0.0.1).

``/healthz`` (liveness), ``/readyz`` (readiness; condition details only when signed), ``/metrics`` (no org
data unless ``EDGEBILL_WEB_METRICS_PER_ORG``), ``/internal/usage-parity`` (signed: 401; bad window or before
the dedup horizon: 400), ``/dashboard`` and ``/dashboard/data.json`` (a signed link's token, traded for a
cookie, or signed headers; strict CSP). The page table and access rules: docs/architecture.md, "Module notes".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from decimal import Decimal
from importlib import resources
from typing import Any, Final

import orjson
from prometheus_client import CONTENT_TYPE_LATEST

from models.billing import bucket_start
from models.parity import dashboard_token, verify_dashboard_token, verify_request
from models.stripe_window import PARITY_QUERY_MAX_SECONDS
from models.watermark import last_closable_bucket
from sinks.parity import ParityConfig, ParityRow, ParityStore
from sinks.reconcile.store import ReconcileStore
from streams.config import WebConfig, WorkerConfig
from streams.health import Health, RateLimitedLog
from streams.metrics_view import render_metrics
from streams.parity_json import gate_json, number, window_org_json
from streams.pipeline import Deps
from streams.reconcile import dashboard_json

__all__ = ["COOKIE", "dashboard_data", "dashboard_html", "dashboard_url", "install_web", "parity_window_json"]

log = logging.getLogger(__name__)

COOKIE: Final = "edgebill_dashboard"
MAX_WINDOW_SECONDS: Final = PARITY_QUERY_MAX_SECONDS
MAX_FLAGGED_NAMES: Final = 20
_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_STATIC: Final = {
    "app.js": "application/javascript",
    "app.css": "text/css",
}


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def dashboard_url(web: WebConfig, now_s: int) -> str:
    """A dashboard link valid for ``web.dashboard_token_ttl_s`` seconds from ``now_s``."""
    token = dashboard_token(web.internal_secret, now_s + web.dashboard_token_ttl_s)
    return f"{web.base_url}/dashboard?token={token}"


def parity_window_json(store: ParityStore, cfg: ParityConfig, from_s: int, to_s: int, now_ms: int) -> dict[str, Any]:
    """The ``/internal/usage-parity`` answer: ``window``, per org ``gb_seconds`` and ``samples`` (the shape
    existing callers read) plus cell GB-s, drift and status."""
    orgs = store.window(from_s, to_s, cfg)
    return {
        "window": {"from": from_s, "to": to_s},
        "orgs": [window_org_json(o) for o in orgs],
        "as_of": _iso(now_ms),
    }


def dashboard_data(
    store: ParityStore,
    cfg: ParityConfig,
    web: WebConfig,
    now_ms: int,
    hours: int,
    reconcile: ReconcileStore | None = None,
) -> dict[str, Any]:
    """Everything the dashboard draws, for the last ``hours`` hours (blocking: call from a thread); with
    ``reconcile``, the reconciliation panel's data too."""
    size = cfg.bucket_seconds
    current = bucket_start(now_ms, size)
    lo = current - max(1, hours * 3600 // size) * size
    rows = store.rows(lo, current + size)
    st = store.state()
    wm = st.get("watermark_ms")
    last = last_closable_bucket(wm, size, cfg.grace_seconds) if wm is not None else None
    gate = store.gate(cfg.grace_seconds, watermark_ms=wm)
    worst = sorted(
        (r for r in rows if r.flagged and last is not None and r.bucket_start <= last),
        key=lambda r: (-abs(r.drift), -r.bucket_start, r.org_id),
    )[:10]
    progress = store.metrics(cfg.grace_seconds).progress
    return {
        "now_ms": now_ms,
        "refreshed_ms": st.get("refreshed_ms"),
        "watermark_ms": wm,
        "bucket_seconds": size,
        "tolerance": str(cfg.tolerance),
        "gate": gate_json(gate, web.gate_hours),
        "buckets": _buckets_json(rows, lo, current, size, last),
        "orgs": _orgs_json(rows),
        "worst": [
            {"org_id": r.org_id, "bucket_start": r.bucket_start, "label": _label(r.bucket_start), **_cell_json(r)}
            for r in worst
        ],
        "lag": [
            {"topic": p.topic, "partition": p.partition, "lag": max(0, p.highwater - (p.committed_offset + 1))}
            for p in sorted(progress, key=lambda p: (p.topic, p.partition))
            if p.highwater is not None
        ],
        "alerts": [
            {"id": a["id"], "first_bucket": a["first_bucket"], "published": a["published_ms"] is not None}
            for a in store.alerts()[-10:]
        ],
        "reconcile": None if reconcile is None else dashboard_json(reconcile.snapshot()),
    }


def _label(start_s: int) -> str:
    return datetime.fromtimestamp(start_s, UTC).strftime("%m-%d %H:%M")


def _cell_json(r: ParityRow) -> dict[str, Any]:
    return {
        "drift": number(r.drift),
        "status": r.status.value,
        "edge": number(r.edge_gb_s),
        "cell": number(r.cell_gb_s),
    }


def _buckets_json(rows: list[ParityRow], lo: int, current: int, size: int, last: int | None) -> list[dict[str, Any]]:
    """Per bucket, from the first with data (at least the last 12 buckets) to the current one: the sums and
    the flagged orgs, named worst first (a long list is cut; the count is complete)."""
    by_bucket: dict[int, list[ParityRow]] = defaultdict(list)
    for r in rows:
        by_bucket[r.bucket_start].append(r)
    first = min(min(by_bucket, default=current), current - 11 * size)
    out = []
    for b in range(max(lo, first), current + size, size):
        rs = by_bucket.get(b, [])
        edge = sum((r.edge_gb_s for r in rs), Decimal(0))
        cell = sum((r.cell_gb_s for r in rs), Decimal(0))
        flagged = sorted((r for r in rs if r.flagged), key=lambda r: (-abs(r.drift), r.org_id))
        drift = (edge - cell) / cell if cell else (Decimal(1) if edge else Decimal(0))
        out.append(
            {
                "start": b,
                "label": _label(b),
                "edge": number(edge),
                "cell": number(cell),
                "drift": number(drift),
                "orgs": len(rs),
                "flagged": len(flagged),
                "flagged_orgs": [r.org_id for r in flagged[:MAX_FLAGGED_NAMES]],
                "settled": last is not None and b <= last,
            }
        )
    return out


def _orgs_json(rows: list[ParityRow]) -> list[dict[str, Any]]:
    """Per org, its cells by bucket, most flagged and worst first."""
    orgs: dict[str, dict[str, Any]] = {}
    for r in rows:
        o = orgs.setdefault(r.org_id, {"org_id": r.org_id, "cells": {}, "flagged": 0, "worst": 0.0})
        o["cells"][str(r.bucket_start)] = _cell_json(r)
        if r.flagged:
            o["flagged"] += 1
            o["worst"] = max(o["worst"], abs(number(r.drift)))
    return sorted(orgs.values(), key=lambda o: (-o["flagged"], -o["worst"], o["org_id"]))


def _static(name: str) -> bytes:
    return (resources.files("streams") / "static" / name).read_bytes()


def dashboard_html(data: dict[str, Any]) -> str:
    """The dashboard page with ``data`` (a :func:`dashboard_data` answer) embedded for its first render."""
    blob = orjson.dumps(data).decode().replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return _static("dashboard.html").decode().replace("{{DATA}}", blob)


class _Guard:
    """Who may read what: requests signed as ``/internal/*`` are, and the dashboard's token or cookie."""

    def __init__(self, web: WebConfig, clock_ms: Callable[[], int]) -> None:
        self._secret = web.internal_secret
        self._tolerance = web.signature_tolerance_s
        self._clock_ms = clock_ms

    def now_s(self) -> int:
        return self._clock_ms() // 1000

    def signed(self, request: Any) -> str | None:
        """None when ``request`` is signed, else why not."""
        h = request.headers
        return verify_request(
            self._secret, h.get("X-Timestamp"), h.get("X-Signature"), request.raw_path, self.now_s(), self._tolerance
        )

    def token_ok(self, token: str | None) -> bool:
        return verify_dashboard_token(self._secret, token, self.now_s())

    def dashboard_allowed(self, request: Any) -> bool:
        return self.token_ok(request.cookies.get(COOKIE)) or self.signed(request) is None


def _secure(headers: dict[str, str] | None = None) -> dict[str, str]:
    return {
        "Content-Security-Policy": _CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
        **(headers or {}),
    }


def install_web(
    app: Any, deps: Deps, *, health: Health, log_throttle: RateLimitedLog, consumed: Collection[str]
) -> None:
    """Register ``/healthz``, ``/readyz``, ``/metrics``, ``/internal/usage-parity`` and the dashboard on ``app``.

    ``health`` answers the probes, ``log_throttle`` logs a ledger ``/metrics`` cannot read, ``consumed`` are
    the topics whose progress ``/metrics`` shows.
    """
    config = deps.config
    store = ParityStore(deps.ledger.engine, bucket_seconds=config.bucket_seconds, clock=deps.clock_ms)
    recon = ReconcileStore(deps.ledger.engine, clock=deps.clock_ms)
    guard = _Guard(config.web, deps.clock_ms)
    _install_probes(app, deps, health, guard)
    _install_metrics(app, config, store, recon, health, log_throttle, consumed)
    _install_parity_window(app, deps, store, guard)
    _install_dashboard(app, deps, store, recon, guard)


def _install_probes(app: Any, deps: Deps, health: Health, guard: _Guard) -> None:
    @app.page("/healthz")  # type: ignore[untyped-decorator]
    async def healthz(web: Any, request: Any) -> Any:
        # Liveness only: no database or broker call, so a sick dependency never gets the process restarted.
        # The cutover state is the one last read (the closer, the sender and the progress timer read it).
        eff = deps.cutover.last_known()
        return web.json(
            {
                "ok": True,
                "ready": health.ready(),
                "owner": deps.owner,
                "shadow": eff.state.shadow,
                "bill_from": eff.state.bill_from,
                "bill_until": eff.state.bill_until,
                "authority": eff.state.authority.value,
                "cutover": {"source": eff.source, "seq": eff.seq},
            }
        )

    @app.page("/readyz")  # type: ignore[untyped-decorator]
    async def readyz(web: Any, request: Any) -> Any:
        body = health.report()
        body["owner"] = deps.owner
        if guard.signed(request) is not None:  # unauthenticated: the conditions, not their error texts
            for held in body["conditions"].values():
                held.pop("detail", None)
        return web.json(body, status=200 if body["ready"] else 503)


def _install_metrics(
    app: Any,
    config: WorkerConfig,
    store: ParityStore,
    recon: ReconcileStore,
    health: Health,
    log_throttle: RateLimitedLog,
    consumed: Collection[str],
) -> None:
    per_org = config.web.limits.metrics_per_org

    def render() -> bytes:
        try:
            snap = store.metrics(config.close.grace_seconds)
            rsnap = recon.snapshot()
        except Exception as exc:
            log_throttle.failure(
                "metrics snapshot", "/metrics: the ledger cannot be read (%s: %s)", type(exc).__name__, exc
            )
            return render_metrics(None, consumed, time.time())
        log_throttle.recovered("metrics snapshot")
        return render_metrics(snap, consumed, time.time(), reconcile=rsnap, per_org=per_org)

    @app.page("/metrics")  # type: ignore[untyped-decorator]
    async def metrics(web: Any, request: Any) -> Any:
        health.report()  # refresh the readiness gauges
        body = await asyncio.to_thread(render)
        return web.bytes(body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _install_parity_window(app: Any, deps: Deps, store: ParityStore, guard: _Guard) -> None:
    @app.page("/internal/usage-parity")  # type: ignore[untyped-decorator]
    async def usage_parity(web: Any, request: Any) -> Any:
        reason = guard.signed(request)
        if reason is not None:
            log.warning("refused %s from %s: %s", request.raw_path, request.remote, reason)
            return web.json({"error": "unauthorized", "reason": reason}, status=401)
        try:
            from_s, to_s = int(request.query["from"]), int(request.query["to"])
        except (KeyError, ValueError):
            return web.json({"error": "from and to are required, in unix seconds"}, status=400)
        if to_s <= from_s:
            return web.json({"error": "to must be after from"}, status=400)
        if to_s - from_s > MAX_WINDOW_SECONDS:
            return web.json({"error": f"window longer than {MAX_WINDOW_SECONDS} s"}, status=400)
        horizon = await asyncio.to_thread(deps.ledger.dedup_horizon)
        if from_s < horizon:
            # The edge side is summed from the samples, and retention dropped those before the horizon.
            return web.json(
                {
                    "error": f"from is before the ledger's dedup horizon {horizon}: retention dropped the samples "
                    "before it (the parity table keeps those hours: edgebill parity)",
                    "dedup_horizon": horizon,
                },
                status=400,
            )
        cfg = deps.config.parity
        body = await asyncio.to_thread(parity_window_json, store, cfg, from_s, to_s, deps.clock_ms())
        return web.json(body)


def _install_dashboard(app: Any, deps: Deps, store: ParityStore, recon: ReconcileStore, guard: _Guard) -> None:
    cfg, web_cfg = deps.config.parity, deps.config.web

    def data(hours: int) -> dict[str, Any]:
        return dashboard_data(store, cfg, web_cfg, deps.clock_ms(), hours, recon)

    @app.page("/dashboard")  # type: ignore[untyped-decorator]
    async def dashboard(web: Any, request: Any) -> Any:
        token = request.query.get("token")
        if token is not None:
            if not guard.token_ok(token):
                return web.text("dashboard link expired or invalid\n", status=401, headers=_secure())
            exp = int(token.partition(".")[0])
            age = max(1, exp - guard.now_s())
            cookie = f"{COOKIE}={token}; Max-Age={age}; Path=/dashboard; HttpOnly; SameSite=Strict"
            return web.text("", status=303, headers=_secure({"Location": "/dashboard", "Set-Cookie": cookie}))
        if not guard.dashboard_allowed(request):
            return web.text(
                "open the link printed by `edgebill parity --dashboard-url`\n", status=401, headers=_secure()
            )
        return web.html(dashboard_html(await asyncio.to_thread(data, 48)), headers=_secure())

    @app.page("/dashboard/data.json")  # type: ignore[untyped-decorator]
    async def dashboard_json(web: Any, request: Any) -> Any:
        if not guard.dashboard_allowed(request):
            return web.json({"error": "unauthorized"}, status=401)
        try:
            hours = min(24 * 35, max(1, int(request.query.get("hours", "48"))))
        except ValueError:
            return web.json({"error": "hours must be an integer"}, status=400)
        return web.json(await asyncio.to_thread(data, hours), headers=_secure())

    @app.page("/dashboard/{name}")  # type: ignore[untyped-decorator]
    async def dashboard_static(web: Any, request: Any, name: str) -> Any:
        if name not in _STATIC:
            return web.text("not found\n", status=404)
        if not guard.dashboard_allowed(request):
            return web.text("unauthorized\n", status=401)
        return web.bytes(_static(name), content_type=_STATIC[name], headers=_secure())

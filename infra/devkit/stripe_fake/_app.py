"""The HTTP shell: routing, Stripe auth, body parsing, Idempotency-Key replay, faults and limits."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import orjson
from aiohttp import web

from infra.devkit.stripe_fake._base import API_VERSION, IdempotentResult, RequestContext, current_request
from infra.devkit.stripe_fake._errors import StripeError
from infra.devkit.stripe_fake._faults import FaultConfig, FaultDecision
from infra.devkit.stripe_fake._params import MAX_DEPTH, json_depth_ok, parse_form, parse_pairs
from infra.devkit.stripe_fake._state import FakeStripe
from infra.devkit.stripe_fake._util import dumps

__all__ = ["STATE_KEY", "json_response", "params", "state_of", "stripe_middleware"]

log = logging.getLogger("infra.devkit.stripe_fake")

STATE_KEY = web.AppKey("stripe_fake_state", FakeStripe)
PARAMS_KEY = web.RequestKey("stripe_fake_params", dict[str, Any])
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Obj = dict[str, Any]

STREAM_PATH = "/v2/billing/meter_event_stream"
V1_METER_EVENTS = "/v1/billing/meter_events"
PREVIEW_PATH = "/v1/invoices/create_preview"
IDEMPOTENCY_TTL_S = 86400

NO_KEY_MESSAGE = (
    "You did not provide an API key. You need to provide your API key in the Authorization header, "
    "using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). "
    "See https://stripe.com/docs/api#authentication for details, or we can help at https://support.stripe.com/."
)
RATE_LIMIT_MESSAGE = (
    "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits."
)
KEY_PREFIXES = ("sk_test_", "sk_live_", "rk_test_", "rk_live_")
# Headers whose values end up in stored objects, events or answers: refused (400) unless they are UTF-8.
TEXT_HEADERS = ("Authorization", "Idempotency-Key", "Stripe-Version", "Stripe-Account", "Content-Type")


# -- small helpers ---------------------------------------------------------------------------------


def _text(value: str) -> str:
    """``value`` with what is not text (bytes that were not UTF-8, kept as lone surrogates) as U+FFFD."""
    return value.encode("utf-8", "replace").decode("utf-8")


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps(obj), status=status, content_type="application/json", headers=headers)


def params(request: web.Request) -> Obj:
    return request.get(PARAMS_KEY) or {}


def state_of(request: web.Request) -> FakeStripe:
    return request.app[STATE_KEY]


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else request.path


def _mask(key: str) -> str:
    for prefix in KEY_PREFIXES:
        if key.startswith(prefix):
            return prefix + "*" * max(0, len(key) - len(prefix) - 4) + key[-4:]
    return key[:4] + "*" * max(0, len(key) - 8) + key[-4:] if len(key) > 8 else "*" * len(key)


def _bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        return auth[len("Bearer ") :].strip() or None
    if auth.startswith("Basic "):
        try:
            decoded = base64.b64decode(auth[len("Basic ") :]).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.split(":", 1)[0] or None
    return None


def rate_limit_error() -> StripeError:
    return StripeError(
        429,
        RATE_LIMIT_MESSAGE,
        code="rate_limit",
        headers={"Stripe-Should-Retry": "true"},
    )


@dataclass
class _Prepared:
    api_key: str
    livemode: bool
    params: Obj


# -- the middleware --------------------------------------------------------------------------------


async def _authenticate(request: web.Request, state: FakeStripe) -> tuple[str, bool]:
    token = _bearer(request)
    if request.path == STREAM_PATH:
        # Every v2 error carries a ``code``; Stripe documents only the expired-session one, the others are ours.
        if token is None:
            raise StripeError(401, NO_KEY_MESSAGE, code="missing_authentication")
        if token.startswith(KEY_PREFIXES):
            raise StripeError(
                401,
                "The meter event stream takes a meter event session token, not an API key: create one with "
                "POST /v2/billing/meter_event_session.",
                code="secret_key_not_allowed",
            )
        status = state.session_status(token)
        if status == "expired":
            raise StripeError(
                401,
                "The meter event session has expired. Create a new session with POST /v2/billing/meter_event_session.",
                type_="temporary_session_expired",
                code="billing_meter_event_session_expired",
            )
        if status == "unknown":
            raise StripeError(
                401, f"Invalid authentication token provided: {_mask(token)}", code="invalid_authentication_token"
            )
        return token, "_live_" in token
    if token is None:
        raise StripeError(401, NO_KEY_MESSAGE)
    if not token.startswith(KEY_PREFIXES) or len(token) < len("sk_test_") + 1:
        raise StripeError(401, f"Invalid API Key provided: {_mask(token)}")
    return token, "_live_" in token


def _query_pairs(request: web.Request) -> list[tuple[str, str]]:
    """The query as sent (still percent-encoded), decoded once; bytes that are not UTF-8 read as U+FFFD."""
    return parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True)


async def _parse(request: web.Request, v2: bool) -> Obj:
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise StripeError(
            413, f"Request entity too large: the body must be at most {request.client_max_size:,} bytes."
        ) from None
    if v2:
        if request.method in ("GET", "DELETE"):
            return parse_pairs(_query_pairs(request))
        if not body.strip():
            return {}
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise StripeError(400, "Invalid JSON in the request body.") from None
        if not isinstance(data, dict):
            raise StripeError(400, "The request body must be a JSON object.")
        if not json_depth_ok(data):
            raise StripeError(400, f"Invalid request: the JSON body is nested more than {MAX_DEPTH} levels deep.")
        return data
    merged = parse_pairs(_query_pairs(request))
    if body:
        ctype = request.headers.get("Content-Type", "")
        if "json" in ctype:
            raise StripeError(
                400,
                "Invalid request: v1 API requests must be form-encoded (application/x-www-form-urlencoded).",
            )
        form = parse_form(body)
        if not isinstance(merged, dict) or not isinstance(form, dict):  # e.g. a bare "0": an array, not params
            raise StripeError(400, "Invalid request: the parameters must be named (name=value pairs).")
        merged.update(form)
    if not isinstance(merged, dict):
        raise StripeError(400, "Invalid request: the parameters must be named (name=value pairs).")
    return merged


def _fingerprint(method: str, path: str, data: Obj) -> bytes:
    canon = orjson.dumps([method, path, data], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canon).digest()


def _error_response(exc: StripeError, request_id: str, *, v2: bool = False) -> web.Response:
    headers = {"Request-Id": request_id, "Stripe-Version": API_VERSION, **exc.headers}
    return json_response(exc.body(v2=v2), exc.status, headers)


def _live_limits(state: FakeStripe, cfg: FaultConfig, request: web.Request, data: Obj) -> tuple[str, str] | None:
    """Enforce live-mode limits; returns the (customer, meter) slot held for a v1 meter event."""
    if not cfg.live_limits or request.method != "POST":
        return None
    if request.path == STREAM_PATH:
        if not state.window("v2_stream").allow(cfg.v2_stream_per_s):
            state.faults.note("limit_v2_stream")
            raise rate_limit_error()
        return None
    if request.path != V1_METER_EVENTS:
        return None
    if not state.window("v1_meter_events").allow(cfg.v1_meter_events_per_s):
        state.faults.note("limit_v1_rate")
        raise rate_limit_error()
    payload = data.get("payload")
    customer = ""
    if isinstance(payload, dict):
        customer = str(payload.get("stripe_customer_id") or next(iter(payload.values()), ""))
    slot = (customer, str(data.get("event_name", "")))
    if not state.claim_meter_slot(slot):
        state.faults.note("limit_v1_concurrency")
        raise rate_limit_error()
    return slot


def _read_limits(state: FakeStripe, cfg: FaultConfig, request: web.Request) -> None:
    """Enforce the read limit: every GET, and invoice previews (they create nothing)."""
    if not cfg.read_limits:
        return
    if request.method != "GET" and request.path != PREVIEW_PATH:
        return
    if not state.window("reads").allow(cfg.reads_per_s):
        state.faults.note("limit_reads")
        raise rate_limit_error()


@web.middleware
async def stripe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = state_of(request)
    route = _route_name(request)
    if request.path.startswith("/_fake/"):
        try:
            resp = await handler(request)
        except StripeError as exc:
            resp = json_response(exc.body(), exc.status)  # the inspection API's own errors
        state.count_request(request.method, route, resp.status)
        return resp
    request_id = state.ids("req_", 14)
    resp = await _serve(request, handler, state, request_id)
    state.count_request(request.method, route, resp.status)
    return resp


async def _serve(request: web.Request, handler: Handler, state: FakeStripe, request_id: str) -> web.StreamResponse:
    v2 = request.path.startswith("/v2/")
    http_exc = request.match_info.http_exception
    if http_exc is not None:
        return _error_response(
            StripeError(
                404,
                f"Unrecognized request URL ({request.method}: {_text(request.path)}). "
                "Please see https://stripe.com/docs or we can help at https://support.stripe.com/.",
            ),
            request_id,
            v2=v2,
        )
    idem_slot: tuple[str, str] | None = None
    meter_slot: tuple[str, str] | None = None
    try:
        for name in TEXT_HEADERS:
            value = request.headers.get(name)
            if value is not None and _text(value) != value:
                raise StripeError(400, f"Invalid {name} header: it must be UTF-8 text.")
        api_key, livemode = await _authenticate(request, state)
        data = await _parse(request, v2)
        request[PARAMS_KEY] = data
        cfg = state.faults.config
        idem_key = request.headers.get("Idempotency-Key")
        if idem_key is not None and request.method in ("POST", "DELETE"):
            if len(idem_key) > 255:
                raise StripeError(400, "Idempotency-Key must be at most 255 characters.", param="Idempotency-Key")
            replay = _check_idempotency(state, (api_key, idem_key), request, data)
            if replay is not None:
                return replay
            idem_slot = (api_key, idem_key)  # registered as in flight: released in ``finally``
        decision = state.faults.decide(request.method, request.path)
        _read_limits(state, cfg, request)
        meter_slot = _live_limits(state, cfg, request, data)
        if decision.kind == "429":
            raise rate_limit_error()
        if decision.delay:
            await asyncio.sleep(decision.delay)
        token = current_request.set(RequestContext(request_id, idem_key, livemode))
        try:
            resp = await _execute(request, handler, decision, request_id)
        finally:
            current_request.reset(token)
        if idem_slot is not None and isinstance(resp, web.Response):
            stored = resp.status < 400 or (resp.status >= 500 and cfg.replay_errors)
            if stored:
                _store_idempotency(state, idem_slot, request, data, resp, request_id)
        if decision.kind == "cutoff" and resp.status < 400:
            log.info("fault: cutting off %s %s after it was recorded", request.method, request.path)
            transport = request.transport
            if transport is not None:
                transport.abort()
        return resp
    except StripeError as exc:
        return _error_response(exc, request_id, v2=v2)
    except Exception:
        log.exception("local Stripe server: unexpected error on %s %s", request.method, request.path)
        return _error_response(
            StripeError(500, "An unknown error occurred while processing your request.", type_="api_error"),
            request_id,
            v2=v2,
        )
    finally:
        state.release_slots(meter_slot, idem_slot)


async def _execute(
    request: web.Request, handler: Handler, decision: FaultDecision, request_id: str
) -> web.StreamResponse:
    if decision.kind == "500":
        return _error_response(
            StripeError(
                500,
                "An unknown error occurred while processing your request.",
                type_="api_error",
                headers={"Stripe-Should-Retry": "false"},
            ),
            request_id,
            v2=request.path.startswith("/v2/"),
        )
    try:
        resp = await handler(request)
    except StripeError as exc:
        return _error_response(exc, request_id, v2=request.path.startswith("/v2/"))
    resp.headers["Request-Id"] = request_id
    resp.headers["Stripe-Version"] = request.headers.get("Stripe-Version", API_VERSION)
    idem_key = request.headers.get("Idempotency-Key")
    if idem_key is not None:
        resp.headers["Idempotency-Key"] = idem_key
    return resp


def _check_idempotency(
    state: FakeStripe, slot: tuple[str, str], request: web.Request, data: Obj
) -> web.Response | None:
    stored = state.idempotency_claim(slot, IDEMPOTENCY_TTL_S)
    if stored is None:
        return None
    if stored.fingerprint != _fingerprint(request.method, request.path, data):
        raise StripeError(
            400,
            "Keys for idempotent requests can only be used with the same parameters "
            "they were first used with. "
            f"Try using a key other than '{slot[1]}' if you meant to execute a different request.",
            type_="idempotency_error",
        )
    headers = {**stored.headers, "Idempotent-Replayed": "true", "Original-Request": stored.request_id}
    return web.Response(body=stored.body, status=stored.status, content_type="application/json", headers=headers)


def _store_idempotency(
    state: FakeStripe,
    slot: tuple[str, str],
    request: web.Request,
    data: Obj,
    resp: web.Response,
    request_id: str,
) -> None:
    body = resp.body
    keep = ("Request-Id", "Stripe-Version", "Idempotency-Key", "Stripe-Should-Retry")
    state.idempotency_store(
        slot,
        IdempotentResult(
            method=request.method,
            path=request.path,
            fingerprint=_fingerprint(request.method, request.path, data),
            status=resp.status,
            body=body if isinstance(body, bytes) else b"",
            headers={k: v for k, v in resp.headers.items() if k in keep},
            request_id=request_id,
            created=state.now(),
        ),
    )

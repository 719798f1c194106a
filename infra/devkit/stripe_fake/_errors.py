"""Stripe's error envelope, as a Python exception the handlers raise.

v1 and v2 share the envelope ``{"error": {"type", "code", "message", "param", "doc_url"}}``;
absent fields are left out, as Stripe leaves them out. Stripe's v2 schema (``v2.error``) has no ``param``:
a v2 answer leaves it out.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "StripeError",
    "invalid_integer",
    "missing_param",
    "no_such",
    "unknown_param",
]

DOC_BASE = "https://stripe.com/docs/error-codes/"


class StripeError(Exception):
    """An error answer: HTTP status plus Stripe's error body (and optional extra headers)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def body(self, *, v2: bool = False) -> dict[str, Any]:
        err: dict[str, Any] = {}
        if self.code is not None:
            err["code"] = self.code
            err["doc_url"] = DOC_BASE + self.code.replace("_", "-")
        err["message"] = self.message
        if self.param is not None and not v2:
            err["param"] = self.param
        err["type"] = self.type
        err.update(self.extra)
        return {"error": err}


def missing_param(param: str) -> StripeError:
    return StripeError(400, f"Missing required param: {param}.", code="parameter_missing", param=param)


def unknown_param(param: str) -> StripeError:
    return StripeError(400, f"Received unknown parameter: {param}", code="parameter_unknown", param=param)


def invalid_integer(param: str, value: object) -> StripeError:
    return StripeError(400, f"Invalid integer: {value}", code="parameter_invalid_integer", param=param)


def no_such(label: str, ident: str, *, param: str = "id", status: int = 404) -> StripeError:
    """``No such customer: 'cus_x'`` — 404 for a path id, 400 when a parameter names it."""
    return StripeError(status, f"No such {label}: '{ident}'", code="resource_missing", param=param)

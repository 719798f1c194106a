"""Request parameters: Stripe's bracket-nested form/query encoding, and typed access with Stripe's errors.

v1 bodies and every query string arrive as ``a[b][0][c]=v`` pairs (the SDK always indexes lists);
``key[]=v`` (the older style) appends. v2 bodies are JSON and are used as they are.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl

from infra.devkit.stripe_fake._errors import StripeError, invalid_integer, missing_param, unknown_param

__all__ = ["MAX_DEPTH", "Params", "json_depth_ok", "parse_form", "parse_pairs"]

_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
# Deeper nesting than any Stripe parameter has is refused (and never reaches a recursive walk).
MAX_DEPTH = 32
_SUB = re.compile(r"\[([^\[\]]*)\]")


def _too_deep(key: str) -> StripeError:
    shown = key if len(key) <= 40 else key[:37] + "..."
    return StripeError(400, f"Invalid parameter: {shown} is nested more than {MAX_DEPTH} levels deep", param=shown)


def json_depth_ok(doc: Any) -> bool:
    """True when ``doc`` (parsed JSON) nests at most :data:`MAX_DEPTH` levels (checked without recursion)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > MAX_DEPTH:
                return False
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return True


def _conflict(key: str) -> StripeError:
    return StripeError(400, f"Invalid array or hash for parameter: {key}", param=key)


def parse_pairs(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Nest ``a[b][0]=v`` pairs into dicts; dicts whose keys are all digits become lists."""
    root: dict[str, Any] = {}
    for raw_key, value in pairs:
        m = _KEY.match(raw_key)
        path: list[Any] = [raw_key] if m is None else [m.group(1), *_SUB.findall(m.group(2))]
        if len(path) > MAX_DEPTH:
            raise _too_deep(raw_key)
        node: dict[str, Any] = root
        for i, part in enumerate(path):
            if part == "" and i > 0:
                # ``key[]`` appends: emulate with the next free integer index.
                part = str(sum(1 for k in node if _is_index(k)))
            if i == len(path) - 1:
                if isinstance(node.get(part), dict):
                    raise _conflict(raw_key)
                node[part] = value
            else:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise _conflict(raw_key)
                node = child
    result: dict[str, Any] = _listify(root)
    return result


def _is_index(key: str) -> bool:
    """``0``, ``1``, ...: ASCII digits only (``str.isdigit`` also takes '²', which ``int`` refuses)."""
    return key.isascii() and key.isdigit()


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    out = {k: _listify(v) for k, v in node.items()}
    if out and all(_is_index(k) for k in out):
        return [out[k] for k in sorted(out, key=int)]
    return out


def parse_form(body: bytes | str) -> dict[str, Any]:
    """A form body; bytes that are not UTF-8 are refused with Stripe's 400 (percent-escapes decode leniently)."""
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
    except UnicodeDecodeError:
        raise StripeError(400, "Invalid request: the request body is not valid UTF-8.") from None
    return parse_pairs(parse_qsl(text, keep_blank_values=True))


class Params:
    """Typed, validating access to one request's parameters (names as Stripe reports them)."""

    def __init__(self, data: Mapping[str, Any], allowed: Iterable[str] | None = None, prefix: str = ""):
        self.data: Mapping[str, Any] = data
        self.prefix = prefix
        if allowed is not None:
            ok = set(allowed) | {"expand"}
            for key in data:
                if key not in ok:
                    raise unknown_param(self.name(key))

    def name(self, key: str) -> str:
        return f"{self.prefix}[{key}]" if self.prefix else key

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str) -> Any:
        return self.data.get(key)

    def string(self, key: str, *, required: bool = False, max_len: int | None = None) -> str | None:
        value = self.data.get(key)
        if value is None:
            if required:
                raise missing_param(self.name(key))
            return None
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise StripeError(400, f"Invalid string: {value!r}", param=self.name(key))
        text = str(value)
        if required and text == "":
            raise missing_param(self.name(key))
        if max_len is not None and len(text) > max_len:
            raise StripeError(
                400,
                f"Invalid string: {text[:20]}...; must be at most {max_len} characters",
                param=self.name(key),
            )
        return text

    def req_str(self, key: str, *, max_len: int | None = None) -> str:
        value = self.string(key, required=True, max_len=max_len)
        assert value is not None
        return value

    def integer(self, key: str, *, required: bool = False) -> int | None:
        value = self.data.get(key)
        if value is None or value == "":
            if required:
                raise missing_param(self.name(key))
            return None
        if isinstance(value, bool):
            raise invalid_integer(self.name(key), value)
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        raise invalid_integer(self.name(key), value)

    def decimal(self, key: str) -> Decimal | None:
        value = self.data.get(key)
        if value is None or value == "":
            return None
        try:
            dec = Decimal(str(value))
        except InvalidOperation:
            raise StripeError(400, f"Invalid decimal: {value}", param=self.name(key)) from None
        if not dec.is_finite():
            raise StripeError(400, f"Invalid decimal: {value}", param=self.name(key))
        return dec

    def boolean(self, key: str) -> bool | None:
        value = self.data.get(key)
        if value is None or value == "":
            return None
        if isinstance(value, bool):
            return value
        if value in ("true", "false"):
            return bool(value == "true")
        raise StripeError(400, f"Invalid boolean: {value}", param=self.name(key))

    def enum(self, key: str, choices: Iterable[str], *, required: bool = False) -> str | None:
        value = self.string(key, required=required)
        if value is None:
            return None
        options = list(choices)
        if value not in options:
            raise StripeError(
                400,
                f"Invalid {self.name(key)}: must be one of {', '.join(options)}",
                param=self.name(key),
            )
        return value

    def sub(self, key: str, allowed: Iterable[str] | None = None, *, required: bool = False) -> Params | None:
        value = self.data.get(key)
        if value is None or value == "":
            if required:
                raise missing_param(self.name(key))
            return None
        if not isinstance(value, dict):
            raise StripeError(400, f"Invalid object: {self.name(key)}", param=self.name(key))
        return Params(value, allowed, self.name(key))

    def array(self, key: str) -> list[Any] | None:
        value = self.data.get(key)
        if value is None:
            return None
        if value == "":
            return []
        if isinstance(value, dict):  # a single non-indexed hash is not a list
            raise StripeError(400, f"Invalid array: {self.name(key)}", param=self.name(key))
        if not isinstance(value, list):
            return [value]
        return value

    def strings(self, key: str) -> list[str] | None:
        items = self.array(key)
        if items is None:
            return None
        out: list[str] = []
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise StripeError(400, f"Invalid string: {item!r}", param=f"{self.name(key)}[{i}]")
            out.append(item)
        return out

    def metadata(self, current: dict[str, str] | None = None, key: str = "metadata") -> dict[str, str]:
        """``current`` updated the way Stripe does: ``metadata[k]=""`` unsets one key, ``metadata=""`` all."""
        base = dict(current or {})
        value = self.data.get(key)
        if value is None:
            return base
        if value == "":
            return {}
        if not isinstance(value, dict):
            raise StripeError(400, "Invalid metadata: must be a hash", param=self.name(key))
        if len(value) > 50:
            raise StripeError(400, "Invalid metadata: at most 50 keys are allowed", param=self.name(key))
        for k, v in value.items():
            if len(k) > 40:
                raise StripeError(
                    400, f"Invalid metadata key {k!r}: must be at most 40 characters", param=self.name(key)
                )
            if not isinstance(v, str | int | float) or isinstance(v, bool):
                raise StripeError(400, f"Invalid metadata value for {k!r}", param=f"{self.name(key)}[{k}]")
            if len(str(v)) > 500:
                raise StripeError(
                    400,
                    f"Invalid metadata value for {k!r}: must be at most 500 characters",
                    param=f"{self.name(key)}[{k}]",
                )
            if str(v) == "":
                base.pop(k, None)
            else:
                base[k] = str(v)
        return base

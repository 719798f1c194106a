"""A small subset of Stripe's search query language: ``field:'v'`` and ``metadata['k']:'v'`` joined by AND.

Stripe's full language also has OR, ``-`` negation, ``~`` (substring) and numeric comparisons;
``~`` is supported here, the rest answers 400 so a caller notices.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from infra.devkit.stripe_fake._errors import StripeError

__all__ = ["compile_query"]

_CLAUSE = re.compile(
    r"""^\s*(?P<field>[a-z_]+)(?:\[(?P<q>['"])(?P<key>[^'"]+)(?P=q)\])?\s*(?P<op>[:~])\s*(?P<vq>['"])(?P<value>.*?)(?P=vq)\s*$"""
)


def _bad(query: str) -> StripeError:
    return StripeError(400, f"Invalid search query: {query!r}. Supported: field:'value' AND ...", param="query")


def compile_query(query: str, fields: set[str]) -> Callable[[dict[str, Any]], bool]:
    """Compile ``query`` into a predicate over objects; ``fields`` are the searchable top-level keys."""
    if not query.strip():
        raise _bad(query)
    clauses = re.split(r"\s+AND\s+", query.strip())
    tests: list[Callable[[dict[str, Any]], bool]] = []
    for clause in clauses:
        m = _CLAUSE.match(clause)
        if m is None:
            raise _bad(query)
        field, key, op, value = m.group("field"), m.group("key"), m.group("op"), m.group("value")
        if key is not None and field != "metadata":
            raise _bad(query)
        if key is None and field not in fields:
            raise StripeError(400, f"Field '{field}' is not supported for search.", param="query")

        def test(
            obj: dict[str, Any], field: str = field, key: str | None = key, op: str = op, value: str = value
        ) -> bool:
            raw = obj.get("metadata", {}).get(key) if key is not None else obj.get(field)
            if raw is None:
                return False
            text = str(raw).lower() if isinstance(raw, bool) else str(raw)
            return value in text if op == "~" else text == value

        tests.append(test)
    return lambda obj: all(t(obj) for t in tests)

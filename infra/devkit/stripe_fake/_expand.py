"""``expand[]``: replace an id in an answer by the object it names, as Stripe does for expandable fields.

Paths are dotted (``customer``, ``items.data.price.product``; on a list, ``data.customer``), at most four
levels deep. A field that names no object this server keeps, or that Stripe does not let expand, is a 400
with Stripe's message. ``line_items`` of a checkout session is not in the object until expanded.
"""

from __future__ import annotations

from typing import Any

from infra.devkit.stripe_fake._errors import StripeError
from infra.devkit.stripe_fake._webhooks import WebhooksMixin

__all__ = ["MAX_EXPAND_DEPTH", "ExpandMixin"]

Obj = dict[str, Any]

MAX_EXPAND_DEPTH = 4
#: Id prefixes of the objects an expandable field can name, and the table each lives in.
_TABLES = {
    "cus_": "customers",
    "sub_": "subscriptions",
    "price_": "prices",
    "prod_": "products",
    "mtr_": "meters",
    "cs_": "checkout_sessions",
}


def _cannot(path: str) -> StripeError:
    return StripeError(400, f"This property cannot be expanded ({path}).", param="expand")


class ExpandMixin(WebhooksMixin):
    def expand(self, obj: Any, paths: list[str] | None) -> Any:
        """``obj`` (an answer, already a copy) with every path in ``paths`` expanded; raises 400 like Stripe."""
        if not paths:
            return obj
        with self._lock:
            for path in paths:
                if not isinstance(path, str) or not path:
                    raise StripeError(400, "Invalid expand parameter.", param="expand")
                parts = path.split(".")
                if len(parts) > MAX_EXPAND_DEPTH:
                    raise StripeError(
                        400,
                        f"You cannot expand more than {MAX_EXPAND_DEPTH} levels of a property. Property: {path}",
                        param="expand",
                    )
                self._expand_in(obj, parts, path)
        return obj

    def _expand_in(self, node: Any, parts: list[str], path: str) -> None:
        if isinstance(node, list):
            for item in node:
                self._expand_in(item, parts, path)
            return
        if not isinstance(node, dict):
            raise _cannot(path)
        head, rest = parts[0], parts[1:]
        if head == "line_items" and node.get("object") == "checkout.session":
            if "line_items" not in node:
                node["line_items"] = self.line_items(node["id"])
            if rest:
                self._expand_in(node["line_items"], rest, path)
            return
        if head not in node:
            raise _cannot(path)
        value = node[head]
        if rest:
            if isinstance(value, str):
                value = node[head] = self._lookup(value, path)
            if value is None:
                return
            self._expand_in(value, rest, path)
            return
        if isinstance(value, str):
            node[head] = self._lookup(value, path)
        elif value is not None and not isinstance(value, dict):
            raise _cannot(path)

    def _lookup(self, ident: str, path: str) -> Obj:
        for prefix, name in _TABLES.items():
            if ident.startswith(prefix):
                table: dict[str, Obj] = getattr(self, name)
                if name == "customers" and ident in self.deleted_customers:
                    return {"id": ident, "object": "customer", "deleted": True}
                found = table.get(ident)
                if found is not None:
                    return self.copy(found)
        raise _cannot(path)

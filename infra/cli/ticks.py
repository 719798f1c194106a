"""The tick format as a product surface: ``edgebill schema``, and the line check behind ``produce --file``.

The schema is generated from the wire model (:class:`models.ticks.UsageTickEnvelope`); the line check runs the
ingest parser itself (:func:`models.ticks.parse_record`), so what it accepts is exactly what the worker bills.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import click
import orjson

from infra.cli._base import cli
from models.ticks import FUTURE_TOLERANCE_MS, UsageTickEnvelope, parse_record

__all__ = ["EXAMPLE_ARRAY", "EXAMPLE_TICK", "BadLine", "CheckedFile", "check_tick_lines", "tick_record_schema"]

EXAMPLE_TICK: Final[dict[str, Any]] = {
    "id": "sb_42:3:1187",
    "type": "usage_tick",
    "sandbox_id": "sb_42",
    "org_id": "org_7",
    "plan": "pro",
    "worker_id": "w-3",
    "cell_id": "eu-1",
    "payload": {"sandbox_id": "sb_42", "cost_cents": 10, "interval_s": 20, "memory_mb": 4096, "cpu_count": 2},
    "timestamp": "2026-06-15T23:00:12Z",
}
EXAMPLE_ARRAY: Final[list[dict[str, Any]]] = [
    EXAMPLE_TICK,
    {
        "id": "sb_42:3:1188",
        "type": "usage_tick",
        "sandbox_id": "sb_42",
        "org_id": "org_7",
        "plan": "pro",
        "worker_id": "w-3",
        "cell_id": "eu-1",
        "payload": {"sandbox_id": "sb_42", "cost_cents": 10, "interval_s": 20, "memory_mb": 8192, "cpu_count": 4},
        "timestamp": "2026-06-15T23:00:32Z",
    },
]

# What each field means; the types and limits come from the model.
_ENVELOPE_DOCS: Final = {
    "id": "Unique tick id; with the tick's hour, the dedup key: deterministic, e.g. "
    "'{sandbox}:{generation}:{rowid}'. Delivery is at-least-once: a repeated id is counted once. The first copy "
    "stored counts: a copy with another payload in the same hour is a conflicting duplicate (not counted, "
    "dead-lettered as 'conflicting_duplicate' with both payload fingerprints, counted in "
    "edgebill_conflicting_duplicate_ticks_total); an id reused in another hour is another tick.",
    "type": "'usage_tick' is billed; envelopes of any other type are accepted, counted and ignored.",
    "sandbox_id": "The sandbox that used the resources (payload.sandbox_id is read when this is empty).",
    "org_id": "The org billed for the usage (also the record key producers should use).",
    "plan": "Advisory only and never used for pricing: the plan comes from the org-policy topic.",
    "worker_id": "The worker that ran the sandbox (a tick from a worker that no longer owns it is not billed).",
    "cell_id": "The cell of that worker.",
    "payload": "The measured usage.",
    "timestamp": "When the interval ended: RFC 3339 with a UTC offset (e.g. 'Z'). Decides the billing hour; "
    "more than an hour ahead of the reader's clock is rejected.",
}
_PAYLOAD_DOCS: Final = {
    "sandbox_id": "The sandbox (older producers put it here only).",
    "cost_cents": "Carried, never billed.",
    "interval_s": "Seconds the sandbox ran at this size since the previous tick. Missing reads as 0 (no charge).",
    "memory_mb": "Memory in MiB. Billed usage: memory_mb x interval_s / 1024 GB-seconds. Missing reads as 0.",
    "cpu_count": "CPUs; carried, not billed. Missing reads as 0.",
}


def tick_record_schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of a ``usage-ticks`` record value: one envelope, or a non-empty array of them."""
    envelope = UsageTickEnvelope.model_json_schema(ref_template="#/$defs/{model}")
    defs: dict[str, Any] = envelope.pop("$defs", {})
    envelope["description"] = (
        "One usage tick. Unknown fields are allowed and ignored. A tick that breaks a rule here is dead-lettered "
        "to usage-ticks-dlq with a reason (see `edgebill dlq`), never billed and never dropped silently."
    )
    for name, doc in _ENVELOPE_DOCS.items():
        envelope["properties"][name]["description"] = doc
    payload = defs["TickPayload"]
    payload["description"] = "The measured usage of one interval."
    for name, doc in _PAYLOAD_DOCS.items():
        payload["properties"][name]["description"] = doc
    envelope["examples"] = [EXAMPLE_TICK]
    defs["UsageTickEnvelope"] = envelope
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "usage-ticks record value",
        "description": "The value of a record on the usage-ticks topic: one tick envelope (JSON object) or a "
        "JSON array of them (producers batch). Key: the org_id, as bytes (optional).",
        "oneOf": [
            {"$ref": "#/$defs/UsageTickEnvelope"},
            {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/UsageTickEnvelope"}},
        ],
        "examples": [EXAMPLE_TICK, EXAMPLE_ARRAY],
        "$defs": defs,
    }


@cli.command()
@click.option("--envelope", is_flag=True, help="Only the schema of one envelope (not the record: object or array).")
def schema(envelope: bool) -> None:
    """Print the JSON Schema of a usage tick (the usage-ticks record value), generated from the wire model."""
    doc = tick_record_schema()
    if envelope:
        env = doc["$defs"].pop("UsageTickEnvelope")
        doc = {"$schema": doc["$schema"], **env, "$defs": doc["$defs"]}
    click.echo(json.dumps(doc, indent=2, ensure_ascii=False))


# ------------------------------------------------------------------------------------ checking a file


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line the worker would dead-letter (whole, or one element of an array)."""

    line: int  # 1-based
    reason: str
    index: int | None = None  # position in an array line

    def __str__(self) -> str:
        where = f"line {self.line}" + (f" [{self.index}]" if self.index is not None else "")
        return f"{where}: {self.reason}"


@dataclass(slots=True)
class CheckedFile:
    """The messages of a JSON-lines file (key = org of the first envelope), and what the parser refuses."""

    messages: list[tuple[bytes | None, bytes]] = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)
    ticks: int = 0
    ignored: int = 0  # envelopes of another type


def check_tick_lines(lines: Iterable[bytes], now_ms: int) -> CheckedFile:
    """Parse each non-blank line as the ingest agent would at ``now_ms``; keep every line, list the bad ones."""
    out = CheckedFile()
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            continue
        parsed = parse_record(line, max_ts_ms=now_ms + FUTURE_TOLERANCE_MS)
        out.ticks += len(parsed.ticks)
        out.ignored += parsed.ignored
        out.bad.extend(BadLine(n, r.reason, r.index) for r in parsed.rejected)
        key = parsed.ticks[0].org_id.encode() if parsed.ticks else _first_org(line)
        out.messages.append((key, line))
    return out


def _first_org(line: bytes) -> bytes | None:
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    first = doc[0] if isinstance(doc, list) and doc else doc
    org = first.get("org_id") if isinstance(first, dict) else None
    return org.encode() if isinstance(org, str) and org else None

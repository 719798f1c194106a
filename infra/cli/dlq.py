"""``edgebill dlq``: the dead letters, by reason, with the offset of the record each one stands for.

Every dead letter carries its reason and source in headers: ``edgebill-reason``, ``edgebill-source``
(``topic/partition/offset``), ``edgebill-array-index`` (one element of an array record) and
``edgebill-truncated`` (the original size, when the record was too large to carry whole). The topics are read
from the beginning without a consumer group: nothing is committed, no worker is disturbed.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import click

from infra.cli._base import broker_errors, cli, iso, require_broker, settings_for_cli
from infra.kafka_io import ReadRecord
from models.topics import TOPIC_DLQ, TOPIC_POLICY_DLQ, TOPIC_SCALE_DLQ

__all__ = ["dead_letter_json"]

_TOPICS = {"ticks": TOPIC_DLQ, "policy": TOPIC_POLICY_DLQ, "scale": TOPIC_SCALE_DLQ}
PREVIEW_CHARS = 100


def _header(rec: ReadRecord, name: str) -> str | None:
    raw = rec.headers.get(name)
    return None if raw is None else raw.decode("utf-8", errors="replace")


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and text.isascii() and text.isdigit() else None


def _preview(value: bytes | None) -> str:
    text = (value or b"")[: PREVIEW_CHARS * 4].decode("utf-8", errors="replace")
    text = "".join(c if c.isprintable() else "\ufffd" for c in text)
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


def dead_letter_json(topic: str, rec: ReadRecord) -> dict[str, Any]:
    """One dead letter as the command reports it (``--json``)."""
    source = _header(rec, "edgebill-source")
    src_topic, src_partition, src_offset = None, None, None
    if source is not None:
        parts = source.rsplit("/", 2)
        if len(parts) == 3:
            src_topic, src_partition, src_offset = parts[0], _int(parts[1]), _int(parts[2])
    return {
        "topic": topic,
        "partition": rec.partition,
        "offset": rec.offset,
        "time": iso(rec.timestamp_ms / 1000) if rec.timestamp_ms is not None else None,
        "reason": _header(rec, "edgebill-reason") or "unknown",
        "source": source,
        "source_topic": src_topic,
        "source_partition": src_partition,
        "source_offset": src_offset,
        "array_index": _int(_header(rec, "edgebill-array-index")),
        "truncated_from": _int(_header(rec, "edgebill-truncated")),
        "bytes": len(rec.value or b""),
        "key": None if rec.key is None else rec.key.decode("utf-8", errors="replace"),
        "preview": _preview(rec.value),
    }


@cli.command()
@click.option(
    "--topic",
    "which",
    type=click.Choice(["all", *_TOPICS]),
    default="all",
    show_default=True,
    help="Which dead-letter topic: usage-ticks-dlq (ticks), org-policy-dlq (policy), sandbox-scale-events-dlq (scale).",
)
@click.option("--reason", default=None, help="Only dead letters with this reason.")
@click.option("--limit", type=int, default=20, show_default=True, help="Dead letters listed per reason (0 = all).")
@click.option("--json", "as_json", is_flag=True, help="Counts and every dead letter (not limited) as JSON.")
@click.option("--max-wait", type=float, default=60.0, show_default=True, help="Seconds to read each topic at most.")
def dlq(which: str, reason: str | None, limit: int, as_json: bool, max_wait: float) -> None:
    """Dead letters by reason, each with the source record's topic/partition/offset (and array index)."""
    from infra.kafka_io import read_to_end_sync

    s = settings_for_cli()
    require_broker(s)
    names = [s.kafka.topic(t) for key, t in _TOPICS.items() if which in ("all", key)]
    found: dict[str, dict[str, Any]] = {}
    letters: list[dict[str, Any]] = []
    with broker_errors(s):
        for name in names:
            read = read_to_end_sync(s.kafka.servers, name, max_wait=max_wait)
            rows = [dead_letter_json(name, r) for r in sorted(read.records, key=lambda r: (r.partition, r.offset))]
            rows = [r for r in rows if reason is None or r["reason"] == reason]
            letters.extend(rows)
            found[name] = {
                "exists": read.exists,
                "complete": read.complete,
                "count": len(rows),
                "by_reason": dict(Counter(r["reason"] for r in rows).most_common()),
            }
    if as_json:
        click.echo(json.dumps({"topics": found, "dead_letters": letters}, indent=2, ensure_ascii=False))
    else:
        _print(found, letters, limit)


def _print(found: dict[str, dict[str, Any]], letters: list[dict[str, Any]], limit: int) -> None:
    for name, info in found.items():
        if not info["exists"]:
            click.echo(f"{name}: no such topic (nothing was ever dead-lettered there)")
            continue
        partial = "" if info["complete"] else " (stopped reading before the end: --max-wait)"
        click.echo(f"{name}: {info['count']} dead letter(s){partial}")
        for why, n in info["by_reason"].items():
            click.echo(f"  {why}: {n}")
            rows = [r for r in letters if r["topic"] == name and r["reason"] == why]
            shown = rows if limit <= 0 else rows[:limit]
            head = f"{'dead-lettered (UTC)':<21} {'source (topic/partition/offset)':<40} {'index':>5} {'bytes':>10}"
            click.echo(f"    {head}  value")
            for r in shown:
                size = f"{r['bytes']:,}" + (f" of {r['truncated_from']:,}" if r["truncated_from"] is not None else "")
                idx = "-" if r["array_index"] is None else str(r["array_index"])
                click.echo(f"    {r['time'] or '-':<21} {r['source'] or '?':<40} {idx:>5} {size:>10}  {r['preview']}")
            if len(shown) < len(rows):
                click.echo(f"    ... {len(rows) - len(shown)} more (--limit 0 lists all, --json gives every one)")

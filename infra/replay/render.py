"""Replay's report as a human-readable table, and its progress display on a terminal."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from infra.replay.report import OK, PENDING_CLOSE, PENDING_CLOSE_NOTE, KeyDiff, ReplayReport, _dec, _iso

__all__ = ["progress_display", "render_table"]


@contextmanager
def progress_display(stream: IO[str], *, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar for the scan on ``stream`` (records read of records to read, rate, time left), or
    None when not ``enabled`` (``--json``, or not a terminal). Removed from the screen when done."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class _Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{speed:,.0f} records/s")

    console = Console(file=stream, force_terminal=True)
    with Progress(
        TextColumn("replay: scanning"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("scan", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _label(k: KeyDiff) -> str:
    """A key's label; a key pending close that also differs says how."""
    if k.label == PENDING_CLOSE and k.difference != OK:
        return f"{PENDING_CLOSE}, {k.difference}"
    return k.label


def render_table(report: ReplayReport, limit: int = 50) -> list[str]:
    """The human-readable report, as lines."""
    c = report.counts
    out = [
        f"topic {report.topic}: {len(report.ranges)} partition(s), offsets "
        + ", ".join(f"{r.partition}:[{r.start},{r.end})" for r in report.ranges)
        + ("" if report.complete else "  (partial offset range: per-bucket units not compared)"),
    ]
    lo, hi = report.window_ms
    if lo is not None or hi is not None:
        out.append(
            f"tick window: [{'-' if lo is None else _iso(lo // 1000)}, {'-' if hi is None else _iso(hi // 1000)})"
        )
    if report.clipped:
        out.append(
            f"the range reaches past the ledger's dedup horizon {_iso(report.horizon_s)}: retention dropped the "
            "ticks before it, so ticks and buckets are compared from the horizon on (earlier ticks count as "
            "outside the window)"
        )
    if report.compared_buckets:
        a, b = report.compared_buckets
        out.append(f"buckets compared: {_iso(a)} .. {_iso(b)} (bucket starts, inclusive)")
    out.append(
        f"records {c['records']:,}  ticks read {c['ticks_read']:,}  selected {c['selected']:,}  "
        f"unique {c['unique']:,}  duplicates {c['duplicates']:,}  rejected {c['rejected']:,}  "
        f"other types {c['ignored_type']:,}"
    )
    if report.rejected:
        out.append("rejected by reason: " + ", ".join(f"{k}={v}" for k, v in report.rejected.items()))
    if report.unbilled:
        out.append("counted, not billed: " + ", ".join(f"{k}={v[0]} ticks" for k, v in sorted(report.unbilled.items())))
    out.append(
        f"missing from ledger {c['missing_from_ledger']:,}  extra in ledger {c['extra_in_ledger']:,}  "
        f"(org, bucket, meter) compared {c['compared_keys']:,}, differing {c['differing_keys']:,}"
    )
    if report.labels:
        out.append("(org, bucket, meter) by label: " + ", ".join(f"{k} {v:,}" for k, v in report.labels.items()))
    if report.keys:
        out.append("")
        out.append(
            f"{'org':<20} {'bucket':<17} {'meter':<34} {'re-derived':>16} {'billed':>16} {'pending close':>14} "
            f"{'difference':>14} {'missing':>14}  label"
        )
        for k in report.keys[:limit]:
            w = k.to_wire()
            out.append(
                f"{k.org_id:<20} {_iso(k.bucket_start):<17} {k.meter:<34} {w['derived']:>16} {w['billed']:>16} "
                f"{w['pending_close']:>14} {w['diff'] if k.compared else 'n/c':>14} {w['missing']:>14}  {_label(k)}"
            )
        if len(report.keys) > limit:
            out.append(f"... {len(report.keys) - limit} more (--limit 0 shows all)")
        out.append(
            "(GB-s for the unified meter, seconds for tier meters; n/c = bucket not wholly in the range; "
            "difference = re-derived - billed - pending close)"
        )
    if report.org_meters:
        out.append("")
        out.append(f"{'org':<20} {'meter':<34} {'re-derived value':>18} {'billed value':>18} {'difference':>14}")
        for o in report.org_meters[:limit]:
            note = "" if o.units_agree else "  (units differ)"
            if o.open_units:
                note += "  (includes usage pending close: not billed yet)"
            out.append(
                f"{o.org_id:<20} {o.meter:<34} {_dec(o.derived_value):>18} {_dec(o.billed_value):>18} "
                f"{_dec(o.value_diff):>14}{note}"
            )
    for label, ids in (("missing from ledger", report.missing_ids), ("extra in ledger", report.extra_ids)):
        if ids:
            shown = ids[:limit]
            more = f" ... (+{len(ids) - len(shown)})" if len(ids) > len(shown) else ""
            out.append(f"{label}: " + ", ".join(shown) + more)
    pending = report.pending_keys
    if pending:
        out.append("")
        out.append(f"pending close: {len(pending)} (org, bucket, meter): {PENDING_CLOSE_NOTE}")
    out.append("")
    if report.has_differences:
        out.append(
            f"DIFFERENCES: {c['missing_from_ledger']} missing tick(s), {c['extra_in_ledger']} extra sample(s), "
            f"{c['differing_keys']} (org, bucket, meter) differing"
            + (f"; {len(pending)} (org, bucket, meter) pending close" if pending else "")
        )
    elif pending:
        out.append(
            f"PENDING CLOSE: {len(pending)} (org, bucket, meter) hold usage not billed yet, nothing else differs "
            "(not clean: the closer's next run bills it; replay again after it)"
        )
    else:
        out.append("no difference")
    out.append(f"({report.seconds:.2f}s, {report.jobs} scan process(es))")
    return out

"""``edgebill ledger``: meter rows, counters, unbilled usage, the ledger's size, and retention (reads the ledger;
never creates one; ``--compact`` is the only option that writes)."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import click

from infra.cli._base import CannotRun, cli, iso, open_ledger, settings_for_cli
from models.billing import RowState
from models.retention import retention_problem

if TYPE_CHECKING:
    from infra.settings import Settings
    from sinks.ledger import Ledger
    from sinks.retention import CompactResult, Retention, RetentionPlan, TableSize


def _days(value: int | None) -> int | None:
    if value is not None and (problem := retention_problem(value)):
        raise click.BadParameter(problem, param_hint="--days")
    return value


@cli.command()
@click.option("--org", "org_id", default=None)
@click.option("--state", type=click.Choice([s.value for s in RowState]), default=None, help="Only rows in this state.")
@click.option("--bucket", type=int, default=None, help="Bucket start (unix s).")
@click.option("--json", "as_json", is_flag=True, help="Rows (or the summary, or the compaction) as JSON.")
@click.option(
    "--summary", is_flag=True, help="Counts by state, counters, unbilled usage, the ledger's size and retention."
)
@click.option(
    "--compact",
    is_flag=True,
    help="Drop the per-tick data of retired buckets now (what the leader's retention timer does).",
)
@click.option("--dry-run", is_flag=True, help="With --compact: say what it would drop, drop nothing.")
@click.option(
    "--days",
    type=int,
    default=None,
    callback=lambda _c, _p, v: _days(v),
    help="With --compact: this retention instead of EDGEBILL_RETENTION_DAYS.",
)
@click.option("--vacuum", is_flag=True, help="With --compact on PostgreSQL: VACUUM the tables afterwards.")
def ledger(
    org_id: str | None,
    state: str | None,
    bucket: int | None,
    as_json: bool,
    summary: bool,
    compact: bool,
    dry_run: bool,
    days: int | None,
    vacuum: bool,
) -> None:
    """Meter rows by state, org, bucket; counters; usage counted but not billed (and why); the ledger's size
    and what retention would free (--summary); retention run by hand (--compact [--dry-run])."""
    if (dry_run or days is not None or vacuum) and not compact:
        raise click.UsageError("--dry-run, --days and --vacuum go with --compact")
    s = settings_for_cli()
    led = open_ledger(s)
    try:
        if compact:
            _compact(s, led, as_json=as_json, dry_run=dry_run, days=days, vacuum=vacuum)
        elif summary:
            _summary(s, led, as_json=as_json)
        else:
            _rows(led, org_id=org_id, state=state, bucket=bucket, as_json=as_json)
    finally:
        led.dispose()


def _rows(led: Ledger, *, org_id: str | None, state: str | None, bucket: int | None, as_json: bool) -> None:
    rows = led.rows(org=org_id, state=state, bucket=bucket)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    click.echo(f"{'id':<60} {'bucket (UTC)':<20} {'value':>16} {'state':<26} {'sent (UTC)':<20} error")
    for r in rows:
        sent = iso(r["sent_ms"] / 1000) if r.get("sent_ms") else "-"
        click.echo(
            f"{r['id']:<60} {iso(r['bucket_start']):<20} {r['value']:>16} {r['state']:<26} {sent:<20} "
            f"{r['last_error'] or ''}"
        )
    click.echo(f"{len(rows)} row(s); by state: {led.state_counts()}")


def _retention(s: Settings, led: Ledger) -> Retention:
    from sinks.retention import Retention

    stored = led.stored_bucket_seconds()
    if stored is not None and stored != s.billing.bucket_seconds:
        raise CannotRun(
            f"this ledger was built with EDGEBILL_BUCKET_SECONDS={stored}, the settings say {s.billing.bucket_seconds}",
            "set EDGEBILL_BUCKET_SECONDS to the ledger's",
        )
    return Retention(led.engine, bucket_seconds=s.billing.bucket_seconds)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _summary(s: Settings, led: Ledger, *, as_json: bool) -> None:
    states, counters, unbilled = led.state_counts(), led.counters(), led.unbilled()
    ret = _retention(s, led)
    sizes = ret.sizes()
    days = s.billing.retention_days
    plan = ret.plan(_now_ms(), days, estimate_bytes=True)
    stored, open_ticks = led.stored_ticks(), led.open_samples()
    if as_json:
        out = {
            "rows_by_state": states,
            "ticks": {"stored": stored, "not_aggregated": open_ticks},
            "counters": counters,
            "unbilled": unbilled,
            "tables": [_size_wire(t) for t in sizes],
            "retention": {"enabled": days > 0, **plan.to_wire()},
        }
        click.echo(json.dumps(out, indent=2, default=str))
        return
    click.echo("rows by state: " + (", ".join(f"{k}={v}" for k, v in sorted(states.items())) or "none"))
    click.echo(f"ticks stored: {stored:,} in tick batches ({open_ticks:,} not aggregated into meter rows yet)")
    click.echo("counters:")
    for name, value in sorted(counters.items()):
        click.echo(f"  {name:<40} {value:>14,}")
    click.echo("counted, not billed:" + ("" if unbilled else " none"))
    if unbilled:
        click.echo(f"  {'org':<24} {'bucket (UTC)':<20} {'reason':<28} {'samples':>10} {'GB-s':>16}")
    for u in unbilled:
        click.echo(
            f"  {u['org_id']:<24} {iso(u['bucket_start']):<20} {u['reason']:<28} {u['samples']:>10,} "
            f"{u['mb_seconds'] / 1024:>16,.3f}"
        )
    _echo_sizes(sizes)
    _echo_plan(plan, enabled=days > 0)


def _size_wire(t: TableSize) -> dict[str, Any]:
    return {"table": t.name, "rows": t.rows, "rows_estimated": t.estimated, "bytes": t.bytes}


def _echo_sizes(sizes: list[TableSize]) -> None:
    total = sum(t.bytes for t in sizes)
    click.echo(f"ledger size: {_mib(total)} (tables with their indexes; rows ≈ on PostgreSQL)")
    for t in sizes:
        if t.rows or t.bytes:
            rows = f"{'≈' if t.estimated else ''}{t.rows:,}"
            click.echo(f"  {t.name:<28} {rows:>16} rows {_mib(t.bytes):>12}")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _echo_plan(plan: RetentionPlan, *, enabled: bool) -> None:
    horizon = iso(plan.horizon_s) if plan.horizon_s else "none (nothing dropped yet)"
    if not enabled:
        click.echo(f"retention: off (EDGEBILL_RETENTION_DAYS=0): every tick is kept; dedup horizon {horizon}")
        return
    click.echo(
        f"retention: {plan.days} days; dedup horizon {horizon} (ticks before it are refused as older_than_retention)"
    )
    if plan.retire:
        click.echo(
            f"  a run now would drop {plan.samples:,} sample(s) of {len(plan.retire)} bucket(s) from "
            f"{iso(min(plan.retire))} to {iso(max(plan.retire))}, about {_mib(plan.frees_bytes)}, and move the "
            f"horizon to {iso(plan.new_horizon_s)}"
        )
    else:
        click.echo(f"  a run now would drop nothing (buckets ending by {iso(plan.retire_before_s)} may go)")
    for why, buckets in sorted(plan.held.items()):
        click.echo(f"  kept for now, {why}: {len(buckets)} bucket(s) from {iso(min(buckets))} to {iso(max(buckets))}")


def _compact(s: Settings, led: Ledger, *, as_json: bool, dry_run: bool, days: int | None, vacuum: bool) -> None:
    keep = s.billing.retention_days if days is None else days
    if keep <= 0:
        raise click.UsageError("retention is off (EDGEBILL_RETENTION_DAYS=0): pass --days N (at least 35) to run it")
    ret = _retention(s, led)
    if dry_run:
        plan = ret.plan(_now_ms(), keep, estimate_bytes=True)
        if as_json:
            click.echo(json.dumps({"dry_run": True, **plan.to_wire()}, indent=2))
        else:
            _echo_plan(plan, enabled=True)
        return
    from sinks.parity import ParityStore

    result = ret.compact(_now_ms(), keep, parity=ParityStore(led.engine, bucket_seconds=ret.bucket_seconds))
    if vacuum:
        ret.vacuum()
    _echo_result(result, as_json=as_json)


def _echo_result(result: CompactResult, *, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result.to_wire(), indent=2))
        return
    horizon = iso(result.horizon_s) if result.horizon_s else "none"
    click.echo(
        f"dropped {result.samples:,} sample(s) of {result.buckets} bucket(s) and {result.intervals:,} cell "
        f"interval(s) in {result.transactions} transaction(s), {result.seconds:.1f} s; dedup horizon {horizon}"
    )
    for why, buckets in sorted(result.plan.held.items()):
        click.echo(f"kept for now, {why}: {len(buckets)} bucket(s) from {iso(min(buckets))} to {iso(max(buckets))}")

"""``edgebill replay``: re-derive a range of ``usage-ticks`` and diff it against the ledger."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from infra.cli._base import broker_errors, cli, open_ledger, parse_time, require_broker, settings_for_cli
from models.errors import EdgebillError


class _ReplayFailed(click.ClickException):
    """--apply refused, or the replay failed midway: exit 2 (1 means: it ran and found differences)."""

    exit_code = 2


def _partition_offsets(values: tuple[str, ...], flag: str) -> dict[int | None, int]:
    """``[P:]N`` values -> {partition or None (= every partition): offset}."""
    out: dict[int | None, int] = {}
    for v in values:
        part, sep, off = v.rpartition(":")
        try:
            out[int(part) if sep else None] = int(off)
        except ValueError as exc:
            raise click.BadParameter(f"{v!r} is not OFFSET or PARTITION:OFFSET", param_hint=flag) from exc
    return out


@cli.command()
@click.option("--partition", "partitions", type=int, multiple=True, help="Only this partition (repeatable).")
@click.option("--from-offset", "from_offsets", multiple=True, help="[PARTITION:]OFFSET to start at (inclusive).")
@click.option("--to-offset", "to_offsets", multiple=True, help="[PARTITION:]OFFSET to stop before (exclusive).")
@click.option("--since", default=None, help="Only ticks stamped at or after: unix s or RFC 3339.")
@click.option("--until", default=None, help="Only ticks stamped before: unix s or RFC 3339.")
@click.option("--bucket-from", default=None, help="First bucket (its start, or any time inside it).")
@click.option("--bucket-to", default=None, help="Last bucket, inclusive (its start, or any time inside it).")
@click.option("--dry-run/--apply", "dry_run", default=True, show_default=True, help="Only diff, or write the missing.")
@click.option("--force", is_flag=True, help="--apply even beyond Stripe's 35 days or with unexplained differences.")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON.")
@click.option("--limit", type=int, default=50, show_default=True, help="Rows and ids shown (0 = all).")
@click.option("--jobs", type=int, default=None, help="Scan processes (default: one per CPU; small ranges: 1).")
def replay(
    partitions: tuple[int, ...],
    from_offsets: tuple[str, ...],
    to_offsets: tuple[str, ...],
    since: str | None,
    until: str | None,
    bucket_from: str | None,
    bucket_to: str | None,
    dry_run: bool,
    force: bool,
    as_json: bool,
    limit: int,
    jobs: int | None,
) -> None:
    """Re-derive a range of usage-ticks and diff it against what the ledger billed.

    Reads the topic without a consumer group (never commits, never disturbs a worker), prices every unique
    tick as the closer does, and compares: ticks missing from the ledger, samples the topic does not hold,
    units per (org, bucket, meter) and values per (org, meter). Exit 0 when there is no difference, 1 when
    there is, 2 when the replay could not run or --apply refused. --apply writes only the missing ticks
    into the ledger (the closer turns them into correction rows, the sender ships them) and exits 0 when
    that accounts for every difference.
    """
    from infra.replay import ReplayRefused, ReplaySpec, apply_missing, render_table, run_replay
    from models.topics import TOPIC_TICKS

    s = settings_for_cli()
    spec = ReplaySpec(
        topic=s.kafka.topic(TOPIC_TICKS),
        partitions=tuple(partitions) or None,
        from_offsets=_partition_offsets(from_offsets, "--from-offset"),
        to_offsets=_partition_offsets(to_offsets, "--to-offset"),
        since_ms=parse_time(since) * 1000 if since else None,
        until_ms=parse_time(until) * 1000 if until else None,
        bucket_from=parse_time(bucket_from) if bucket_from else None,
        bucket_to=parse_time(bucket_to) if bucket_to else None,
    )
    # The ledger must exist (a new, empty one would make every tick "missing"); no migration either way (it
    # takes the write lock a running worker's ledger uses). A broker that does not answer: exit 2 now, not
    # a traceback from the scan.
    led = open_ledger(s)
    try:
        require_broker(s)
    except click.ClickException:
        led.dispose()
        raise
    applied: dict[str, Any] | None = None
    refused: list[str] = []
    try:
        try:
            with broker_errors(s):
                result = run_replay(led, s.kafka.servers, spec, bucket_seconds=s.billing.bucket_seconds, jobs=jobs)
            if not dry_run:
                try:
                    res = apply_missing(led, result, force=force)
                    applied = {"offered": res.offered, "inserted": res.inserted}
                    applied["already_present"] = res.offered - res.inserted
                except ReplayRefused as exc:
                    refused = exc.reasons
        except EdgebillError as exc:
            raise _ReplayFailed(str(exc)) from exc
    finally:
        led.dispose()
    report = result.report
    if as_json:
        out = report.to_wire(limit)
        if not dry_run:
            out["applied"] = applied
            out["refused"] = refused
        click.echo(json.dumps(out, indent=2))
    else:
        for line in render_table(report, limit or len(report.keys) + len(report.missing_ids) + 1):
            click.echo(line)
        if applied is not None:
            click.echo(
                f"applied: {applied['inserted']} missing tick(s) written to the ledger "
                f"({applied['already_present']} were present by then); the closer turns them into rows "
                "(corrections …:r{n} for closed buckets) and the sender ships them"
            )
    if refused:
        for r in refused:
            click.echo(f"refused: {r}", err=True)
        raise _ReplayFailed("nothing applied (--force to apply anyway)")
    if applied is not None:  # what remains after applying: differences the missing ticks do not explain
        remaining = bool(report.extra_ids) or any(k.diff_units and not k.explained for k in report.keys)
        sys.exit(1 if remaining else 0)
    sys.exit(0 if report.clean else 1)

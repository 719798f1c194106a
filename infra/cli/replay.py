"""``edgebill replay``: re-derive a range of ``usage-ticks`` and diff it against the ledger."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from infra.cli._base import (
    broker_errors,
    cli,
    error_fields,
    ledger_label,
    mark_reported,
    open_ledger,
    parse_time,
    require_broker,
    settings_for_cli,
)
from models.errors import EdgebillError


class _ReplayFailed(click.ClickException):
    """--apply refused, or the replay failed midway: exit 2 (1 means: it ran and found differences)."""

    exit_code = 2


_NOTHING_APPLIED = "nothing applied"
_FORCE_HINT = "--force to apply anyway"


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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


@cli.command()
@click.option("--partition", "partitions", type=int, multiple=True, help="Only this partition (repeatable).")
@click.option("--from-offset", "from_offsets", multiple=True, help="[PARTITION:]OFFSET to start at (inclusive).")
@click.option("--to-offset", "to_offsets", multiple=True, help="[PARTITION:]OFFSET to stop before (exclusive).")
@click.option("--since", default=None, help="Only ticks stamped at or after: unix s or RFC 3339.")
@click.option("--until", default=None, help="Only ticks stamped before: unix s or RFC 3339.")
@click.option("--bucket-from", default=None, help="First bucket (its start, or any time inside it).")
@click.option("--bucket-to", default=None, help="Last bucket, inclusive (its start, or any time inside it).")
@click.option("--org", "orgs", multiple=True, help="Only this org (repeatable).")
@click.option(
    "--dry-run/--apply", "dry_run", default=True, show_default=True, help="Only diff, or repair the differences."
)
@click.option("--force", is_flag=True, help="--apply even beyond Stripe's 35 days or with unexplained differences.")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON (no progress display).")
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
    orgs: tuple[str, ...],
    dry_run: bool,
    force: bool,
    as_json: bool,
    limit: int,
    jobs: int | None,
) -> None:
    """Re-derive a range of usage-ticks and diff it against what the ledger billed; --apply repairs.

    Reads the topic without a consumer group (never commits, never disturbs a worker), prices every unique
    tick as the closer does, and compares: ticks missing from the ledger, samples the topic does not hold,
    units per (org, bucket, meter) — each labelled ok, missing, under-billed or over-billed — and values per
    (org, meter). --apply writes the missing ticks (the closer turns them into correction rows), and repairs
    under- and over-billing with correction rows: an over-billing still inside Stripe's 24 h window is
    cancelled at Stripe and resent with its corrected value, an older one gets a negative correction.

    Replay mends differences between the topic and the ledger. Differences between the ledger and Stripe
    (Stripe lost rows, or holds more than the ledger sent) are `edgebill reconcile --repair`'s.

    An (org, bucket, meter) whose ticks are in the ledger but not yet aggregated into meter rows is labelled
    pending_close with those units: Stripe has not been billed for them, so the report is not clean. Billing
    them is the closer's job (its next run does it); --apply writes no correction for them.

    \b
    Exit codes:
      0  no difference and nothing pending close (or --apply accounted for every difference)
      1  differences (missing or extra ticks, a differing key), whether or not some key is pending close
      2  the replay could not run (broker or ledger unreachable: one line on stderr), or --apply refused
      4  no difference, but some compared key is pending_close (never to be read as clean)
    """
    from sqlalchemy.exc import DBAPIError

    from infra.replay import (
        EXIT_CLEAN,
        EXIT_DIFFERENCES,
        EXIT_PENDING_CLOSE,
        ReplaySpec,
        apply_missing,
        apply_problems,
        apply_repairs,
        progress_display,
        render_table,
        repair_problems,
        repairable,
        run_replay,
    )
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
        orgs=tuple(orgs) or None,
    )
    # The ledger must exist (a new, empty one would make every tick "missing"); no migration either way (it
    # takes the write lock a running worker's ledger uses). A ledger or a broker that cannot be reached:
    # exit 2 now with the one line that matters, not a traceback from the scan; the ledger is named after.
    url = s.db.resolved_url
    led = open_ledger(s, quiet=True)
    try:
        require_broker(s)
    except click.ClickException:
        led.dispose()
        raise
    click.echo(f"ledger: {ledger_label(url)}", err=True)
    applied: dict[str, Any] | None = None
    repaired: dict[str, Any] | None = None
    refused: list[str] = []
    remaining = False
    try:
        try:
            with (
                broker_errors(s),
                progress_display(sys.stderr, enabled=not as_json and sys.stderr.isatty()) as progress,
            ):
                result = run_replay(
                    led, s.kafka.servers, spec, bucket_seconds=s.billing.bucket_seconds, jobs=jobs, progress=progress
                )
            if not dry_run:
                now_ms = time.time_ns() // 1_000_000
                refused = apply_problems(result, now_ms=now_ms) + repair_problems(result, now_ms=now_ms)
                if not refused or force:
                    refused = []
                    res = apply_missing(led, result, force=True, now_ms=now_ms)
                    applied = {"offered": res.offered, "inserted": res.inserted, "too_old": res.too_old}
                    applied["already_present"] = res.offered - res.inserted - res.too_old
                    fixed = apply_repairs(led, result, cancel=_canceller(s), now_ms=now_ms)
                    repaired = fixed.to_wire()
                    handled = {(k.org_id, k.bucket_start, k.meter) for k in repairable(result)}
                    handled -= {(x["org_id"], x["bucket_start"], x["meter"]) for x in fixed.skipped}
                    remaining = bool(result.report.extra_ids or fixed.errors or fixed.skipped) or any(
                        k.diff_units and not k.explained and (k.org_id, k.bucket_start, k.meter) not in handled
                        for k in result.report.keys
                    )
        except EdgebillError as exc:
            raise _ReplayFailed(str(exc)) from exc
        except DBAPIError as exc:
            raise _ReplayFailed(f"the ledger at {_safe(url)} failed: {_one_line(exc.orig or exc)}") from None
        except (OSError, ConnectionError) as exc:
            raise _ReplayFailed(f"the Kafka broker at {s.kafka.servers} failed: {_one_line(exc)}") from None
    finally:
        led.dispose()
    report = result.report
    if as_json:
        out = report.to_wire(limit)
        if not dry_run:
            out["applied"] = applied
            out["repaired"] = repaired
            out["refused"] = refused
            if refused:
                out.update(error_fields(_NOTHING_APPLIED, _ReplayFailed.exit_code, _FORCE_HINT))
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
            if applied["too_old"]:
                click.echo(
                    f"refused by the ledger: {applied['too_old']} tick(s) before its dedup horizon (retention "
                    "moved it since the replay read it)"
                )
        if repaired is not None:
            for line in _render_repairs(repaired):
                click.echo(line)
            if report.pending_keys:
                click.echo(
                    f"not repaired: {len(report.pending_keys)} (org, bucket, meter) pending close: the closer bills "
                    "them on its next run"
                )
    if refused:
        for r in refused:
            click.echo(f"refused: {r}", err=True)
        failed = _ReplayFailed(f"{_NOTHING_APPLIED} ({_FORCE_HINT})")
        raise mark_reported(failed) if as_json else failed  # the report above says it
    if applied is not None:  # what remains after applying: differences neither the ticks nor the repairs cover
        sys.exit(EXIT_DIFFERENCES if remaining else EXIT_PENDING_CLOSE if report.pending_keys else EXIT_CLEAN)
    sys.exit(report.exit_code)


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _canceller(s: Any) -> Any:
    """Cancels one meter event at Stripe (event_name, identifier) -> Cancellation."""
    from sinks.stripe.v1 import cancel_meter_event, make_client

    client = make_client(s.stripe.api_key.get_secret_value(), s.stripe.base, timeout=s.stripe.timeout)
    return lambda event_name, identifier: cancel_meter_event(client, event_name, identifier)


def _render_repairs(r: dict[str, Any]) -> list[str]:
    lines = [
        f"repaired: {len(r['cancelled'])} row(s) cancelled at Stripe, {len(r['corrections'])} correction row(s) "
        "written (the sender ships the pending ones)"
    ]
    for c in r["corrections"]:
        lines.append(f"  {c['id']}  {c['value']}  {c['state']}")
    for c in r["credit_needed"]:
        lines.append(f"  credit needed (Stripe cannot take it): {c['org_id']} {c['bucket_start']} {c['meter']}")
    for e in r["errors"]:
        lines.append(f"  cancel failed: {e['id']}: {e['error']}")
    for k in r["skipped"]:
        lines.append(f"  not repaired: {k['org_id']} {k['bucket_start']} {k['meter']}: {k['why']}")
    return lines

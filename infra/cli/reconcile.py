"""``edgebill reconcile``: what the ledger sent against what Stripe holds; the upcoming invoices; repairs."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import TYPE_CHECKING

import click

from infra.cli._base import (
    CannotRun,
    cli,
    iso,
    ledger_label,
    ledger_unreachable,
    open_ledger,
    parse_time,
    settings_for_cli,
)
from infra.settings import bootstrap_cutover
from models.reconcile import DAY, Grouping, dec, grouping_for

if TYPE_CHECKING:
    from infra.settings import Settings
    from sinks.reconciliation import ReconcileReport, RepairReport


@cli.command()
@click.option(
    "--from", "from_", default=None, help="Range start: unix s or RFC 3339 (default: the lookback's first day)."
)
@click.option("--to", "to", default=None, help="Range end, exclusive (default: the end of today, UTC).")
@click.option("--org", "orgs", multiple=True, help="Only this org (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON (exact decimal strings).")
@click.option(
    "--invoice",
    is_flag=True,
    help="Check each pro org's upcoming invoice (the current period; Stripe's preview) instead.",
)
@click.option("--repair", is_flag=True, help="Repair the short windows through the outbox (see below).")
def reconcile(
    from_: str | None, to: str | None, orgs: tuple[str, ...], as_json: bool, invoice: bool, repair: bool
) -> None:
    """The ledger's sent totals per (org, meter, day) against Stripe's meter event summaries.

    A range whose ends are UTC midnights is compared per day, any other per hour. Windows not closed, not
    sent, or sent less than EDGEBILL_STRIPE_AUDIT_SETTLE seconds ago are listed as not settled and not
    compared. Labels: ok, short, over, unknown_customer, meter_misconfigured; each difference names its likely
    causes. --invoice compares each pro org's upcoming invoice (usage quantities of the current period).

    --repair queues the rows Stripe does not hold again under their own identifiers, and bills again under a
    new identifier (the next revision of the bucket) the rows whose identifier is lost (refused after the send,
    or cancelled); the running worker's sender ships them. An over window is never repaired: it is reported
    for the over-billing path (`edgebill replay --apply`).

    Exit 0: everything compared matches; 1: a difference; 2: Stripe or the ledger cannot be read.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from infra.runtime import build_reconciliation

    s = settings_for_cli()
    now = int(time.time())
    today = now // DAY * DAY
    hi = parse_time(to) if to else today + DAY
    lo = parse_time(from_) if from_ else today - (s.stripe.audit_lookback_days - 1) * DAY
    if hi <= lo:
        raise click.BadParameter("--to must be after --from")
    if repair and invoice:
        raise click.UsageError("--repair repairs windows; run it without --invoice")
    led = open_ledger(s, quiet=True)
    if repair and not led.effective_cutover(bootstrap_cutover(s.billing)).state.live:
        led.dispose()
        raise CannotRun(
            "--repair while the cutover state in force is shadow",
            "the outbox sends nothing in shadow: repair once edgebill sends (`edgebill cutover status`)",
        )
    if not as_json:
        click.echo(f"ledger: {ledger_label(s.db.resolved_url)}", err=True)
    try:
        rec = build_reconciliation(s, led.engine)
        try:
            only = list(orgs) or None
            report = rec.invoices(orgs=only) if invoice else rec.compare(lo, hi, grouping_for(lo, hi), orgs=only)
            if report.failure is None and report.requests == 0:
                # Nothing needed a Stripe read (no rows, no subscription): still say whether Stripe answers.
                probe = rec.reader.meters()
                if probe.problem is not None and probe.problem.fatal:
                    report.failure = f"reading the billing meters: {probe.problem}: {probe.detail}"
            if report.failure is not None:
                raise _stripe_unreachable(s, report.failure)
            fixed = rec.repair(report, by=f"cli:{socket.gethostname()}:{os.getpid()}") if repair else None
        except SQLAlchemyError as exc:
            raise ledger_unreachable(s, exc) from exc
    finally:
        led.dispose()
    if as_json:
        out = report.to_wire()
        if invoice:
            out.pop("windows")
            out.pop("unsettled")
        if fixed is not None:
            out["repair"] = fixed.to_wire()
        click.echo(json.dumps(out, indent=2))
    elif invoice:
        _show_invoice(s, report)
    else:
        _show(s, report)
        if fixed is not None:
            _show_repair(fixed)
    differs = report.invoice_differences if invoice else report.differences
    if differs:
        raise SystemExit(1)


def _stripe_unreachable(s: Settings, failure: str) -> CannotRun:
    return CannotRun(
        f"cannot read Stripe at {s.stripe.base}",
        "check EDGEBILL_STRIPE_API_BASE, EDGEBILL_STRIPE_API_KEY and the network",
        failure,
    )


def _show(s: Settings, rep: ReconcileReport) -> None:
    unit = "UTC days" if rep.grouping is Grouping.DAY else "UTC hours"
    click.echo(
        f"Stripe at {s.stripe.base}, {iso(rep.lo)} .. {iso(rep.hi)} ({unit}): {len(rep.results)} window(s) compared, "
        f"{len(rep.differences)} differ, {len(rep.unsettled)} not settled; {rep.requests} Stripe request(s), "
        f"{rep.throttled} throttled"
    )
    for note in rep.notes:
        click.echo(f"note: {note}")
    if rep.results:
        click.echo(
            f"{'window (UTC)':<21} {'org':<20} {'meter':<34} {'customer':<20} {'ledger':>18} {'stripe':>18} "
            f"{'difference':>14}  label"
        )
    for r in rep.results:
        k = r.key
        w = r.to_wire()
        click.echo(
            f"{iso(k.start):<21} {k.org_id:<20} {k.meter:<34} {k.customer:<20} {w['ledger']:>18} "
            f"{w['stripe'] or '-':>18} {w['difference'] or '-':>14}  {r.label.value}"
        )
        for c in r.causes:
            cw = c.to_wire()
            rows = (
                f" ({len(c.rows)} row(s): {', '.join(c.rows[:4])}{', ...' if len(c.rows) > 4 else ''})"
                if c.rows
                else ""
            )
            detail = f" [{c.detail}]" if c.detail else ""
            click.echo(f"    cause {c.cause.value}: {cw['value']}{rows}: {cw['explains']}{detail}")
    if rep.unsettled:
        click.echo("not settled (not compared):")
        for u in rep.unsettled:
            click.echo(f"    {iso(u.start):<21} {u.org_id:<20} {u.meter:<34} {u.reason}")
    if rep.differences:
        click.echo(
            "repair: `edgebill reconcile --repair` re-sends the short windows' rows Stripe does not hold; "
            "over windows go to the over-billing path (`edgebill replay --apply`)"
        )


def _show_invoice(s: Settings, rep: ReconcileReport) -> None:
    click.echo(
        f"Stripe at {s.stripe.base}: {len(rep.invoices)} usage line(s) of upcoming invoices checked, "
        f"{len(rep.invoice_differences)} differ; {rep.requests} Stripe request(s), {rep.throttled} throttled"
    )
    for note in rep.notes:
        click.echo(f"note: {note}")
    if rep.invoices:
        click.echo(
            f"{'org':<20} {'subscription':<24} {'meter':<38} {'period end (UTC)':<21} {'stripe':>18} {'ledger':>18} "
            f"{'not sent':>12}  label"
        )
    for i in rep.invoices:
        click.echo(
            f"{i.org_id:<20} {i.subscription:<24} {i.meter or '(' + i.price_id + ')':<38} {iso(i.period_end):<21} "
            f"{dec(i.stripe):>18} {dec(i.ledger):>18} {dec(i.pending):>12}  {i.label.value}"
            + (f"  [{i.detail}]" if i.detail else "")
        )


def _show_repair(fixed: RepairReport) -> None:
    done = [d for d in fixed.done if d.skipped is None]
    click.echo(f"repair: {len(done)} row(s) queued in the outbox")
    for d in fixed.done:
        if d.skipped is not None:
            click.echo(f"    skipped {d.row_id}: {d.skipped}")
        elif d.new_row_id:
            click.echo(f"    {d.row_id}: lost at Stripe; billed again as {d.new_row_id} ({dec(d.value)})")
        else:
            click.echo(f"    {d.row_id}: queued again under its own identifier ({dec(d.value)})")
    for key, why in fixed.refused:
        click.echo(f"    not repaired: {key.org_id} {key.meter} {iso(key.start)}: {why}")
    if done:
        click.echo("the worker's sender ships them; run `edgebill reconcile` again once they are sent and settled")

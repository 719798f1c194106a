"""``edgebill reconcile``: what the ledger sent against what Stripe holds; the upcoming invoices; repairs."""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from typing import TYPE_CHECKING, Any

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
    from sinks.reconcile.run import ReconcileReport, RepairReport

#: Exit status of a run that compared nothing (every window not closed, not settled, nothing sent, shadow).
NOTHING_COMPARED = 3


def _default_by() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


@cli.command()
@click.option(
    "--from", "from_", default=None, help="Range start: unix s or RFC 3339 (default: the lookback, hour by hour)."
)
@click.option("--to", "to", default=None, help="Range end, exclusive (default: the end of today, UTC).")
@click.option("--org", "orgs", multiple=True, help="Only this org (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON (exact decimal strings).")
@click.option(
    "--invoice",
    is_flag=True,
    help="Check each pro org's upcoming invoice (the current period; Stripe's preview) instead.",
)
@click.option("--repair", is_flag=True, help="Plan the repairs of every difference (a dry run: see --apply).")
@click.option("--apply", "apply_", is_flag=True, help="With --repair: make them (recorded with --by, --reason).")
@click.option("--by", default=None, help="Who repairs (default: the OS user@host); recorded.")
@click.option("--reason", default="", help="Why; recorded with each repair.")
def reconcile(
    from_: str | None,
    to: str | None,
    orgs: tuple[str, ...],
    as_json: bool,
    invoice: bool,
    repair: bool,
    apply_: bool,
    by: str | None,
    reason: str,
) -> None:
    """The ledger's sent totals per (org, meter) against Stripe's meter event summaries.

    Without --from/--to: the lookback (EDGEBILL_STRIPE_AUDIT_LOOKBACK_DAYS, today included) as soon as each
    hour is settled: whole UTC days where complete, hours elsewhere; the upcoming invoices of periods ending
    within EDGEBILL_STRIPE_AUDIT_INVOICE_AHEAD_HOURS are checked too. A range whose ends are UTC midnights is
    compared per day, any other per hour. Windows not closed, not sent, or sent less than
    EDGEBILL_STRIPE_AUDIT_SETTLE seconds ago are listed as not settled and not compared. Labels: ok, short,
    over, unknown_customer, meter_misconfigured; each difference names its likely causes. --invoice compares
    each pro org's upcoming invoice (usage quantities of the current period).

    --repair plans the repair of every difference; --repair --apply makes it. Rows Stripe does not hold are
    queued again under their own identifiers, or billed again under a new identifier (the next revision of the
    bucket) when theirs is lost (refused after the send, or cancelled); the running worker's sender ships them.
    What Stripe holds beyond what edgebill sent, per hour, is taken back: a row of edgebill's that Stripe held
    with another value is cancelled at Stripe (within its 24 h) and billed again; otherwise a credit row, a
    meter event of the negative excess in that hour, lands on the invoice of its period. Once per (org, meter,
    hour, difference): a second --apply, or one after a crash, writes nothing again. Beyond Stripe's 35 days, or
    for a period whose invoice is finalized: refused, with the amount for a credit note. (Differences between
    the usage topic and the ledger are `edgebill replay --apply`'s.)

    Exit 0: everything compared matches; 1: a difference; 2: Stripe or the ledger cannot be read; 3: nothing
    was compared (said why: nothing sent, nothing settled yet, shadow) - never read as clean.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from infra.runtime import build_reconciliation

    s = settings_for_cli()
    now = int(time.time())
    today = now // DAY * DAY
    recent = from_ is None and to is None and not invoice
    hi = parse_time(to) if to else today + DAY
    lo = parse_time(from_) if from_ else today - (s.stripe.audit_lookback_days - 1) * DAY
    if hi <= lo:
        raise click.BadParameter("--to must be after --from")
    if repair and invoice:
        raise click.UsageError("--repair repairs windows; run it without --invoice")
    if apply_ and not repair:
        raise click.UsageError("--apply makes the repairs --repair plans: add --repair")
    led = open_ledger(s, quiet=True)
    shadow = not led.effective_cutover(bootstrap_cutover(s.billing)).state.live
    if apply_ and shadow:
        led.dispose()
        raise CannotRun(
            "--repair --apply while the cutover state in force is shadow",
            "the outbox sends nothing in shadow: repair once edgebill sends (`edgebill cutover status`)",
        )
    if not as_json:
        click.echo(f"ledger: {ledger_label(s.db.resolved_url)}", err=True)
    fixed: RepairReport | None = None
    recorded: list[dict[str, Any]] = []
    try:
        rec = build_reconciliation(s, led.engine)
        try:
            only = list(orgs) or None
            if invoice:
                report = rec.invoices(orgs=only)
            elif recent:
                report = rec.compare_recent(orgs=only)
                if report.failure is None:
                    rec.check_invoices(report, orgs=only, due_only=True)
                    report.requests, report.throttled = rec.reader.requests, rec.reader.throttled
            else:
                report = rec.compare(lo, hi, grouping_for(lo, hi), orgs=only)
            if report.failure is None and report.requests == 0:
                # Nothing needed a Stripe read (no rows, no subscription): still say whether Stripe answers.
                probe = rec.reader.meters()
                if probe.problem is not None and probe.problem.fatal:
                    report.failure = f"reading the billing meters: {probe.problem}: {probe.detail}"
            if report.failure is not None:
                raise _stripe_unreachable(s, report.failure)
            if repair:
                fixed = rec.repair(report, by=by or _default_by(), reason=reason, apply=apply_, cancel=_canceller(s))
            if not invoice:
                recorded = [r for r in rec.store.recent_repairs(200) if _in_range(r, report.lo, report.hi)]
        except SQLAlchemyError as exc:
            raise ledger_unreachable(s, exc) from exc
    finally:
        led.dispose()
    compared = len(report.invoices) if invoice else len(report.results) + len(report.invoices)
    if not compared:
        if invoice:
            report.why = "no pro org has a subscription with usage lines to check"
        else:
            report.explain(shadow=shadow)
    if as_json:
        out = report.to_wire()
        if invoice:
            out.pop("windows")
            out.pop("unsettled")
            out["compared"] = len(report.invoices)
        else:
            out["repairs_recorded"] = recorded
        if fixed is not None:
            out["repair"] = fixed.to_wire()
        click.echo(json.dumps(out, indent=2))
    elif invoice:
        _show_invoice(s, report)
    else:
        _show(s, report, recorded)
        if fixed is not None:
            _show_repair(fixed)
    differs = report.invoice_differences if invoice else report.differences + report.invoice_differences
    if differs:
        raise SystemExit(1)
    if not compared:
        raise SystemExit(NOTHING_COMPARED)


def _in_range(repair: dict[str, Any], lo: int, hi: int) -> bool:
    hour = repair.get("hour")
    if hour is None:
        hour = (repair.get("window") or {}).get("start")
    return hour is not None and lo <= int(hour) < hi


def _canceller(s: Settings) -> Any:
    """Stripe's cancellation of one meter event (a meter-event adjustment), with the settings' key."""
    from sinks.stripe.v1 import Cancellation, cancel_meter_event, make_client

    def cancel(event_name: str, identifier: str) -> Cancellation:
        client = make_client(s.stripe.api_key.get_secret_value(), s.stripe.base, timeout=s.stripe.timeout)
        return cancel_meter_event(client, event_name, identifier)

    return cancel


def _stripe_unreachable(s: Settings, failure: str) -> CannotRun:
    return CannotRun(
        f"cannot read Stripe at {s.stripe.base}",
        "check EDGEBILL_STRIPE_API_BASE, EDGEBILL_STRIPE_API_KEY and the network",
        failure,
    )


def _window(start: int, grouping: Grouping) -> str:
    return iso(start) + ("" if grouping is Grouping.DAY else " (h)")


def _show(s: Settings, rep: ReconcileReport, recorded: list[dict[str, Any]]) -> None:
    if rep.why is not None:
        click.echo(f"NOTHING COMPARED: {rep.why}")
    unit = {"day": "UTC days", "hour": "UTC hours"}.get(rep.grouping_name, "UTC days where complete, else hours")
    click.echo(
        f"Stripe at {s.stripe.base}, {iso(rep.lo)} .. {iso(rep.hi)} ({unit}): {len(rep.results)} window(s) compared, "
        f"{len(rep.differences)} differ, {len(rep.unsettled)} not settled; {rep.requests} Stripe request(s), "
        f"{rep.throttled} throttled"
    )
    if rep.results:
        hours = sorted(r.key.start for r in rep.results if r.key.grouping is Grouping.HOUR)
        days = sorted(r.key.start for r in rep.results if r.key.grouping is Grouping.DAY)
        parts = []
        if days:
            parts.append(f"days {iso(days[0])[:10]} .. {iso(days[-1])[:10]}")
        if hours:
            parts.append(f"hours {', '.join(iso(h)[:16] for h in hours[:48])}")
        click.echo(f"compared: {'; '.join(parts)} (newest window ends {iso(rep.newest_compared)})")
    for note in rep.notes:
        click.echo(f"note: {note}")
    if rep.results:
        click.echo(
            f"{'window (UTC)':<25} {'org':<20} {'meter':<34} {'customer':<20} {'ledger':>18} {'stripe':>18} "
            f"{'difference':>14}  label"
        )
    for r in rep.results:
        k = r.key
        w = r.to_wire()
        click.echo(
            f"{_window(k.start, k.grouping):<25} {k.org_id:<20} {k.meter:<34} {k.customer:<20} {w['ledger']:>18} "
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
        for hour, excess in r.excess:
            click.echo(f"    hour {iso(hour)}: Stripe holds {dec(excess)} more than edgebill sent")
    if rep.unsettled:
        click.echo("not settled (not compared):")
        for u in rep.unsettled:
            click.echo(f"    {_window(u.start, u.grouping):<25} {u.org_id:<20} {u.meter:<34} {u.reason}")
    if rep.invoices:
        click.echo("upcoming invoices (periods ending soon):")
        for i in rep.invoices:
            click.echo(
                f"    {i.org_id:<20} {i.meter or '(' + i.price_id + ')':<34} ends {iso(i.period_end)}  stripe "
                f"{dec(i.stripe)} ledger {dec(i.ledger)}  {i.label.value}" + (f"  [{i.detail}]" if i.detail else "")
            )
    if recorded:
        click.echo("repairs recorded for this range:")
        for rp in recorded:
            where = f"hour {iso(rp['hour'])}" if rp.get("hour") is not None else f"window {iso(rp['window']['start'])}"
            made = f" as {rp['new_row']}" if rp.get("new_row") else ""
            click.echo(
                f"    {iso(rp['created_ms'] // 1000)} {rp['action']} {rp['row']}{made} ({rp['value']}) {where} by "
                f"{rp['by']}: {rp['reason'] or '-'}"
            )
    if rep.differences:
        click.echo(
            "repair: `edgebill reconcile --repair` plans the repair of each difference (rows Stripe lacks, and what it "
            "holds beyond what edgebill sent); add --apply to make it"
        )


def _show_invoice(s: Settings, rep: ReconcileReport) -> None:
    if rep.why is not None:
        click.echo(f"NOTHING COMPARED: {rep.why}")
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
    if not fixed.applied:
        click.echo(
            f"repair plan (dry run, nothing written: add --apply): {len(fixed.planned)} row(s) Stripe lacks, "
            f"{len(fixed.over)} hour(s) Stripe holds more of"
        )
        for _key, step in fixed.planned:
            what = "queue again under its own identifier" if step.action.value == "resend" else "bill again (new row)"
            click.echo(f"    {step.row_id}: {what} ({dec(step.value)}; {step.cause.value})")
        for o in fixed.over:
            if o.action.value == "credit":
                click.echo(
                    f"    {o.org_id} {o.meter} hour {iso(o.hour)}: Stripe holds {dec(o.excess)} more: a credit row of "
                    f"{dec(o.value)} at {iso(o.bucket_end)}"
                )
            else:
                click.echo(
                    f"    {o.org_id} {o.meter} hour {iso(o.hour)}: Stripe holds {dec(o.excess)} more under {o.row_id}: "
                    f"cancel it at Stripe and bill its {dec(o.value)} again under a new identifier"
                )
    else:
        done = [d for d in fixed.done if d.skipped is None]
        over = [d for d in fixed.over_done if d.skipped is None]
        click.echo(f"repair: {len(done)} row(s) queued in the outbox, {len(over)} over-billed hour(s) taken back")
        for d in fixed.done:
            if d.skipped is not None:
                click.echo(f"    skipped {d.row_id}: {d.skipped}")
            elif d.new_row_id:
                click.echo(f"    {d.row_id}: lost at Stripe; billed again as {d.new_row_id} ({dec(d.value)})")
            else:
                click.echo(f"    {d.row_id}: queued again under its own identifier ({dec(d.value)})")
        for od in fixed.over_done:
            ost = od.step
            if od.skipped is not None:
                click.echo(
                    f"    skipped {ost.org_id} {ost.meter} hour {iso(ost.hour)}: {od.skipped} ({od.row_id or '-'})"
                )
            elif ost.action.value == "credit":
                click.echo(
                    f"    {ost.org_id} {ost.meter} hour {iso(ost.hour)}: credit row {od.row_id} "
                    f"({dec(ost.value)}) queued"
                )
            else:
                click.echo(
                    f"    {ost.org_id} {ost.meter} hour {iso(ost.hour)}: {ost.row_id} cancelled at Stripe; "
                    f"billed again as {od.row_id} ({dec(ost.value)})"
                )
        for err in fixed.errors:
            click.echo(f"    not done: {err}")
        if done or over:
            click.echo("the worker's sender ships them; run `edgebill reconcile` again once they are sent and settled")
    for key, why in fixed.refused:
        click.echo(f"    not repaired: {key.org_id} {key.meter} {iso(key.start)}: {why}")

"""``edgebill cutover status | plan | arm | rollback | release | publish``: the cutover as an operation.

Exit codes: 0 done; 1 recorded and in force at the edge but not published on the control topic (the broker
could not be reached), or a cancellation at Stripe failed; 2 refused (every reason on stderr, nothing
changed).
"""

from __future__ import annotations

import getpass
import json
import socket
import sys
import time
from decimal import Decimal
from typing import Any

import click

from infra.cli._base import (
    NoLedger,
    cli,
    error_fields,
    ledger_for_writing,
    ledger_label,
    open_ledger,
    parse_time,
    settings_for_cli,
)
from models.errors import CutoverRefused


def _default_by() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _ops(s: Any, led: Any) -> Any:
    """The operation context from the settings: ledger, parity gate, bootstrap state, publisher, Stripe."""
    from infra.cutover import CutoverOps
    from infra.kafka_admin import ensure_topics, kafka_answers
    from infra.kafka_io import publish_sync
    from infra.runtime import CONTROL_TOPIC_CONFIG, topics
    from infra.settings import bootstrap_cutover
    from models.cutover import CONTROL_KEY, CutoverState
    from models.errors import BrokerError
    from sinks.parity import ParityStore
    from sinks.stripe.v1 import Cancellation, cancel_meter_event, make_client

    servers = s.kafka.servers
    control = topics(s).control

    def publish(state: CutoverState) -> None:
        if not kafka_answers(servers, timeout=3.0):
            raise BrokerError(f"no Kafka broker answers on {servers}")
        try:  # created compacted if no worker has created it yet (a plain produce would auto-create it)
            ensure_topics(
                servers,
                {control: 1},
                replication_factor=s.kafka.replication_factor,
                configs={control: dict(CONTROL_TOPIC_CONFIG)},
            )
            publish_sync(servers, control, [(CONTROL_KEY.encode(), state.to_json())])
        except BrokerError:
            raise
        except Exception as exc:  # aiokafka's errors: the change stays recorded, unpublished
            raise BrokerError(f"publishing on {control} failed: {type(exc).__name__}: {exc}") from exc

    def cancel(event_name: str, identifier: str) -> Cancellation:
        client = make_client(s.stripe.api_key.get_secret_value(), s.stripe.base, timeout=s.stripe.timeout)
        return cancel_meter_event(client, event_name, identifier)

    b = s.billing
    return CutoverOps(
        ledger=led,
        parity=ParityStore(led.engine, bucket_seconds=b.bucket_seconds),
        bootstrap=bootstrap_cutover(b),
        bucket_seconds=b.bucket_seconds,
        grace_seconds=b.grace_seconds,
        clean_hours_required=Decimal(b.cutover_clean_hours),
        publish=publish,
        clock_ms=lambda: time.time_ns() // 1_000_000,
        cancel=cancel,
    )


def _command_text(ctx: click.Context) -> str:
    """The command as run, from its parsed options (recorded in the audit log)."""
    parts = ["edgebill", *ctx.command_path.split()[1:]]  # the console script's name, however it was invoked
    for k, v in ctx.params.items():
        if k in ("as_json", "by") or v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        parts.append(flag if v is True else f"{flag} {json.dumps(v) if isinstance(v, str) and ' ' in v else v}")
    return " ".join(parts)


def _actor(ctx: click.Context, by: str | None, reason: str) -> Any:
    from infra.cutover import Actor

    return Actor(by=by or _default_by(), reason=reason or "", command=_command_text(ctx))


_REFUSED_HINT = "nothing changed; `edgebill cutover status` shows the state in force"


def _run(fn: Any, as_json: bool, render: Any) -> None:
    """Run an operation: refused -> exit 2 with every reason; unpublished or failed cancellations -> 1."""
    try:
        out = fn()
    except CutoverRefused as exc:
        if as_json:
            error = {**error_fields("refused", 2, _REFUSED_HINT), "refused": exc.problems}
            click.echo(json.dumps(error, indent=2))
        for p in exc.problems:
            click.echo(f"refused: {p}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(out, indent=2, default=str))
    else:
        for line in render(out):
            click.echo(line)
    if out.get("error"):
        click.echo(
            f"warning: recorded and in force at the edge, but NOT published on the control topic ({out['error']}): "
            "the cell side has not been told; run `edgebill cutover publish` once the broker answers",
            err=True,
        )
        sys.exit(1)
    if out.get("cancel_errors"):
        sys.exit(1)


_JSON = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
_BY = click.option("--by", default=None, help="Who makes the change (default: the OS user@host); recorded.")
_REASON = click.option("--reason", default="", help="Why; recorded in the audit log.")


@cli.group()
def cutover() -> None:
    """The cutover of Pro billing from the cell to the edge at a bucket boundary T: status, plan, arm,
    rollback, release. Every change is recorded in the ledger (audit) and published on billing-control;
    running workers apply it without restart."""


@cutover.command("status")
@_JSON
@click.option("--limit", type=int, default=50, show_default=True, help="Audit entries shown (newest).")
def status_cmd(as_json: bool, limit: int) -> None:
    """The state in force and its source, the parity gate, pending and shadow rows, the seam report, the
    audit log and the workers' acknowledgements. Before any ledger exists: the bootstrap state from the
    settings (which is then in force) and where the ledger will be; nothing is created."""
    from infra.cutover import status, status_without_ledger
    from infra.settings import bootstrap_cutover

    s = settings_for_cli()
    try:
        led = open_ledger(s, quiet=as_json)
    except NoLedger as exc:
        st = status_without_ledger(
            bootstrap_cutover(s.billing),
            s.billing.bucket_seconds,
            ledger_label(s.db.resolved_url),
            "the database has no edgebill tables" if "edgebill tables" in exc.message else "no database file",
        )
        if as_json:
            click.echo(json.dumps(st, indent=2))
        else:
            for line in render_status_without_ledger(st):
                click.echo(line)
        return
    try:
        _run(lambda: status(_ops(s, led), log_limit=limit), as_json, render_status)
    finally:
        led.dispose()


@cutover.command("plan")
@click.option("--at", "at", required=True, help="T: a bucket boundary in the future (unix s or RFC 3339).")
@click.option("--force", is_flag=True, help="Plan despite the checks (needs --reason; recorded as forced).")
@_BY
@_REASON
@_JSON
@click.pass_context
def plan_cmd(ctx: click.Context, at: str, force: bool, by: str | None, reason: str, as_json: bool) -> None:
    """Plan the cutover at T (refused unless T is bucket-aligned, in the future, and preceded by the
    configured run of clean parity hours, EDGEBILL_CUTOVER_CLEAN_HOURS)."""
    from infra.cutover import plan

    s = settings_for_cli()
    led = ledger_for_writing(s, quiet=as_json)
    actor = _actor(ctx, by, reason)
    try:
        _run(lambda: plan(_ops(s, led), parse_time(at), actor, force=force), as_json, _render_change)
    finally:
        led.dispose()


@cutover.command("arm")
@click.option("--force", is_flag=True, help="Arm although T is past or buckets from T closed (needs --reason).")
@_BY
@_REASON
@_JSON
@click.pass_context
def arm_cmd(ctx: click.Context, force: bool, by: str | None, reason: str, as_json: bool) -> None:
    """Make the latest plan live: from T the edge bills and the cell side is told to stop (authority edge)."""
    from infra.cutover import arm

    s = settings_for_cli()
    led = ledger_for_writing(s, quiet=as_json)
    actor = _actor(ctx, by, reason)
    try:
        _run(lambda: arm(_ops(s, led), actor, force=force), as_json, _render_change)
    finally:
        led.dispose()


@cutover.command("rollback")
@click.option("--at", "at", default=None, help="R: the cell bills from here (default: the current bucket).")
@click.option("--cancel-sent", is_flag=True, help="Cancel rows sent for buckets >= R still inside Stripe's 24 h.")
@_BY
@_REASON
@_JSON
@click.pass_context
def rollback_cmd(
    ctx: click.Context, at: str | None, cancel_sent: bool, by: str | None, reason: str, as_json: bool
) -> None:
    """Hand Pro billing back to the cell from R: unsent edge rows of buckets >= R become skipped_rolled_back;
    rows already sent are listed (and cancelled within 24 h with --cancel-sent; older ones need a credit)."""
    from infra.cutover import rollback

    s = settings_for_cli()
    led = ledger_for_writing(s, quiet=as_json)
    actor = _actor(ctx, by, reason)
    r = parse_time(at) if at else None
    try:
        _run(lambda: rollback(_ops(s, led), r, actor, cancel_sent=cancel_sent), as_json, _render_change)
    finally:
        led.dispose()


@cutover.command("release")
@click.option("--bucket", "bucket", required=True, help="The gap's bucket start (unix s or RFC 3339).")
@_BY
@click.option("--reason", required=True, help="Why the gap is billed now; recorded.")
@_JSON
@click.pass_context
def release_cmd(ctx: click.Context, bucket: str, by: str | None, reason: str, as_json: bool) -> None:
    """Bill a gap: a bucket at or after T that closed in shadow becomes billed (its rows pending)."""
    from infra.cutover import release

    s = settings_for_cli()
    led = ledger_for_writing(s, quiet=as_json)
    actor = _actor(ctx, by, reason)
    try:
        _run(lambda: release(_ops(s, led), parse_time(bucket), actor), as_json, _render_change)
    finally:
        led.dispose()


@cutover.command("publish")
@_JSON
def publish_cmd(as_json: bool) -> None:
    """Publish the recorded state changes the control topic has not acknowledged yet."""
    from infra.cutover import publish_pending

    s = settings_for_cli()
    led = ledger_for_writing(s, quiet=as_json)
    try:
        _run(lambda: publish_pending(_ops(s, led)), as_json, _render_change)
    finally:
        led.dispose()


# ------------------------------------------------------------------------------------------ rendering


def _render_change(out: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if "planned" in out:
        p = out["planned"]
        lines.append(f"planned: cutover at T={p['T']} ({p['at']}), audit entry {p['seq']}")
    if "armed" in out:
        a = out["armed"]
        lines.append(f"armed: the edge bills from T={a['T']} ({a['at']}), authority edge; audit entry {a['seq']}")
    if "rolled_back" in out:
        r = out["rolled_back"]
        lines.append(f"rolled back: the cell bills from R={r['R']} ({r['at']}); audit entry {r['seq']}")
        lines.append(f"  {len(r['rows_skipped'])} unsent edge row(s) of buckets >= R are now skipped_rolled_back")
    if "released" in out:
        r = out["released"]
        lines.append(f"released: bucket {r['bucket']} ({r['at']}) is billed: {len(r['rows'])} row(s) pending")
    for forced in (out.get(k, {}).get("forced", []) for k in ("planned", "armed")):
        for f in forced:
            lines.append(f"  FORCED past: {f}")
    sent = out.get("sent_from_R") or []
    if sent:
        lines.append(f"{len(sent)} row(s) already sent for buckets >= R:")
        for row in sent:
            lines.append(f"  {row['id']}  {row['value']}  sent {row['sent']}  cancellable={row['cancellable']}")
    for rid in out.get("cancelled") or []:
        lines.append(f"  cancelled at Stripe: {rid}")
    for row in out.get("credit_needed") or []:
        lines.append(f"  outside Stripe's 24 h cancel window, credit needed: {row['id']} ({row['value']})")
    for err in out.get("cancel_errors") or []:
        lines.append(f"  cancel failed: {err['id']}: {err['error']}")
    if out.get("published"):
        lines.append(f"published {len(out['published'])} change(s) on billing-control")
    return lines


def render_status_without_ledger(st: dict[str, Any]) -> list[str]:
    """``cutover status`` before any ledger exists."""
    s = st["state"]
    lines = [
        f"state in force (from the {s['source']}): shadow={s['shadow']} bill_from={s['bill_from']} "
        f"({s['bill_from_iso'] or '-'}) bill_until={s['bill_until']} authority={s['authority']}  live={s['live']}",
        f"ledger: {st['ledger_url']}: {st['note']}",
    ]
    lines.extend(f"  INTERLOCK: {p}" for p in st["interlocks"])
    return lines


def render_status(st: dict[str, Any]) -> list[str]:
    """``cutover status`` for a terminal."""
    s = st["state"]
    env = st["environment"]
    lines = [
        f"state in force (from the {s['source']}{'' if s['seq'] == 0 else ', seq ' + str(s['seq'])}): "
        f"shadow={s['shadow']} bill_from={s['bill_from']} ({s['bill_from_iso'] or '-'}) "
        f"bill_until={s['bill_until']} authority={s['authority']}  live={s['live']}",
        f"environment (bootstrap): shadow={env['shadow']} bill_from={env['bill_from']} "
        f"authority={env['authority']}  {'IN FORCE' if env['in_force'] else 'not in force'}",
    ]
    for p in st["interlocks"]:
        lines.append(f"  INTERLOCK: {p}")
    g = st["gate"]
    lines.append(
        f"parity gate: {g['clean_hours']} clean hour(s) with usage on both sides, {g['required_hours']} required: "
        f"{'open' if g['open'] else 'closed'}"
    )
    lines.append(
        f"rows: pending {st['rows']['pending']}, shadow {st['rows']['shadow']}; by state {st['rows_by_state']}"
    )
    if st["plan"]:
        p = st["plan"]
        lines.append(f"plan: T={p['bill_from']} ({p['bill_from_iso']}) by {p['by']} ({p['reason'] or 'no reason'})")
    seam = st["seam"]
    if seam["T"]:
        lines.append(f"seam: T={seam['T']}" + (f", R={seam['R']}" if seam["R"] else ""))
        for b in seam["buckets"]:
            rows = ", ".join(f"{k} {v['rows']}×/{v['value']}" for k, v in sorted(b["rows"].items())) or "no rows"
            decided = b["decision"] or ("not decided" if b["closed"] else "open")
            lines.append(f"  {b['at']}  {b['side']:<4}  {decided:<26} {rows}")
        for gap in seam["gaps"]:
            lines.append(f"  GAP: {gap['at']} closed in shadow: `edgebill cutover release --bucket {gap['bucket']}`")
        for row in seam["sent_from_R"]:
            lines.append(f"  sent for a bucket >= R: {row['id']} {row['value']} (cancellable={row['cancellable']})")
    lines.append("audit log:")
    for e in st["log"]:
        what = e["kind"]
        if e["kind"] == "state":
            what = f"state shadow={e['shadow']} bill_from={e['bill_from']} bill_until={e['bill_until']} " + str(
                e["authority"]
            )
        elif e["kind"] == "plan":
            what = f"plan T={e['bill_from']}"
        forced = " FORCED" if e["details"].get("forced") else ""
        lines.append(f"  #{e['seq']} {e['changed']} {what}{forced} by {e['by']}: {e['reason'] or '-'} [{e['command']}]")
    lines.append("workers:")
    for w in st["workers"]:
        lines.append(f"  {w['owner']}: seq {w['seq']} ({w['status']}, last seen {w['acked']})")
    if st["unpublished"]:
        lines.append(f"UNPUBLISHED on billing-control: {len(st['unpublished'])} change(s): `edgebill cutover publish`")
    return lines

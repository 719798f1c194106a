"""``edgebill webhooks``: received Stripe events and their outcome; re-apply one; the provisioning log (reads
the ledger a worker created; never creates one)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from infra.cli._base import cli, iso, open_ledger, settings_for_cli


@contextmanager
def _store() -> Iterator[Any]:
    from sinks.webhooks.store import WebhookStore

    led = open_ledger(settings_for_cli())
    try:
        yield WebhookStore(led.engine)
    finally:
        led.dispose()


def _when(ms: int | None) -> str:
    return iso(None if ms is None else ms / 1000)


@cli.group(invoke_without_command=True)
@click.option("--limit", type=int, default=50, show_default=True, help="Newest deliveries to show.")
@click.option("--org", "org_id", default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def webhooks(ctx: click.Context, limit: int, org_id: str | None, as_json: bool) -> None:
    """Stripe events received (newest first) and their outcome: applied, duplicate, out_of_order, ignored,
    shadow, failed, or received (not applied yet)."""
    if ctx.invoked_subcommand is not None:
        return
    with _store() as store:
        rows = store.recent(limit, org_id)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo("no Stripe event received")
        return
    click.echo(f"{'received':<20} {'event':<30} {'type':<34} {'org':<16} {'outcome':<13} detail")
    for r in rows:
        click.echo(
            f"{_when(r['received_ms']):<20} {r['event_id'][:30]:<30} {(r['type'] or '-'):<34} "
            f"{(r['org_id'] or '-'):<16} {r['outcome']:<13} {r['detail'] or ''}"
        )


@webhooks.command("reapply")
@click.argument("event_id")
def reapply(event_id: str) -> None:
    """Apply EVENT_ID again (a failed, shadow, ignored or out-of-order one): the running worker's retry timer
    applies it under the authority in force now. An applied event is never applied twice."""
    from models.webhooks import Outcome

    with _store() as store:
        before = store.requeue(event_id)
    if before is None:
        raise click.ClickException(f"no Stripe event {event_id} was received")
    if before is Outcome.APPLIED:
        raise click.ClickException(f"{event_id} is already applied; events are applied exactly once")
    click.echo(f"{event_id} ({before.value}) queued: a running worker applies it within its retry interval")


@webhooks.command("provisioning")
@click.option("--org", "org_id", default=None)
@click.option("--shadow", is_flag=True, help="Only what was recorded instead of done (authority cell).")
@click.option("--json", "as_json", is_flag=True)
def provisioning(org_id: str | None, shadow: bool, as_json: bool) -> None:
    """The provisioning log: subscriptions and credits created (mode edge) or only described (mode shadow)."""
    with _store() as store:
        rows = store.provisioning(org_id, "shadow" if shadow else None)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo("no provisioning recorded")
        return
    click.echo(f"{'when':<20} {'mode':<7} {'org':<16} {'customer':<20} {'subscription':<24} credit")
    for r in rows:
        click.echo(
            f"{_when(r['created_ms']):<20} {r['mode']:<7} {r['org_id']:<16} {r['customer_id']:<20} "
            f"{r['subscription_id'] or '-':<24} {r['credit_txn_id'] or '-'}"
        )

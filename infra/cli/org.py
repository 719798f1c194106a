"""``edgebill org set | show``: publish and read org policy."""

from __future__ import annotations

import json
import time

import click

from infra.cli._base import broker_errors, cli, iso, open_ledger, parse_time, require_broker, settings_for_cli


@cli.group()
def org() -> None:
    """Show or set org policy (history: each record holds from its effective time on)."""


@org.command("set")
@click.argument("org_id")
@click.option("--plan", type=click.Choice(["pro", "free"]), required=True)
@click.option("--billing-mode", type=click.Choice(["unified", "legacy"]), default="unified", show_default=True)
@click.option("--customer", default=None, help="Stripe customer id (cus_…).")
@click.option("--subscription", default=None, help="Stripe subscription id (sub_…).")
@click.option(
    "--provider",
    default="stripe",
    show_default=True,
    help="Billing provider: 'stripe' and 'legacy' are billed through Stripe; others (autumn) are billed elsewhere.",
)
@click.option("--effective-at", default=None, help="Unix seconds or RFC 3339 (default: now).")
def org_set(
    org_id: str,
    plan: str,
    billing_mode: str,
    customer: str | None,
    subscription: str | None,
    provider: str,
    effective_at: str | None,
) -> None:
    """Publish a policy record for ORG_ID to the org-policy topic."""
    from infra.kafka_io import publish_sync
    from models.policy import OrgPolicy
    from models.topics import TOPIC_POLICY

    s = settings_for_cli()
    eff = parse_time(effective_at) if effective_at else int(time.time())
    try:
        pol = OrgPolicy.model_validate(
            {
                "org_id": org_id,
                "plan": plan,
                "billing_mode": billing_mode,
                "stripe_customer_id": customer,
                "stripe_subscription_id": subscription,
                "billing_provider": provider,
                "effective_at": eff,
            }
        )
    except ValueError as exc:
        raise click.ClickException(f"invalid policy: {exc}") from exc
    require_broker(s)
    with broker_errors(s):
        publish_sync(s.kafka.servers, s.kafka.topic(TOPIC_POLICY), [(org_id.encode(), pol.to_json())])
    click.echo(json.dumps(pol.to_wire()))


@org.command("show")
@click.argument("org_id", required=False)
@click.option("--json", "as_json", is_flag=True)
def org_show(org_id: str | None, as_json: bool) -> None:
    """Policy history as the ledger holds it (what the worker has read from org-policy)."""
    led = open_ledger(settings_for_cli())
    try:
        rows = led.policies(org_id)
    finally:
        led.dispose()
    if as_json:
        click.echo(json.dumps(rows, default=str, indent=2))
        return
    if not rows:
        click.echo("no policy records" + (f" for {org_id}" if org_id else ""))
        return
    click.echo(f"{'org':<20} {'effective_at (UTC)':<26} {'plan':<5} {'mode':<8} customer")
    for r in rows:
        eff = iso(r["effective_ms"] / 1000)
        click.echo(
            f"{r['org_id']:<20} {eff:<26} {r['plan']:<5} {r['billing_mode']:<8} {r['stripe_customer_id'] or '-'}"
        )

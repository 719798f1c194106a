"""``edgebill stripe setup``: publish the meters, the product, every catalog price and the one webhook endpoint
to Stripe, and the catalog to ``billing_prices`` (the production path's Stripe step)."""

from __future__ import annotations

import json
from typing import Any

import click

from infra.cli._base import CannotRun, cli, error_fields, ledger_unreachable, mark_reported, settings_for_cli


@cli.group("stripe")
def stripe_group() -> None:
    """Stripe set-up (the price catalog and the webhook endpoint)."""


def _stripe_failed(base: str, exc: Any) -> CannotRun:
    """One line for a Stripe call that failed: unreachable, a refused key, or another answer."""
    import stripe

    if isinstance(exc, stripe.APIConnectionError):
        return CannotRun(f"cannot reach Stripe at {base}", "check EDGEBILL_STRIPE_API_BASE and the network", exc)
    if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
        return CannotRun(
            f"Stripe at {base} refused EDGEBILL_STRIPE_API_KEY",
            "use a secret key (or a restricted key with write access to Billing, Products, Prices and Webhooks)",
            exc.user_message or str(exc),
        )
    return CannotRun(f"Stripe at {base} answered {exc.http_status or 'an error'}", "see the message", exc)


@stripe_group.command("setup")
@click.option("--dry-run", is_flag=True, help="Show what would be created; create and write nothing.")
@click.option(
    "--webhook-url",
    default=None,
    help="Public URL of POST /webhooks/stripe (default EDGEBILL_STRIPE_WEBHOOK_URL, else the worker's own).",
)
@click.option("--no-webhook", is_flag=True, help="Leave webhook endpoints alone.")
@click.option("--json", "as_json", is_flag=True)
def stripe_setup(dry_run: bool, webhook_url: str | None, no_webhook: bool, as_json: bool) -> None:
    """Idempotently publish the catalog to Stripe and billing_prices; register or verify the webhook endpoint.

    Meters, product and prices are found by event name and metadata, so a second run creates nothing and
    leaves billing_prices as it is. A partial catalog (a price that exists with other settings, or one that
    could not be made) is not written to billing_prices at all: the command fails and says why. The ledger
    is created (migrated) when it does not exist yet: this is the first step of a new deployment.
    """
    import stripe
    from sqlalchemy.exc import SQLAlchemyError

    from infra.catalog import ensure_catalog, ensure_webhook_endpoint
    from infra.runtime import webhook_url as default_webhook_url
    from sinks.catalog_store import CatalogStore
    from sinks.schema import make_engine, migrate
    from sinks.stripe.v1 import make_client

    s = settings_for_cli()
    client = make_client(s.stripe.api_key.get_secret_value(), s.stripe.base, timeout=s.stripe.timeout)
    try:
        rep = ensure_catalog(client, dry_run=dry_run)
        if not no_webhook:
            ensure_webhook_endpoint(client, webhook_url or default_webhook_url(s), rep)
    except stripe.StripeError as exc:
        raise _stripe_failed(s.stripe.base, exc) from exc
    changed: list[str] = []
    if rep.complete and not dry_run:
        engine = make_engine(s.db.resolved_url)
        try:
            migrate(engine)
            changed = CatalogStore(engine).publish_catalog(rep.prices)
        except SQLAlchemyError as exc:
            raise ledger_unreachable(s, exc) from exc
        finally:
            engine.dispose()
    failure: click.ClickException | None = None
    if rep.problems:
        failure = click.ClickException(
            "the catalog is not published (billing_prices unchanged):\n" + "\n".join(f"  - {p}" for p in rep.problems)
        )
    elif not rep.complete and not dry_run:
        failure = click.ClickException("the catalog is incomplete; billing_prices unchanged")
    if as_json:
        out = {**rep.to_json(), "billing_prices_changed": changed}
        if failure is not None:  # the error is this report's, not a second JSON object
            out.update(error_fields(failure.format_message().splitlines()[0], failure.exit_code, None))
            mark_reported(failure)
        click.echo(json.dumps(out, indent=2))
    else:
        verb = "would create" if dry_run else "created"
        click.echo(f"Stripe at {s.stripe.base}: {len(rep.found)} found, {len(rep.created)} {verb}")
        for line in rep.created:
            click.echo(f"  {verb}: {line}")
        if rep.complete and not dry_run:
            state = f"{len(changed)} key(s) written: {', '.join(changed)}" if changed else "unchanged"
            click.echo(f"billing_prices: {state} ({len(rep.prices)} prices)")
        if rep.endpoint_secret:
            click.echo(
                f"webhook endpoint {rep.endpoint} created; its signing secret (Stripe shows it only now): "
                f"{rep.endpoint_secret}\n  set EDGEBILL_STRIPE_WEBHOOK_SECRET to it for every worker"
            )
    for w in rep.warnings:
        click.echo(f"warning: {w}", err=True)
    if failure is not None:
        raise failure

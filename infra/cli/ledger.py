"""``edgebill ledger``: meter rows, counters and unbilled usage."""

from __future__ import annotations

import json

import click

from infra.cli._base import cli, ledger_for_cli


@cli.command()
@click.option("--org", "org_id", default=None)
@click.option(
    "--state",
    default=None,
    help="pending, sent, shadow, skipped_before_bill_from, skipped_rolled_back, cancelled, rejected, ...",
)
@click.option("--bucket", type=int, default=None, help="Bucket start (unix s).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--summary", is_flag=True, help="Only counts by state, counters and unbilled usage.")
def ledger(org_id: str | None, state: str | None, bucket: int | None, as_json: bool, summary: bool) -> None:
    """Meter rows by state, org, bucket; counters; usage counted but not billed (and why)."""
    led = ledger_for_cli()
    if summary:
        out = {"rows_by_state": led.state_counts(), "counters": led.counters(), "unbilled": led.unbilled()}
        click.echo(json.dumps(out, indent=2, default=str))
        return
    rows = led.rows(org=org_id, state=state, bucket=bucket)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    click.echo(f"{'id':<60} {'value':>16} {'state':<26} error")
    for r in rows:
        click.echo(f"{r['id']:<60} {r['value']:>16} {r['state']:<26} {r['last_error'] or ''}")
    click.echo(f"{len(rows)} row(s); by state: {led.state_counts()}")

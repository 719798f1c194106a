"""``edgebill ledger``: meter rows, counters and unbilled usage (reads the ledger; never creates one)."""

from __future__ import annotations

import json

import click

from infra.cli._base import cli, iso, open_ledger, settings_for_cli
from models.billing import RowState


@cli.command()
@click.option("--org", "org_id", default=None)
@click.option("--state", type=click.Choice([s.value for s in RowState]), default=None, help="Only rows in this state.")
@click.option("--bucket", type=int, default=None, help="Bucket start (unix s).")
@click.option("--json", "as_json", is_flag=True, help="Rows (or the summary) as JSON.")
@click.option("--summary", is_flag=True, help="Only counts by state, counters and unbilled usage.")
def ledger(org_id: str | None, state: str | None, bucket: int | None, as_json: bool, summary: bool) -> None:
    """Meter rows by state, org, bucket; counters; usage counted but not billed (and why)."""
    led = open_ledger(settings_for_cli())
    try:
        if summary:
            states, counters, unbilled = led.state_counts(), led.counters(), led.unbilled()
            if as_json:
                out = {"rows_by_state": states, "counters": counters, "unbilled": unbilled}
                click.echo(json.dumps(out, indent=2, default=str))
                return
            click.echo("rows by state: " + (", ".join(f"{k}={v}" for k, v in sorted(states.items())) or "none"))
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
            return
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
    finally:
        led.dispose()

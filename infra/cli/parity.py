"""``edgebill parity``: the parity table, the per-org window, a dashboard link."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import click

from infra.cli._base import cli, iso, open_ledger, parse_time, settings_for_cli
from models.billing import bucket_start_s

if TYPE_CHECKING:
    from infra.settings import Settings
    from sinks.ledger import Ledger
    from sinks.parity import ParityConfig


@cli.command()
@click.option("--from", "from_", default=None, help="Window start: unix s or RFC 3339 (default: 24 h before --to).")
@click.option("--to", "to", default=None, help="Window end, exclusive (default: now).")
@click.option("--org", "org_id", default=None, help="Only this org.")
@click.option("--flagged", is_flag=True, help="Only rows that are not ok.")
@click.option("--json", "as_json", is_flag=True, help="Rows, per-bucket summaries and the gate as JSON.")
@click.option("--refresh", is_flag=True, help="Recompute the window's buckets from the raw data first.")
@click.option(
    "--window", "whole", is_flag=True, help="One row per org over the whole window, live (the endpoint's view)."
)
@click.option("--dashboard-url", is_flag=True, help="Print a signed link to the worker's dashboard and exit.")
def parity(
    from_: str | None,
    to: str | None,
    org_id: str | None,
    flagged: bool,
    as_json: bool,
    refresh: bool,
    whole: bool,
    dashboard_url: bool,
) -> None:
    """The parity table: edge (usage ticks) vs cell (scale events) GB-s per pro org and bucket.

    Status is ok, drift (|drift| > EDGEBILL_PARITY_TOLERANCE), edge_only or cell_only. The worker keeps the
    table up to date; --refresh recomputes the window here (e.g. with no worker running). Reads the
    existing ledger (named on stderr); never creates one.
    """
    from infra.runtime import parity_config, web_config

    s = settings_for_cli()
    if dashboard_url:
        from streams.web import dashboard_url as make_url

        click.echo(make_url(web_config(s), int(time.time())))
        return
    end = parse_time(to) if to else int(time.time())
    start = parse_time(from_) if from_ else end - 86_400
    if end <= start:
        raise click.BadParameter("--to must be after --from")
    cfg = parity_config(s)
    led = open_ledger(s)
    try:
        _show(s, led, cfg, start, end, org_id, flagged, as_json, refresh, whole)
    finally:
        led.dispose()


def _show(
    s: Settings,
    led: Ledger,
    cfg: ParityConfig,
    start: int,
    end: int,
    org_id: str | None,
    flagged: bool,
    as_json: bool,
    refresh: bool,
    whole: bool,
) -> None:
    from sinks.parity import ParityStore
    from streams.parity_json import gate_json, row_json, window_org_json

    store = ParityStore(led.engine, bucket_seconds=s.billing.bucket_seconds)
    if whole:
        orgs = [o for o in store.window(start, end, cfg) if (not org_id or o.org_id == org_id)]
        orgs = [o for o in orgs if not flagged or o.status.value != "ok"]
        out = [window_org_json(o) for o in orgs]
        if as_json:
            click.echo(json.dumps({"window": {"from": start, "to": end}, "orgs": out}, indent=2))
            return
        click.echo(f"{'org':<20} {'edge GB-s':>18} {'cell GB-s':>18} {'samples':>8} {'drift':>9}  status")
        for o, w in zip(orgs, out, strict=True):
            click.echo(
                f"{o.org_id:<20} {o.measure.edge_gb_s:>18,.3f} {o.measure.cell_gb_s:>18,.3f} "
                f"{o.measure.samples:>8} {o.drift * 100:>+8.2f}%  {w['status']}"
            )
        return
    if refresh:
        n = store.recompute_range(start, end, cfg)
        click.echo(f"recomputed {n} row(s)", err=True)
    size = s.billing.bucket_seconds
    rows = store.rows(bucket_start_s(start, size), end, org=org_id, flagged_only=flagged)
    gate = store.gate(s.billing.grace_seconds)
    settled = gate.last_settled
    by_bucket: dict[int, list[Any]] = {}
    for r in rows:
        by_bucket.setdefault(r.bucket_start, []).append(r)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "window": {"from": start, "to": end},
                    "rows": [row_json(r) for r in rows],
                    "gate": gate_json(gate, s.billing.cutover_clean_hours),
                    "state": store.state(),
                },
                indent=2,
            )
        )
        return
    if not rows:
        click.echo("no parity rows in the window (is a worker running? --refresh computes them here)")
    for b, rs in sorted(by_bucket.items()):
        label = iso(b)
        click.echo(f"\n{label} {'(settled)' if settled is not None and b <= settled else '(not settled)'}")
        click.echo(f"  {'org':<20} {'edge GB-s':>16} {'cell GB-s':>16} {'samples':>8} {'drift':>9}  status")
        for r in rs:
            click.echo(
                f"  {r.org_id:<20} {r.edge_gb_s:>16,.3f} {r.cell_gb_s:>16,.3f} {r.samples:>8} "
                f"{r.drift * 100:>+8.2f}%  {r.status.value}"
            )
        bad = [r for r in rs if r.flagged]
        worst = max(rs, key=lambda r: abs(r.drift))
        click.echo(
            f"  checked={len(rs)} flagged={len(bad)} (tolerance={s.parity.tolerance * 100:.1f}%) "
            f"worst={worst.org_id} ({worst.drift * 100:+.1f}%)"
        )
    click.echo(
        f"\ngate: {gate.clean_hours:.0f} consecutive clean hour(s) of parity with usage on both sides "
        f"(the cutover needs {s.billing.cutover_clean_hours:g}: EDGEBILL_CUTOVER_CLEAN_HOURS)"
    )

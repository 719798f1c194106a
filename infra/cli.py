"""``edgebill`` command line (click). Commands print for humans (or ``--json``); logs go to stderr."""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from models.errors import ConfigError, EdgebillError

__all__ = ["main"]

log = logging.getLogger("edgebill")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("alembic", "stripe", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _settings() -> Any:
    from infra.settings import load_settings

    try:
        return load_settings()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _parse_time(value: str) -> int:
    """Unix seconds from an integer or an RFC 3339 timestamp."""
    if value.lstrip("-").isdigit():
        return int(value)
    try:
        dt = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is neither unix seconds nor an RFC 3339 timestamp") from exc
    if dt.tzinfo is None:
        raise click.BadParameter(f"{value!r} has no UTC offset (add 'Z')")
    return int(dt.timestamp())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """edgebill: usage ticks on Kafka -> exact GB-second buckets -> idempotent Stripe meter events.

    Settings come from EDGEBILL_* environment variables (`edgebill check-config` shows them all).
    """
    _setup_logging(verbose)


# ----------------------------------------------------------------------------------- config


@cli.command("check-config")
@click.option("--json", "as_json", is_flag=True, help="Print effective settings as JSON.")
def check_config(as_json: bool) -> None:
    """Validate every setting and the cutover interlocks; report every problem at once (exit 1)."""
    from infra.settings import load_settings

    try:
        s = load_settings()
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    desc = s.describe()
    if as_json:
        click.echo(json.dumps(desc, indent=2, default=str))
        return
    for area, values in desc.items():
        click.echo(f"[{area}]")
        for k, v in values.items():
            click.echo(f"  {k} = {v}")
    click.echo("configuration OK")


# ----------------------------------------------------------------------------------- servers


@cli.command()
@click.option("--port", type=int, default=None, help="Port on 127.0.0.1 (default EDGEBILL_KAFKA_EMBEDDED_PORT).")
@click.option("--log-dir", type=click.Path(path_type=Path), default=None, help="Where the broker log goes.")
def broker(port: int | None, log_dir: Path | None) -> None:
    """Run the embedded Kafka-compatible broker (Tansu, memory storage; dev/test only) until Ctrl-C."""
    from infra.broker import run_foreground

    p = port if port is not None else _settings().kafka.embedded_port
    sys.exit(run_foreground(p, log_dir=log_dir))


@cli.command("stripe-fake")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address.")
@click.option("--port", type=int, default=None, help="Port (default EDGEBILL_STRIPE_LOCAL_PORT, 12111).")
@click.option("--fault-429", type=float, default=0.0, show_default=True, help="Share of POSTs answered 429.")
@click.option("--fault-500", type=float, default=0.0, show_default=True, help="Share of POSTs answered 500.")
@click.option(
    "--fault-cutoff",
    type=float,
    default=0.0,
    show_default=True,
    help="Share of POSTs recorded by the server, then cut off without an answer.",
)
@click.option("--fault-slow", type=float, default=0.0, show_default=True, help="Share of POSTs delayed.")
@click.option("--fault-seed", type=int, default=1, show_default=True, help="Seed of the fault RNG (repeatable runs).")
@click.option("--live-limits", is_flag=True, help="Enforce live-mode rate limits (1,000/s, one per customer+meter).")
def stripe_fake(
    host: str,
    port: int | None,
    fault_429: float,
    fault_500: float,
    fault_cutoff: float,
    fault_slow: float,
    fault_seed: int,
    live_limits: bool,
) -> None:
    """Run the local Stripe-compatible server (customers, meters, meter events, summaries, ...)."""
    from infra.stripe_fake import FaultConfig, run_foreground

    p = port if port is not None else _settings().stripe.local_port
    try:
        faults = FaultConfig(
            seed=fault_seed,
            p_429=fault_429,
            p_500=fault_500,
            p_cutoff=fault_cutoff,
            p_slow=fault_slow,
            live_limits=live_limits,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    sys.exit(run_foreground(host, p, faults=faults))


@cli.command()
def worker() -> None:
    """Run all agents and the web server (bound to EDGEBILL_WEB_HOST, 127.0.0.1 by default)."""
    from infra.runtime import run_worker

    try:
        run_worker(_settings())
    except EdgebillError as exc:
        raise click.ClickException(str(exc)) from exc


# ----------------------------------------------------------------------------------- data


@cli.command()
@click.option("--orgs", type=int, default=24, show_default=True, help="Simulated orgs.")
@click.option("--hours", type=int, default=4, show_default=True, help="Simulated past hours.")
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--duplicates", type=float, default=0.10, show_default=True, help="Share of ticks sent twice.")
@click.option(
    "--file", "path", type=click.File("rb"), default=None, help="JSON lines to publish instead ('-' = stdin)."
)
@click.option("--policies/--no-policies", default=True, show_default=True, help="Also publish simulated org policies.")
@click.option(
    "--scale-events/--no-scale-events",
    default=True,
    show_default=True,
    help="Also publish the matching cell rows to sandbox-scale-events.",
)
@click.option(
    "--drift",
    "drifts",
    multiple=True,
    metavar="KIND[:ORG[:BUCKET_START]]",
    help="Inject edge-side drift: missing, zombie or skew (org and bucket chosen when omitted). Repeatable.",
)
def produce(
    orgs: int,
    hours: int,
    seed: int,
    duplicates: float,
    path: Any,
    policies: bool,
    scale_events: bool,
    drifts: tuple[str, ...],
) -> None:
    """Publish usage ticks: a seeded simulated fleet over past hours, or JSON lines from a file / stdin.

    The fleet's cell rows go to sandbox-scale-events too, so the parity table has both sides; --drift makes
    the edge side disagree on purpose, and the command prints the (org, bucket) pairs it affects.
    """
    from infra.kafka_io import publish_sync
    from infra.simulator import (
        DRIFT_KINDS,
        DriftSpec,
        FleetSpec,
        build_fleet,
        encode_messages,
        inject_drift,
        iter_file_messages,
        pick_drift_specs,
    )
    from models.policy import OrgPolicy
    from streams.cell import TOPIC_SCALE
    from streams.pipeline import TOPIC_POLICY, TOPIC_TICKS

    s = _settings()
    bootstrap = s.kafka.servers
    if path is not None:
        n = publish_sync(bootstrap, s.kafka.topic(TOPIC_TICKS), iter_file_messages(iter(path)))
        click.echo(f"published {n} message(s) to {s.kafka.topic(TOPIC_TICKS)}")
        return
    size = s.billing.bucket_seconds
    now = int(time.time())
    start = (now // size - hours - 1) * size
    fleet = build_fleet(
        FleetSpec(orgs=orgs, hours=hours, start=start, bucket_seconds=size, seed=seed, duplicate_rate=duplicates)
    )
    if policies:
        pols = [
            (
                o.org_id.encode(),
                OrgPolicy.model_validate(
                    {
                        "org_id": o.org_id,
                        "plan": o.plan,
                        "billing_mode": o.billing_mode,
                        "effective_at": start - 86400,
                    }
                ).to_json(),
            )
            for o in fleet.orgs
        ]
        publish_sync(bootstrap, s.kafka.topic(TOPIC_POLICY), pols)
    ticks = fleet.ticks
    if drifts:
        specs: list[DriftSpec] = []
        for d in drifts:
            kind, _, rest = d.partition(":")
            if kind not in DRIFT_KINDS:
                raise click.BadParameter(f"{kind!r} is not one of {', '.join(DRIFT_KINDS)}", param_hint="--drift")
            org, _, bucket = rest.partition(":")
            if org:
                b = _parse_time(bucket) if bucket else start + size
                specs.append(DriftSpec(kind, org, b))
            else:
                specs.extend(pick_drift_specs(fleet, [kind], seed=seed + len(specs), exclude=[x.org_id for x in specs]))
        try:
            case = inject_drift(fleet, specs)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--drift") from exc
        ticks = case.ticks
        for spec in specs:
            click.echo(f"drift {spec.kind} on {spec.org_id} at {datetime.fromtimestamp(spec.bucket_start, UTC):%H:%MZ}")
        for org, b in sorted(case.affected):
            click.echo(f"  affects {org} bucket {b} ({datetime.fromtimestamp(b, UTC):%Y-%m-%d %H:%MZ})")
    msgs = encode_messages(ticks, fleet.spec)
    publish_sync(bootstrap, s.kafka.topic(TOPIC_TICKS), msgs)
    click.echo(
        f"published {len(ticks)} unique ticks in {len(msgs)} messages for {orgs} orgs over {hours} h "
        f"from {datetime.fromtimestamp(start, UTC).isoformat()}"
    )
    if scale_events:
        scale = fleet.scale_messages()
        publish_sync(bootstrap, s.kafka.topic(TOPIC_SCALE), scale)
        click.echo(f"published {len(fleet.scale_rows())} cell rows as {len(scale)} scale events")


@cli.group()
def org() -> None:
    """Show or set org policy (history: each record holds from its effective time on)."""


@org.command("set")
@click.argument("org_id")
@click.option("--plan", type=click.Choice(["pro", "free"]), required=True)
@click.option("--billing-mode", type=click.Choice(["unified", "legacy"]), default="unified", show_default=True)
@click.option("--customer", default=None, help="Stripe customer id (cus_…).")
@click.option("--subscription", default=None, help="Stripe subscription id (sub_…).")
@click.option("--provider", default="stripe", show_default=True, help="Billing provider (only 'stripe' is billed).")
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
    from streams.pipeline import TOPIC_POLICY

    s = _settings()
    eff = _parse_time(effective_at) if effective_at else int(time.time())
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
    publish_sync(s.kafka.servers, s.kafka.topic(TOPIC_POLICY), [(org_id.encode(), pol.to_json())])
    click.echo(json.dumps(pol.to_wire()))


@org.command("show")
@click.argument("org_id", required=False)
@click.option("--json", "as_json", is_flag=True)
def org_show(org_id: str | None, as_json: bool) -> None:
    """Policy history as the ledger holds it (what the worker has read from org-policy)."""
    led = _ledger()
    rows = led.policies(org_id)
    if as_json:
        click.echo(json.dumps(rows, default=str, indent=2))
        return
    if not rows:
        click.echo("no policy records" + (f" for {org_id}" if org_id else ""))
        return
    click.echo(f"{'org':<20} {'effective_at':<26} {'plan':<5} {'mode':<8} customer")
    for r in rows:
        eff = datetime.fromtimestamp(r["effective_ms"] / 1000, UTC).isoformat()
        click.echo(
            f"{r['org_id']:<20} {eff:<26} {r['plan']:<5} {r['billing_mode']:<8} {r['stripe_customer_id'] or '-'}"
        )


def _ledger() -> Any:
    from infra.db import make_engine, migrate
    from sinks.ledger import Ledger

    s = _settings()
    engine = make_engine(s.db.resolved_url)
    migrate(engine)
    return Ledger(engine)


@cli.command()
@click.option("--org", "org_id", default=None)
@click.option("--state", default=None, help="pending, sent, shadow, skipped_before_bill_from, rejected, ...")
@click.option("--bucket", type=int, default=None, help="Bucket start (unix s).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--summary", is_flag=True, help="Only counts by state, counters and unbilled usage.")
def ledger(org_id: str | None, state: str | None, bucket: int | None, as_json: bool, summary: bool) -> None:
    """Meter rows by state, org, bucket; counters; usage counted but not billed (and why)."""
    led = _ledger()
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
    table up to date; --refresh recomputes the window here (e.g. with no worker running).
    """
    from sinks.parity import ParityStore
    from streams.cell import parity_config

    s = _settings()
    if dashboard_url:
        from streams.web import dashboard_url as make_url

        click.echo(make_url(s, int(time.time())))
        return
    end = _parse_time(to) if to else int(time.time())
    start = _parse_time(from_) if from_ else end - 86_400
    if end <= start:
        raise click.BadParameter("--to must be after --from")
    cfg = parity_config(s)
    led = _ledger()
    store = ParityStore(led.engine, bucket_seconds=s.billing.bucket_seconds)
    if whole:
        orgs = [o for o in store.window(start, end, cfg) if (not org_id or o.org_id == org_id)]
        orgs = [o for o in orgs if not flagged or o.status.value != "ok"]
        out = [
            {
                "org_id": o.org_id,
                "gb_seconds": str(o.measure.edge_gb_s),
                "samples": o.measure.samples,
                "cell_gb_seconds": str(o.measure.cell_gb_s),
                "drift": str(o.drift),
                "status": o.status.value,
            }
            for o in orgs
        ]
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
    rows = store.rows(start // size * size, end, org=org_id, flagged_only=flagged)
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
                    "rows": [r.to_wire() for r in rows],
                    "gate": {
                        "clean_buckets": gate.clean_buckets,
                        "clean_hours": str(gate.clean_hours),
                        "required_hours": s.parity.gate_hours,
                        "last_settled": gate.last_settled,
                        "last_flagged": gate.last_flagged,
                    },
                    "state": store.state(),
                },
                indent=2,
            )
        )
        return
    if not rows:
        click.echo("no parity rows in the window (is a worker running? --refresh computes them here)")
    for b, rs in sorted(by_bucket.items()):
        label = datetime.fromtimestamp(b, UTC).strftime("%Y-%m-%d %H:%MZ")
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
        f"\ngate: {gate.clean_hours:.0f} consecutive clean hour(s) of parity (cutover needs {s.parity.gate_hours})"
    )


@cli.command()
@click.option("--orgs", type=int, default=24, show_default=True)
@click.option("--hours", type=int, default=4, show_default=True)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option(
    "--kill-worker",
    "kills",
    type=int,
    default=1,
    show_default=True,
    help="SIGKILL the worker this many times mid-run (it is restarted each time).",
)
@click.option("--timeout", type=float, default=150.0, show_default=True, help="Seconds to wait for the pipeline.")
@click.option("--keep", is_flag=True, help="Keep the demo folder under ./var/demo/ afterwards.")
@click.option(
    "--drift",
    type=click.Choice(["missing", "skew", "none"]),
    multiple=True,
    default=("missing",),
    show_default=True,
    help="Edge-side drift to inject for the parity check, one org per kind ('none' for a clean fleet).",
)
def demo(orgs: int, hours: int, seed: int, kills: int, timeout: float, keep: bool, drift: tuple[str, ...]) -> None:
    """Everything embedded: broker, local Stripe, worker, a simulated fleet; exits 0 only if all totals agree
    and the parity table is clean except exactly where drift was injected."""
    from infra.demo import DemoOptions, run_demo

    kinds = tuple(d for d in drift if d != "none")
    opts = DemoOptions(orgs=orgs, hours=hours, seed=seed, kills=kills, timeout=timeout, keep=keep, drift=kinds)
    sys.exit(run_demo(opts))


class _ReplayFailed(click.ClickException):
    """The replay could not run, or --apply refused: exit 2 (1 means: it ran and found differences)."""

    exit_code = 2


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


@cli.command()
@click.option("--partition", "partitions", type=int, multiple=True, help="Only this partition (repeatable).")
@click.option("--from-offset", "from_offsets", multiple=True, help="[PARTITION:]OFFSET to start at (inclusive).")
@click.option("--to-offset", "to_offsets", multiple=True, help="[PARTITION:]OFFSET to stop before (exclusive).")
@click.option("--since", default=None, help="Only ticks stamped at or after: unix s or RFC 3339.")
@click.option("--until", default=None, help="Only ticks stamped before: unix s or RFC 3339.")
@click.option("--bucket-from", default=None, help="First bucket (its start, or any time inside it).")
@click.option("--bucket-to", default=None, help="Last bucket, inclusive (its start, or any time inside it).")
@click.option("--dry-run/--apply", "dry_run", default=True, show_default=True, help="Only diff, or write the missing.")
@click.option("--force", is_flag=True, help="--apply even beyond Stripe's 35 days or with unexplained differences.")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON.")
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
    dry_run: bool,
    force: bool,
    as_json: bool,
    limit: int,
    jobs: int | None,
) -> None:
    """Re-derive a range of usage-ticks and diff it against what the ledger billed.

    Reads the topic without a consumer group (never commits, never disturbs a worker), prices every unique
    tick as the closer does, and compares: ticks missing from the ledger, samples the topic does not hold,
    units per (org, bucket, meter) and values per (org, meter). Exit 0 when there is no difference, 1 when
    there is, 2 when the replay could not run or --apply refused. --apply writes only the missing ticks
    into the ledger (the closer turns them into correction rows, the sender ships them) and exits 0 when
    that accounts for every difference.
    """
    from infra.replay import ReplayRefused, ReplaySpec, apply_missing, render_table, run_replay
    from streams.pipeline import TOPIC_TICKS

    s = _settings()
    spec = ReplaySpec(
        topic=s.kafka.topic(TOPIC_TICKS),
        partitions=tuple(partitions) or None,
        from_offsets=_partition_offsets(from_offsets, "--from-offset"),
        to_offsets=_partition_offsets(to_offsets, "--to-offset"),
        since_ms=_parse_time(since) * 1000 if since else None,
        until_ms=_parse_time(until) * 1000 if until else None,
        bucket_from=_parse_time(bucket_from) if bucket_from else None,
        bucket_to=_parse_time(bucket_to) if bucket_to else None,
    )
    if dry_run:  # read-only: no migration (it takes the write lock a running worker's ledger uses)
        from sqlalchemy import inspect

        from infra.db import make_engine
        from sinks.ledger import Ledger

        led = Ledger(make_engine(s.db.resolved_url))
        if not inspect(led.engine).has_table("usage_samples"):
            led.engine.dispose()
            raise _ReplayFailed(f"no ledger at {s.db.resolved_url} (no usage_samples table)")
    else:
        led = _ledger()
    applied: dict[str, Any] | None = None
    refused: list[str] = []
    try:
        try:
            result = run_replay(led, s.kafka.servers, spec, bucket_seconds=s.billing.bucket_seconds, jobs=jobs)
            if not dry_run:
                try:
                    res = apply_missing(led, result, force=force)
                    applied = {"offered": res.offered, "inserted": res.inserted}
                    applied["already_present"] = res.offered - res.inserted
                except ReplayRefused as exc:
                    refused = exc.reasons
        except EdgebillError as exc:
            raise _ReplayFailed(str(exc)) from exc
    finally:
        led.engine.dispose()
    report = result.report
    if as_json:
        out = report.to_wire(limit)
        if not dry_run:
            out["applied"] = applied
            out["refused"] = refused
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
    if refused:
        for r in refused:
            click.echo(f"refused: {r}", err=True)
        raise _ReplayFailed("nothing applied (--force to apply anyway)")
    if applied is not None:  # what remains after applying: differences the missing ticks do not explain
        remaining = bool(report.extra_ids) or any(k.diff_units and not k.explained for k in report.keys)
        sys.exit(1 if remaining else 0)
    sys.exit(0 if report.clean else 1)


@cli.command()
@click.option("--only", default=None, help="Comma-separated benchmark names (the raw limit always runs first).")
@click.option("--quick", is_flag=True, help="Smaller inputs (a smoke run, not a measurement).")
def bench(only: str | None, quick: bool) -> None:
    """Performance benchmark on a fresh embedded broker: JSON lines with ratios to the raw limit."""
    from infra.bench import run_benchmarks

    names = [n.strip() for n in only.split(",") if n.strip()] if only else None
    try:
        sys.exit(run_benchmarks(names, quick, click.echo))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def main() -> None:
    try:
        cli(standalone_mode=True)
    except EdgebillError as exc:  # pragma: no cover - click handles most
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

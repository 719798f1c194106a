"""The console script ``edgebill``: the production commands plus the developer kit's.

Adds ``broker``, ``stripe-fake``, ``produce``, ``demo`` and ``bench`` to :data:`infra.cli.cli`. The import
runs from the dev kit to the command line, never the other way.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from infra.cli import cli
from infra.cli import main as _main
from infra.cli._base import broker_errors, parse_time, require_broker, settings_for_cli

__all__ = ["cli", "main"]


@cli.command()
@click.option("--port", type=int, default=None, help="Port on 127.0.0.1 (default EDGEBILL_KAFKA_EMBEDDED_PORT).")
@click.option("--log-dir", type=click.Path(path_type=Path), default=None, help="Where the broker log goes.")
def broker(port: int | None, log_dir: Path | None) -> None:
    """Run the embedded Kafka-compatible broker (Tansu, memory storage; dev/test only) until Ctrl-C."""
    from infra.devkit.broker import run_foreground

    p = port if port is not None else settings_for_cli().kafka.embedded_port
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
@click.option(
    "--webhook-speed",
    type=click.FloatRange(min=0, min_open=True),
    default=10_000.0,
    show_default=True,
    help="Retry failed webhook deliveries on Stripe's three-day schedule compressed this many times.",
)
def stripe_fake(
    host: str,
    port: int | None,
    fault_429: float,
    fault_500: float,
    fault_cutoff: float,
    fault_slow: float,
    fault_seed: int,
    live_limits: bool,
    webhook_speed: float,
) -> None:
    """Run the local Stripe-compatible server (customers, meters, meter events, summaries, ...)."""
    from infra.devkit.stripe_fake import FaultConfig, run_foreground

    p = port if port is not None else settings_for_cli().stripe.local_port
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
    sys.exit(run_foreground(host, p, faults=faults, webhook_speed=webhook_speed))


@cli.command()
@click.option("--orgs", type=int, default=24, show_default=True, help="Simulated orgs.")
@click.option("--hours", type=int, default=4, show_default=True, help="Simulated past hours.")
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--duplicates", type=float, default=0.10, show_default=True, help="Share of ticks sent twice.")
@click.option(
    "--file", "path", type=click.File("rb"), default=None, help="JSON lines to publish instead ('-' = stdin)."
)
@click.option(
    "--as-is",
    is_flag=True,
    help="With --file: publish every line even if the worker would dead-letter it (to test the DLQ).",
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
    as_is: bool,
    policies: bool,
    scale_events: bool,
    drifts: tuple[str, ...],
) -> None:
    """Publish usage ticks: a seeded simulated fleet over past hours, or JSON lines from a file / stdin.

    The fleet's cell rows go to sandbox-scale-events too, so the parity table has both sides; --drift makes
    the edge side disagree on purpose, and the command prints the (org, bucket) pairs it affects.

    --file checks every line with the worker's own parser first (`edgebill schema` prints the format): when
    a line would be dead-lettered it lists each one with its line number and reason, publishes nothing and
    exits 1, unless --as-is.
    """
    from infra.devkit.simulator import (
        DRIFT_KINDS,
        DriftSpec,
        FleetSpec,
        build_fleet,
        encode_messages,
        inject_drift,
        pick_drift_specs,
    )
    from infra.kafka_io import publish_sync
    from models.policy import OrgPolicy
    from models.topics import TOPIC_POLICY, TOPIC_SCALE_EVENTS, TOPIC_TICKS

    s = settings_for_cli()
    bootstrap = s.kafka.servers
    if path is not None:
        _produce_file(s, path, as_is)
        return
    require_broker(s)
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
        with broker_errors(s):
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
                b = parse_time(bucket) if bucket else start + size
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
    with broker_errors(s):
        publish_sync(bootstrap, s.kafka.topic(TOPIC_TICKS), msgs)
    click.echo(
        f"published {len(ticks)} unique ticks in {len(msgs)} messages for {orgs} orgs over {hours} h "
        f"from {datetime.fromtimestamp(start, UTC).isoformat()}"
    )
    if scale_events:
        scale = fleet.scale_messages()
        with broker_errors(s):
            publish_sync(bootstrap, s.kafka.topic(TOPIC_SCALE_EVENTS), scale)
        click.echo(f"published {len(fleet.scale_rows())} cell rows as {len(scale)} scale events")


def _produce_file(s: Any, path: Any, as_is: bool) -> None:
    """Check the file's lines with the ingest parser, then publish them (all or nothing, unless ``as_is``)."""
    from infra.cli.ticks import check_tick_lines
    from infra.kafka_io import publish_sync
    from models.topics import TOPIC_TICKS

    checked = check_tick_lines(iter(path), int(time.time() * 1000))
    name = getattr(path, "name", "-")
    for bad in checked.bad:
        click.echo(f"{name}: {bad}", err=True)
    if checked.bad and not as_is:
        lines = len({b.line for b in checked.bad})
        click.echo(
            f"{len(checked.bad)} tick(s) on {lines} line(s) would be dead-lettered; nothing published "
            "(fix them, see `edgebill schema`, or --as-is to publish anyway)",
            err=True,
        )
        sys.exit(1)
    require_broker(s)
    topic = s.kafka.topic(TOPIC_TICKS)
    with broker_errors(s):
        n = publish_sync(s.kafka.servers, topic, checked.messages)
    click.echo(
        f"published {n} message(s) to {topic}: {checked.ticks} tick(s)"
        + (f", {len(checked.bad)} the worker will dead-letter" if checked.bad else "")
        + (f", {checked.ignored} of another type" if checked.ignored else "")
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
@click.option("--serve", is_flag=True, help="Keep the stack up after the checks and print the dashboard link.")
def demo(
    orgs: int, hours: int, seed: int, kills: int, timeout: float, keep: bool, drift: tuple[str, ...], serve: bool
) -> None:
    """Everything embedded: broker, local Stripe, worker, a simulated fleet; exits 0 only if all totals agree
    and the parity table is clean except exactly where drift was injected. --serve keeps it all running after
    the checks and prints a link to the dashboard, until Ctrl-C."""
    from infra.devkit.demo import DemoOptions, run_demo

    kinds = tuple(d for d in drift if d != "none")
    opts = DemoOptions(
        orgs=orgs, hours=hours, seed=seed, kills=kills, timeout=timeout, keep=keep, drift=kinds, serve=serve
    )
    sys.exit(run_demo(opts))


@cli.command()
@click.option("--only", default=None, help="Comma-separated benchmark names (the raw limit always runs first).")
@click.option("--quick", is_flag=True, help="Smaller inputs (a smoke run, not a measurement).")
@click.option(
    "--runs",
    type=click.IntRange(1, 9),
    default=1,
    show_default=True,
    help="Run every selected benchmark this many times (each on a fresh broker, the raw limit measured again), "
    "then print the median of the runs per metric.",
)
def bench(only: str | None, quick: bool, runs: int) -> None:
    """Performance benchmark on a fresh embedded broker: JSON lines with ratios to the raw limit."""
    from infra.devkit.bench import run_benchmarks

    names = [n.strip() for n in only.split(",") if n.strip()] if only else None
    try:
        sys.exit(run_benchmarks(names, quick, click.echo, runs=runs))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def main() -> None:
    """Entry point of the ``edgebill`` console script."""
    _main()


if __name__ == "__main__":
    main()

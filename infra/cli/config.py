"""``edgebill check-config``: every setting checked at once; ``--probe`` also reaches the broker, the ledger's
database and Stripe."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable

import click

from infra.cli._base import CannotRun, cli, error_fields, ledger_label
from infra.settings import Settings
from models.errors import ConfigError

PROBE_TIMEOUT_S = 5.0


@cli.command("check-config")
@click.option("--json", "as_json", is_flag=True, help="Print effective settings (and probe results) as JSON.")
@click.option("--probe", is_flag=True, help="Also connect to the broker, the ledger database and Stripe.")
def check_config(as_json: bool, probe: bool) -> None:
    """Validate every setting, the cutover interlocks and the security rules; report every problem at once.

    Exit 1 when a setting is invalid; with --probe, exit 2 when the broker, the database or Stripe cannot be
    reached (one line each, naming the setting and the fix). Values that are valid but probably not what was
    meant (a SHADOW that is neither true nor false) are warned about on stderr.
    """
    from infra.settings import config_warnings, load_settings

    for warning in config_warnings():
        click.echo(f"warning: {warning}", err=True)
    try:
        s = load_settings()
    except ConfigError as exc:
        if as_json:
            bad = {**error_fields("invalid configuration", 1, None), "problems": exc.problems}
            click.echo(json.dumps(bad, indent=2))
        click.echo(str(exc), err=True)
        sys.exit(1)
    desc = s.describe()
    desc["db"]["ledger"] = ledger_label(s.db.resolved_url)
    probes = _probe_all(s) if probe else {}
    if as_json:
        if probe:
            desc["probe"] = {name: {"ok": err is None, "error": err} for name, err in probes.items()}
            if any(err is not None for err in probes.values()):
                unreachable = ", ".join(name for name, err in probes.items() if err is not None)
                desc.update(
                    error_fields(f"cannot reach: {unreachable}", 2, "each probe's error names the setting and the fix")
                )
        click.echo(json.dumps(desc, indent=2, default=str))
    else:
        for area, values in desc.items():
            click.echo(f"[{area}]")
            for k, v in values.items():
                click.echo(f"  {k} = {v}")
        click.echo(f"ledger: {desc['db']['ledger']}")
        for name, err in probes.items():
            click.echo(f"probe {name}: {'ok' if err is None else 'FAILED'}")
        click.echo("configuration OK")
    failed = [err for err in probes.values() if err is not None]
    for err in failed:
        click.echo(f"Error: {err}", err=True)
    if failed:
        sys.exit(2)


def _probe_all(s: Settings) -> dict[str, str | None]:
    """name -> None when it answered, else the one-line "cannot run" message."""
    out: dict[str, str | None] = {}
    checks: dict[str, Callable[[Settings], None]] = {
        "broker": _probe_broker,
        "database": _probe_database,
        "stripe": _probe_stripe,
    }
    for name, check in checks.items():
        try:
            check(s)
            out[name] = None
        except CannotRun as exc:
            out[name] = exc.message
    return out


def _probe_broker(s: Settings) -> None:
    from infra.cli._base import require_broker

    require_broker(s, timeout=PROBE_TIMEOUT_S)


def _probe_database(s: Settings) -> None:
    """A connection to the ledger's database (a SQLite file need not exist yet: the worker creates it)."""
    import os
    from pathlib import Path

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from infra.cli._base import ledger_unreachable

    url = make_url(s.db.resolved_url)
    if url.get_backend_name() == "sqlite":
        folder = Path(url.database or ".").resolve().parent
        existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
        if not (existing.is_dir() and os.access(existing, os.W_OK)):
            raise ledger_unreachable(s, PermissionError(f"{existing} is not a writable folder"))
        if not Path(url.database or "").exists():
            return  # nothing to open yet; the worker creates it
    connect_args = {"connect_timeout": int(PROBE_TIMEOUT_S)} if url.get_backend_name() != "sqlite" else {}
    engine = create_engine(url, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        raise ledger_unreachable(s, exc) from exc
    finally:
        engine.dispose()


def _probe_stripe(s: Settings) -> None:
    """An authenticated GET (one meter) with the configured key: proves the base answers and the key works."""
    import stripe

    from sinks.stripe.v1 import make_client, make_http_session

    base = s.stripe.base
    fix_base = "EDGEBILL_STRIPE_API_BASE" + (
        "" if s.stripe.api_base else f" (unset: the local Stripe server, `edgebill stripe-fake`, on {base})"
    )
    http = make_http_session(1)
    client = make_client(s.stripe.api_key.get_secret_value(), base, timeout=PROBE_TIMEOUT_S, session=http)
    try:
        client.v1.billing.meters.list({"limit": 1})
    except stripe.AuthenticationError as exc:
        raise CannotRun(
            f"Stripe at {base} refused EDGEBILL_STRIPE_API_KEY",
            "set EDGEBILL_STRIPE_API_KEY to a secret key of that account",
            exc.user_message or str(exc),
        ) from exc
    except stripe.PermissionError as exc:
        raise CannotRun(
            f"Stripe at {base} does not let EDGEBILL_STRIPE_API_KEY read billing meters",
            "give the restricted key read and write access to Billing meters and meter events",
            exc.user_message or str(exc),
        ) from exc
    except stripe.APIConnectionError as exc:
        raise CannotRun(
            f"cannot reach Stripe at {base}", f"check {fix_base} and the network", _network_reason(str(exc))
        ) from exc
    except stripe.StripeError as exc:
        raise CannotRun(
            f"Stripe at {base} answered {exc.http_status or 'an error'}",
            f"check {fix_base}",
            exc.user_message or str(exc),
        ) from exc
    finally:
        http.close()


def _network_reason(text: str) -> str:
    """The cause inside the SDK's connection-error text ("Connection refused", "timed out", ...)."""
    m = re.search(r"\[Errno -?\d+\] ([^\"')]+)", text)
    if m:
        return m.group(1).strip()
    if "timed out" in text.lower():
        return f"no answer within {PROBE_TIMEOUT_S:g} s"
    _, _, rest = text.partition("Network error: ")
    return (rest or text).strip()[:160]

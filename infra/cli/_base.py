"""The ``edgebill`` command group and what every command shares (settings, time parsing, the ledger).

Commands print for humans (or ``--json``); logs go to stderr.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime
from typing import Any

import click

from models.errors import ConfigError

__all__ = ["cli", "ledger_for_cli", "parse_time", "settings_for_cli"]

log = logging.getLogger("edgebill")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("alembic", "stripe", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def settings_for_cli() -> Any:
    from infra.settings import load_settings

    try:
        return load_settings()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def parse_time(value: str) -> int:
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


def ledger_for_cli() -> Any:
    """The ledger named by the settings, migrated to the current schema."""
    from sinks.ledger import Ledger
    from sinks.schema import make_engine, migrate

    s = settings_for_cli()
    engine = make_engine(s.db.resolved_url)
    migrate(engine)
    return Ledger(engine)

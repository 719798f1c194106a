"""The ``edgebill`` command group and what every command shares: settings, time parsing, the ledger, and the
"cannot run" errors.

Exit codes, for every command: 0 done; 1 the command ran and found something wrong (differences, bad lines,
invalid settings for ``check-config``); 2 the command could not run (a broker, database or Stripe that cannot
be reached, no ledger, invalid settings, a usage error); ``reconcile`` alone has a fourth, 3: it ran and compared
nothing (never to be read as clean). A "cannot run" error is one line naming the setting and the fix, never a
traceback.

Commands print for humans (or ``--json``); logs and the "which ledger" line go to stderr.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from models.errors import BrokerError, ConfigError

if TYPE_CHECKING:
    from infra.settings import Settings
    from sinks.ledger import Ledger

__all__ = [
    "CannotRun",
    "InvalidSettings",
    "NoLedger",
    "broker_errors",
    "broker_unreachable",
    "cli",
    "iso",
    "ledger_label",
    "ledger_unreachable",
    "open_ledger",
    "parse_time",
    "require_broker",
    "settings_for_cli",
]

log = logging.getLogger("edgebill")

BROKER_PROBE_TIMEOUT_S = 5.0
DB_CONNECT_TIMEOUT_S = 10


class CannotRun(click.ClickException):
    """The command cannot run: something it needs cannot be reached or opened. Exit 2, one line.

    ``what`` says what failed, ``detail`` (first line only) why, ``fix`` names the setting or command that
    fixes it.
    """

    exit_code = 2

    def __init__(self, what: str, fix: str, detail: str | BaseException | None = None) -> None:
        why = _first_line(detail) if detail is not None else ""
        super().__init__(f"{what}{f' ({why})' if why else ''}: {fix}")


class NoLedger(CannotRun):
    """No ledger exists yet where the settings point (no SQLite file, or a database without edgebill's tables):
    a command that can say something without one catches it."""


class InvalidSettings(click.ClickException):
    """The settings are invalid: every problem listed, exit 2 (the command could not run)."""

    exit_code = 2


def _first_line(detail: str | BaseException) -> str:
    if isinstance(detail, BaseException):
        text = str(detail).strip() or type(detail).__name__
        if not isinstance(detail, click.ClickException) and type(detail).__name__ not in text:
            text = f"{type(detail).__name__}: {text}"
    else:
        text = detail.strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= 200 else line[:197] + "..."


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("alembic", "stripe", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def settings_for_cli() -> Settings:
    """The settings, or exit 2 listing every problem (``check-config`` shows the same list, exit 1)."""
    from infra.settings import load_settings

    try:
        return load_settings()
    except ConfigError as exc:
        raise InvalidSettings(f"{exc}\n(`edgebill check-config` shows every effective value)") from exc


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


def iso(unix_s: float | None) -> str:
    """``2026-06-15T23:00:00Z`` (UTC, whole seconds); ``-`` for None."""
    if unix_s is None:
        return "-"
    return datetime.fromtimestamp(unix_s, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """edgebill: usage ticks on Kafka -> exact GB-second buckets -> idempotent Stripe meter events.

    Settings come from EDGEBILL_* environment variables (`edgebill check-config` shows them all).
    Exit codes: 0 done, 1 the command found a problem, 2 the command could not run (`reconcile`: 3 it compared
    nothing, which is never clean).
    """
    _setup_logging(verbose)


# ------------------------------------------------------------------------------------------- the broker


def broker_unreachable(s: Settings, detail: str | BaseException | None = None) -> CannotRun:
    if s.kafka.embedded:
        return CannotRun(
            f"no Kafka broker answers at {s.kafka.servers} (EDGEBILL_KAFKA_BOOTSTRAP is unset: the embedded broker)",
            "start it with `edgebill broker`, or set EDGEBILL_KAFKA_BOOTSTRAP to your brokers' host:port",
            detail,
        )
    return CannotRun(
        f"cannot reach a Kafka broker at EDGEBILL_KAFKA_BOOTSTRAP={s.kafka.servers}",
        "check that the brokers run and EDGEBILL_KAFKA_BOOTSTRAP lists reachable host:port pairs",
        detail,
    )


def require_broker(s: Settings, timeout: float = BROKER_PROBE_TIMEOUT_S) -> None:
    """Return when a broker answers Kafka requests at the configured bootstrap; else exit 2 in one line."""
    from infra.kafka_admin import kafka_answers

    try:
        ok = kafka_answers(s.kafka.servers, timeout=timeout)
    except BrokerError as exc:
        raise broker_unreachable(s, exc) from exc
    if not ok:
        raise broker_unreachable(s, f"nothing answered Kafka requests, waited up to {timeout:g} s")


@contextmanager
def broker_errors(s: Settings) -> Iterator[None]:
    """Turn a broker failure inside the block (after :func:`require_broker` passed) into exit 2, one line."""
    from aiokafka.errors import KafkaError

    # aiokafka logs each failed connection attempt at ERROR, with a traceback: the command says it once.
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        yield
    except (KafkaError, BrokerError, OSError, TimeoutError) as exc:
        raise broker_unreachable(s, exc) from exc
    finally:
        quiet.setLevel(level)


# ------------------------------------------------------------------------------------------- the ledger


def ledger_label(url: str) -> str:
    """The ledger as an operator should read it: an absolute SQLite path, or the URL without its password."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        return f"sqlite:///{Path(u.database).resolve().as_posix()}"
    return u.render_as_string(hide_password=True)


def _db_fix(s: Settings) -> str:
    if s.db.url:
        return "check EDGEBILL_DATABASE_URL (and that the database server runs)"
    return (
        f"EDGEBILL_DATABASE_URL is unset, so the ledger is {s.db.var_dir / 'edgebill.db'} under the current "
        f"folder ({Path.cwd()}): run from the worker's folder, or set EDGEBILL_DATABASE_URL"
    )


def ledger_unreachable(s: Settings, exc: BaseException) -> CannotRun:
    """The one line for a ledger database that refused a connection (or is not a database)."""
    detail = getattr(exc, "orig", None) or exc
    return CannotRun(f"cannot open the ledger at {ledger_label(s.db.resolved_url)}", _db_fix(s), detail)


def open_ledger(s: Settings, *, quiet: bool = False) -> Ledger:
    """The existing ledger named by the settings, at the schema this code expects. Never creates one.

    Read-only commands use this (it runs no migration, so it neither creates a database file nor takes the
    lock a running worker's migrations use). Prints ``ledger: <url>`` to stderr unless ``quiet``. No ledger,
    a database that cannot be reached, or a schema at another revision: exit 2 in one line (no ledger:
    :class:`NoLedger`).
    """
    from urllib.parse import quote

    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from sinks.ledger import Ledger
    from sinks.schema import current_revision, head_revision, make_engine

    url = s.db.resolved_url
    label = ledger_label(url)
    u = make_url(url)
    kwargs: dict[str, Any] = {}
    if u.get_backend_name() == "sqlite":
        if not u.database or u.database == ":memory:" or not Path(u.database).is_file():
            raise NoLedger(f"no ledger at {label}", _db_fix(s))
        # Looked at read-only first: opening a SQLite file for use writes to it (the journal mode).
        probe = create_engine(f"sqlite:///file:{quote(Path(u.database).resolve().as_posix())}?mode=ro&uri=true")
    else:
        kwargs["connect_args"] = {"connect_timeout": DB_CONNECT_TIMEOUT_S}
        probe = make_engine(url, **kwargs)
    try:
        current = current_revision(probe)
    except SQLAlchemyError as exc:
        raise ledger_unreachable(s, exc) from exc
    finally:
        probe.dispose()
    head = head_revision()
    if current is None:
        raise NoLedger(f"no ledger at {label} (the database has no edgebill tables)", _db_fix(s))
    if current != head:
        raise CannotRun(
            f"the ledger at {label} is at schema revision {current}, this edgebill expects {head}",
            "run this version's `edgebill worker` once (it migrates the ledger), or use the matching edgebill",
        )
    engine = make_engine(url, **kwargs)
    if not quiet:
        click.echo(f"ledger: {label}", err=True)
    return Ledger(engine)


def ledger_for_writing(s: Settings, *, quiet: bool = False) -> Ledger:
    """The ledger named by the settings, created or migrated to this code's schema (under the migration lock a
    starting worker takes too). For commands that record something in it, such as a cutover change, which
    must not depend on a worker having run first. A database that cannot be reached: exit 2 in one line."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from sinks.ledger import Ledger
    from sinks.schema import make_engine, migrate

    url = s.db.resolved_url
    kwargs: dict[str, Any] = {}
    if make_url(url).get_backend_name() != "sqlite":
        kwargs["connect_args"] = {"connect_timeout": DB_CONNECT_TIMEOUT_S}
    engine = make_engine(url, **kwargs)
    try:
        migrate(engine)
    except SQLAlchemyError as exc:
        engine.dispose()
        raise ledger_unreachable(s, exc) from exc
    if not quiet:
        click.echo(f"ledger: {ledger_label(url)}", err=True)
    return Ledger(engine)

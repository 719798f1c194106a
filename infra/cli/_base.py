"""The ``edgebill`` command group and what every command shares: settings, time parsing, the ledger, and the
"cannot run" errors.

Exit codes: 0 done; 1 found something wrong; 2 could not run; 3 (``reconcile``) compared nothing; 4
(``replay``) only ticks pending close. A command raises its errors and never prints them:
:class:`EdgebillCommand` / :class:`EdgebillGroup` print one line, and with ``--json`` one JSON object on
stdout. In detail: docs/architecture.md, "Module notes".
"""

from __future__ import annotations

import json
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
    "EdgebillCommand",
    "EdgebillGroup",
    "InvalidSettings",
    "NoLedger",
    "broker_errors",
    "broker_unreachable",
    "cli",
    "error_fields",
    "error_object",
    "iso",
    "ledger_label",
    "ledger_unreachable",
    "mark_reported",
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
        self.error = f"{what}{f' ({why})' if why else ''}"
        self.fix = fix
        super().__init__(f"{self.error}: {fix}")


#: The hint of every "invalid settings" error.
CHECK_CONFIG_HINT = "`edgebill check-config` shows every effective value"


class NoLedger(CannotRun):
    """No ledger exists yet where the settings point (no SQLite file, or a database without edgebill's tables):
    a command that can say something without one catches it."""


class InvalidSettings(click.ClickException):
    """The settings are invalid: every problem listed, exit 2 (the command could not run)."""

    exit_code = 2

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


# ------------------------------------------------------------------------------- errors as JSON (--json)

_REPORTED = "_edgebill_json_reported"


def mark_reported(exc: click.ClickException) -> click.ClickException:
    """Mark ``exc`` as already in the command's JSON output (it printed its report, with ``error`` and
    ``exit_code``, before raising): no second JSON object is printed for it."""
    setattr(exc, _REPORTED, True)
    return exc


def _command_name(ctx: click.Context) -> str:
    names: list[str] = []
    c: click.Context | None = ctx
    while c is not None and c.parent is not None:
        names.append(c.info_name or "")
        c = c.parent
    return " ".join(["edgebill", *reversed(names)])


def error_object(exc: click.ClickException, ctx: click.Context) -> dict[str, Any]:
    """The JSON object of an error that ends a command: what failed, the exit code, the fix."""
    command = _command_name(ctx)
    out: dict[str, Any] = {"error": exc.format_message(), "exit_code": exc.exit_code, "hint": None}
    if isinstance(exc, CannotRun):
        out["error"], out["hint"] = exc.error, exc.fix
    elif isinstance(exc, InvalidSettings):
        out["error"], out["hint"], out["problems"] = "invalid configuration", CHECK_CONFIG_HINT, exc.problems
    elif isinstance(exc, click.UsageError):
        out["hint"] = f"`{command} --help` lists its options"
    out["command"] = command
    return out


def error_fields(error: str, exit_code: int, hint: str | None) -> dict[str, Any]:
    """The keys of :func:`error_object`, for a command that puts its error into its own JSON report (then
    raises the error through :func:`mark_reported`, or exits with ``exit_code``)."""
    return {"error": error, "exit_code": exit_code, "hint": hint, "command": _command_name(click.get_current_context())}


def _report_as_json(exc: click.ClickException, ctx: click.Context) -> None:
    if getattr(exc, _REPORTED, False):
        return
    mark_reported(exc)
    click.echo(json.dumps(error_object(exc, ctx), indent=2, default=str))


def _wants_json(cmd: click.Command, args: list[str]) -> bool:
    """``--json`` among the arguments (before a ``--``) of a command that has that flag."""
    if not any("--json" in p.opts for p in cmd.params if isinstance(p, click.Option)):
        return False
    head = args[: args.index("--")] if "--" in args else args
    return "--json" in head


class _JsonErrors(click.Command):
    """With ``--json``, an error that ends the command also prints :func:`error_object` on stdout; the
    exception then goes on unchanged (click prints its line on stderr and exits with its code)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        wants = _wants_json(self, args)  # the options are not parsed yet: a bad value fails right here
        try:
            return super().parse_args(ctx, args)
        except click.ClickException as exc:
            if wants:
                _report_as_json(exc, ctx)
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            if ctx.params.get("as_json"):
                _report_as_json(exc, ctx)
            raise


class EdgebillCommand(_JsonErrors, click.Command):
    """Every ``edgebill`` command: its errors reach a script as JSON too (see :class:`_JsonErrors`)."""


class EdgebillGroup(_JsonErrors, click.Group):
    """Every ``edgebill`` group: its commands are :class:`EdgebillCommand`, its groups of this class."""

    command_class = EdgebillCommand
    group_class = type


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
        raise InvalidSettings(f"{exc}\n({CHECK_CONFIG_HINT})", exc.problems) from exc


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


@click.group(cls=EdgebillGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """edgebill: usage ticks on Kafka -> exact GB-second buckets -> idempotent Stripe meter events.

    Settings come from EDGEBILL_* environment variables (`edgebill check-config` shows them all).
    Exit codes: 0 done, 1 the command found a problem, 2 the command could not run (`reconcile`: 3 it compared
    nothing; `replay`: 4 ticks wait for the closer; neither is ever clean).
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

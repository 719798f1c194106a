"""``edgebill worker``: every agent and the web server, until SIGINT/SIGTERM."""

from __future__ import annotations

import click

from infra.cli._base import broker_unreachable, cli, ledger_unreachable, require_broker, settings_for_cli
from models.errors import BrokerError, EdgebillError


@cli.command()
def worker() -> None:
    """Run all agents and the web server (bound to EDGEBILL_WEB_HOST, 127.0.0.1 by default).

    A broker or ledger database that cannot be reached at start: exit 2 with one line naming the setting.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from infra.runtime import run_worker

    s = settings_for_cli()
    if s.kafka.embedded:  # nothing to wait for: say so in one line now
        require_broker(s, timeout=2.0)
    try:
        run_worker(s)
    except BrokerError as exc:
        raise broker_unreachable(s, exc) from exc
    except SQLAlchemyError as exc:  # the ledger's connect and migrations run before the worker starts
        raise ledger_unreachable(s, exc) from exc
    except EdgebillError as exc:
        raise click.ClickException(str(exc)) from exc

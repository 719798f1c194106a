"""``edgebill worker``: every agent and the web server, until SIGINT/SIGTERM."""

from __future__ import annotations

import click

from infra.cli._base import cli, settings_for_cli
from models.errors import EdgebillError


@cli.command()
def worker() -> None:
    """Run all agents and the web server (bound to EDGEBILL_WEB_HOST, 127.0.0.1 by default)."""
    from infra.runtime import run_worker

    try:
        run_worker(settings_for_cli())
    except EdgebillError as exc:
        raise click.ClickException(str(exc)) from exc

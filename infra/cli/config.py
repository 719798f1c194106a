"""``edgebill check-config``."""

from __future__ import annotations

import json
import sys

import click

from infra.cli._base import cli
from models.errors import ConfigError


@cli.command("check-config")
@click.option("--json", "as_json", is_flag=True, help="Print effective settings as JSON.")
def check_config(as_json: bool) -> None:
    """Validate every setting and the cutover interlocks; report every problem at once (exit 1)."""
    from infra.settings import config_warnings, load_settings

    for warning in config_warnings():
        click.echo(f"warning: {warning}", err=True)
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

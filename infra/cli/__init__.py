"""``edgebill``: the production command line (click).

Importing this package registers every production command on :data:`cli`. The developer commands
(broker, stripe-fake, produce, demo, bench) are added by :mod:`infra.devkit.cli`, which the console
script runs; production code never imports the dev kit.
"""

from __future__ import annotations

import sys

import click

from infra.cli import (
    config,
    cutover,
    dlq,
    ledger,
    org,
    parity,
    reconcile,
    replay,
    stripe_setup,
    ticks,
    webhooks,
    worker,
)
from infra.cli._base import cli
from models.errors import EdgebillError

__all__ = ["cli", "main"]

_COMMAND_MODULES = (config, cutover, dlq, ledger, org, parity, reconcile, replay, stripe_setup, ticks, webhooks, worker)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except EdgebillError as exc:  # pragma: no cover - click handles most
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

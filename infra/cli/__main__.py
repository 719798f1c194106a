"""``python -m infra.cli``: the production commands."""

from infra.cli import main

main()

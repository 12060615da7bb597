"""The ``concordance`` command: one module per group of subcommands, all on one app."""

from . import client, daemon, deadletters, lattice, maintenance  # noqa: F401 - they register their commands
from .common import app


def main() -> None:
    app()

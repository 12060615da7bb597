"""The ``concordance`` command: one module per group of subcommands, all on one app."""

# They register their commands; --help lists them in this order.
from . import client, read  # noqa: F401, I001
from . import daemon, lattice, maintenance, deadletters  # noqa: F401, I001
from . import archive  # noqa: F401, I001
from . import permissions  # noqa: F401, I001
from .common import app


def main() -> None:
    app()

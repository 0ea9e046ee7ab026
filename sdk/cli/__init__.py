"""The ``lowra`` command line (``lowra --help``)."""
from lowra.sdk.cli.main import main

__all__ = ["main"]

"""The `fedrec` command: one sub-app per area, each a thin layer over a Python API.

Sub-apps import their heavy dependencies (torch, flwr) inside commands, so `fedrec --help`
stays fast. Every `FedrecError` becomes one red line on stderr and exit status 1.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from shared.errors import FedrecError

CONTEXT = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="fedrec",
    help="Federated, privacy-preserving edge recommender for e-commerce.",
    no_args_is_help=True,
    context_settings=CONTEXT,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def main() -> None:
    """Entry point of the `fedrec` console script."""
    try:
        app()
    except FedrecError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False)
        sys.exit(1)

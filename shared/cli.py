"""The `fedrec` command: one sub-app per area, each a thin layer over a Python API.

Sub-apps import their heavy dependencies (torch, flwr) inside commands, so `fedrec --help`
stays fast. Every `FedrecError` becomes one red line on stderr and exit status 1.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from coordinator.cli import app as coordinator_app
from deploy.cli import app as deploy_app
from edge_client.cli import app as edge_app
from shared.data_cli import app as data_app
from shared.errors import FedrecError
from shared.train_cli import evaluate as evaluate_command
from shared.train_cli import train as train_command
from simulations.cli import app as sim_app
from simulations.cli import demo as demo_command

CONTEXT = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="fedrec",
    help="Federated, privacy-preserving edge recommender for e-commerce.",
    no_args_is_help=True,
    context_settings=CONTEXT,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_app, name="data")
app.command("train")(train_command)
app.command("evaluate")(evaluate_command)
app.add_typer(edge_app, name="edge")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(deploy_app, name="deploy")
app.add_typer(sim_app, name="sim")
app.command("demo")(demo_command)


def main() -> None:
    """Entry point of the `fedrec` console script."""
    try:
        app()
    except FedrecError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False)
        sys.exit(1)

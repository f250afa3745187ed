"""`fedrec coordinator`: run federated rounds and administer the registry (thin CLI).

Every command reads the registry of a state directory (``--state-dir``, default
``$FEDREC_STATE_DIR`` or ``./state``); ``--json`` prints machine-readable output.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from coordinator.ab_cli import app as ab_app
from coordinator.errors import CoordinatorError

if TYPE_CHECKING:
    from coordinator.registry import ModelVersion, Registry

CONTEXT = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    help="Run federated rounds and administer model versions, sites and privacy.",
    no_args_is_help=True,
    context_settings=CONTEXT,
)
models_app = typer.Typer(
    help="List, inspect, publish and roll back model versions.",
    no_args_is_help=True,
    context_settings=CONTEXT,
)
app.add_typer(models_app, name="models")
app.add_typer(ab_app, name="ab")

StateDir = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="State directory holding coordinator/coordinator.db "
        "(default: $FEDREC_STATE_DIR or ./state).",
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]

console = Console()


def _state_dir(state_dir: Path | None) -> Path:
    from shared.federated import default_state_dir

    return (state_dir or default_state_dir()).resolve()


def _registry(state_dir: Path | None) -> Registry:
    from coordinator.registry import Registry

    return Registry(_state_dir(state_dir) / "coordinator" / "coordinator.db", create=False)


def _print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


# ----------------------------------------------------------------------------- run
@app.command()
def run(
    connection: Annotated[
        str,
        typer.Option(
            "--connection",
            "-c",
            help="SuperLink connection name in $FLWR_HOME/config.toml (flwr run's SUPERLINK).",
        ),
    ] = "local",
    rounds: Annotated[int, typer.Option("--rounds", "-n", help="Rounds to run.", min=0)] = 3,
    continuous: Annotated[
        bool,
        typer.Option(
            "--continuous",
            help="Feedback loop: a round whenever enough sites report enough new events "
            "(or on --round-interval); --rounds caps it (0 = no cap).",
        ),
    ] = False,
    round_interval: Annotated[
        float, typer.Option(help="Continuous: also run a round every this many seconds.")
    ] = 0.0,
    run_config: Annotated[
        list[str] | None,
        typer.Option("--run-config", help="Extra run-config 'key=value' pairs (repeatable)."),
    ] = None,
    app_dir: Annotated[
        Path, typer.Option("--app", help="The Flower app (this repository).")
    ] = Path(),
    flwr_home: Annotated[
        Path | None,
        typer.Option(help="Flower home with config.toml (default: <state-dir>/flwr)."),
    ] = None,
    state_dir: StateDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Run federated rounds with `flwr run` against a SuperLink, then report them.

    Example: fedrec coordinator run -c fedrec -n 2 --run-config 'catalogue="cat.json"'
    """
    from deploy.flower_processes import FLOWER_ENV, flower_bin, format_node_config

    state = _state_dir(state_dir)
    home = (flwr_home or state / "flwr").resolve()
    home.mkdir(parents=True, exist_ok=True)
    overrides: dict[str, Any] = {
        "mode": "continuous" if continuous else "rounds",
        "num-rounds": rounds,
        "state-dir": str(state),
    }
    if round_interval:
        overrides["round-interval"] = round_interval
    extra = " ".join(run_config or [])
    argv = [
        flower_bin("flwr"),
        "run",
        str(app_dir.resolve()),
        connection,
        "--stream",
        "--run-config",
        (format_node_config(overrides) + " " + extra).strip(),
    ]
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(home), "FEDREC_STATE_DIR": str(state)}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    run_id = _stream_flwr_run(argv, env, connection)
    registry = _registry(state)
    from coordinator.reports import status_report

    report = status_report(registry)
    report["flwr_run_id"] = run_id
    if as_json:
        _print_json(report)
    else:
        _render_status(report)
    last = report["last_run"]
    if last is None or last["status"] != "completed":
        raise CoordinatorError(
            f"the run did not complete (status: {last['status'] if last else 'not recorded'}"
            f"{'; ' + last['detail'] if last and last['detail'] else ''})"
        )


def _stream_flwr_run(argv: list[str], env: dict[str, str], connection: str) -> int | None:
    """Run `flwr run --stream`, echo its output; on Ctrl-C stop the run on the SuperLink."""
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    run_id: int | None = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stderr.write(line)
            match = re.search(r"Successfully started run (\d+)", line)
            if match:
                run_id = int(match.group(1))
        proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        if run_id is not None:
            subprocess.run(
                [argv[0], "stop", str(run_id), connection], env=env, check=False, timeout=60
            )
        proc.wait(timeout=30)
        raise
    if run_id is None:
        raise CoordinatorError(f"flwr run did not start a run (exit code {proc.returncode})")
    return run_id


# ----------------------------------------------------------------------------- demo sites
@app.command("demo-sites")
def demo_sites(
    sites: Annotated[int, typer.Option("--sites", min=2, help="Number of sites.")] = 3,
    shoppers: Annotated[int, typer.Option(min=5, help="Shoppers per site.")] = 40,
    items: Annotated[int, typer.Option(min=10, help="Catalogue size.")] = 60,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic log.")] = 0,
    state_dir: StateDir = None,
) -> None:
    """Write synthetic sites <state>/sites/site-NNN and a catalogue for `flwr run .`.

    Flower's simulation maps SuperNode partition N to <state>/sites/site-NNN, and a run with
    no catalogue uses <state>/sites/catalogue.json.

    Example: fedrec coordinator demo-sites --sites 3 && flwr run . --stream
    """
    from deploy.demo_sites import sites_root, write_demo_sites

    root = sites_root(_state_dir(state_dir))
    catalogue, dirs = write_demo_sites(
        root, n_sites=sites, shoppers_per_site=shoppers, n_items=items, seed=seed
    )
    console.print(f"wrote {len(dirs)} sites under {root} and {catalogue}")
    console.print(
        "run them: FLWR_HOME=$PWD/state/flwr flwr run . --stream "
        f"--federation-config 'num-supernodes={sites}' --run-config 'min-sites={sites}'"
    )


@app.command("stop-local")
def stop_local(
    flwr_home: Annotated[
        Path | None,
        typer.Option(
            help="Flower home whose processes to stop (default: $FLWR_HOME or <state-dir>/flwr)."
        ),
    ] = None,
    state_dir: StateDir = None,
) -> None:
    """Stop Flower processes left running under a Flower home.

    `flwr run .` with the default `local` connection starts a simulation SuperLink that
    outlives the run; only processes started with this FLWR_HOME are touched.

    Example: fedrec coordinator stop-local
    """
    from deploy.flower_processes import flower_processes_under, kill_pids

    env_home = os.environ.get("FLWR_HOME")
    home = (flwr_home or (Path(env_home) if env_home else _state_dir(state_dir) / "flwr")).resolve()
    pids = list(flower_processes_under(home))
    kill_pids(pids)
    console.print(f"stopped {len(pids)} process(es) running with FLWR_HOME={home}")


# ----------------------------------------------------------------------------- status
@app.command()
def status(state_dir: StateDir = None, as_json: JsonFlag = False) -> None:
    """Rounds, sites seen, last contact and each site's epsilon spent of its budget.

    Example: fedrec coordinator status --json
    """
    from coordinator.reports import status_report

    report = status_report(_registry(state_dir))
    if as_json:
        _print_json(report)
    else:
        _render_status(report)


def _render_status(report: dict[str, Any]) -> None:
    last = report["last_run"]
    if last:
        console.print(
            f"last run #{last['id']} (flower {last['flwr_run_id']}): [bold]{last['status']}[/] "
            f"- {last['mode']}, {last['strategy']}, privacy {last['privacy_mode']}"
            f"{', SecAgg+' if last['secagg'] else ''}"
        )
    console.print(
        f"rounds: {report['rounds']['total']} {report['rounds']['by_status']}; "
        f"published: {report['published_version']}; newest: {report['newest_version']}"
    )
    rounds = Table(title="recent rounds")
    for col in (
        "round",
        "status",
        "asked",
        "ok",
        "rejected",
        "refused",
        "failed",
        "s",
        "version",
        "eps max",
    ):
        rounds.add_column(col)
    for r in report["recent_rounds"]:
        rounds.add_row(
            str(r["number"]),
            str(r["status"]),
            str(r["sites_asked"]),
            str(r["sites_accepted"]),
            str(r["sites_rejected"]),
            str(r["sites_refused"]),
            str(r["sites_failed"]),
            f"{r['seconds']:.1f}" if r["seconds"] is not None else "",
            str(r["model_version"] or ""),
            _fmt(r["epsilon_max"]),
        )
    console.print(rounds)
    sites = Table(title="sites")
    for col in ("site", "last contact", "last outcome", "rounds", "eps spent", "budget", "serving"):
        sites.add_column(col)
    for s in report["sites"]:
        sites.add_row(
            s["site"],
            str(s["last_contact"]),
            str(s["last_outcome"]),
            str(s["rounds_trained"]),
            _fmt(s["epsilon_spent"]),
            _fmt(s["epsilon_budget"]),
            str(s["serving_version"] or ""),
        )
    console.print(sites)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


# ----------------------------------------------------------------------------- privacy
@app.command()
def privacy(state_dir: StateDir = None, as_json: JsonFlag = False) -> None:
    """Privacy report: unit, mechanism, accountant, epsilon per site and per version.

    Example: fedrec coordinator privacy --json
    """
    from coordinator.reports import privacy_report

    report = privacy_report(_registry(state_dir))
    if as_json:
        _print_json(report)
        return
    console.print(f"privacy modes used: {', '.join(report['privacy_modes_used']) or 'none'}")
    store = report["store_mode"]
    console.print(f"store mode: unit {store['unit']}; {store['mechanism']}; {store['accountant']}")
    table = Table(title="store mode: epsilon per site")
    for col in ("site", "epsilon spent", "budget", "share", "delta", "rounds"):
        table.add_column(col)
    for s in store["sites"]:
        table.add_row(
            s["site"],
            _fmt(s["epsilon_spent"]),
            _fmt(s["epsilon_budget"]),
            _fmt(s["share_of_budget"]),
            _fmt(s["delta"]),
            str(s["rounds_trained"]),
        )
    console.print(table)
    app_mode = report["app_mode"]
    console.print(
        f"app mode: unit {app_mode['unit']}; epsilon {_fmt(app_mode['epsilon'])} at delta "
        f"{_fmt(app_mode['delta'])} after {app_mode['releases']} release(s) "
        f"({app_mode['accountant']})"
    )


# ----------------------------------------------------------------------------- models
def _model_row(m: ModelVersion) -> dict[str, Any]:
    return m.to_dict()


@models_app.command("list")
def models_list(state_dir: StateDir = None, as_json: JsonFlag = False) -> None:
    """Every model version, newest first, with round, epsilon and the published flag.

    Example: fedrec coordinator models list --json
    """
    versions = _registry(state_dir).models()
    if as_json:
        _print_json([_model_row(m) for m in versions])
        return
    table = Table(title="model versions")
    for col in ("version", "round", "parent", "eps max", "eps mean", "hr@10", "published"):
        table.add_column(col)
    for m in versions:
        table.add_row(
            m.version,
            "" if m.round is None else str(m.round),
            m.parent or "",
            _fmt(m.epsilon_max),
            _fmt(m.epsilon_mean),
            _fmt(m.metrics.get("hr@10")),
            "yes" if m.published else "",
        )
    console.print(table)


@models_app.command("show")
def models_show(
    version: Annotated[str, typer.Argument(help="Model version name.")],
    state_dir: StateDir = None,
    as_json: JsonFlag = False,
) -> None:
    """One version in full: lineage, sha256, metrics, privacy, where it is stored.

    Example: fedrec coordinator models show v20261128T130102-1a2b3c4d
    """
    model = _registry(state_dir).model(version)
    if as_json:
        _print_json(_model_row(model))
        return
    for key, value in _model_row(model).items():
        console.print(f"[bold]{key}[/]: {value}")


@models_app.command("publish")
def models_publish(
    version: Annotated[str, typer.Argument(help="Model version name.")],
    state_dir: StateDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Make VERSION the one every site serves (it reaches sites with the next round).

    Example: fedrec coordinator models publish v20261128T130102-1a2b3c4d
    """
    model = _registry(state_dir).publish(version, note="published from the CLI")
    _report_publication(model, "published", as_json)


@models_app.command("rollback")
def models_rollback(
    version: Annotated[
        str | None, typer.Argument(help="Version to go back to (default: the previous one).")
    ] = None,
    state_dir: StateDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Publish the previously published version again (or VERSION).

    Example: fedrec coordinator models rollback
    """
    model = _registry(state_dir).rollback(version)
    _report_publication(model, "rolled back to", as_json)


def _report_publication(model: ModelVersion, verb: str, as_json: bool) -> None:
    if as_json:
        _print_json(_model_row(model))
    else:
        console.print(f"{verb} [bold]{model.version}[/]: sites serve it from the next round")

"""`fedrec coordinator ab`: start, watch, stop and promote A/B experiments (thin CLI).

The logic is `coordinator.ab_testing`; the experiment reaches the sites with the next
federated run or round (`coordinator.ab_sync`), which also brings their counts back.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from coordinator.ab_testing import ABRegistry

CONTEXT = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    help="A/B tests of model versions: traffic split at the sites, CTR and conversion per arm.",
    no_args_is_help=True,
    context_settings=CONTEXT,
)

StateDir = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="State directory holding coordinator/coordinator.db "
        "(default: $FEDREC_STATE_DIR or ./state).",
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
ExperimentArg = Annotated[
    str | None, typer.Argument(help="Experiment id (default: the newest).", show_default=False)
]

console = Console()


def _ab(state_dir: Path | None) -> ABRegistry:
    from coordinator.ab_testing import ABRegistry
    from shared.federated import default_state_dir

    root = (state_dir or default_state_dir()).resolve()
    return ABRegistry(root / "coordinator" / "coordinator.db")


def _print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def _split(text: str | None, kind: type) -> list[Any] | None:
    if text is None:
        return None
    try:
        return [kind(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise typer.BadParameter(f"{text!r}: {err}") from err


@app.command()
def start(
    versions: Annotated[
        list[str], typer.Argument(help="Two or more registered versions; the first is control.")
    ],
    split: Annotated[
        str | None, typer.Option(help="Traffic weights, e.g. '50,50' or '90,10' (default equal).")
    ] = None,
    names: Annotated[
        str | None, typer.Option(help="Arm names, e.g. 'control,candidate' (default A, B, ...).")
    ] = None,
    window_minutes: Annotated[
        float, typer.Option(help="An outcome counts up to this long after the impression.")
    ] = 30.0,
    epsilon: Annotated[
        float,
        typer.Option(help="Laplace noise per site report, epsilon per shopper (0 = exact)."),
    ] = 0.0,
    metric: Annotated[
        str, typer.Option(help="Metric that decides the winner: ctr | conversion.")
    ] = "ctr",
    alpha: Annotated[float, typer.Option(help="Significance level (Bonferroni over arms).")] = 0.05,
    state_dir: StateDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Start an experiment; the sites receive it with the next federated run or round.

    Example: fedrec coordinator ab start v20261128T1301-1a2b v20261129T0800-5e6f --split 90,10
    """
    with _ab(state_dir) as reg:
        exp = reg.start(
            versions,
            weights=_split(split, float),
            names=_split(names, str),
            window_s=window_minutes * 60.0,
            epsilon=epsilon,
            metric=metric,
            alpha=alpha,
        )
    if as_json:
        _print_json(
            {"experiment_id": exp.experiment_id, **exp.spec.to_dict(), "status": exp.status}
        )
        return
    arms = ", ".join(f"{a.name}={a.version} ({a.weight:g})" for a in exp.spec.arms)
    console.print(
        f"started [bold]{exp.experiment_id}[/]: {arms}; window {window_minutes:g} min, "
        f"{'exact counts' if epsilon == 0 else f'epsilon {epsilon:g} per report'}; the sites "
        "receive it with the next federated run or round"
    )


@app.command()
def status(
    experiment: ExperimentArg = None, state_dir: StateDir = None, as_json: JsonFlag = False
) -> None:
    """CTR and conversion per arm with 95% Wilson intervals and z-tests against the control.

    Example: fedrec coordinator ab status --json
    """
    from coordinator.ab_testing import report

    with _ab(state_dir) as reg:
        payload = report(reg.get(experiment))
    if as_json:
        _print_json(payload)
    else:
        render(payload)


def render(payload: dict[str, Any]) -> None:
    """The human view of `coordinator.ab_testing.report`."""
    eps = payload["epsilon_per_report"]
    noise = "exact counts" if eps == 0 else f"epsilon {eps:g} per report"
    console.print(
        f"experiment [bold]{payload['experiment_id']}[/]: {payload['status']}; window "
        f"{payload['window_s'] / 60:g} min; {noise}; {len(payload['sites'])} site(s) reported; "
        f"unit: {payload['unit']}"
    )
    control = payload["arms"][0]["arm"]
    table = Table(title_justify="left")
    for col in ("arm", "exposed", "clicked", "CTR [95% CI]", f"p vs {control}"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for col in ("converted", "conversion [95% CI]", f"p vs {control}"):
        table.add_column(col, justify="right")
    for arm in payload["arms"]:
        counts = arm["counts"]
        row = [arm["arm"]]
        for metric, count in (("ctr", "clicked"), ("conversion", "converted")):
            m = arm[metric]
            if metric == "ctr":
                row.append(f"{counts.get('exposed', 0):,.0f}")
            row.append(f"{counts.get(count, 0):,.0f}")
            row.append(f"{m['rate']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]")
            row.append("-" if m["p_vs_control"] is None else f"{m['p_vs_control']:.2g}")
        table.add_row(*row)
    console.print(table)
    for arm in payload["arms"]:
        console.print(f"  {arm['arm']}: {arm['version']} (weight {arm['weight']:g})")
    for metric, win in payload["winner"].items():
        verdict = "significant" if win["significant"] else "not significant"
        console.print(
            f"{metric}: best arm [bold]{win['arm']}[/] ({win['version']}), {verdict} at alpha "
            f"{payload['alpha']:g} ({payload['test']})"
        )


@app.command()
def stop(
    experiment: ExperimentArg = None, state_dir: StateDir = None, as_json: JsonFlag = False
) -> None:
    """Stop an experiment: sites go back to the published version and report once more.

    Example: fedrec coordinator ab stop
    """
    with _ab(state_dir) as reg:
        exp = reg.stop(experiment)
    if as_json:
        _print_json({"experiment_id": exp.experiment_id, "status": exp.status})
    else:
        console.print(f"stopped [bold]{exp.experiment_id}[/] (the sites learn it at the next sync)")


@app.command()
def promote(
    experiment: ExperimentArg = None,
    arm: Annotated[str | None, typer.Option(help="Promote this arm instead of the winner.")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Promote the best arm even if not significant.")
    ] = False,
    state_dir: StateDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Publish the winning arm's version (every site serves it from the next round).

    Example: fedrec coordinator ab promote
    """
    with _ab(state_dir) as reg:
        exp, model = reg.promote(experiment, arm=arm, force=force)
    if as_json:
        _print_json(
            {"experiment_id": exp.experiment_id, "status": exp.status, "published": model.version}
        )
    else:
        console.print(
            f"experiment [bold]{exp.experiment_id}[/] ended: published [bold]{model.version}[/]; "
            "sites serve it from the next round"
        )


@app.command("list")
def list_(state_dir: StateDir = None, as_json: JsonFlag = False) -> None:
    """Every experiment, newest first.

    Example: fedrec coordinator ab list --json
    """
    with _ab(state_dir) as reg:
        experiments = reg.experiments()
    rows: list[dict[str, Any]] = [
        {
            "experiment_id": e.experiment_id,
            "status": e.status,
            "created_at": e.created_at,
            "arms": [a.version for a in e.spec.arms],
            "sites": len(e.reports),
            "promoted_version": e.promoted_version,
        }
        for e in experiments
    ]
    if as_json:
        _print_json(rows)
        return
    table = Table(title="A/B experiments", title_justify="left")
    for col in ("experiment", "status", "created", "arms", "sites", "promoted"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["experiment_id"],
            r["status"],
            r["created_at"],
            ", ".join(r["arms"]),
            str(r["sites"]),
            r["promoted_version"] or "-",
        )
    console.print(table)

"""`fedrec sim` (run, sweep, scale, report) and `fedrec demo`: thin layers over `simulations`.

torch, flwr and pandas are imported inside the commands so that `fedrec --help` stays fast.
Progress goes to stderr (rich); ``--json`` prints one JSON object on stdout.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from simulations.ab_cli import ab as ab_command
from simulations.progress import RichProgress, summary_table

if TYPE_CHECKING:
    from simulations.runner import SimConfig

CONTEXT = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    help="Federated simulations with the production apps: runs, sweeps, scale, reports.",
    no_args_is_help=True,
    context_settings=CONTEXT,
)

out_console = Console()
err_console = Console(stderr=True)

# ----------------------------------------------------------------------------- options
DataOpt = Annotated[str, typer.Option("--data", "-d", help="'synth' or a data file/directory.")]
FormatOpt = Annotated[
    str,
    typer.Option(
        "--format", "-f", help="Format of --data: s3rec | sasrec | ml100k | taobao | events."
    ),
]
SplitOpt = Annotated[
    str,
    typer.Option(
        help="auto | uniform | dirichlet | natural | one-per-site (auto: natural for synth, "
        "one-per-site for app mode, else uniform)."
    ),
]
PerRoundOpt = Annotated[
    int | None,
    typer.Option("--sites-per-round", min=1, help="Sites sampled per round (default all)."),
]
RoundsOpt = Annotated[int, typer.Option(min=1, help="Federated rounds.")]
EpochsOpt = Annotated[int, typer.Option("--local-epochs", min=1, help="Local epochs per round.")]
StrategyOpt = Annotated[str, typer.Option(help="fedavg | fedadam | fedmedian | fedtrimmedavg.")]
DeltaOpt = Annotated[float, typer.Option(help="δ per shopper.")]
ClipOpt = Annotated[
    float, typer.Option(help="Clip bound: per-shopper gradient (store) or device update (app).")
]
SigmaOpt = Annotated[
    float | None,
    typer.Option(
        "--noise-multiplier", help="σ; default: calibrated to the ε budget over all rounds."
    ),
]
SeedOpt = Annotated[int, typer.Option(help="Seed of the split, synthetic data and training.")]
AlphaOpt = Annotated[float, typer.Option(help="Dirichlet concentration (split dirichlet).")]
LabelOpt = Annotated[
    str, typer.Option("--label-by", help="Dirichlet labels: category (item attributes) | region.")
]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Local batch (expected, DP).")]
LrOpt = Annotated[float, typer.Option("--lr", help="Local learning rate (Adam).")]
KindOpt = Annotated[str, typer.Option("--model-kind", help="gru | sasrec | mf.")]
ModelCfgOpt = Annotated[
    str,
    typer.Option(
        "--model-config", help="JSON merged over the kind's defaults, e.g. '{\"dim\": 32}'."
    ),
]
RunCfgOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Extra run-config key=value (repeatable), e.g. --set fedadam-eta=0.05."
    ),
]
EvalFracOpt = Annotated[
    float | None,
    typer.Option(
        "--eval-fraction", help="Share of sites in federated evaluation (default: as training)."
    ),
]
ActorsOpt = Annotated[
    int | None, typer.Option(min=1, help="ClientApps at a time (Ray actors; default: CPUs).")
]
TimeoutOpt = Annotated[
    float | None, typer.Option(help="Give up after this many seconds of federated run.")
]
KeepOpt = Annotated[
    bool, typer.Option("--keep-models", help="Keep every model version (default: the final only).")
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")]


def _parse_sets(values: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs; values are parsed as JSON when they can be (numbers, booleans)."""
    from shared.errors import ConfigError

    out: dict[str, Any] = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _model_config(text: str) -> dict[str, Any]:
    from shared.errors import ConfigError

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--model-config is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise ConfigError("--model-config must be a JSON object")
    return value


def _config(**values: Any) -> SimConfig:
    from simulations.runner import SimConfig

    return SimConfig(**values)


# ----------------------------------------------------------------------------- commands
@app.command()
def run(
    out: Annotated[Path, typer.Option("--out", "-o", help="New run directory.")],
    data: DataOpt = "synth",
    fmt: FormatOpt = "events",
    sites: Annotated[
        int | None, typer.Option(min=1, help="Sites (default: the data's own, natural split).")
    ] = 3,
    sites_per_round: PerRoundOpt = None,
    rounds: RoundsOpt = 3,
    local_epochs: EpochsOpt = 1,
    strategy: StrategyOpt = "fedavg",
    privacy: Annotated[
        str, typer.Option(help="none | store | app | distributed (SecAgg+, see docs/privacy.md).")
    ] = "store",
    epsilon: Annotated[float, typer.Option(help="ε budget of the whole run, per shopper.")] = 8.0,
    delta: DeltaOpt = 1e-5,
    clip: ClipOpt = 1.0,
    noise_multiplier: SigmaOpt = None,
    seed: SeedOpt = 0,
    split: SplitOpt = "auto",
    alpha: AlphaOpt = 0.5,
    label_by: LabelOpt = "category",
    batch_size: BatchOpt = 64,
    lr: LrOpt = 1e-3,
    model_kind: KindOpt = "gru",
    model_config: ModelCfgOpt = "{}",
    sets: RunCfgOpt = None,
    eval_fraction: EvalFracOpt = None,
    actors: ActorsOpt = None,
    timeout: TimeoutOpt = None,
    synth_shoppers: Annotated[int, typer.Option(min=3, help="Synthetic: shoppers per site.")] = 40,
    synth_items: Annotated[int, typer.Option(min=10, help="Synthetic: catalogue size.")] = 120,
    keep_models: KeepOpt = False,
    as_json: JsonFlag = False,
) -> None:
    """Split a dataset into sites and train them with Flower's simulation engine.

    Writes config.json, metrics.jsonl (one line per round), summary.json, model/ (ONNX) and
    report.md with PNGs into --out; every process started is stopped.

    Example: fedrec sim run --data synth --sites 3 --rounds 2 --epsilon 8 --out /tmp/s
    """
    from simulations.runner import run_simulation

    config = _config(
        data=data,
        format=fmt,
        sites=sites,
        sites_per_round=sites_per_round,
        rounds=rounds,
        local_epochs=local_epochs,
        strategy=strategy,
        privacy=privacy,
        epsilon=epsilon,
        delta=delta,
        clip=clip,
        noise_multiplier=noise_multiplier,
        seed=seed,
        split=split,
        alpha=alpha,
        label_by=label_by,
        batch_size=batch_size,
        learning_rate=lr,
        model_kind=model_kind,
        model_config=_model_config(model_config),
        run_config=_parse_sets(sets),
        eval_fraction=eval_fraction,
        actors=actors,
        timeout=timeout,
        synth_shoppers=synth_shoppers,
        synth_items=synth_items,
        keep_models=keep_models,
    )
    progress = RichProgress(err_console)
    try:
        result = run_simulation(config, out, report=progress)
    finally:
        progress.close()
    if as_json:
        out_console.print_json(json.dumps(result.summary, default=str))
        return
    out_console.print(summary_table(result.summary, f"Simulation {result.out.name}"))
    out_console.print(f"report: {result.out / 'report.md'}")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run (or sweep) directory.")],
) -> None:
    """Re-write the report (markdown and PNGs) of a finished run or sweep.

    Example: fedrec sim report /tmp/s
    """
    from simulations.report import write_run_report
    from simulations.sweep import rewrite_sweep_report

    if (run_dir / "sweep.json").is_file():
        path = rewrite_sweep_report(run_dir)
    else:
        path = write_run_report(run_dir)
    out_console.print(f"report: {path}")


@app.command()
def sweep(
    out: Annotated[Path, typer.Option("--out", "-o", help="Sweep directory (resumable).")],
    data: DataOpt = "synth",
    fmt: FormatOpt = "events",
    modes: Annotated[
        str, typer.Option(help="DP modes, comma-separated: store,app,distributed.")
    ] = "store",
    epsilons: Annotated[
        str, typer.Option(help="ε budgets, comma-separated; inf = no DP.")
    ] = "1,2,4,8,inf",
    sites: Annotated[str, typer.Option(help="Numbers of sites, comma-separated.")] = "10,100",
    alphas: Annotated[
        str, typer.Option(help="Dirichlet α values (split dirichlet), comma-separated.")
    ] = "0.5",
    split: SplitOpt = "dirichlet",
    sites_per_round: PerRoundOpt = None,
    rounds: RoundsOpt = 10,
    local_epochs: EpochsOpt = 1,
    strategy: StrategyOpt = "fedavg",
    delta: DeltaOpt = 1e-5,
    clip: ClipOpt = 1.0,
    seed: SeedOpt = 0,
    label_by: LabelOpt = "category",
    batch_size: BatchOpt = 64,
    lr: LrOpt = 1e-3,
    model_kind: KindOpt = "gru",
    model_config: ModelCfgOpt = "{}",
    sets: RunCfgOpt = None,
    eval_fraction: EvalFracOpt = None,
    actors: ActorsOpt = None,
    centralized: Annotated[
        bool, typer.Option(help="Also train the centralized reference on the same split.")
    ] = True,
    synth_shoppers: Annotated[int, typer.Option(min=3, help="Synthetic: shoppers per site.")] = 40,
    as_json: JsonFlag = False,
) -> None:
    """Run a grid of simulations plus the centralized and popularity references.

    Every run gets its own directory under --out/runs (a finished one is skipped when the
    sweep is re-run); results.md/results.json and the plots go to --out.

    Example: fedrec sim sweep --data synth --epsilons 1,8,inf --sites 3,6 --rounds 2 --out /tmp/sw
    """
    from simulations.sweep import SweepGrid, run_sweep

    base = _config(
        data=data,
        format=fmt,
        sites=None if data != "synth" else 3,
        sites_per_round=sites_per_round,
        rounds=rounds,
        local_epochs=local_epochs,
        strategy=strategy,
        delta=delta,
        clip=clip,
        seed=seed,
        split=split,
        label_by=label_by,
        batch_size=batch_size,
        learning_rate=lr,
        model_kind=model_kind,
        model_config=_model_config(model_config),
        run_config=_parse_sets(sets),
        eval_fraction=eval_fraction,
        actors=actors,
        synth_shoppers=synth_shoppers,
    )
    grid = SweepGrid(
        modes=tuple(m.strip() for m in modes.split(",") if m.strip()),
        epsilons=tuple(_number(e) for e in epsilons.split(",") if e.strip()),
        sites=tuple(int(s) for s in sites.split(",") if s.strip()),
        alphas=tuple(float(a) for a in alphas.split(",") if a.strip()),
    )
    result = run_sweep(base, grid, out, centralized=centralized, console=err_console)
    if as_json:
        out_console.print_json(json.dumps(result, default=str))
        return
    out_console.print(f"results: {out / 'results.md'}")


@app.command()
def scale(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory of the scale runs.")],
    sites: Annotated[
        str, typer.Option(help="Numbers of virtual sites, comma-separated.")
    ] = "10,100,1000",
    sites_per_round: Annotated[
        int, typer.Option("--sites-per-round", min=1, help="Sites per round in every run.")
    ] = 10,
    rounds: RoundsOpt = 3,
    shoppers: Annotated[int, typer.Option(min=3, help="Synthetic shoppers per site.")] = 20,
    privacy: Annotated[
        str, typer.Option(help="none | store | app | distributed (SecAgg+, see docs/privacy.md).")
    ] = "store",
    actors: ActorsOpt = None,
) -> None:
    """Wall time and peak memory of 10, 100, 1000 virtual sites (synthetic data), one table.

    Example: fedrec sim scale --sites 10,100 --rounds 2 --out state/scale
    """
    from simulations.sweep import run_scale

    counts = tuple(int(s) for s in sites.split(",") if s.strip())
    rows = run_scale(
        out,
        counts,
        sites_per_round=sites_per_round,
        rounds=rounds,
        shoppers=shoppers,
        privacy=privacy,
        actors=actors,
        console=err_console,
    )
    table = Table(title="Scale", title_justify="left")
    for col in (
        "sites",
        "events",
        "wall s",
        "federated s",
        "s/round",
        "peak PSS MiB",
        "peak RSS MiB",
        "load",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["sites"]),
            f"{r['events']:,}",
            f"{r['wall_seconds']:.0f}",
            f"{r['federated_seconds']:.0f}",
            f"{r['seconds_per_round']:.1f}",
            f"{r['peak_pss_mib']:.0f}",
            f"{r['peak_rss_mib']:.0f}",
            str(r["load_average"]),
        )
    out_console.print(table)
    out_console.print(f"table: {out / 'scale.md'}")


def _number(text: str) -> float:
    text = text.strip().lower()
    return math.inf if text in ("inf", "none", "∞") else float(text)


app.command("ab")(ab_command)


# ----------------------------------------------------------------------------- demo
def demo(
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Demo directory (default: state/demo/<time>)."),
    ] = None,
    rounds: RoundsOpt = 3,
    port: Annotated[
        int | None, typer.Option(help="Edge service port (default: a free one).")
    ] = None,
) -> None:
    """A federated DP simulation on 5 synthetic sites, then one site's edge service live.

    Trains 5 stores with DP-SGD (store mode, ε = 8) under Flower's simulation engine,
    starts `fedrec edge serve` on the resulting model, posts a shopper's events over HTTP
    and prints the recommendations before and after; stops everything it started.

    Example: fedrec demo
    """
    from simulations.demo import run_demo

    started = time.monotonic()
    run_demo(out, rounds=rounds, port=port, console=out_console)
    out_console.print(f"demo finished in {time.monotonic() - started:.0f} s")

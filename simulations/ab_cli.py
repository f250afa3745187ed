"""`fedrec sim ab`: the A/B replay simulation (a thin layer over `simulations.ab_replay`)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

err_console = Console(stderr=True)


def ab(
    data: Annotated[
        str, typer.Option("--data", "-d", help="'synth' or a data file/directory.")
    ] = "synth",
    fmt: Annotated[
        str,
        typer.Option(
            "--format", "-f", help="Format of --data: events | s3rec | sasrec | ml100k | taobao."
        ),
    ] = "events",
    arms: Annotated[
        str,
        typer.Option(
            help="Comma-separated arms, control first: pop | gru[:EPOCHS] | sasrec[:EPOCHS] | "
            "mf[:EPOCHS] | a model directory."
        ),
    ] = "pop,gru:8",
    split: Annotated[str, typer.Option(help="Traffic weights per arm, e.g. '50,50'.")] = "50,50",
    holdout: Annotated[
        float, typer.Option(help="Each shopper's newest share of events replayed.")
    ] = 0.2,
    k: Annotated[int, typer.Option("-k", help="Recommendations shown per impression.")] = 10,
    window_minutes: Annotated[
        float, typer.Option(help="Outcome window after an impression.")
    ] = 30.0,
    epsilon: Annotated[
        float, typer.Option(help="Laplace noise per site report, epsilon per shopper (0 = exact).")
    ] = 0.0,
    sites: Annotated[int, typer.Option(help="Sites (synthetic; real data: shoppers hashed).")] = 3,
    shoppers_per_site: Annotated[int, typer.Option(help="Synthetic shoppers per site.")] = 300,
    items: Annotated[int, typer.Option(help="Synthetic catalogue size.")] = 300,
    model_config: Annotated[
        str, typer.Option(help="JSON over each model kind's defaults, e.g. '{\"dim\": 32}'.")
    ] = "{}",
    train_config: Annotated[
        str, typer.Option(help="JSON over each kind's training settings, e.g. '{\"lr\": 0.005}'.")
    ] = "{}",
    seed: Annotated[int, typer.Option(help="Seed of the data and the training.")] = 0,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Run directory (default: state/sim-ab/<time>)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Replay held-out events through the edge against model versions; report the A/B test.

    Trains each arm on the past, starts the experiment with the coordinator's API, replays
    every site's held-out events through its edge service logic (arm by hash, impressions,
    outcomes within the window) and reports CTR and conversion per arm with 95% Wilson
    intervals and a two-proportion z-test.

    Example: fedrec sim ab --arms pop,gru:8 --split 50,50
    """
    from coordinator.ab_cli import render
    from simulations.ab_replay import ABReplayConfig, run_ab_replay
    from simulations.errors import SimulationError

    try:
        overrides = json.loads(model_config)
        training = json.loads(train_config)
        weights = tuple(float(w) for w in split.split(","))
    except ValueError as err:
        raise SimulationError(f"--model-config / --train-config / --split: {err}") from err
    if not isinstance(overrides, dict) or not isinstance(training, dict):
        raise SimulationError("--model-config and --train-config must be JSON objects")
    run_dir = out or Path("state") / "sim-ab" / datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    cfg = ABReplayConfig(
        out_dir=run_dir,
        data=data,
        fmt=fmt,
        arms=tuple(a.strip() for a in arms.split(",") if a.strip()),
        split=weights,
        holdout=holdout,
        k=k,
        window_s=window_minutes * 60.0,
        epsilon=epsilon,
        n_sites=sites,
        shoppers_per_site=shoppers_per_site,
        n_items=items,
        model_config=overrides,
        train_config=training,
        seed=seed,
    )
    started = time.monotonic()
    payload = run_ab_replay(cfg, progress=lambda line: err_console.print(line, highlight=False))
    if as_json:
        typer.echo(json.dumps(payload, indent=2, default=str))
        return
    render(payload)
    for row in payload["replay"]["recommendation_effect"]:
        err_console.print(
            f"arm {row['arm']}: recommendation effect R = {row['R']:.4f} (explicit ratings), "
            f"{row['R_implicit']:.4f} (implicit) over {row['pairs']:,} recommended pairs",
            highlight=False,
        )
    for arm in payload["replay"]["arm_models"]:
        offline = arm.get("offline_ndcg@10")
        err_console.print(
            f"arm {arm['arm']} = {arm['spec']} ({arm['version']})"
            + (f", offline NDCG@10 {offline:.4f}" if offline is not None else ""),
            highlight=False,
        )
    err_console.print(
        f"replayed {payload['replay']['held_out_events']:,} events in "
        f"{time.monotonic() - started:.0f} s; report: {run_dir / 'ab_replay.json'}",
        highlight=False,
    )

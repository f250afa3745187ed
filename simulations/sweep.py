"""`fedrec sim sweep` and `fedrec sim scale`: grids of simulation runs, one table and plots.

A sweep runs every (privacy mode, ε, number of sites, α) of a grid as its own run
directory under ``<out>/runs/`` (ε = inf is the run without DP), adds the centralized model
(`shared.training.train_model` with the kind's default settings) and the popularity model
trained on the very same leave-one-out split, and writes ``results.md``/``results.json`` and
the plots (`simulations.report.write_sweep_report`). It is resumable: a run whose
``summary.json`` exists is not run again, and the centralized reference is cached in
``reference-<dataset>.json``.

`run_scale` runs synthetic federations of 10, 100, 1000... virtual sites with the same
number of sites per round and reports wall time and the peak memory of the whole process
tree (`simulations.memory`), into ``scale.md``/``scale.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from rich.console import Console

from simulations.errors import SimulationError
from simulations.runner import SUMMARY_FILE, Privacy, SimConfig, read_metrics, run_simulation

SWEEP_FILE = "sweep.json"


SWEEP_MODES = ("store", "app", "distributed")


@dataclass(frozen=True)
class SweepGrid:
    """The values each dimension of a sweep takes."""

    modes: tuple[str, ...] = ("store",)  # DP modes for finite ε: store, app, distributed
    epsilons: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, math.inf)  # inf = no DP
    sites: tuple[int, ...] = (10, 100)
    alphas: tuple[float, ...] = (0.5,)  # used by the dirichlet split only

    def __post_init__(self) -> None:
        if not self.epsilons or not self.sites:
            raise SimulationError("a sweep needs at least one epsilon and one number of sites")
        for mode in self.modes:
            if mode not in SWEEP_MODES:
                raise SimulationError(f"sweep modes are {', '.join(SWEEP_MODES)}, not {mode!r}")
        if any(not e > 0 for e in self.epsilons) or any(s < 1 for s in self.sites):
            raise SimulationError("epsilons must be > 0 and numbers of sites >= 1")


def run_name(config: SimConfig) -> str:
    """A run's directory name: mode, ε, sites, α."""
    eps = "inf" if config.privacy == "none" else f"{config.epsilon:g}"
    alpha = f"-a{config.alpha:g}" if config.resolved_split == "dirichlet" else ""
    return f"{config.privacy}-eps{eps}-sites{config.sites}{alpha}"


def grid_configs(base: SimConfig, grid: SweepGrid) -> Iterator[SimConfig]:
    """Every run of the grid, the run without DP first for each (sites, α)."""
    alphas: tuple[float | None, ...] = grid.alphas if base.split == "dirichlet" else (None,)
    for sites in grid.sites:
        for alpha in alphas:
            common: dict[str, Any] = {"sites": sites}
            if alpha is not None:
                common["alpha"] = alpha
            finite = sorted(e for e in grid.epsilons if math.isfinite(e))
            if any(math.isinf(e) for e in grid.epsilons):
                yield dataclasses.replace(base, privacy="none", **common)
            for mode in grid.modes:
                for eps in finite:
                    extra: dict[str, Any] = {}
                    if mode == "app":
                        extra["split"] = "one-per-site"
                    privacy = cast(Privacy, mode)
                    yield dataclasses.replace(base, privacy=privacy, epsilon=eps, **common, **extra)


def dataset_key(config: SimConfig) -> str:
    """What identifies a sweep run's dataset (synthetic data depends on the site count)."""
    if config.data == "synth":
        return f"synth-sites{config.sites}-shoppers{config.synth_shoppers}-seed{config.seed}"
    return Path(config.data).stem


def centralized_reference(config: SimConfig, out: Path, console: Console) -> dict[str, Any]:
    """Centralized training and popularity on the run's global split (cached in ``out``)."""
    from shared.models import build_model
    from shared.sequences import build_sequences, leave_one_out
    from shared.training import default_train_config, train_model
    from simulations.runner import load_dataset, popularity_baseline
    from simulations.sites import catalogue_of

    path = out / f"reference-{dataset_key(config)}.json"
    if path.is_file():
        cached: dict[str, Any] = json.loads(path.read_text("utf-8"))
        return cached
    dataset = load_dataset(config)
    vocab = catalogue_of(dataset.events)
    split = leave_one_out(build_sequences(dataset.events, vocab))
    console.print(f"centralized reference ({config.model_kind}) on {dataset.name} ...")
    model = build_model(config.model_kind, {**config.model_config, "n_items": vocab.n_items})
    # The kind's recipe without `fedrec train`'s wall-clock budget: on a loaded machine the
    # budget would cut the reference short and flatter the federated runs.
    train_config = dataclasses.replace(default_train_config(config.model_kind), time_budget_s=None)
    result = train_model(model, split, train_config, progress=console.is_terminal)
    reference: dict[str, Any] = {
        "dataset": dataset.name,
        "model_kind": config.model_kind,
        "model_config": config.model_config,
        "train_config": result.config,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "train_seconds": round(result.train_seconds, 1),
        "centralized": {k: float(v) for k, v in result.test.items()},
        "popularity": popularity_baseline(split, vocab),
    }
    path.write_text(json.dumps(reference, indent=2) + "\n", "utf-8")
    console.print(
        f"centralized NDCG@10 {reference['centralized']['ndcg@10']:.4f} "
        f"(best epoch {result.best_epoch}, {result.train_seconds:.0f} s)"
    )
    return reference


def run_sweep(
    base: SimConfig,
    grid: SweepGrid,
    out: Path,
    *,
    centralized: bool = True,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run (or resume) the sweep into ``out``; returns the results (also results.json)."""
    from simulations.progress import RichProgress
    from simulations.report import write_sweep_report

    console = console or Console(stderr=True)
    out = out.expanduser().resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    header = {
        "command": sys.argv,
        "dataset": base.data,
        "base": base.to_dict(),
        "grid": dataclasses.asdict(grid),
    }
    (out / SWEEP_FILE).write_text(json.dumps(header, indent=2, default=str) + "\n", "utf-8")
    configs = list(grid_configs(base, grid))
    references: dict[str, dict[str, Any]] = {}
    for config in configs:
        key = dataset_key(config)
        if centralized and key not in references:
            references[key] = centralized_reference(config, out, console)
    for i, config in enumerate(configs, start=1):
        name = run_name(config)
        run_dir = out / "runs" / name
        if (run_dir / SUMMARY_FILE).is_file():
            console.print(f"[{i}/{len(configs)}] {name}: done before, skipped")
            continue
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an interrupted run of this sweep; it starts over
        console.print(f"[{i}/{len(configs)}] {name}")
        progress = RichProgress(console, label=name)
        try:
            run_simulation(config, run_dir, report=progress)
        except SimulationError as err:
            console.print(f"[red]{name} failed:[/] {err}")
            (run_dir / "error.txt").write_text(str(err) + "\n", "utf-8")
        finally:
            progress.close()
    rows = collect_rows(out, configs, references)
    write_sweep_report(out, rows, header)
    return {"header": header, "rows": rows}


def collect_rows(
    out: Path, configs: list[SimConfig], references: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """The table of a sweep: one row per run, then the references."""
    rows: list[dict[str, Any]] = []
    for config in configs:
        run_dir = out / "runs" / run_name(config)
        row: dict[str, Any] = {
            "name": run_name(config),
            "kind": "federated",
            "privacy": config.privacy,
            "epsilon": math.inf if config.privacy == "none" else config.epsilon,
            "sites": config.sites,
            "alpha": config.alpha if config.resolved_split == "dirichlet" else None,
            "rounds": config.rounds,
            "dataset": dataset_key(config),
        }
        summary_path = run_dir / SUMMARY_FILE
        if not summary_path.is_file():
            row["status"] = "failed" if (run_dir / "error.txt").is_file() else "missing"
            rows.append(row)
            continue
        summary = json.loads(summary_path.read_text("utf-8"))
        lines = read_metrics(run_dir)
        row.update(
            status="completed",
            **{"hr@10": summary["final"]["hr@10"], "ndcg@10": summary["final"]["ndcg@10"]},
            epsilon_max=summary["final"]["epsilon_max"],
            noise_multiplier=summary.get("noise_multiplier"),
            label_skew=summary.get("label_skew"),
            mb_per_round=summary["bytes_per_round_mean"] / 1e6,
            wall_seconds=summary["wall_seconds"],
            popularity_ndcg=summary["popularity"]["ndcg@10"],
            curve=[[line["round"], line["ndcg@10"]] for line in lines],
            bytes_curve=[[line["round"], line["bytes_sent"]] for line in lines],
        )
        rows.append(row)
    for row in rows:
        ref = references.get(row["dataset"])
        if ref is not None and row.get("ndcg@10") is not None:
            row["vs_centralized"] = row["ndcg@10"] / ref["centralized"]["ndcg@10"]
        base = next(
            (
                r
                for r in rows
                if r["privacy"] == "none"
                and r["sites"] == row["sites"]
                and r["alpha"] == row["alpha"]
                and r.get("ndcg@10")
            ),
            None,
        )
        if base is not None and row.get("ndcg@10") is not None and row is not base:
            row["vs_nonprivate"] = row["ndcg@10"] / base["ndcg@10"]
    for key, ref in references.items():
        for label, metrics in (
            ("centralized", ref["centralized"]),
            ("popularity", ref["popularity"]),
        ):
            rows.append(
                {
                    "name": f"{label} ({key})",
                    "kind": label,
                    "privacy": "-",
                    "epsilon": None,
                    "sites": 1 if label == "centralized" else None,
                    "alpha": None,
                    "dataset": key,
                    "hr@10": metrics["hr@10"],
                    "ndcg@10": metrics["ndcg@10"],
                    "vs_centralized": metrics["ndcg@10"] / ref["centralized"]["ndcg@10"],
                    "wall_seconds": ref.get("train_seconds") if label == "centralized" else None,
                    "status": "completed",
                }
            )
    return rows


def rewrite_sweep_report(out: Path) -> Path:
    """Rebuild results.md/json and the plots of an existing sweep directory."""
    from simulations.report import write_sweep_report

    header = json.loads((out / SWEEP_FILE).read_text("utf-8"))
    base = SimConfig(**{k: v for k, v in header["base"].items() if k != "split_resolved"})
    grid = SweepGrid(**{k: tuple(v) for k, v in header["grid"].items()})
    configs = list(grid_configs(base, grid))
    references = {}
    for config in configs:
        path = out / f"reference-{dataset_key(config)}.json"
        if path.is_file():
            references[dataset_key(config)] = json.loads(path.read_text("utf-8"))
    rows = collect_rows(out, configs, references)
    write_sweep_report(out, rows, header)
    return out / "results.md"


# ----------------------------------------------------------------------------- scale
def run_scale(
    out: Path,
    counts: tuple[int, ...],
    *,
    sites_per_round: int = 10,
    rounds: int = 3,
    shoppers: int = 20,
    privacy: str = "store",
    actors: int | None = None,
    console: Console | None = None,
) -> list[dict[str, Any]]:
    """One synthetic run per number of sites; the wall time and peak memory table."""
    from simulations.progress import RichProgress

    console = console or Console(stderr=True)
    out = out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for n in counts:
        run_dir = out / f"sites-{n}"
        if not (run_dir / SUMMARY_FILE).is_file():
            if run_dir.exists():
                shutil.rmtree(run_dir)  # an interrupted run of this scale series
            config = SimConfig(
                data="synth",
                sites=n,
                sites_per_round=min(sites_per_round, n),
                rounds=rounds,
                privacy=privacy,  # type: ignore[arg-type]
                synth_shoppers=shoppers,
                split="natural",
                actors=actors,
            )
            progress = RichProgress(console, label=f"{n} sites")
            started = time.monotonic()
            try:
                run_simulation(config, run_dir, report=progress)
            finally:
                progress.close()
            console.print(f"{n} sites: {time.monotonic() - started:.0f} s")
        summary = json.loads((run_dir / SUMMARY_FILE).read_text("utf-8"))
        config_doc = json.loads((run_dir / "config.json").read_text("utf-8"))
        lines = read_metrics(run_dir)
        steady = [line["seconds"] for line in lines[1:] if line["seconds"] is not None]
        rows.append(
            {
                "sites": n,
                "sites_per_round": min(sites_per_round, n),
                "rounds": len(lines),
                "shoppers": config_doc["dataset"]["shoppers"],
                "events": config_doc["dataset"]["events"],
                "site_db_mib": round(_db_bytes(run_dir) / 2**20, 1),
                "wall_seconds": summary["wall_seconds"],
                "federated_seconds": summary["federated_seconds"],
                "first_round_seconds": lines[0]["seconds"],
                "seconds_per_round": sum(steady) / len(steady) if steady else math.nan,
                "peak_pss_mib": summary["memory"]["peak_pss_mib"],
                "peak_rss_mib": summary["memory"]["peak_rss_mib"],
                "peak_pss_without_runner_mib": summary["memory"].get("peak_pss_without_runner_mib"),
                "processes_at_peak": summary["memory"]["processes_at_peak"],
                "ndcg@10": summary["final"]["ndcg@10"],
                "load_average": summary.get("load_average"),
            }
        )
    (out / "scale.json").write_text(json.dumps(rows, indent=2) + "\n", "utf-8")
    (out / "scale.md").write_text(scale_markdown(rows, sys.argv), "utf-8")
    return rows


def _db_bytes(run_dir: Path) -> int:
    return sum(p.stat().st_size for p in (run_dir / "state" / "sites").glob("site-*/site.db*"))


def scale_markdown(rows: list[dict[str, Any]], command: list[str]) -> str:
    """The scale table in markdown, with the command that produced it."""
    head = (
        "| sites | per round | shoppers | events | site DBs MiB | wall s | federated s | "
        "round 1 s | later rounds s | peak PSS MiB | without runner | peak RSS MiB | processes | "
        "load (1/5/15) |"
    )
    lines = [f"Command: `{' '.join(command)}`", "", head, "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r['sites']} | {r['sites_per_round']} | {r['shoppers']:,} | {r['events']:,} | "
            f"{r['site_db_mib']} | {r['wall_seconds']:.0f} | {r['federated_seconds']:.0f} | "
            f"{r['first_round_seconds']:.1f} | {r['seconds_per_round']:.1f} | "
            f"{r['peak_pss_mib']:.0f} | {r['peak_pss_without_runner_mib']:.0f} | "
            f"{r['peak_rss_mib']:.0f} | {r['processes_at_peak']} | "
            f"{r['load_average']} |"
        )
    return "\n".join(lines) + "\n"

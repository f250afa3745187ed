"""Reports: a run's report.md and PNGs, the sweep grid, its table and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from simulations.report import write_run_report, write_sweep_report
from simulations.runner import METRIC_KEYS, SimConfig
from simulations.sweep import SweepGrid, collect_rows, grid_configs, run_name

PNG = b"\x89PNG\r\n\x1a\n"


def _line(number: int, ndcg: float, eps: float | None) -> dict[str, Any]:
    values: dict[str, Any] = dict.fromkeys(METRIC_KEYS)
    values.update(
        {
            "round": number,
            "status": "completed",
            "loss": 5.0 - number,
            "hr@10": 2 * ndcg,
            "ndcg@10": ndcg,
            "fed_hr@10": 2 * ndcg,
            "fed_ndcg@10": ndcg,
            "epsilon_max": eps,
            "epsilon_mean": None if eps is None else eps / 2,
            "seconds": 3.0,
            "elapsed_seconds": 3.0 * number,
            "bytes_down": 2_000_000,
            "bytes_up": 1_000_000,
            "bytes_sent": 3_000_000,
            "sites_asked": 4,
            "sites_accepted": 4,
            "sites_refused": 0,
            "sites_rejected": 0,
            "sites_failed": 0,
            "model_version": f"v{number}",
        }
    )
    return values


def fake_run(out: Path, config: SimConfig, ndcgs: list[float]) -> None:
    """A run directory as `run_simulation` leaves it (without the heavy parts)."""
    out.mkdir(parents=True)
    dp = config.privacy != "none"
    lines = [_line(i + 1, v, (i + 1) * 2.0 if dp else None) for i, v in enumerate(ndcgs)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    config_doc = {
        "config": config.to_dict(),
        "command": ["fedrec", "sim", "run"],
        "dataset": {"name": "synthetic-seed0", "shoppers": 120, "items": 100, "events": 1500},
        "partition": {
            "method": "dirichlet",
            "n_sites": 4,
            "shoppers_per_site": {"min": 10, "median": 30.0, "mean": 30.0, "max": 50},
            "alpha": 0.5,
            "label_skew": 0.42,
        },
        "training_shoppers_per_site": [10, 30, 30, 50],
        "privacy": {"noise_multiplier": 1.1, "how": "calibrated", "accountant": "prv"}
        if dp
        else {},
        "run_config": {"min-sites": 4},
        "engine": {"actors": 2},
    }
    (out / "config.json").write_text(json.dumps(config_doc))
    final = lines[-1]
    summary = {
        "epsilon_budget": config.epsilon if dp else None,
        "final": {k: final[k] for k in ("round", "hr@10", "ndcg@10", "fed_hr@10", "fed_ndcg@10",
                                          "epsilon_max", "epsilon_mean", "loss")},
        "popularity": {"hr@10": 0.06, "ndcg@10": 0.03},
        "centralized": {"hr@10": 0.2, "ndcg@10": 0.1},
        "bytes_total": 3_000_000 * len(lines),
        "bytes_per_round_mean": 3_000_000.0,
        "wall_seconds": 50.0,
        "federated_seconds": 40.0,
        "memory": {"peak_rss_mib": 3000.0, "peak_pss_mib": 2000.0, "processes_at_peak": 12},
        "load_average": [1.0, 1.0, 1.0],
        "noise_multiplier": 1.1 if dp else None,
        "label_skew": 0.42,
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary))


def test_run_report_has_tables_figures_and_the_command(tmp_path: Path) -> None:
    config = SimConfig(privacy="store", epsilon=4.0, split="dirichlet", sites=4)
    fake_run(tmp_path / "run", config, [0.02, 0.04, 0.05])

    path = write_run_report(tmp_path / "run")

    text = path.read_text()
    assert "`fedrec sim run`" in text
    assert "| 3 | completed | 2.000 | 0.1000 | 0.0500 |" in text  # the per-round table
    assert "popularity (same training split) | 0.0600 | 0.0300" in text
    assert "centralized (same split) | 0.2000 | 0.1000" in text
    assert "budget ε = 4" in text and "σ = 1.100" in text
    for name in ("ndcg_vs_round", "loss_vs_round", "epsilon_vs_round", "bytes_per_round",
                 "site_sizes"):  # fmt: skip
        assert f"({name}.png)" in text
        assert (tmp_path / "run" / f"{name}.png").read_bytes()[:8] == PNG


def test_a_run_without_dp_has_no_epsilon_figure(tmp_path: Path) -> None:
    fake_run(tmp_path / "run", SimConfig(privacy="none"), [0.03])

    text = write_run_report(tmp_path / "run").read_text()

    assert "epsilon_vs_round.png" not in text and "| privacy | none |" in text


def test_sweep_grid_runs_each_setting_once_with_the_non_private_run_first() -> None:
    base = SimConfig(data="x.txt", format="s3rec", split="dirichlet", sites=None)
    grid = SweepGrid(modes=("store", "app"), epsilons=(8.0, 1.0, math.inf), sites=(10,),
                     alphas=(0.1, 1.0))  # fmt: skip

    names = [run_name(c) for c in grid_configs(base, grid)]

    assert names[:5] == [
        "none-epsinf-sites10-a0.1",
        "store-eps1-sites10-a0.1",
        "store-eps8-sites10-a0.1",
        "app-eps1-sites10",
        "app-eps8-sites10",
    ]
    assert len(names) == 10 and len(set(names)) == 8  # app runs ignore alpha: run once each
    with pytest.raises(Exception, match="modes"):
        SweepGrid(modes=("central",))


def test_sweep_table_ratios_and_plots(tmp_path: Path) -> None:
    base = SimConfig(data="synth", split="dirichlet", sites=4)
    grid = SweepGrid(modes=("store",), epsilons=(1.0, 8.0, math.inf), sites=(4,), alphas=(0.5,))
    configs = list(grid_configs(base, grid))
    for config, ndcg in zip(configs, (0.08, 0.02, 0.05), strict=True):
        fake_run(tmp_path / "runs" / run_name(config), config, [ndcg / 2, ndcg])
    key = "synth-sites4-shoppers40-seed0"
    refs = {
        key: {
            "centralized": {"hr@10": 0.2, "ndcg@10": 0.1},
            "popularity": {"hr@10": 0.06, "ndcg@10": 0.03},
            "train_seconds": 9.0,
        }
    }

    rows = collect_rows(tmp_path, configs, refs)
    path = write_sweep_report(tmp_path, rows, {"dataset": "synth", "command": ["fedrec"]})

    by_name = {r["name"]: r for r in rows}
    assert by_name["none-epsinf-sites4-a0.5"]["vs_centralized"] == pytest.approx(0.8)
    assert by_name["store-eps8-sites4-a0.5"]["vs_nonprivate"] == pytest.approx(0.05 / 0.08)
    assert by_name["store-eps1-sites4-a0.5"]["curve"] == [[1, 0.01], [2, 0.02]]
    assert by_name[f"popularity ({key})"]["vs_centralized"] == pytest.approx(0.3)
    text = path.read_text()
    assert "| none-epsinf-sites4-a0.5 | none | ∞ | 4 | 0.5 | 3 | 0.1600 | 0.0800 | 0.80 |" in text
    for name in ("ndcg_vs_round", "ndcg_vs_epsilon", "ndcg_vs_sites", "bytes_per_round"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["name"] == rows[0]["name"]

"""Reports of simulation runs and sweeps: markdown tables plus matplotlib PNGs.

`write_run_report(run_dir)` reads a run's ``config.json``, ``metrics.jsonl`` and
``summary.json`` and writes ``report.md`` with ``ndcg_vs_round.png``, ``loss_vs_round.png``,
``epsilon_vs_round.png`` (DP runs), ``bytes_per_round.png`` and ``site_sizes.png``.
`write_sweep_report(sweep_dir, rows)` writes ``results.md`` / ``results.json`` and the
sweep's plots: NDCG@10 against the round, ε and the number of sites, and communication per
round. Both can be re-run on existing directories (`fedrec sim report`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations.errors import SimulationError


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise SimulationError(f"cannot read {path}: {err}") from err


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _mb(n: float | None) -> str:
    return "–" if n is None else f"{n / 1e6:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path.name


# ----------------------------------------------------------------------------- one run
def run_figures(
    out: Path, lines: list[dict[str, Any]], summary: dict[str, Any], sizes: list[int]
) -> dict[str, str]:
    """The PNGs of one run; returns {what: file name}."""
    plt = _pyplot()
    rounds = [line["round"] for line in lines]
    figures: dict[str, str] = {}

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(rounds, [line["ndcg@10"] for line in lines], "o-", label="global test (LOO)")
    if any(line["fed_ndcg@10"] is not None for line in lines):
        ax.plot(rounds, [line["fed_ndcg@10"] for line in lines], "s--", label="federated eval")
    pop = summary.get("popularity", {}).get("ndcg@10")
    if pop is not None:
        ax.axhline(pop, color="grey", linestyle=":", label="popularity")
    central = (summary.get("centralized") or {}).get("ndcg@10")
    if central is not None:
        ax.axhline(central, color="black", linestyle="-.", label="centralized")
    ax.set(xlabel="round", ylabel="NDCG@10", title="NDCG@10 by round")
    ax.legend(fontsize=8)
    figures["ndcg"] = _save(fig, out / "ndcg_vs_round.png")

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(rounds, [line["loss"] for line in lines], "o-")
    ax.set(xlabel="round", ylabel="train loss (mean over sites)", title="Local training loss")
    figures["loss"] = _save(fig, out / "loss_vs_round.png")

    if any(line["epsilon_max"] is not None for line in lines):
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot(rounds, [line["epsilon_max"] for line in lines], "o-", label="max over sites")
        ax.plot(rounds, [line["epsilon_mean"] for line in lines], "s--", label="mean")
        budget = summary.get("epsilon_budget")
        if budget is not None:
            ax.axhline(budget, color="red", linestyle=":", label="budget")
        ax.set(xlabel="round", ylabel="ε spent (cumulative)", title="Privacy spent")
        ax.legend(fontsize=8)
        figures["epsilon"] = _save(fig, out / "epsilon_vs_round.png")

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(rounds, [line["bytes_down"] / 1e6 for line in lines], label="to sites")
    ax.bar(
        rounds,
        [line["bytes_up"] / 1e6 for line in lines],
        bottom=[line["bytes_down"] / 1e6 for line in lines],
        label="from sites",
    )
    ax.set(xlabel="round", ylabel="MB", title="Communication per round")
    ax.legend(fontsize=8)
    figures["bytes"] = _save(fig, out / "bytes_per_round.png")

    if sizes:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.hist(sizes, bins=min(40, max(5, len(sizes) // 2)))
        ax.set(xlabel="shoppers with a training example", ylabel="sites", title="Site sizes")
        figures["sizes"] = _save(fig, out / "site_sizes.png")
    return figures


def write_run_report(out: Path) -> Path:
    """Write ``out/report.md`` and its PNGs from the run's files; returns the report path."""
    from simulations.runner import CONFIG_FILE, SUMMARY_FILE, read_metrics

    config = _read_json(out / CONFIG_FILE)
    summary = _read_json(out / SUMMARY_FILE)
    lines = read_metrics(out)
    sizes = [int(n) for n in config.get("training_shoppers_per_site", [])]
    figures = run_figures(out, lines, summary, sizes)
    cfg = config["config"]
    part = config["partition"]
    privacy = config.get("privacy", {})
    final = summary["final"]
    md = [
        f"# Simulation report: {config['dataset']['name']}",
        "",
        "Command: `" + " ".join(config.get("command") or ["(Python API)"]) + "`",
        "",
        "## Setup",
        "",
        *_table(
            ["what", "value"],
            [
                ["data", f"{cfg['data']} ({cfg['format'] if cfg['data'] != 'synth' else 'synth'})"],
                [
                    "shoppers / items / events",
                    f"{config['dataset']['shoppers']:,} / {config['dataset']['items']:,} / "
                    f"{config['dataset']['events']:,}",
                ],
                ["sites", f"{part['n_sites']} ({part['method']} split)"],
                [
                    "shoppers per site (min / median / max)",
                    f"{part['shoppers_per_site']['min']} / "
                    f"{part['shoppers_per_site']['median']:g} / {part['shoppers_per_site']['max']}",
                ],
                [
                    "Dirichlet α / label skew",
                    f"{_fmt(part.get('alpha'), 2)} / {_fmt(part.get('label_skew'), 3)}",
                ],
                [
                    "rounds / sites per round",
                    f"{cfg['rounds']} / {config['run_config']['min-sites']}",
                ],
                [
                    "strategy / local epochs / batch / lr",
                    f"{cfg['strategy']} / "
                    f"{cfg['local_epochs']} / {cfg['batch_size']} / {cfg['learning_rate']:g}",
                ],
                ["model", f"{cfg['model_kind']} {json.dumps(cfg['model_config'])}"],
                ["privacy", _privacy_line(cfg, privacy)],
                ["engine", f"Flower simulation (Ray), {config['engine']['actors']} actors"],
            ],
        ),
        "",
        "## Result",
        "",
        *_table(
            ["model", "HR@10", "NDCG@10", "ε (max over sites)"],
            [
                [
                    f"federated, final round {final['round']} (global test)",
                    _fmt(final["hr@10"]),
                    _fmt(final["ndcg@10"]),
                    _fmt(final["epsilon_max"], 3),
                ],
                [
                    "federated evaluation (sites' held-out items)",
                    _fmt(final["fed_hr@10"]),
                    _fmt(final["fed_ndcg@10"]),
                    "",
                ],
                [
                    "popularity (same training split)",
                    _fmt(summary["popularity"]["hr@10"]),
                    _fmt(summary["popularity"]["ndcg@10"]),
                    "",
                ],
                *_centralized_row(summary),
            ],
        ),
        "",
        f"Wall time {summary['wall_seconds']:.0f} s (federated part "
        f"{summary['federated_seconds']:.0f} s); peak memory of the process tree "
        f"{summary['memory']['peak_pss_mib']:.0f} MiB PSS "
        f"({summary['memory']['peak_rss_mib']:.0f} MiB summed RSS); load average at the end "
        f"{summary.get('load_average')}. Traffic {summary['bytes_total'] / 1e6:.1f} MB in total.",
        "",
        f"![NDCG@10 by round]({figures['ndcg']})",
        "",
        "## Rounds",
        "",
        *_table(
            [
                "round",
                "status",
                "loss",
                "HR@10",
                "NDCG@10",
                "fed NDCG@10",
                "ε max",
                "ε mean",
                "s",
                "MB",
                "sites ok/asked",
            ],
            [
                [
                    str(line["round"]),
                    line["status"],
                    _fmt(line["loss"], 3),
                    _fmt(line["hr@10"]),
                    _fmt(line["ndcg@10"]),
                    _fmt(line["fed_ndcg@10"]),
                    _fmt(line["epsilon_max"], 3),
                    _fmt(line["epsilon_mean"], 3),
                    _fmt(line["seconds"], 1),
                    _mb(line["bytes_sent"]),
                    f"{line['sites_accepted']}/{line['sites_asked']}",
                ]
                for line in lines
            ],
        ),
        "",
        *[f"![{name}]({file})" for name, file in figures.items() if name != "ndcg"],
        "",
        "## Files",
        "",
        "- `config.json`: every option, the partition, the privacy calibration, the run config",
        "- `metrics.jsonl`: one line per round; `ndcg@10`/`hr@10` = global leave-one-out test "
        "(the split centralized training uses), `fed_*` = federated evaluation",
        "- `model/`: the final model directory (ONNX included)",
        "- `state/`: the simulated sites (`sites/site-NNN/site.db`) and the coordinator's "
        "registry; `logs/`: SuperLink and `flwr run` logs",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(md), encoding="utf-8")
    return path


def _privacy_line(cfg: dict[str, Any], privacy: dict[str, Any]) -> str:
    if cfg["privacy"] == "none":
        return "none"
    mode = "store (DP-SGD per site)" if cfg["privacy"] == "store" else "app (client-level DP)"
    return (
        f"{mode}: budget ε = {cfg['epsilon']:g}, δ = {cfg['delta']:g}, clip {cfg['clip']:g}, "
        f"σ = {_fmt(privacy.get('noise_multiplier'), 3)} ({privacy.get('how', '')}), "
        f"unit one shopper, {privacy.get('accountant', '')} accountant"
    )


def _centralized_row(summary: dict[str, Any]) -> list[list[str]]:
    central = summary.get("centralized")
    if not central:
        return []
    return [["centralized (same split)", _fmt(central.get("hr@10")), _fmt(central["ndcg@10"]), ""]]


# ----------------------------------------------------------------------------- sweeps
SWEEP_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("name", "run", ""),
    ("privacy", "privacy", ""),
    ("epsilon", "ε budget", "g"),
    ("sites", "sites", ""),
    ("alpha", "α", "g"),
    ("rounds", "rounds", ""),
    ("hr@10", "HR@10", ".4f"),
    ("ndcg@10", "NDCG@10", ".4f"),
    ("vs_centralized", "/ central", ".2f"),
    ("vs_nonprivate", "/ non-private", ".2f"),
    ("epsilon_max", "ε spent", ".2f"),
    ("mb_per_round", "MB/round", ".2f"),
    ("wall_seconds", "wall s", ".0f"),
)


def write_sweep_report(out: Path, rows: list[dict[str, Any]], header: dict[str, Any]) -> Path:
    """``results.json``, ``results.md`` and the sweep plots under ``out``."""
    (out / "results.json").write_text(
        json.dumps({"header": header, "rows": rows}, indent=2, default=str) + "\n", "utf-8"
    )
    figures = sweep_figures(out, rows)
    md = [
        f"# Sweep: {header.get('dataset', '')}",
        "",
        "Command: `" + " ".join(header.get("command") or []) + "`",
        "",
        "NDCG@10/HR@10: global leave-one-out test of the final round (the split centralized "
        "training uses). `/ central`: ratio to the centralized model; `/ non-private`: to "
        "the federated run without DP of the same sites and α.",
        "",
        *_table(
            [title for _, title, _ in SWEEP_COLUMNS],
            [[_cell(row.get(key), spec) for key, _, spec in SWEEP_COLUMNS] for row in rows],
        ),
        "",
        *[f"![{name}]({file})" for name, file in figures.items()],
        "",
    ]
    path = out / "results.md"
    path.write_text("\n".join(md), encoding="utf-8")
    return path


def _cell(value: Any, spec: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return "∞"
    if isinstance(value, int | float) and spec:
        return format(value, spec)
    return str(value)


def sweep_figures(out: Path, rows: list[dict[str, Any]]) -> dict[str, str]:
    """NDCG@10 vs round / ε / sites and MB per round for the federated rows of a sweep."""
    plt = _pyplot()
    runs = [r for r in rows if r.get("kind") == "federated"]
    refs = [r for r in rows if r.get("kind") != "federated"]
    figures: dict[str, str] = {}

    def reference_lines(ax: Any) -> None:
        for ref, style in zip(refs, (":", "-."), strict=False):
            if ref.get("ndcg@10") is not None:
                ax.axhline(ref["ndcg@10"], color="grey", linestyle=style, label=ref["name"])

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        curve = r.get("curve") or []
        ax.plot([c[0] for c in curve], [c[1] for c in curve], label=r["name"], linewidth=1)
    reference_lines(ax)
    ax.set(xlabel="round", ylabel="NDCG@10 (global test)", title="NDCG@10 by round")
    ax.legend(fontsize=6, ncol=2)
    figures["ndcg_vs_round"] = _save(fig, out / "ndcg_vs_round.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    series: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in runs:
        series.setdefault(
            (r["privacy"] if r["privacy"] != "none" else "dp", r["sites"], r["alpha"]), []
        ).append(r)
    for (mode, sites, alpha), group in sorted(series.items(), key=str):
        private = sorted(
            (g for g in group if g["epsilon"] is not None and math.isfinite(g["epsilon"])),
            key=lambda g: g["epsilon"],
        )
        nonprivate = [
            r
            for r in runs
            if r["privacy"] == "none" and r["sites"] == sites and r["alpha"] == alpha
        ]
        if not private:
            continue
        label = f"{mode}, {sites} sites" + (f", α={alpha}" if alpha is not None else "")
        line = ax.plot(
            [g["epsilon"] for g in private], [g["ndcg@10"] for g in private], "o-", label=label
        )
        if nonprivate and nonprivate[0].get("ndcg@10") is not None:
            ax.axhline(
                nonprivate[0]["ndcg@10"], color=line[0].get_color(), linestyle="--", linewidth=0.8
            )
    reference_lines(ax)
    ax.set_xscale("log", base=2)
    ax.set(
        xlabel="ε budget (log scale; dashed: same sites without DP)",
        ylabel="NDCG@10",
        title="NDCG@10 vs privacy budget",
    )
    ax.legend(fontsize=7)
    figures["ndcg_vs_epsilon"] = _save(fig, out / "ndcg_vs_epsilon.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    by_setting: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in runs:
        by_setting.setdefault((r["privacy"], r["epsilon"], r["alpha"]), []).append(r)
    for (mode, eps, alpha), group in sorted(by_setting.items(), key=str):
        group = sorted(group, key=lambda g: g["sites"])
        eps_label = "no DP" if mode == "none" else f"{mode} ε={eps:g}"
        label = eps_label + (f", α={alpha}" if alpha is not None else "")
        ax.plot([g["sites"] for g in group], [g["ndcg@10"] for g in group], "o-", label=label)
    reference_lines(ax)
    ax.set_xscale("log")
    ax.set(xlabel="sites", ylabel="NDCG@10", title="NDCG@10 vs number of sites")
    ax.legend(fontsize=7)
    figures["ndcg_vs_sites"] = _save(fig, out / "ndcg_vs_sites.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["name"] for r in runs]
    ax.barh(names, [r.get("mb_per_round") or 0.0 for r in runs])
    ax.set(xlabel="MB per round (to + from sites)", title="Communication per round")
    ax.tick_params(axis="y", labelsize=6)
    figures["bytes_per_round"] = _save(fig, out / "bytes_per_round.png")
    return figures

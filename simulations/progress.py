"""Terminal progress of simulation runs (rich): site writing, then one line per round."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


class RichProgress:
    """Terminal progress of a run: site writing, then one line per finished round."""

    def __init__(self, console: Console, label: str = "") -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = console
        self.label = f"[{label}] " if label else ""
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.sites_task: Any = None
        self.rounds_task: Any = None
        self.rounds_done = 0

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        """Handle one event of `simulations.runner.run_simulation`."""
        p = self.progress
        if event == "data":
            self.console.print(
                f"{self.label}{data['dataset']}: {data['shoppers']:,} shoppers, "
                f"{data['items']:,} items, {data['events']:,} events -> {data['sites']} sites "
                f"({data['split']})"
            )
        elif event == "privacy":
            self.console.print(
                f"{self.label}privacy {data['mode']}: σ = {data['noise_multiplier']:.4g} "
                f"({data['how']})"
            )
        elif event == "sites":
            if self.sites_task is None:
                p.start()
                self.sites_task = p.add_task("writing sites", total=data["total"])
            p.update(self.sites_task, completed=data["done"])
            if data["done"] == data["total"]:
                p.remove_task(self.sites_task)
        elif event == "engine":
            self.console.print(
                f"{self.label}simulation SuperLink on 127.0.0.1:{data['port']}, "
                f"Ray temp dir {data['ray_tmpdir']}"
            )
        elif event in ("tick", "round"):
            if self.rounds_task is None:
                p.start()
                self.rounds_task = p.add_task("rounds", total=data.get("rounds"))
            if event == "round":
                self.rounds_done += 1
                p.update(self.rounds_task, total=data["rounds"], completed=self.rounds_done)
                self.console.print(self.round_line(data))
        elif event == "done":
            p.stop()

    def round_line(self, line: dict[str, Any]) -> str:
        """One terminal line per round."""

        def f(value: Any, digits: int = 4) -> str:
            return "–" if value is None else f"{value:.{digits}f}"

        return (
            f"{self.label}round {line['round']:>3} {line['status']:<9} loss {f(line['loss'], 3)}"
            f"  NDCG@10 {f(line['ndcg@10'])}  HR@10 {f(line['hr@10'])}"
            f"  fed {f(line['fed_ndcg@10'])}  ε {f(line['epsilon_max'], 2)}"
            f"  {f(line['seconds'], 1)} s  {line['bytes_sent'] / 1e6:.1f} MB"
            f"  sites {line['sites_accepted']}/{line['sites_asked']}"
        )

    def close(self) -> None:
        """Stop the live display."""
        self.progress.stop()


def summary_table(summary: dict[str, Any], title: str) -> Table:
    """The final numbers of a run as a rich table."""
    table = Table(title=title, title_justify="left")
    for col in ("model", "HR@10", "NDCG@10", "ε"):
        table.add_column(col, justify="right" if col != "model" else "left")
    final = summary["final"]

    def f(value: Any, digits: int = 4) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    table.add_row(
        f"federated (round {final['round']}, global test)",
        f(final["hr@10"]),
        f(final["ndcg@10"]),
        f(final["epsilon_max"], 3),
    )
    table.add_row("federated evaluation", f(final["fed_hr@10"]), f(final["fed_ndcg@10"]), "")
    table.add_row(
        "popularity", f(summary["popularity"]["hr@10"]), f(summary["popularity"]["ndcg@10"]), ""
    )
    return table

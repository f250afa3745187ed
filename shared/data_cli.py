"""`fedrec data`: generate, describe and clean event logs (a thin layer over shared.readers).

Commands import pandas-heavy modules inside their bodies so that `fedrec --help` stays fast.
Every `FedrecError` becomes one red line on stderr and exit status 1, also when the sub-app
is invoked directly (tests call it through `shared.cli.app` with typer's CliRunner).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from shared.errors import ConfigError, DataError, FedrecError

if TYPE_CHECKING:
    from shared.cleaning import CleaningConfig

CONTEXT = {"help_option_names": ["-h", "--help"]}
FORMATS_HELP = "events | s3rec | sasrec | ml100k | taobao"

app = typer.Typer(
    name="data",
    help="Generate, describe and clean shopping event logs.",
    no_args_is_help=True,
    context_settings=CONTEXT,
    pretty_exceptions_enable=False,
    add_completion=False,
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
FormatOpt = Annotated[str, typer.Option("--format", "-f", help=f"Input format: {FORMATS_HELP}.")]
PerMinuteOpt = Annotated[
    int | None,
    typer.Option(help="Bot rule: most events a shopper may have in any 60 s (0 = off)."),
]
PerDayOpt = Annotated[
    int | None,
    typer.Option(help="Bot rule: most events a shopper may have in any 24 h (0 = off)."),
]
CollapseOpt = Annotated[
    bool, typer.Option(help="Drop events on the same item as the shopper's previous event.")
]


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """Turn a `FedrecError` into one red line on stderr and exit status 1."""
    try:
        yield
    except FedrecError as err:
        # soft_wrap: the message stays one line whatever the terminal width
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {err}", highlight=False)
        raise typer.Exit(1) from err


def _cleaning_config(
    fmt: str, per_minute: int | None, per_day: int | None, collapse: bool
) -> CleaningConfig:
    """The format's default cleaning rules with the command-line overrides applied."""
    from shared.readers import default_cleaning

    if (per_minute is not None and per_minute < 0) or (per_day is not None and per_day < 0):
        raise DataError("event-rate limits must be >= 0 (0 switches the rule off)")
    config = default_cleaning(fmt)
    if per_minute is not None:
        config = replace(config, max_events_per_minute=per_minute or None)
    if per_day is not None:
        config = replace(config, max_events_per_day=per_day or None)
    return replace(config, collapse_repeats=collapse)


def _summary_table(stats: dict[str, object], title: str) -> Table:
    """The `describe_dataset` numbers as a two-column rich table."""
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    for key, value in stats.items():
        if key == "cleaning":
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v:,}" for k, v in value.items())
        elif isinstance(value, int):
            value = f"{value:,}"
        table.add_row(key, str(value))
    return table


@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write into.")],
    sites: Annotated[int, typer.Option(help="Number of sites (stores/apps).")] = 5,
    shoppers: Annotated[int, typer.Option(help="Shoppers per site.")] = 200,
    items: Annotated[int, typer.Option(help="Catalogue size.")] = 1000,
    categories: Annotated[int, typer.Option(help="Number of item categories.")] = 20,
    events: Annotated[float, typer.Option(help="Mean events per shopper.")] = 50.0,
    days: Annotated[int, typer.Option(help="Days the log spans.")] = 28,
    start: Annotated[str, typer.Option(help="First day, ISO 8601 (UTC).")] = "2024-01-01",
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same log.")] = 0,
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="Events file type: parquet | csv | jsonl.")
    ] = "parquet",
    json_out: JsonFlag = False,
) -> None:
    """Generate a synthetic multi-site shopping log (events file + catalogue.csv).

    Example: fedrec data synth --out state/synth --sites 5 --shoppers 200 --seed 0
    """
    with _one_line_errors():
        from shared.readers import describe_dataset
        from shared.synth import SYNTH_FORMATS, SynthConfig, generate_synthetic, write_synthetic

        if fmt not in SYNTH_FORMATS:
            raise ConfigError(f"unknown format {fmt!r}; expected one of {', '.join(SYNTH_FORMATS)}")
        config = SynthConfig(
            n_sites=sites,
            shoppers_per_site=shoppers,
            n_items=items,
            n_categories=categories,
            events_per_shopper=events,
            days=days,
            start=start,
            seed=seed,
        )
        dataset = generate_synthetic(config)
        paths = write_synthetic(dataset, out, fmt)
        stats = describe_dataset(dataset)
        stats.pop("cleaning", None)
        result = {**stats, "files": {k: str(v) for k, v in paths.items()}}
        if json_out:
            typer.echo(json.dumps(result))
            return
        console = Console()
        console.print(_summary_table(stats, f"synthetic log, seed {seed}"))
        for kind, path in paths.items():
            console.print(f"wrote {kind}: {path}")


@app.command()
def stats(
    path: Annotated[Path, typer.Argument(help="Data file (or directory for ml100k / events).")],
    fmt: FormatOpt,
    max_per_minute: PerMinuteOpt = None,
    max_per_day: PerDayOpt = None,
    collapse_repeats: CollapseOpt = False,
    json_out: JsonFlag = False,
) -> None:
    """Read and clean a dataset; print its size, sequence lengths, event types, time range.

    Example: fedrec data stats ../shared/data/ml-100k --format ml100k
    """
    with _one_line_errors():
        from shared.cleaning import CleaningReport
        from shared.readers import describe_dataset, read_dataset

        config = _cleaning_config(fmt, max_per_minute, max_per_day, collapse_repeats)
        dataset = read_dataset(path, fmt, cleaning=config)
        result = describe_dataset(dataset)
        if json_out:
            typer.echo(json.dumps(result))
            return
        console = Console()
        console.print(_summary_table(result, f"{dataset.name} ({fmt})"))
        report = CleaningReport.from_dict(dict(dataset.info["cleaning"]))  # type: ignore[call-overload]
        console.print(report.to_table())


@app.command()
def clean(
    path: Annotated[Path, typer.Argument(help="Data file (or directory for ml100k / events).")],
    fmt: FormatOpt,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Canonical events file: .parquet, .csv or .jsonl.")
    ],
    max_per_minute: PerMinuteOpt = None,
    max_per_day: PerDayOpt = None,
    collapse_repeats: CollapseOpt = False,
    json_out: JsonFlag = False,
) -> None:
    """Read and clean a dataset; write it as a canonical events file plus a JSON report.

    The report goes beside the output as ``<name>.cleaning.json``.

    Example: fedrec data clean ../shared/data/taobao_userbehavior/UserBehavior_head.csv
    --format taobao --out state/taobao.parquet
    """
    with _one_line_errors():
        from shared.cleaning import CleaningReport
        from shared.readers import EVENT_FILE_SUFFIXES, read_dataset, write_events

        if out.suffix.lower() not in EVENT_FILE_SUFFIXES:
            raise DataError(
                f"{out}: the output type comes from its extension; "
                f"use one of {', '.join(EVENT_FILE_SUFFIXES)}"
            )
        config = _cleaning_config(fmt, max_per_minute, max_per_day, collapse_repeats)
        dataset = read_dataset(path, fmt, cleaning=config)
        write_events(dataset.events, out)
        report_dict = dict(dataset.info["cleaning"])  # type: ignore[call-overload]
        report_path = out.with_name(f"{out.stem}.cleaning.json")
        report_path.write_text(json.dumps(report_dict, indent=2) + "\n", encoding="utf-8")
        if json_out:
            result = {
                "events_file": str(out),
                "report_file": str(report_path),
                "rows": len(dataset.events),
                "cleaning": report_dict,
            }
            typer.echo(json.dumps(result))
            return
        console = Console()
        console.print(CleaningReport.from_dict(report_dict).to_table())
        console.print(f"wrote {len(dataset.events):,} events to {out}; report: {report_path}")

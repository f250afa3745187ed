"""`fedrec edge`: serve a site, bulk-import events, show its status, forget a shopper.

A thin layer over `edge_client.store`, `edge_client.inference` and the service; heavy
modules (pandas, onnxruntime, uvicorn) are imported inside the commands so that
`fedrec --help` stays fast.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from shared.errors import FedrecError

CONTEXT = {"help_option_names": ["-h", "--help"]}
FORMATS_HELP = "events | s3rec | sasrec | ml100k | taobao"

app = typer.Typer(
    name="edge",
    help="The store/app daemon: durable event store and real-time recommendations.",
    no_args_is_help=True,
    context_settings=CONTEXT,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DbOpt = Annotated[Path, typer.Option("--db", help="The site's SQLite event store (site.db).")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """Turn a `FedrecError` into one red line on stderr and exit status 1."""
    try:
        yield
    except FedrecError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from err


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@app.command()
def serve(
    db: Annotated[
        Path | None,
        typer.Option("--db", help="The site's event store (default: $FEDREC_EDGE_DB)."),
    ] = None,
    model_dir: Annotated[
        Path | None,
        typer.Option(
            "--model-dir",
            help="The site's models directory (<version>/ and CURRENT); empty = popularity.",
        ),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    dev: Annotated[
        bool, typer.Option("--dev", help="Allow an empty or default admin token (development).")
    ] = False,
    threads: Annotated[
        int | None, typer.Option("--threads", help="ONNX Runtime threads per inference.")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug | info | warning | error")] = None,
) -> None:
    """Serve events and recommendations over HTTP (one uvicorn worker).

    Settings not given here come from FEDREC_EDGE_* environment variables (docs/edge.md);
    the admin token only from FEDREC_EDGE_ADMIN_TOKEN.

    Example: fedrec edge serve --db /tmp/e.db --model-dir /tmp/m --port 8765 --dev
    """
    with _one_line_errors():
        import logging

        import uvicorn

        from edge_client.service.app import create_app
        from edge_client.settings import load_settings
        from edge_client.store import EventStore

        settings = load_settings(
            db=db,
            model_dir=model_dir,
            host=host,
            port=port,
            dev=dev or None,
            intra_op_threads=threads,
            log_level=log_level,
        )
        # Open the store once here, so that a bad path is one clear line, not a traceback.
        EventStore(settings.db, synchronous=settings.synchronous).close()
        logging.basicConfig(
            level=settings.log_level.upper(), format="%(levelname)-9s %(name)s: %(message)s"
        )
        if settings.dev and settings.admin_token.get_secret_value() == "":
            Console(stderr=True).print(
                "[yellow]warning:[/] --dev with no FEDREC_EDGE_ADMIN_TOKEN: admin endpoints "
                "accept the default token 'changethis'"
            )
        uvicorn.run(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
            loop="uvloop",
            http="httptools",
            lifespan="on",
            timeout_graceful_shutdown=10,
        )


@app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(help="The event file (or dataset directory).")],
    db: DbOpt,
    fmt: Annotated[
        str, typer.Option("--format", "-f", help=f"Input format: {FORMATS_HELP}.")
    ] = "events",
    as_json: JsonFlag = False,
) -> None:
    """Bulk-import a dataset into a site's store (cleaned first; a re-import is a no-op).

    Example: fedrec edge import UserBehavior.csv --format taobao --db state/site/site.db
    """
    with _one_line_errors():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        from edge_client.store import EventStore
        from shared.cleaning import CleaningReport
        from shared.readers import read_dataset

        err_console = Console(stderr=True)
        start = time.perf_counter()
        with err_console.status(f"reading {file} ({fmt})", spinner="dots"):
            dataset = read_dataset(file, fmt)
        read_s = time.perf_counter() - start
        cleaning = dataset.info.get("cleaning")
        frame = dataset.events
        store = EventStore(db)
        try:
            start = time.perf_counter()
            with Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=err_console,
                disable=as_json,
            ) as progress:
                task = progress.add_task("importing", total=len(frame))
                result = store.import_events(frame, progress=lambda n: progress.advance(task, n))
            write_s = time.perf_counter() - start
            stats = store.stats()
        finally:
            store.close()
        summary: dict[str, Any] = {
            "file": str(file),
            "format": fmt,
            "rows_after_cleaning": len(frame),
            "accepted": result.accepted,
            "duplicates": result.duplicates,
            "read_seconds": round(read_s, 3),
            "write_seconds": round(write_s, 3),
            "events_per_second": round(len(frame) / write_s) if write_s > 0 else None,
            "store_events": stats["events"],
            "cleaning": cleaning,
        }
        if as_json:
            typer.echo(json.dumps(summary))
            return
        console = Console()
        if isinstance(cleaning, dict):
            console.print(CleaningReport.from_dict(cleaning).to_table())
        table = Table(title=f"imported into {db}", title_justify="left")
        table.add_column("what")
        table.add_column("value", justify="right")
        table.add_row("rows after cleaning", f"{len(frame):,}")
        table.add_row("stored (new)", f"{result.accepted:,}")
        table.add_row("already stored (duplicates)", f"{result.duplicates:,}")
        table.add_row(
            "write time", f"{write_s:.2f} s ({summary['events_per_second'] or 0:,} events/s)"
        )
        table.add_row("events in the store now", f"{stats['events']:,}")
        console.print(table)


@app.command()
def status(
    db: DbOpt,
    model_dir: Annotated[
        Path | None, typer.Option("--model-dir", help="The site's models directory.")
    ] = None,
    window_days: Annotated[
        float, typer.Option(help="Window of the R and I_u indicators, in days.", min=0.001)
    ] = 30.0,
    as_json: JsonFlag = False,
) -> None:
    """Rows, shoppers, items, disk use, model version, indicators R and I_u, A/B test.

    Example: fedrec edge status --db state/site/site.db --model-dir state/site/models --json
    """
    with _one_line_errors():
        from edge_client.ab_site import ABSite
        from edge_client.inference import installed_versions, read_current_version
        from edge_client.outcomes import site_indicators
        from edge_client.store import EventStore
        from shared.artifacts import read_metadata

        store = EventStore(db, create=False)
        try:
            stats = store.stats()
        finally:
            store.close()
        ind = site_indicators(db, window_days)
        with ABSite(db) as ab_site:
            running = ab_site.running()
            ab_state: dict[str, Any] = {
                "running": running.to_dict() if running else None,
                "epsilon_spent": ab_site.epsilon_spent(),
            }
        model: dict[str, Any] = {}
        if model_dir is not None:
            current = read_current_version(model_dir)
            model = {"models_dir": str(model_dir), "current": current, "mode": "popularity"}
            model["installed"] = list(installed_versions(model_dir))
            if current is not None:
                meta = read_metadata(model_dir / current)
                model.update(
                    mode="model",
                    kind=meta.kind,
                    n_items=meta.n_items,
                    created_at=meta.created_at,
                    privacy=meta.privacy.describe(),
                )
        if as_json:
            payload = {"store": stats, "model": model, "indicators": ind.to_dict(), "ab": ab_state}
            typer.echo(json.dumps(payload))
            return
        table = Table(title=f"site store {db}", title_justify="left")
        table.add_column("what")
        table.add_column("value", justify="right")
        table.add_row("events", f"{stats['events']:,}")
        table.add_row("shoppers", f"{stats['shoppers']:,}")
        table.add_row("items", f"{stats['items']:,}")
        table.add_row("first event", _when(stats["first_ts_ms"]))
        table.add_row("last event", _when(stats["last_ts_ms"]))
        table.add_row("disk (db + wal)", f"{stats['disk_bytes'] / 1e6:,.1f} MB")
        table.add_row("schema", ", ".join(stats["migrations"]))
        if model:
            table.add_row("model", str(model.get("current") or "none: serving popularity"))
            if model.get("privacy"):
                table.add_row("privacy", str(model["privacy"]))
            table.add_row("installed versions", str(len(model["installed"])))
        days = f"{window_days:g} days"
        table.add_row(
            f"recommendation effect R ({days})",
            f"{ind.recommendation_effect:.3f} explicit, {ind.recommendation_effect_implicit:.3f}"
            f" implicit over N={ind.recommended_pairs:,} recommended pairs",
        )
        table.add_row(
            f"user interest I_u ({days})",
            f"{ind.user_interest:.3f} explicit ({ind.raters:,} raters), "
            f"{ind.user_interest_implicit:.3f} implicit ({ind.active_shoppers:,} shoppers)",
        )
        if running is not None:
            arms = ", ".join(f"{a.name}={a.version} ({a.weight:g})" for a in running.arms)
            table.add_row("A/B experiment", f"{running.experiment_id}: {arms}")
        table.add_row("A/B epsilon spent", f"{ab_state['epsilon_spent']:.3g}")
        Console().print(table)


@app.command()
def forget(
    user_id: Annotated[str, typer.Argument(help="The shopper to forget.")],
    db: DbOpt,
    as_json: JsonFlag = False,
) -> None:
    """Delete every event of one shopper (overwritten on disk; a running service sees it).

    Example: fedrec edge forget u1 --db state/site/site.db
    """
    with _one_line_errors():
        from edge_client.store import EventStore

        store = EventStore(db, create=False)
        try:
            deleted = store.forget(user_id)
        finally:
            store.close()
        if as_json:
            typer.echo(json.dumps({"user_id": user_id, "deleted_events": deleted}))
        else:
            Console().print(f"forgot shopper {user_id!r}: {deleted} event(s) deleted")


@app.command()
def retention(
    db: DbOpt,
    max_age_days: Annotated[
        float | None, typer.Option(help="Delete events older than this many days.")
    ] = None,
    max_events_per_user: Annotated[
        int | None, typer.Option(help="Keep only each shopper's newest N events.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Apply a retention policy once (the service can also run it periodically).

    Example: fedrec edge retention --db state/site/site.db --max-age-days 365
    """
    with _one_line_errors():
        from edge_client.errors import StoreError
        from edge_client.store import EventStore

        if max_age_days is None and max_events_per_user is None:
            raise StoreError("give --max-age-days and/or --max-events-per-user")
        store = EventStore(db, create=False)
        try:
            result = store.apply_retention(
                max_age_days=max_age_days, max_events_per_user=max_events_per_user
            )
        finally:
            store.close()
        out = {"deleted_by_age": result.deleted_by_age, "deleted_by_cap": result.deleted_by_cap}
        if as_json:
            typer.echo(json.dumps(out))
        else:
            Console().print(
                f"deleted {result.deleted_by_age} event(s) by age and "
                f"{result.deleted_by_cap} over the per-shopper cap"
            )

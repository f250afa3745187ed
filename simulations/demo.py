"""`fedrec demo` (what `make demo` runs): federated DP training, then a live edge service.

1. A federated simulation of 5 synthetic stores with DP-SGD at every store (store mode,
   ε = 8 per shopper over the whole run) under Flower's simulation engine, with the same
   ServerApp and ClientApp as production (`simulations.runner.run_simulation`).
2. Store ``site-000``'s edge service (`fedrec edge serve`, a subprocess on a free
   127.0.0.1 port, ``--dev``) started on the model the federation delivered to it.
3. A new shopper: recommendations before any event (the store's popular items), then a few
   events posted over HTTP, then recommendations again (the federated model, reading the
   events just stored): the real-time effect.
4. Every process started is stopped and checked; the report's path is printed.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from shared.federated import default_state_dir
from simulations.errors import SimulationError
from simulations.progress import RichProgress
from simulations.runner import SimConfig, run_simulation

DEMO_SHOPPER = "demo-shopper-1"
DEMO_SITE = "site-000"
# Small enough for a couple of minutes on two cores; big enough (400 shoppers per store,
# batches of 256) that DP-SGD at ε = 8 beats the popularity baseline (docs/simulations.md).
DEMO_CONFIG = SimConfig(
    data="synth",
    sites=5,
    rounds=3,
    local_epochs=4,
    privacy="store",
    epsilon=8.0,
    synth_shoppers=400,
    synth_items=100,
    batch_size=256,
    learning_rate=0.01,
    model_config={"dim": 16, "hidden": 16, "max_len": 20},
    seed=7,
)


def run_demo(
    out: Path | None = None,
    *,
    rounds: int = 3,
    port: int | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the demo into ``out`` (default ``state/demo/<time>``); returns what it showed."""
    import dataclasses

    console = console or Console()
    out = out or default_state_dir() / "demo" / time.strftime("%Y%m%dT%H%M%S")
    config = dataclasses.replace(DEMO_CONFIG, rounds=rounds)
    console.rule("1. federated training with DP-SGD at 5 simulated stores")
    progress = RichProgress(Console(stderr=True))
    try:
        result = run_simulation(config, out, report=progress)
    finally:
        progress.close()
    final = result.final
    console.print(
        f"federated model after round {final['round']}: NDCG@10 {final['ndcg@10']:.4f} "
        f"(popularity {result.summary['popularity']['ndcg@10']:.4f}), "
        f"ε ≤ {final['epsilon_max']:.2f} per shopper (δ = {config.delta:g})"
    )
    console.rule(f"2. the edge service of store {DEMO_SITE} on the federated model")
    shown = show_site(out, DEMO_SITE, port=port, console=console)
    console.rule("3. where things are")
    console.print(f"report:      {out / 'report.md'}")
    console.print(f"metrics:     {out / 'metrics.jsonl'}")
    console.print(f"final model: {out / 'model'} (ONNX)")
    console.print(f"store data:  {out / 'state' / 'sites' / DEMO_SITE / 'site.db'}")
    return {"out": str(out), "summary": result.summary, **shown}


def show_site(
    run_dir: Path, site: str = DEMO_SITE, *, port: int | None = None, console: Console
) -> dict[str, Any]:
    """Serve one site of a finished synthetic run and show recommendations before/after."""
    import json

    saved = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["config"]
    saved.pop("split_resolved", None)
    config = SimConfig(**saved)
    if config.data != "synth":
        raise SimulationError("the demo shows a site of a synthetic run (it needs categories)")
    return serve_and_show(
        run_dir / "state" / "sites" / site,
        _categories(config),
        run_dir / "logs" / f"edge-{site}.log",
        port,
        console,
    )


def _categories(config: SimConfig) -> dict[str, str]:
    """Item id -> its category in the (regenerated, deterministic) synthetic catalogue."""
    from simulations.runner import load_dataset

    dataset = load_dataset(config)
    return {
        item: next((a.split(":", 1)[1] for a in attrs if a.startswith("category:")), "?")
        for item, attrs in dataset.item_attributes.items()
    }


def _pick_items(site: Path, categories: dict[str, str], n: int = 3) -> list[str]:
    """The ``n`` most popular items of the store's favourite category."""
    from edge_client.store import EventStore

    store = EventStore(site / "site.db", create=False)
    try:
        popular = [item for item, _ in store.popularity(200)]
    finally:
        store.close()
    if not popular:
        raise SimulationError(f"{site} has no events")
    favourite = Counter(categories.get(i, "?") for i in popular[:30]).most_common(1)[0][0]
    picked = [i for i in popular if categories.get(i) == favourite][:n]
    return picked or popular[:n]


def serve_and_show(
    site: Path,
    categories: dict[str, str],
    log_path: Path,
    port: int | None,
    console: Console,
) -> dict[str, Any]:
    """Start the site's edge service, show before/after recommendations, stop it."""
    import httpx

    from deploy.flower_processes import flower_bin, free_port, start_process

    port = port or free_port()
    argv = [
        flower_bin("fedrec"),
        "edge",
        "serve",
        "--db",
        str(site / "site.db"),
        "--model-dir",
        str(site / "models"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dev",
        "--log-level",
        "warning",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = start_process("edge", argv, env, log_path)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=10.0) as http:
            ready = _wait_ready(http, proc, log_path)
            console.print(
                f"`fedrec edge serve` on {base}: serving {ready.get('model_version')} "
                f"(mode {ready.get('mode')}); log {log_path}"
            )
            items = _pick_items(site, categories)
            before = _recommend(http, DEMO_SHOPPER)
            now = int(time.time())
            events = [
                {
                    "event_id": f"demo-{now}-{i}",
                    "user_id": DEMO_SHOPPER,
                    "item_id": item,
                    "event_type": "view" if i < len(items) - 1 else "cart",
                    "timestamp": now - 60 * (len(items) - i),
                }
                for i, item in enumerate(items)
            ]
            posted = http.post("/v1/events", json={"events": events})
            if posted.status_code != 200:
                raise SimulationError(
                    f"POST /v1/events answered {posted.status_code}: {posted.text}"
                )
            after = _recommend(http, DEMO_SHOPPER)
        wanted = categories.get(items[0], "?")
        console.print(
            f"shopper {DEMO_SHOPPER} (new) then views/carts: "
            + ", ".join(f"{i} (category {categories.get(i, '?')})" for i in items)
        )
        console.print(_table("before any event", before, categories, wanted))
        console.print(
            _table(f"after {len(events)} events, a moment later", after, categories, wanted)
        )
        share_before = _share(before, categories, wanted)
        share_after = _share(after, categories, wanted)
        console.print(
            f"top-10 from category {wanted}: {share_before} before, {share_after} after; "
            f"source {before['source']} -> {after['source']} ({after['model_version']})"
        )
    finally:
        _stop(proc)
    if proc.poll() is None or proc.descendants():
        raise SimulationError("the edge service did not stop")
    return {
        "posted": [e["item_id"] for e in events],
        "before": before,
        "after": after,
        "category": wanted,
        "in_category_before": share_before,
        "in_category_after": share_after,
    }


def _wait_ready(http: Any, proc: Any, log_path: Path, timeout: float = 90.0) -> dict[str, Any]:
    """Poll /readyz until the service answers with a model loaded."""
    import httpx

    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SimulationError(
                f"fedrec edge serve exited with {proc.poll()}; log {log_path}:\n{proc.log_tail()}"
            )
        try:
            resp = http.get("/readyz")
            last = resp.json()
            if resp.status_code == 200 and last.get("mode") == "model":
                return dict(last)
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SimulationError(f"the edge service was not ready with a model in {timeout:.0f} s: {last}")


def _recommend(http: Any, user: str) -> dict[str, Any]:
    resp = http.get(f"/v1/users/{user}/recommendations", params={"k": 10})
    if resp.status_code != 200:
        raise SimulationError(f"recommendations answered {resp.status_code}: {resp.text}")
    return dict(resp.json())


def _share(rec: dict[str, Any], categories: dict[str, str], wanted: str) -> str:
    items = rec["items"]
    hits = sum(1 for i in items if categories.get(i["item_id"]) == wanted)
    return f"{hits}/{len(items)}"


def _table(title: str, rec: dict[str, Any], categories: dict[str, str], wanted: str) -> Table:
    table = Table(title=f"{title}: {rec['source']}", title_justify="left")
    for col in ("#", "item", "category", "score", "why"):
        table.add_column(col, justify="right" if col in ("#", "score") else "left")
    for rank, item in enumerate(rec["items"], start=1):
        category = categories.get(item["item_id"], "?")
        style = "bold green" if category == wanted else ""
        table.add_row(
            str(rank),
            item["item_id"],
            category,
            f"{item['score']:.3g}",
            item["reason"],
            style=style,
        )
    return table


def _stop(proc: Any) -> None:
    """SIGTERM (uvicorn shuts down), SIGKILL after a grace period; reap the process."""
    if proc.poll() is None:
        proc.kill(signal.SIGTERM)
    proc.stop(grace=15.0)

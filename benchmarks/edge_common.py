"""What the edge benchmarks share: sites with a real model and store, a server process, load.

Everything is written under ``state/bench/edge/`` (git-ignored). Servers run as separate
processes (`fedrec edge serve`), and so does the load generator (`edge_loadgen.py`), so the
numbers include real HTTP on 127.0.0.1 and nothing shares a Python interpreter.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / "state" / "bench" / "edge"
LOADGEN = Path(__file__).with_name("edge_loadgen.py")
T0_MS = 1_700_000_000_000


def load_average() -> str:
    """The 1-minute load average and the core count, e.g. ``1.93/2``."""
    return f"{os.getloadavg()[0]:.2f}/{os.cpu_count()}"


def percentiles(seconds: list[float] | np.ndarray) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    ms = np.asarray(seconds) * 1000.0
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def synthetic_events(
    n_users: int, events_per_user: int, n_items: int, seed: int = 0
) -> pd.DataFrame:
    """A canonical event frame: uniform items, mostly views, some carts and purchases."""
    rng = np.random.default_rng(seed)
    n = n_users * events_per_user
    return pd.DataFrame(
        {
            "user_id": pd.Series(
                np.char.add("u", rng.integers(0, n_users, n).astype(str)), dtype=object
            ),
            "item_id": pd.Series(rng.integers(1, n_items + 1, n).astype(str), dtype=object),
            "event_type": pd.Series(
                rng.choice(["view", "view", "view", "view", "cart", "purchase"], n), dtype=object
            ),
            "ts_ms": (T0_MS + rng.integers(0, 30 * 86_400_000, n)).astype(np.int64),
            "value": np.nan,
            "site": "",
        }
    )


@dataclass(frozen=True)
class Site:
    """A site directory with a store and a served model."""

    root: Path
    n_items: int
    users: list[str]

    @property
    def db(self) -> Path:
        """The store."""
        return self.root / "site.db"

    @property
    def models(self) -> Path:
        """The models directory."""
        return self.root / "models"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def edge_server(
    site_root: Path, *, extra_env: dict[str, str] | None = None, threads: int = 1
) -> Iterator[int]:
    """`fedrec edge serve` for a site as a separate process; yields its port; always stops it."""
    import httpx

    port = free_port()
    env = {
        **os.environ,
        "FEDREC_EDGE_ADMIN_TOKEN": secrets.token_urlsafe(24),
        **(extra_env or {}),
    }
    log = (site_root / "serve.log").open("w")
    fedrec = Path(sys.executable).with_name("fedrec")
    proc = subprocess.Popen(
        [
            str(fedrec),
            "edge",
            "serve",
            "--db",
            str(site_root / "site.db"),
            "--model-dir",
            str(site_root / "models"),
            "--port",
            str(port),
            "--threads",
            str(threads),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"edge server exited; see {site_root / 'serve.log'}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("edge server did not become ready in 120 s")
            time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def run_loadgen(
    port: int,
    *,
    concurrency: int,
    duration: float,
    warmup: float,
    paths: Path | None = None,
    bodies: Path | None = None,
    rate: float | None = None,
) -> dict[str, object]:
    """Run `edge_loadgen.py` in its own process and return its JSON summary."""
    cmd = [
        sys.executable,
        str(LOADGEN),
        "--port",
        str(port),
        "--concurrency",
        str(concurrency),
        "--duration",
        str(duration),
        "--warmup",
        str(warmup),
    ]
    if paths is not None:
        cmd += ["--paths", str(paths)]
    if bodies is not None:
        cmd += ["--bodies", str(bodies)]
    if rate is not None:
        cmd += ["--rate", str(rate)]
    out = subprocess.run(
        cmd, check=True, capture_output=True, text=True, timeout=duration + warmup + 120
    )
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    result["load"] = load_average()
    return result

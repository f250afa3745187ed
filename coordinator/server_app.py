"""fedrec: the coordinator's Flower ServerApp (`flwr run .` starts it on the SuperLink)."""

from __future__ import annotations

import logging
import sys

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from coordinator.federation import Federation
from coordinator.run_config import RunConfig
from coordinator.strategy import GuardedStrategy, build_aggregator, build_app_dp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Read the run config, then run rounds (or the feedback loop) and record them."""
    _log_to_stderr()
    cfg = RunConfig.from_mapping(context.run_config)
    federation = Federation(cfg, grid, context.run_id)
    status, detail = "failed", ""
    try:
        if cfg.privacy_mode == "distributed":
            from coordinator.distributed_dp import run_distributed

            run_distributed(federation, grid, context)
        elif cfg.secagg:
            from coordinator.secagg import run_secagg

            run_secagg(federation, grid, context)
        else:
            federation.run(build_strategy(cfg, federation))
        status = "completed"
    except BaseException as err:
        detail = f"{type(err).__name__}: {err}"[:500]
        status = "stopped" if isinstance(err, KeyboardInterrupt | SystemExit) else "failed"
        raise
    finally:
        federation.close(status, detail)


def build_strategy(cfg: RunConfig, federation: Federation) -> GuardedStrategy:
    """Aggregator (+ app-mode DP with a restored accountant) inside the update guard."""
    aggregator = build_aggregator(cfg)
    inner: Strategy = aggregator
    if cfg.privacy_mode == "app":
        inner = build_app_dp(cfg, aggregator, federation.make_accountant())
    return GuardedStrategy(inner, max_update_norm=cfg.max_update_norm, quorum=cfg.quorum)


def _log_to_stderr() -> None:
    """Coordinator logs go to stderr, which Flower streams to `flwr run --stream`/`flwr log`."""
    logger = logging.getLogger("coordinator")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)-8s: %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False

"""`fedrec sim run`: split a dataset into sites and train them with the production Flower apps.

The steps of `run_simulation`:

1. read the data (or generate synthetic sites), build the global leave-one-out split (the
   one centralized training uses, `shared.training.prepare_split`) and the popularity
   baseline on it;
2. split the shoppers into sites (`simulations.partition`) and write each site's
   ``site.db`` through the edge's own store (`simulations.sites`);
3. in a DP mode, calibrate the noise multiplier to the ε budget over all rounds
   (`simulations.privacy`); store-mode sites also get the budget and δ as their own
   settings, and refuse any round past it;
4. run Flower's simulation engine with the very same ServerApp and ClientApp as production
   (`simulations.engine`), following the coordinator's registry: as each round ends, its
   model version is scored on the global test split, one line goes to ``metrics.jsonl``
   and one to the terminal;
5. copy the final model directory (ONNX included) to ``<out>/model``, write
   ``summary.json`` and the report (`simulations.report`), and stop every process.

Run directory: ``config.json``, ``metrics.jsonl``, ``summary.json``, ``report.md`` and its
PNGs, ``model/``, ``state/`` (``sites/`` and the coordinator's ``coordinator/``), ``flwr/``
(FLWR_HOME), ``ray/`` (Ray's temp dir), ``logs/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from shared.errors import ConfigError, FedrecError
from shared.events import EventDataset
from simulations.errors import SimulationError
from simulations.partition import SPLITS, LabelBy, Partition, make_partition

Privacy = Literal["none", "store", "app", "distributed"]
PRIVACY_MODES: tuple[str, ...] = ("none", "store", "app", "distributed")
STRATEGIES: tuple[str, ...] = ("fedavg", "fedadam", "fedmedian", "fedtrimmedavg")
SPLIT_CHOICES: tuple[str, ...] = ("auto", *SPLITS)
EVAL_K = 10
# Every metrics.jsonl line carries these keys (null where a round produced no value).
METRIC_KEYS: tuple[str, ...] = (
    "round",
    "status",
    "loss",
    "hr@10",
    "ndcg@10",
    "fed_hr@10",
    "fed_ndcg@10",
    "epsilon_max",
    "epsilon_mean",
    "seconds",
    "elapsed_seconds",
    "bytes_down",
    "bytes_up",
    "bytes_sent",
    "sites_asked",
    "sites_accepted",
    "sites_refused",
    "sites_rejected",
    "sites_failed",
    "model_version",
)
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MODEL_DIR = "model"


# Run-config keys that name a file on the coordinator's side.
PATH_RUN_CONFIG_KEYS = ("item-attributes",)


@dataclass(frozen=True)
class SimConfig:
    """Everything one simulation run needs (the `fedrec sim run` options)."""

    data: str = "synth"  # "synth" or a path read with `shared.readers.read_dataset`
    format: str = "events"  # input format of a path (s3rec, sasrec, ml100k, taobao, events)
    sites: int | None = 3  # None: the data's own sites (natural split) or every shopper
    sites_per_round: int | None = None  # None: every site trains every round
    rounds: int = 3
    local_epochs: int = 1
    strategy: str = "fedavg"
    privacy: Privacy = "store"
    epsilon: float = 8.0  # the budget of the whole run, per shopper (DP modes)
    delta: float = 1e-5
    clip: float = 1.0  # store: per-shopper gradient bound; app: per-device update bound
    noise_multiplier: float | None = None  # None: calibrated so that the run stays within ε
    seed: int = 0
    split: str = "auto"  # auto: natural for synth, one-per-site for app, else uniform
    alpha: float = 0.5  # Dirichlet concentration (split dirichlet)
    label_by: LabelBy = "category"
    max_groups: int = 10
    eval_fraction: float | None = None  # share of sites in federated evaluation (None: as train)
    batch_size: int = 64
    learning_rate: float = 1e-3
    model_kind: str = "gru"
    model_config: dict[str, Any] = field(default_factory=dict)
    run_config: dict[str, Any] = field(default_factory=dict)  # more run-config keys, verbatim
    actors: int | None = None  # ClientApps at a time (None: the machine's CPUs)
    round_timeout: float = 3600.0
    timeout: float | None = None  # seconds for the whole federated run (None: no limit)
    synth_shoppers: int = 40  # synthetic data: shoppers per site
    synth_items: int = 120
    synth_events: float = 12.0  # mean events per shopper
    keep_models: bool = False  # keep every received/produced version (default: the final)
    global_eval: bool = True  # score every round on the global test split

    def __post_init__(self) -> None:
        self._resolve_path_keys()
        if self.privacy not in PRIVACY_MODES:
            raise ConfigError(f"privacy must be one of {', '.join(PRIVACY_MODES)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}")
        if self.split not in SPLIT_CHOICES:
            raise ConfigError(f"split must be one of {', '.join(SPLIT_CHOICES)}")
        if self.sites is not None and self.sites < 1:
            raise ConfigError("sites must be >= 1")
        if self.sites_per_round is not None and self.sites_per_round < 1:
            raise ConfigError("sites-per-round must be >= 1")
        if self.rounds < 1 or self.local_epochs < 1 or self.batch_size < 1:
            raise ConfigError("rounds, local-epochs and batch-size must be >= 1")
        if not self.epsilon > 0 or not 0 < self.delta < 1 or not self.clip > 0:
            raise ConfigError("epsilon and clip must be > 0 and delta in (0, 1)")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ConfigError("noise-multiplier must be > 0")
        if self.eval_fraction is not None and not 0 <= self.eval_fraction <= 1:
            raise ConfigError("eval-fraction must be in [0, 1]")
        if self.privacy == "app" and self.strategy != "fedavg":
            raise ConfigError("privacy app needs strategy fedavg (Flower's accountant)")
        if self.privacy == "distributed" and self.strategy != "fedavg":
            raise ConfigError("privacy distributed sums updates under SecAgg+: strategy fedavg")
        if self.data == "synth" and self.sites is None:
            raise ConfigError("synthetic data needs --sites")

    def _resolve_path_keys(self) -> None:
        """Path-valued ``--set`` keys made absolute: the ServerApp reads them from its own cwd."""
        for key in PATH_RUN_CONFIG_KEYS:
            value = self.run_config.get(key)
            if not isinstance(value, str) or not value:
                continue
            path = Path(value).expanduser()
            if not path.is_file():
                raise ConfigError(f"--set {key}={value}: no such file")
            # a new dict: the caller's mapping is not ours to change
            object.__setattr__(self, "run_config", {**self.run_config, key: str(path.resolve())})

    @property
    def resolved_split(self) -> str:
        """The split `auto` stands for."""
        if self.split != "auto":
            return self.split
        if self.privacy == "app":
            return "one-per-site"
        return "natural" if self.data == "synth" else "uniform"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        out = dataclasses.asdict(self)
        out["split_resolved"] = self.resolved_split
        return out


@dataclass(frozen=True)
class SimResult:
    """What a finished run reports (also written to summary.json)."""

    out: Path
    summary: dict[str, Any]
    rounds: list[dict[str, Any]]

    @property
    def final(self) -> dict[str, Any]:
        """The metrics line of the last completed round ({} when none completed)."""
        done = [r for r in self.rounds if r["status"] == "completed"]
        return done[-1] if done else {}


# ----------------------------------------------------------------------------- data
def load_dataset(config: SimConfig) -> EventDataset:
    """The synthetic log (one region per site) or the file ``config.data``."""
    from shared.readers import read_dataset
    from shared.synth import SynthConfig, generate_synthetic

    if config.data == "synth":
        n_sites = int(config.sites or 1)
        return generate_synthetic(
            SynthConfig(
                n_sites=n_sites,
                shoppers_per_site=config.synth_shoppers,
                n_items=config.synth_items,
                n_categories=max(2, min(20, config.synth_items // 15)),
                events_per_shopper=config.synth_events,
                min_events=5,
                seed=config.seed,
            )
        )
    path = Path(config.data).expanduser()
    if not path.exists():
        raise SimulationError(f"no data at {path} (give a file, or --data synth)")
    return read_dataset(path, config.format)


REFUSAL_RE = re.compile(r"site (\S+) refuses round \d+: (.+)$")


def site_refusals(log_path: Path, limit: int = 3) -> list[str]:
    """Up to ``limit`` distinct reasons sites gave for refusing rounds, from the run's log.

    A refused SecAgg+ share is a dropout to Flower: the registry records only that the
    protocol halted, and the site's own reason is in the log its ClientApp wrote.
    """
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    seen: dict[str, str] = {}
    for line in text.splitlines():
        match = REFUSAL_RE.search(line)
        if match is None:
            continue
        reason = match.group(2).strip()
        # the same cause at every site differs only in its numbers: show it once
        key = re.sub(r"\d+(\.\d+)?", "N", reason)
        if key not in seen:
            seen[key] = f"{match.group(1)}: {reason}"
        if len(seen) >= limit:
            break
    return list(seen.values())


def training_shoppers_per_site(split: Any, partition: Partition) -> np.ndarray:
    """Per site: shoppers with a training example (>= 2 training events), as a site counts."""
    lengths = np.asarray(split.train.lengths)
    users = np.asarray(split.train.user_ids, dtype=object)
    site = partition.assignment.reindex(users).to_numpy(dtype=np.float64)
    ok = (lengths >= 2) & ~np.isnan(site)
    return np.bincount(site[ok].astype(np.int64), minlength=partition.n_sites)


# ----------------------------------------------------------------------------- run config
def sampling(config: SimConfig, n_sites: int) -> tuple[int, float, float]:
    """(sites per round, fraction-train, fraction-evaluate) for ``n_sites`` simulated sites."""
    per_round = min(n_sites, config.sites_per_round or n_sites)
    fraction = per_round / n_sites
    evaluate = fraction if config.eval_fraction is None else config.eval_fraction
    return per_round, fraction, evaluate


def build_run_config(
    config: SimConfig,
    *,
    n_sites: int,
    catalogue: Path,
    state_dir: Path,
    noise_multiplier: float,
    max_site_shoppers: int = 0,
) -> dict[str, Any]:
    """The ServerApp's run config (`coordinator.run_config.RunConfig` keys) for this run.

    ``max_site_shoppers`` (the largest site's shoppers) sizes SecAgg+'s range in the
    distributed mode, where a site with more shoppers than ``secagg-max-weight`` refuses.
    """
    from coordinator.run_config import RunConfig

    per_round, fraction, evaluate = sampling(config, n_sites)
    values: dict[str, Any] = {
        "num-rounds": config.rounds,
        "strategy": config.strategy,
        "fraction-train": fraction,
        "fraction-evaluate": evaluate,
        "min-sites": per_round,
        "quorum": max(1, math.ceil(per_round / 2)),
        "round-timeout": config.round_timeout,
        "privacy-mode": config.privacy,
        "max-grad-norm": config.clip,
        "local-epochs": config.local_epochs,
        "batch-size": config.batch_size,
        "learning-rate": config.learning_rate,
        "model-kind": config.model_kind,
        "model-config": json.dumps(config.model_config, sort_keys=True),
        "catalogue": str(catalogue),
        "seed": config.seed,
        "eval-k": EVAL_K,
        "state-dir": str(state_dir),
        "publish": "auto",
        # The guard's norm bound is an attack defence sized for small models; a simulation
        # has no attacker, and a Beauty-sized model's honest updates exceed the default.
        "max-update-norm": 0.0,
    }
    if config.privacy == "store":
        values["noise-multiplier"] = noise_multiplier
    if config.privacy == "distributed":
        if per_round < 3:
            raise SimulationError(
                "privacy distributed needs at least 3 sites per round (SecAgg+ shares)"
            )
        values.update(
            {
                "noise-multiplier": noise_multiplier,
                "secagg": True,
                # Each site adds its 1/m share of the noise, m = the quorum: every site of
                # the round must answer, or the sum would carry less noise than planned.
                "quorum": per_round,
                # A share's coordinates reach n C for n shoppers: the range must hold the
                # largest site (Beauty's largest of 10 Dirichlet sites: 5,032; default 1,000).
                "secagg-max-weight": float(max(RunConfig.secagg_max_weight, max_site_shoppers)),
            }
        )
    if config.privacy == "app":
        values.update(
            {
                "app-noise-multiplier": noise_multiplier,
                "app-clipping-norm": config.clip,
                "app-target-delta": config.delta,
                "app-population": n_sites,
                # A hair above the budget: the calibration already keeps R rounds within it,
                # and Flower's check must not refuse the last round over float rounding.
                "app-max-epsilon": config.epsilon * (1 + 1e-9),
                "quorum": per_round,
            }
        )
    values.update(config.run_config)
    try:
        RunConfig.from_mapping(values)
    except FedrecError as err:
        raise SimulationError(f"invalid run config: {err}") from err
    return values


def calibrate(
    config: SimConfig, n_sites: int, shoppers_per_site: np.ndarray
) -> tuple[float, dict[str, Any]]:
    """The noise multiplier of a DP run and how it was chosen."""
    from simulations.privacy import (
        app_epsilon,
        app_noise_multiplier,
        store_mechanisms,
        store_noise_multiplier,
    )

    per_round, _, _ = sampling(config, n_sites)
    info: dict[str, Any] = {"mode": config.privacy}
    if config.privacy == "none":
        return 0.0, info
    if config.privacy == "store":
        if config.noise_multiplier is not None:
            sigma, how = config.noise_multiplier, "given"
        else:
            sigma = store_noise_multiplier(
                config.epsilon,
                config.delta,
                config.rounds,
                shoppers_per_site.tolist(),
                config.batch_size,
                config.local_epochs,
            )
            how = "calibrated (PRV, smallest sites, every round)"
        q, steps = store_mechanisms(
            shoppers_per_site.tolist(), config.batch_size, config.local_epochs
        )[0]
        info.update(
            noise_multiplier=sigma,
            how=how,
            accountant="prv",
            worst_sample_rate=q,
            steps_per_round=steps,
        )
        return sigma, info
    if config.privacy == "distributed":
        return _calibrate_distributed(config, info)
    if config.noise_multiplier is not None:
        sigma, how = config.noise_multiplier, "given"
    else:
        sigma = app_noise_multiplier(
            config.epsilon, config.delta, config.rounds, per_round, n_sites
        )
        how = "calibrated (Flower RDP, no amplification)"
    info.update(
        noise_multiplier=sigma,
        how=how,
        accountant="rdp",
        planned_epsilon=app_epsilon(sigma, config.rounds, config.delta, per_round, n_sites),
    )
    return sigma, info


def _calibrate_distributed(config: SimConfig, info: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Distributed DP-FedSGD: each round is one Gaussian step (σ, q) over every shopper.

    With ``dist-popularity-noise`` σ_p set, the first round releases the item counts
    (σ_p, q = 1) and the others train; the ledger composes both (PRV).
    """
    from coordinator.run_config import RunConfig
    from simulations.privacy import distributed_noise_multiplier

    defaults = RunConfig()
    q = float(config.run_config.get("dist-sample-rate", defaults.dist_sample_rate))
    popularity = float(
        config.run_config.get("dist-popularity-noise", defaults.dist_popularity_noise)
    )
    steps = config.rounds - 1 if popularity > 0 else config.rounds
    if config.noise_multiplier is not None:
        sigma, how = config.noise_multiplier, "given"
    else:
        sigma = distributed_noise_multiplier(
            config.epsilon, config.delta, steps, q, popularity_noise=popularity
        )
        how = "calibrated (PRV, one step per round over every shopper)"
    info.update(
        noise_multiplier=sigma,
        how=how,
        accountant="prv",
        sample_rate=q,
        steps=steps,
        popularity_noise=popularity or None,
    )
    return sigma, info


# ----------------------------------------------------------------------------- registry
def read_registry(db_path: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """(rounds in order, the latest run) from the coordinator's registry, read-only.

    Read with plain sqlite3 in read-only mode while the ServerApp writes (WAL); a missing or
    half-created database reads as nothing yet.
    """
    if not db_path.is_file():
        return [], None
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error:
        return [], None
    conn.row_factory = sqlite3.Row
    try:
        rounds = [dict(r) for r in conn.execute("select * from rounds order by number")]
        runs = [dict(r) for r in conn.execute("select * from runs order by id desc limit 1")]
    except sqlite3.Error:
        return [], None
    finally:
        conn.close()
    for row in rounds:
        for key in ("train_metrics", "eval_metrics"):
            row[key] = json.loads(row.get(key) or "{}")
    return rounds, (runs[0] if runs else None)


def finished_rounds(rounds: list[dict[str, Any]], run_over: bool) -> list[int]:
    """Round numbers whose evaluation phase is over too.

    A round row is final once the next round has started, or once the run has ended.
    """
    numbers = [int(r["number"]) for r in rounds]
    return [
        n
        for i, n in enumerate(numbers)
        if (run_over or rounds[i]["status"] != "running") and (run_over or i + 1 < len(numbers))
    ]


def metrics_line(
    row: dict[str, Any], global_metrics: Mapping[str, float] | None, elapsed: float
) -> dict[str, Any]:
    """One metrics.jsonl line from a registry round and its global test metrics."""

    def num(value: Any) -> float | None:
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None

    train, fed = row["train_metrics"], row["eval_metrics"]
    down, up = int(row["bytes_down"] or 0), int(row["bytes_up"] or 0)
    g = global_metrics or {}
    line: dict[str, Any] = {
        "round": int(row["number"]),
        "status": str(row["status"]),
        "loss": num(train.get("train-loss")),
        "hr@10": num(g.get("hr@10")),
        "ndcg@10": num(g.get("ndcg@10")),
        "fed_hr@10": num(fed.get(f"hr@{EVAL_K}")),
        "fed_ndcg@10": num(fed.get(f"ndcg@{EVAL_K}")),
        "epsilon_max": num(row["epsilon_max"]),
        "epsilon_mean": num(row["epsilon_mean"]),
        "seconds": num(row["seconds"]),
        "elapsed_seconds": round(elapsed, 2),
        "bytes_down": down,
        "bytes_up": up,
        "bytes_sent": down + up,
        "sites_asked": int(row["sites_asked"] or 0),
        "sites_accepted": int(row["sites_accepted"] or 0),
        "sites_refused": int(row["sites_refused"] or 0),
        "sites_rejected": int(row["sites_rejected"] or 0),
        "sites_failed": int(row["sites_failed"] or 0),
        "model_version": row["model_version"],
    }
    assert tuple(line) == METRIC_KEYS
    return line


# ----------------------------------------------------------------------------- evaluation
class GlobalEvaluator:
    """Scores model directories on the global leave-one-out test split."""

    def __init__(self, split: Any, vocab: Any, threads: int) -> None:
        self.split = split
        self.vocab = vocab
        self.threads = threads

    def __call__(self, model_dir: Path) -> dict[str, float]:
        """HR@k, NDCG@k (k = 5, 10, 20) and MRR on the test targets, full ranking."""
        import torch

        from shared.artifacts import load_model_dir
        from shared.training import evaluate_model

        model, vocab, _ = load_model_dir(model_dir)
        if vocab != self.vocab:
            raise SimulationError(f"{model_dir} was trained over another catalogue")
        saved = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            test = evaluate_model(model, self.split.test)
        finally:
            torch.set_num_threads(saved)
        return {k: float(v) for k, v in test.items()}


def popularity_baseline(split: Any, vocab: Any) -> dict[str, float]:
    """Test metrics of the popularity model fitted on the same training split."""
    from shared.models import build_model
    from shared.training import TrainConfig, train_model

    model = build_model("pop", {"n_items": vocab.n_items})
    result = train_model(model, split, TrainConfig(epochs=0))
    return {k: float(v) for k, v in result.test.items()}


# ----------------------------------------------------------------------------- the run
Reporter = Callable[[str, dict[str, Any]], None]  # (event, data): progress for the CLI


def _null_reporter(event: str, data: dict[str, Any]) -> None:
    return None


def prepare_out(out: Path) -> Path:
    """``out`` resolved; it must be new or empty (a run never mixes with an older one)."""
    out = out.expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SimulationError(f"{out} exists and is not empty: choose a new --out directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_simulation(config: SimConfig, out: Path, *, report: Reporter | None = None) -> SimResult:
    """Run one simulation into the fresh directory ``out``; see the module docstring.

    Raises `SimulationError` when the data cannot be split, the run config is invalid, the
    federated run fails or times out; every process started is stopped in every case.
    """
    from shared.sequences import build_sequences, leave_one_out
    from simulations.engine import SimulationEngine, describe_env
    from simulations.memory import MemorySampler, own_tree
    from simulations.sites import catalogue_of, write_sites

    emit = report or _null_reporter
    started = time.monotonic()
    out = prepare_out(out)
    dataset = load_dataset(config)
    vocab = catalogue_of(dataset.events)
    split = leave_one_out(build_sequences(dataset.events, vocab))
    partition = make_partition(
        dataset.events,
        config.resolved_split,  # type: ignore[arg-type]
        config.sites,
        seed=config.seed,
        alpha=config.alpha,
        item_attributes=dataset.item_attributes,
        label_by=config.label_by,
        max_groups=config.max_groups,
    )
    n_sites = partition.n_sites
    shoppers_per_site = training_shoppers_per_site(split, partition)
    emit(
        "data",
        {
            "dataset": dataset.name,
            "shoppers": dataset.n_users,
            "items": vocab.n_items,
            "events": len(dataset.events),
            "sites": n_sites,
            "split": partition.method,
        },
    )
    state_dir = out / "state"
    # A bad run-config key fails here, before the calibration and the sites are written.
    build_run_config(
        config,
        n_sites=n_sites,
        catalogue=state_dir / "sites" / "catalogue.json",
        state_dir=state_dir,
        noise_multiplier=1.0,
    )
    sigma, privacy_info = calibrate(config, n_sites, shoppers_per_site)
    if config.privacy != "none":
        emit("privacy", privacy_info)
    node_config: dict[str, Any] = {
        "epsilon-budget": config.epsilon if config.privacy in ("store", "distributed") else 1e6,
        "delta": config.delta,
    }
    layout = write_sites(
        dataset,
        partition,
        state_dir / "sites",
        node_config=node_config,
        progress=lambda done: emit("sites", {"done": done, "total": n_sites}),
    )
    run_config = build_run_config(
        config,
        n_sites=n_sites,
        catalogue=layout.catalogue,
        state_dir=state_dir,
        noise_multiplier=sigma,
        max_site_shoppers=int(partition.sizes().max(initial=0)),
    )
    popularity = popularity_baseline(split, vocab)
    cpus = os.cpu_count() or 1
    actors = config.actors or cpus
    evaluator = GlobalEvaluator(split, vocab, threads=max(1, cpus - actors))
    engine = SimulationEngine(out, state_dir)
    config_doc = {
        "config": config.to_dict(),
        "command": sys.argv,
        "dataset": {
            "name": dataset.name,
            "timestamps": dataset.timestamps,
            "shoppers": dataset.n_users,
            "items": vocab.n_items,
            "events": len(dataset.events),
            "test_shoppers": len(split.test),
        },
        "partition": partition.describe(),
        "training_shoppers_per_site": shoppers_per_site.tolist(),
        "privacy": privacy_info,
        "run_config": run_config,
        "engine": {**describe_env(engine), "actors": actors, "num_supernodes": n_sites},
        "versions": _versions(),
    }
    _write_json(out / CONFIG_FILE, config_doc)

    lines: list[dict[str, Any]] = []
    status = "failed"
    sampler = MemorySampler(own_tree, interval=1.0)
    fed_started = time.monotonic()
    try:
        with sampler, engine:
            engine.start()
            emit("engine", {"port": engine.port, "ray_tmpdir": str(engine.ray_tmp)})
            proc = engine.submit(run_config, num_supernodes=n_sites, actors=actors)
            lines, status = _follow(
                config, engine, proc, state_dir, evaluator, out, fed_started, emit
            )
        leftovers = engine.leftovers()
    finally:
        peak = sampler.stop()
    if leftovers:
        raise SimulationError(f"processes still running after the run: {leftovers}")
    final = [line for line in lines if line["status"] == "completed"]
    if status != "completed" or not final:
        log_path = engine.log_dir / "flwr-run.log"
        reasons = site_refusals(log_path)
        hint = "; sites refused: " + " | ".join(reasons) if reasons else ""
        raise SimulationError(
            f"the federated run ended with status {status!r} after {len(final)} completed "
            f"round(s){hint}; see {log_path}"
        )
    final_version = str(final[-1]["model_version"])
    model_dir = out / MODEL_DIR
    shutil.copytree(state_dir / "coordinator" / "models" / final_version, model_dir)
    if not config.keep_models:
        prune_models(state_dir, keep={final_version})
    summary = build_summary(
        config=config,
        lines=lines,
        popularity=popularity,
        privacy=privacy_info,
        partition=partition,
        wall_seconds=time.monotonic() - started,
        federated_seconds=time.monotonic() - fed_started,
        peak=peak.as_dict(),
        model_dir=model_dir,
    )
    _write_json(out / SUMMARY_FILE, summary)
    from simulations.report import write_run_report

    write_run_report(out)
    emit("done", summary)
    return SimResult(out, summary, lines)


def _follow(
    config: SimConfig,
    engine: Any,
    proc: Any,
    state_dir: Path,
    evaluator: GlobalEvaluator,
    out: Path,
    started: float,
    emit: Reporter,
) -> tuple[list[dict[str, Any]], str]:
    """Follow the registry until `flwr run` ends; score and log every finished round."""
    db_path = state_dir / "coordinator" / "coordinator.db"
    models = state_dir / "coordinator" / "models"
    deadline = None if config.timeout is None else started + config.timeout
    lines: list[dict[str, Any]] = []
    done: set[int] = set()
    run: dict[str, Any] | None = None
    try:
        while True:
            exited = proc.poll() is not None
            rounds, run = read_registry(db_path)
            over = exited or (run is not None and run.get("status") != "running")
            by_number = {int(r["number"]): r for r in rounds}
            for number in finished_rounds(rounds, over):
                if number in done:
                    continue
                row = by_number[number]
                scored = None
                if config.global_eval and row["status"] == "completed" and row["model_version"]:
                    scored = evaluator(models / str(row["model_version"]))
                line = metrics_line(row, scored, time.monotonic() - started)
                lines.append(line)
                done.add(number)
                with (out / METRICS_FILE).open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(line) + "\n")
                emit("round", {**line, "rounds": config.rounds})
            if exited:
                break
            if deadline is not None and time.monotonic() > deadline:
                engine.stop_run()
                raise SimulationError(
                    f"the federated run did not finish within {config.timeout:.0f} s"
                )
            emit("tick", {"elapsed": time.monotonic() - started, "rounds_done": len(done)})
            time.sleep(1.0)
    except KeyboardInterrupt:
        engine.stop_run()
        raise
    if proc.poll() not in (0, None):
        tail = engine.run_log(4000)
        raise SimulationError(f"flwr run failed (exit {proc.poll()}):\n{tail}")
    return lines, str(run.get("status")) if run else "not started"


def prune_models(state_dir: Path, keep: set[str]) -> None:
    """Delete model versions except ``keep`` and each site's served one.

    A version per site and round adds up to gigabytes of disk on a real catalogue.
    """
    from edge_client.inference import read_current_version

    coordinator = state_dir / "coordinator" / "models"
    if coordinator.is_dir():
        for version in coordinator.iterdir():
            if version.is_dir() and version.name not in keep:
                shutil.rmtree(version, ignore_errors=True)
    sites = state_dir / "sites"
    for site in sorted(sites.glob("site-*")):
        models = site / "models"
        if not models.is_dir():
            continue
        try:
            current = read_current_version(models)
        except FedrecError:
            current = None
        for version in models.iterdir():
            if version.is_dir() and version.name != current:
                shutil.rmtree(version, ignore_errors=True)


def build_summary(
    *,
    config: SimConfig,
    lines: list[dict[str, Any]],
    popularity: dict[str, float],
    privacy: dict[str, Any],
    partition: Partition,
    wall_seconds: float,
    federated_seconds: float,
    peak: dict[str, Any],
    model_dir: Path,
) -> dict[str, Any]:
    """The run's outcome in one JSON object (summary.json)."""
    done = [line for line in lines if line["status"] == "completed"]
    final = done[-1]
    return {
        "privacy": config.privacy,
        "epsilon_budget": config.epsilon if config.privacy != "none" else None,
        "delta": config.delta if config.privacy != "none" else None,
        "noise_multiplier": privacy.get("noise_multiplier"),
        "sites": partition.n_sites,
        "split": partition.method,
        "alpha": partition.alpha,
        "label_skew": partition.describe().get("label_skew"),
        "rounds": len(lines),
        "rounds_completed": len(done),
        "final": {
            "round": final["round"],
            "hr@10": final["hr@10"],
            "ndcg@10": final["ndcg@10"],
            "fed_hr@10": final["fed_hr@10"],
            "fed_ndcg@10": final["fed_ndcg@10"],
            "epsilon_max": final["epsilon_max"],
            "epsilon_mean": final["epsilon_mean"],
            "loss": final["loss"],
        },
        "popularity": {"hr@10": popularity["hr@10"], "ndcg@10": popularity["ndcg@10"]},
        "bytes_total": int(sum(line["bytes_sent"] for line in lines)),
        "bytes_per_round_mean": float(np.mean([line["bytes_sent"] for line in lines])),
        "wall_seconds": round(wall_seconds, 1),
        "federated_seconds": round(federated_seconds, 1),
        "memory": peak,
        "load_average": _load_average(),
        "model_dir": str(model_dir),
    }


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {"python": sys.version.split()[0]}
    for name in ("flwr", "ray", "torch", "opacus"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", "utf-8")
    tmp.replace(path)


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """The lines of a run's metrics.jsonl."""
    path = out / METRICS_FILE
    if not path.is_file():
        raise SimulationError(f"{path} does not exist: not a simulation run directory")
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]

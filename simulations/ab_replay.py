"""A/B replay: held-out shopping events replayed through the edge against two model versions.

The question an A/B test answers on live traffic — which model version makes shoppers
engage more — answered offline by replaying logged behaviour:

1. **Data**: synthetic sites (`shared.synth`, default) or a real dataset; each shopper's
   newest ``holdout`` share of events (by time) is held out, the rest is the past.
2. **Versions**: each arm is a model trained on the past only (``pop``, ``gru:EPOCHS``, any
   kind of `shared.models`, or an existing model directory), registered in a coordinator
   registry like any federated version.
3. **Experiment**: started with the coordinator's own API (`coordinator.ab_testing`), sent to
   each site as the ab_sync message would deliver it (`edge_client.ab_site`), arm models
   placed in each site's ``models/`` as ab_models would.
4. **Replay**: every site is a real ``site.db`` holding its shoppers' past; its held-out
   events are replayed in time order through the edge logic (`Recommender` with
   `ExperimentServing`: the shopper's arm by hash, that arm's ONNX model, impressions
   logged): before each held-out view, and before any held-out event that turns to another
   item than the shopper's previous one (ratings-only data), the shopper is shown ``k``
   recommendations (an impression 1 ms before it); then the event is stored. An outcome is
   a later held-out event of a recommended item within the window, as on a live site.
5. **Report**: each site releases its per-arm counts (`sync_site`, noise per ``epsilon``),
   the coordinator sums them and tests (`coordinator.ab_testing.report`).

What is not exercised here is the Flower envelope of steps 3 and 5 (tested with the real
ClientApp in tests/coordinator/test_ab.py): the replay calls the same functions the
handlers call. Replayed shoppers cannot react to what they were shown, so the replay
measures how often a version *anticipates* what shoppers did next; a live test also
captures that recommendations change behaviour.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from simulations.errors import SimulationError

ProgressFn = Callable[[str], None]


@dataclass(frozen=True)
class ABReplayConfig:
    """What to replay, against which versions."""

    out_dir: Path
    data: str = "synth"  # "synth" or a data file/directory
    fmt: str = "events"
    arms: tuple[str, ...] = ("pop", "gru:8")  # first = control
    split: tuple[float, ...] = (50.0, 50.0)
    holdout: float = 0.2  # each shopper's newest share of events, replayed
    k: int = 10
    window_s: float = 1800.0
    epsilon: float = 0.0  # per site report; 0 = exact counts
    n_sites: int = 3  # real data: shoppers hashed into this many sites
    shoppers_per_site: int = 300  # synthetic data
    n_items: int = 300  # synthetic data
    events_per_shopper: float = 30.0  # synthetic data
    model_config: dict[str, Any] = field(default_factory=dict)  # over each kind's defaults
    train_config: dict[str, Any] = field(default_factory=dict)  # over each kind's TrainConfig
    alpha: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.arms) < 2 or len(self.split) != len(self.arms):
            raise SimulationError("give two or more arms and one traffic weight per arm")
        if not 0 < self.holdout < 1:
            raise SimulationError(f"holdout must be in (0, 1), got {self.holdout}")
        if not 1 <= self.k <= 100:
            raise SimulationError(f"k must be in 1..100, got {self.k}")
        from shared.models import MODEL_KINDS

        for spec in self.arms:
            kind, epochs = _parse_arm(spec)
            if not Path(spec).is_dir() and (kind not in MODEL_KINDS or (epochs or 1) < 1):
                raise SimulationError(
                    f"arm {spec!r}: expected a model directory or "
                    f"{' | '.join(sorted(MODEL_KINDS))}[:EPOCHS]"
                )


# ----------------------------------------------------------------------------- data
def load_events(cfg: ABReplayConfig) -> tuple[pd.DataFrame, str]:
    """The event log (synthetic or read) with a ``site`` per shopper, and its description."""
    if cfg.data == "synth":
        from shared.synth import SynthConfig, generate_synthetic

        dataset = generate_synthetic(
            SynthConfig(
                n_sites=cfg.n_sites,
                shoppers_per_site=cfg.shoppers_per_site,
                n_items=cfg.n_items,
                n_categories=max(1, min(20, cfg.n_items // 10)),
                events_per_shopper=cfg.events_per_shopper,
                seed=cfg.seed,
            )
        )
        return dataset.events.copy(), (
            f"synthetic: {cfg.n_sites} sites x {cfg.shoppers_per_site} shoppers, "
            f"{cfg.n_items} items, seed {cfg.seed}"
        )
    from shared.readers import read_dataset

    dataset = read_dataset(Path(cfg.data), cfg.fmt)
    events = dataset.events.copy()
    users = events["user_id"].astype(str)
    codes = {
        u: int(hashlib.sha256(u.encode()).hexdigest()[:8], 16) % cfg.n_sites for u in users.unique()
    }
    events["site"] = users.map(lambda u: f"site-{codes[u] + 1:02d}")
    return events, f"{dataset.name} ({cfg.fmt}, {dataset.timestamps} timestamps)"


def split_holdout(events: pd.DataFrame, holdout: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each shopper's newest ``holdout`` share of events (at least one) apart from the rest.

    Shoppers with fewer than 4 events stay entirely in the past (they cannot be evaluated).
    """
    ordered = events.sort_values(["user_id", "ts_ms"], kind="stable").reset_index(drop=True)
    position = ordered.groupby("user_id", sort=False).cumcount()
    size = ordered.groupby("user_id", sort=False)["user_id"].transform("size")
    held = np.maximum(1, np.floor(size * holdout)).astype(np.int64)
    is_held = (size >= 4) & (position >= size - held)
    return ordered[~is_held].reset_index(drop=True), ordered[is_held].reset_index(drop=True)


# ----------------------------------------------------------------------------- versions
@dataclass(frozen=True)
class ArmVersion:
    """One arm's model: its registered version, directory and offline metrics."""

    spec: str
    version: str
    path: Path
    offline: dict[str, float]


def _parse_arm(spec: str) -> tuple[str, int | None]:
    kind, _, epochs = spec.partition(":")
    try:
        return kind, (int(epochs) if epochs else None)
    except ValueError as err:
        raise SimulationError(f"arm {spec!r}: epochs must be an integer") from err


def train_arm(
    spec: str,
    past: pd.DataFrame,
    vocab: Any,
    models_dir: Path,
    cfg: ABReplayConfig,
    index: int,
) -> ArmVersion:
    """Train (or load) one arm's model on the past events and save it as a model directory."""
    import torch

    from shared.artifacts import load_model_dir, new_version, save_model_dir
    from shared.models import MODEL_KINDS, build_model
    from shared.training import default_train_config, prepare_split, train_model, with_overrides

    candidate = Path(spec)
    if candidate.is_dir():
        module, _, meta = load_model_dir(candidate)
        version = f"{meta.version}-arm{index}"
        out = models_dir / version
        save_model_dir(out, module, vocab, version=version, parent=meta.version)
        return ArmVersion(spec, version, out, dict(meta.metrics))
    kind, epochs = _parse_arm(spec)
    torch.manual_seed(cfg.seed + index)
    _, split = prepare_split(past, vocab)
    # The overrides apply to the kinds that have those settings (pop has no dim).
    known = {f.name for f in dataclasses.fields(MODEL_KINDS[kind][0])}
    overrides = {k: v for k, v in cfg.model_config.items() if k in known}
    model = build_model(kind, {"n_items": vocab.n_items, **overrides})
    try:
        train_cfg = with_overrides(
            with_overrides(default_train_config(kind), **cfg.train_config),
            epochs=epochs,
            seed=cfg.seed + index,
            device="cpu",
        )
    except TypeError as err:
        raise SimulationError(f"train config {cfg.train_config}: {err}") from err
    result = train_model(model, split, train_cfg)
    offline = {f"offline_{k}": float(v) for k, v in result.test.items() if k.startswith("ndcg")}
    offline["train_seconds"] = float(result.train_seconds)
    offline["epochs"] = float(len(result.history))
    digest = hashlib.sha256(f"{spec}|{index}|{cfg.seed}".encode()).hexdigest()
    version = f"{new_version(digest)}-{kind}{index}"
    out = models_dir / version
    save_model_dir(out, model, vocab, version=version, metrics=offline)
    return ArmVersion(spec, version, out, offline)


# ----------------------------------------------------------------------------- replay
def replay_site(
    site_dir: Path,
    past: pd.DataFrame,
    held: pd.DataFrame,
    arm_dirs: list[Path],
    spec: Any,
    k: int,
) -> dict[str, int]:
    """Replay one site's held-out events through its edge logic; impressions and events."""
    from edge_client.ab_serving import ExperimentServing
    from edge_client.ab_site import ABSite
    from edge_client.outcomes import ImpressionLog
    from edge_client.recommend import Recommender
    from edge_client.store import Event, EventStore

    models = site_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    for arm_dir in arm_dirs:  # what an ab_models message delivers
        shutil.copytree(arm_dir, models / arm_dir.name, dirs_exist_ok=True)
    store = EventStore(site_dir / "site.db", synchronous="NORMAL")
    if len(past):
        store.import_events(past[["user_id", "item_id", "event_type", "ts_ms", "value", "site"]])
    with ABSite(site_dir / "site.db") as ab_site:
        ab_site.upsert([spec])  # what an ab_sync message delivers
    serving = ExperimentServing(site_dir / "site.db", models)
    serving.refresh()
    if serving.live is None:
        raise SimulationError(f"{site_dir.name}: the experiment did not go live: {serving.problem}")
    clock = [0]
    log = ImpressionLog(site_dir / "site.db", clock=lambda: clock[0])
    recommender = Recommender(store, None, experiments=serving, impressions=log)
    shown = 0
    ordered = held.sort_values(["ts_ms", "user_id"], kind="stable")
    columns = zip(
        ordered["user_id"].astype(str).tolist(),
        ordered["item_id"].astype(str).tolist(),
        ordered["event_type"].astype(str).tolist(),
        ordered["ts_ms"].to_numpy(dtype=np.int64).tolist(),
        ordered["value"].to_numpy(dtype=np.float64).tolist(),
        ordered["site"].astype(str).tolist(),
        strict=True,
    )
    last_item: dict[str, str] = {}
    for n, (user, item, kind, ts, value, site) in enumerate(columns):
        # A shopper turning to an item sees a list first; a cart or purchase that continues
        # the item of their previous event (view -> cart -> purchase) does not.
        if kind == "view" or last_item.get(user) != item:
            clock[0] = ts - 1  # the list was on screen just before the shopper's event
            recommender.recommend(user, k)
            shown += 1
        last_item[user] = item
        rating = None if np.isnan(value) else float(value)
        store.add_events([Event(f"replay-{n}", user, item, kind, ts, rating, site)])
    log.close()
    serving.close()
    store.close()
    return {"impressions": shown, "replayed_events": len(ordered)}


def _arm_indicators(until: int, days: float, spec: Any, arm: int, conn: Any) -> Any:
    from edge_client.outcomes import indicators

    return indicators(conn, until, days, experiment_id=spec.experiment_id, arm=arm)


def run_ab_replay(cfg: ABReplayConfig, progress: ProgressFn | None = None) -> dict[str, Any]:
    """The whole replay (see the module docstring); returns the report, also written as JSON."""
    from coordinator.ab_sync import reports_from_metrics
    from coordinator.ab_testing import ABRegistry, report
    from coordinator.registry import ModelVersion, Registry
    from edge_client.ab_site import ABSiteConfig, sync_site
    from edge_client.outcomes import DAY_MS, ImpressionLog
    from shared.artifacts import WEIGHTS_FILE, read_metadata
    from shared.vocab import ItemVocab

    say = progress or (lambda _: None)
    started = time.perf_counter()
    out = cfg.out_dir.resolve()
    if out.exists():
        shutil.rmtree(out)
    (out / "sites").mkdir(parents=True)
    events, described = load_events(cfg)
    past, held = split_holdout(events, cfg.holdout)
    if held.empty:
        raise SimulationError("no shopper has the 4 events a replay needs")
    vocab = ItemVocab.from_items(events["item_id"].astype(str))  # the public catalogue
    say(f"data: {described}; {len(past):,} past events, {len(held):,} held out")

    state = out / "state"
    registry = Registry(state / "coordinator" / "coordinator.db")
    arms: list[ArmVersion] = []
    for i, arm_spec in enumerate(cfg.arms):
        say(f"training arm {i} ({arm_spec}) on the past events")
        arm = train_arm(arm_spec, past, vocab, state / "coordinator" / "models", cfg, i)
        meta = read_metadata(arm.path)
        registry.add_model(
            ModelVersion(
                version=arm.version,
                round=None,
                parent=None,
                sha256=meta.files[WEIGHTS_FILE],
                path=str(arm.path),
                kind=meta.kind,
                n_items=meta.n_items,
                metrics=arm.offline,
            )
        )
        arms.append(arm)
    registry.close()

    db = state / "coordinator" / "coordinator.db"
    with ABRegistry(db) as reg:
        reg.start(
            [a.version for a in arms],
            weights=list(cfg.split),
            window_s=cfg.window_s,
            epsilon=cfg.epsilon,
            alpha=cfg.alpha,
        )
        (spec,) = reg.specs_to_send()
    site_names = sorted(events["site"].astype(str).unique())
    replayed: dict[str, dict[str, int]] = {}
    effect = [{"pairs": 0.0, "r": 0.0, "r_implicit": 0.0} for _ in arms]
    until = int(events["ts_ms"].max()) + 1
    everything = until / DAY_MS + 1.0  # an indicator window holding the whole replay
    site_config = ABSiteConfig(epsilon_budget=max(cfg.epsilon, 1.0))
    for node, site in enumerate(site_names):
        site_dir = out / "sites" / site
        say(f"replaying {site}")
        replayed[site] = replay_site(
            site_dir,
            past[past["site"].astype(str) == site],
            held[held["site"].astype(str) == site],
            [a.path for a in arms],
            spec,
            cfg.k,
        )
        log = ImpressionLog(site_dir / "site.db")
        for a, sums in enumerate(effect):  # the design's R, per arm (edge_client.outcomes)
            ind = log.query(functools.partial(_arm_indicators, until, everything, spec, a))
            sums["pairs"] += ind.recommended_pairs
            sums["r"] += ind.recommendation_effect * ind.recommended_pairs
            sums["r_implicit"] += ind.recommendation_effect_implicit * ind.recommended_pairs
        log.close()
        present = {a.version: True for a in arms}
        result = sync_site(site_dir / "site.db", present, [spec], site_config)
        with ABRegistry(db) as reg:
            for experiment_id, site_report in reports_from_metrics(
                result.metrics, site, node, [spec]
            ):
                reg.record_report(experiment_id, site_report)
    with ABRegistry(db) as reg:
        payload = report(reg.get(spec.experiment_id))
    payload["replay"] = {
        "data": described,
        "config": {**asdict(cfg), "out_dir": str(cfg.out_dir)},
        "past_events": len(past),
        "held_out_events": len(held),
        "sites": replayed,
        "recommendation_effect": [
            {
                "arm": spec.arms[i].name,
                "pairs": int(e["pairs"]),
                "R": e["r"] / e["pairs"] if e["pairs"] else 0.0,
                "R_implicit": e["r_implicit"] / e["pairs"] if e["pairs"] else 0.0,
            }
            for i, e in enumerate(effect)
        ],
        "arm_models": [
            {"arm": spec.arms[i].name, "spec": a.spec, "version": a.version, **a.offline}
            for i, a in enumerate(arms)
        ],
        "seconds": time.perf_counter() - started,
    }
    (out / "ab_replay.json").write_text(json.dumps(payload, indent=2, default=str))
    return payload

"""What a site does in a federated round, as plain functions the ClientApp calls.

- `train_site`: read the site's events from ``site.db``, build sequences over the global
  catalogue, train locally (DP-SGD with the site's privacy ledger in store mode) and return
  new weights plus aggregate numbers; or refuse, with the reason, when the site's privacy
  budget would be exceeded.
- `evaluate_site`: HR@k/NDCG@k of a global model on the site's held-out last items.
- `event_counts`: how many events arrived since this site's previous round (a count only).
- `store_model` / `set_current`: every global model a site receives becomes a model
  directory ``models/<version>/`` (ONNX included) and ``models/CURRENT`` names the version
  the edge service must serve; it is replaced atomically, the service hot-swaps to it.

Site layout (docs/architecture.md): ``<site-dir>/site.db``, ``<site-dir>/models/``, and
``<site-dir>/federated.json`` (this module's small state: last round, event watermark).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from edge_client.errors import EdgeError, ModelRejectedError
from edge_client.inference import check_version_name, read_current_version, set_current_version
from shared.artifacts import PrivacyStatement, save_model_dir, verify_model_dir
from shared.errors import DataError, FedrecError, ModelError
from shared.federated import RoundInstructions, default_state_dir
from shared.metrics import evaluate_ranking
from shared.models import build_model
from shared.sequences import build_sequences, leave_one_out
from shared.vocab import ItemVocab

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]  # "auto": the site's GPU when it has one

STATE_FILE = "federated.json"
KEEP_MODEL_VERSIONS = 5  # older received versions are pruned (CURRENT is always kept)
DEFAULT_EPSILON_BUDGET = 10.0
DEFAULT_DELTA = 1e-5
FAULT_ENV = "FEDREC_ALLOW_FAULT_INJECTION"  # test-only: honour node-config "fault"
FAULTS = ("nan", "slow")
SIMULATED_NODE_CONFIG = "node-config.json"  # a simulated site's node config


class SiteConfigError(EdgeError):
    """The SuperNode's node config does not describe a usable site."""


class SiteRefusedError(EdgeError):
    """The site refuses to train this round (privacy budget, no data); the reason is public."""


@dataclass(frozen=True)
class Site:
    """One store or app: its directory, public name and local settings (node config)."""

    root: Path
    name: str
    epsilon_budget: float = DEFAULT_EPSILON_BUDGET  # the site's total over all rounds (PRV)
    delta: float = DEFAULT_DELTA  # per shopper; below 1 / (shoppers at the site)
    device: Device = "auto"
    fault: str = ""

    @property
    def db_path(self) -> Path:
        """The site's SQLite file (events, privacy ledger)."""
        return self.root / "site.db"

    @property
    def models_dir(self) -> Path:
        """Received model directories and CURRENT."""
        return self.root / "models"

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> Site:
        """Read the SuperNode's node config.

        Keys: ``site-dir`` (or ``partition-id`` in simulation, which maps to
        ``<state>/sites/site-<id>``), ``site-name``, ``epsilon-budget``, ``delta``,
        ``device``.
        """
        raw = node_config.get("site-dir")
        if isinstance(raw, str) and raw:
            root = Path(raw).expanduser().resolve()
        elif isinstance(node_config.get("partition-id"), int):
            root = default_state_dir() / "sites" / f"site-{int(node_config['partition-id']):03d}"
            # A simulated SuperNode has no --node-config: the simulation writes the site's
            # own settings into its directory (`simulations.sites`).
            node_config = {**_simulated_node_config(root), **node_config}
        else:
            raise SiteConfigError(
                "the SuperNode has no site: start it with --node-config 'site-dir=\"/path\"'"
            )
        if not root.is_dir():
            raise SiteConfigError(f"site directory {root} does not exist")
        name = node_config.get("site-name") or root.name
        budget = node_config.get("epsilon-budget", DEFAULT_EPSILON_BUDGET)
        if isinstance(budget, bool) or not isinstance(budget, int | float) or not budget > 0:
            raise SiteConfigError(f"epsilon-budget must be a number > 0, got {budget!r}")
        delta = node_config.get("delta", DEFAULT_DELTA)
        if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 < delta < 1:
            raise SiteConfigError(f"delta must be in (0, 1), got {delta!r}")
        device = node_config.get("device", "auto")
        if device not in ("auto", "cpu", "cuda"):
            raise SiteConfigError(f"device must be auto, cpu or cuda, got {device!r}")
        fault = str(node_config.get("fault", ""))
        if fault and (fault not in FAULTS or os.environ.get(FAULT_ENV) != "1"):
            raise SiteConfigError(
                f"node config 'fault' is a test-only option ({', '.join(FAULTS)}) and needs "
                f"{FAULT_ENV}=1"
            )
        return cls(
            root=root,
            name=str(name),
            epsilon_budget=float(budget),
            delta=float(delta),
            device=device,
            fault=fault,
        )


def _simulated_node_config(root: Path) -> dict[str, Any]:
    """``<site-dir>/node-config.json`` of a simulated site ({} when absent)."""
    path = root / SIMULATED_NODE_CONFIG
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise SiteConfigError(f"{path} is not a readable JSON object: {err}") from err
    if not isinstance(data, dict):
        raise SiteConfigError(f"{path} must hold a JSON object")
    return data


# ----------------------------------------------------------------------------- state file
def read_state(site: Site) -> dict[str, Any]:
    """The federated state of the site (``{}`` before the first round)."""
    path = site.root / STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as err:
        log.warning("ignoring unreadable %s: %s", path, err)
        return {}
    return data if isinstance(data, dict) else {}


def write_state(site: Site, state: dict[str, Any]) -> None:
    """Replace the state file atomically."""
    _atomic_write(site.root / STATE_FILE, json.dumps(state, sort_keys=True))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


# ----------------------------------------------------------------------------- models
def build_global_model(
    instr: RoundInstructions, state: Mapping[str, torch.Tensor]
) -> torch.nn.Module:
    """The architecture the instructions name, holding ``state``."""
    config = {**instr.model_config, "n_items": instr.catalogue.n_items}
    model = build_model(instr.model_kind, config)
    try:
        model.load_state_dict(dict(state))
    except RuntimeError as err:
        raise ModelError(f"received weights do not fit {instr.model_kind}: {err}") from err
    return model


def store_model(
    site: Site,
    version: str,
    model: torch.nn.Module,
    vocab: ItemVocab,
    meta: Mapping[str, Any],
) -> Path:
    """Save a received global model as ``models/<version>/`` unless a verified copy exists."""
    out = site.models_dir / check_version_name(version)
    if out.is_dir():
        try:
            verify_model_dir(out)
            return out
        except ModelError as err:
            log.warning("re-writing corrupt %s: %s", out, err)
    try:
        privacy = PrivacyStatement(**meta.get("privacy", {}))
    except TypeError as err:
        raise ModelError(f"the privacy statement of {version} is malformed: {err}") from err
    save_model_dir(
        out,
        model,
        vocab,
        version=version,
        privacy=privacy,
        metrics={k: float(v) for k, v in dict(meta.get("metrics") or {}).items()},
        parent=meta.get("parent"),
        round=meta.get("round"),
        extra={"received_by": site.name},
    )
    return out


def current_version(site: Site) -> str:
    """The version ``models/CURRENT`` names ("" when none or unreadable)."""
    try:
        return read_current_version(site.models_dir) or ""
    except ModelRejectedError:
        return ""


def set_current(site: Site, version: str) -> bool:
    """Point ``models/CURRENT`` at a stored, verified version; False when it is not here."""
    target = site.models_dir / check_version_name(version)
    if not target.is_dir():
        return False
    try:
        verify_model_dir(target)
    except ModelError as err:
        log.warning("not serving %s: %s", version, err)
        return False
    if current_version(site) != version:
        set_current_version(site.models_dir, version)
        log.info("site %s now serves %s", site.name, version)
    return True


def prune_models(site: Site, keep: int = KEEP_MODEL_VERSIONS) -> None:
    """Delete all but the ``keep`` newest received versions (never one served or A/B-tested)."""
    from edge_client.ab_site import pinned_versions

    current = current_version(site)
    pinned = pinned_versions(site.db_path)  # arms of a running A/B experiment
    dirs = [d for d in site.models_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
    dirs.sort(key=lambda d: d.stat().st_mtime, reverse=True)
    for stale in dirs[keep:]:
        if stale.name != current and stale.name not in pinned:
            shutil.rmtree(stale, ignore_errors=True)


def receive(
    site: Site,
    instr: RoundInstructions,
    state: Mapping[str, torch.Tensor],
    serve_state: Mapping[str, torch.Tensor] | None = None,
) -> torch.nn.Module:
    """Store the received model (and the one to serve, if sent) and update CURRENT."""
    model = build_global_model(instr, state)
    store_model(site, instr.model_version, model, instr.catalogue, instr.model_meta)
    if serve_state is not None and instr.serve_version:
        serve_model = build_global_model(instr, serve_state)
        store_model(site, instr.serve_version, serve_model, instr.catalogue, instr.serve_meta)
    if instr.serve_version:
        set_current(site, instr.serve_version)
    prune_models(site)
    return model


# ----------------------------------------------------------------------------- data
def _store(site: Site) -> Any:
    from edge_client.store import EventStore

    return EventStore(site.db_path, create=False)


def load_split(site: Site, vocab: ItemVocab) -> tuple[Any, int, int]:
    """Leave-one-out split of the site's events over ``vocab``, event count, newest ts."""
    store = _store(site)
    try:
        events = store.events_frame()
    finally:
        store.close()
    seqs = build_sequences(events, vocab)
    newest = int(events["ts_ms"].max()) if len(events) else 0
    return leave_one_out(seqs), len(events), newest


def event_counts(site: Site) -> dict[str, float]:
    """Events in total and since this site's previous training round (counts only)."""
    state = read_state(site)
    store = _store(site)
    try:
        total = store.count_events()
        watermark = state.get("watermark_ts_ms")
        new = store.count_events(since_ms=int(watermark) + 1) if watermark is not None else total
    finally:
        store.close()
    spent, budget = privacy_spent(site)
    return {
        "events": float(total),
        "new-events": float(new),
        "epsilon": spent,
        "epsilon-budget": budget,
    }


# ----------------------------------------------------------------------------- training
@dataclass
class TrainOutcome:
    """What `train_site` produced: new weights (None when refused) and aggregate numbers."""

    weights: dict[str, torch.Tensor] | None
    metrics: dict[str, float]
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def privacy_spent(site: Site) -> tuple[float, float]:
    """(epsilon spent, budget) of the site's ledger (PRV, one shopper); 0 before any round."""
    from edge_client.privacy_ledger import PrivacyLedger

    ledger = PrivacyLedger(site.db_path)
    try:
        spent = ledger.spent().epsilon_prv if ledger.delta is not None else 0.0
    finally:
        ledger.close()
    return float(spent), site.epsilon_budget


def local_config(site: Site, instr: RoundInstructions) -> Any:
    """The `LocalTrainConfig` of a round: the coordinator's settings, the site's budget."""
    from edge_client.local_training import LocalTrainConfig

    return LocalTrainConfig(
        epochs=float(instr.local_epochs),
        batch_size=instr.batch_size,
        lr=instr.learning_rate,
        optimizer=instr.local_optimizer,  # type: ignore[arg-type]  # checked by LocalTrainConfig
        max_steps=instr.local_steps,
        max_grad_norm=instr.max_grad_norm,
        noise_multiplier=instr.noise_multiplier,
        # The budget and delta are the site's own (node config): whoever sets the budget
        # controls privacy, so the coordinator cannot raise it.
        delta=site.delta,
        epsilon_budget=site.epsilon_budget,
        dp=instr.privacy_mode == "store",
        seed=instr.seed,
        device=site.device,
    )


def train_site(
    site: Site, instr: RoundInstructions, state: Mapping[str, torch.Tensor]
) -> TrainOutcome:
    """One local training round on the site's own events."""
    from edge_client.errors import PrivacyBudgetExceeded
    from edge_client.local_training import train_local
    from edge_client.privacy_ledger import PrivacyLedger

    started = time.monotonic()
    model = receive(site, instr, state)
    split, n_events, newest = load_split(site, instr.catalogue)
    counts = event_counts(site)
    if site.fault == "slow":
        time.sleep(60.0)  # test-only: a site that hangs mid-round
    store_mode = instr.privacy_mode == "store"
    config = local_config(site, instr)
    ledger = PrivacyLedger(site.db_path)
    try:
        result = train_local(
            model,
            split.train,
            config,
            ledger if store_mode else None,
            model_version=instr.model_version,
        )
    except PrivacyBudgetExceeded as err:
        return _refusal(site, str(err), err.spent, counts, instr)
    except DataError as err:
        spent, _ = privacy_spent(site)
        return _refusal(site, f"no training data: {err}", spent, counts, instr)
    finally:
        ledger.close()
    weights = {k: v.detach().cpu() for k, v in result.state_dict.items()}
    if site.fault == "nan":
        first = next(iter(weights))
        weights[first] = torch.full_like(weights[first], float("nan"))
    write_state(
        site,
        {
            "last_round": instr.server_round,
            "watermark_ts_ms": newest,
            "events_at_last_round": n_events,
        },
    )
    metrics = {
        # App mode: one device is one shopper, so every update weighs the same (the
        # accountant requires equal weights); store mode: FedAvg by shoppers.
        "num-examples": 1.0 if instr.privacy_mode == "app" else float(result.num_examples),
        "train-loss": float(result.loss),
        "epsilon": float(result.epsilon) if store_mode else 0.0,
        "epsilon-rdp": float(result.epsilon_rdp) if store_mode else 0.0,
        "delta": float(result.delta) if store_mode else 0.0,
        "epsilon-budget": site.epsilon_budget,
        "new-events": counts["new-events"],
        "refused": 0.0,
        "train-seconds": time.monotonic() - started,
    }
    if not all(math.isfinite(v) for v in metrics.values()):
        raise EdgeError("local training produced a non-finite metric")
    return TrainOutcome(weights=weights, metrics=metrics)


def share_config(site: Site, instr: RoundInstructions) -> Any:
    """The `ShareConfig` of a distributed round.

    The coordinator's settings, the site's own budget and delta (the coordinator cannot
    raise them).
    """
    from edge_client.distributed_dp import ShareConfig

    return ShareConfig(
        sample_rate=instr.sample_rate,
        noise_multiplier=instr.noise_multiplier,
        max_grad_norm=instr.max_grad_norm,
        noise_shares=instr.noise_shares,
        share_scale=instr.share_scale,
        share_range=instr.share_range,
        delta=site.delta,
        epsilon_budget=site.epsilon_budget,
        frozen=frozenset(n.strip() for n in instr.frozen.split(",") if n.strip()),
        device=site.device,
    )


def share_site(
    site: Site, instr: RoundInstructions, state: Mapping[str, torch.Tensor]
) -> TrainOutcome:
    """The site's share of a distributed DP-FedSGD round (`edge_client.distributed_dp`).

    Only call this where the share leaves masked by SecAgg+ (the ClientApp checks). The
    reply's ``weights`` are the share (not model weights); ``shoppers`` is the site's
    shopper count, which the coordinator needs for the expected batch q N.
    """
    from edge_client.distributed_dp import (
        ShareRangeError,
        noisy_clipped_sum,
        noisy_item_counts,
    )
    from edge_client.errors import PrivacyBudgetExceeded
    from edge_client.privacy_ledger import PrivacyLedger

    if instr.privacy_mode != "distributed":
        raise SiteRefusedError(f"not a distributed-DP round ({instr.privacy_mode!r})")
    tasks = {"gradient": noisy_clipped_sum, "popularity": noisy_item_counts}
    if instr.dp_task not in tasks:
        raise SiteRefusedError(f"unknown distributed-DP task {instr.dp_task!r}")
    started = time.monotonic()
    model = receive(site, instr, state)
    split, _, newest = load_split(site, instr.catalogue)
    counts = event_counts(site)
    config = share_config(site, instr)
    ledger = PrivacyLedger(site.db_path)
    try:
        result = tasks[instr.dp_task](
            model, split.train, config, ledger, model_version=instr.model_version
        )
    except PrivacyBudgetExceeded as err:
        return _refusal(site, str(err), err.spent, counts, instr)
    except (ShareRangeError, DataError) as err:
        spent, _ = privacy_spent(site)
        return _refusal(site, str(err), spent, counts, instr)
    finally:
        ledger.close()
    write_state(
        site,
        {
            "last_round": instr.server_round,
            "watermark_ts_ms": newest,
            "events_at_last_round": counts["events"],
        },
    )
    metrics = {
        # Every share weighs the same in the secure sum; the count sets q N at the server.
        "num-examples": 1.0,
        "shoppers": float(result.num_shoppers),
        # No training loss: it would be an unnoised function of the sampled shoppers.
        "train-loss": 0.0,
        "epsilon": float(result.epsilon),
        "epsilon-rdp": float(result.epsilon_rdp),
        "delta": float(result.delta),
        "epsilon-budget": site.epsilon_budget,
        "new-events": counts["new-events"],
        "refused": 0.0,
        "train-seconds": time.monotonic() - started,
    }
    return TrainOutcome(weights=result.share, metrics=metrics)


def _refusal(
    site: Site, reason: str, spent: float, counts: dict[str, float], instr: RoundInstructions
) -> TrainOutcome:
    log.warning("site %s refuses round %d: %s", site.name, instr.server_round, reason)
    metrics = {
        "num-examples": 0.0,
        "train-loss": 0.0,
        "epsilon": spent,
        "epsilon-rdp": 0.0,
        "delta": site.delta,
        "epsilon-budget": site.epsilon_budget,
        "new-events": counts["new-events"],
        "refused": 1.0,
        "train-seconds": 0.0,
    }
    return TrainOutcome(weights=None, metrics=metrics, reason=reason)


# ----------------------------------------------------------------------------- evaluation
def evaluate_site(
    site: Site,
    instr: RoundInstructions,
    state: Mapping[str, torch.Tensor],
    serve_state: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Store (and serve) the received version, then rank each shopper's held-out last item."""
    model = receive(site, instr, state, serve_state).eval()
    split, _, _ = load_split(site, instr.catalogue)
    max_len = int(instr.model_config.get("max_len", 50))
    k = instr.eval_k

    def score(items: torch.Tensor) -> torch.Tensor:
        return model(items)[:, -1, :]  # (B, V): logits after the last history item

    if len(split.test) == 0:
        return {"num-examples": 0.0, f"hr@{k}": 0.0, f"ndcg@{k}": 0.0}
    with torch.no_grad():
        metrics = evaluate_ranking(score, split.test, max_len, ks=(k,))
    return {
        "num-examples": float(metrics["n_users"]),
        f"hr@{k}": float(metrics[f"hr@{k}"]),
        f"ndcg@{k}": float(metrics[f"ndcg@{k}"]),
    }


def public_reason(err: BaseException) -> str:
    """What may leave the site about a failure: the error class, never its message.

    A message can quote an item or shopper id; the full error stays in the site's log.
    """
    if isinstance(err, SiteConfigError | SiteRefusedError):
        return f"{type(err).__name__}: {err}"
    if isinstance(err, FedrecError):
        return f"{type(err).__name__} (details in the site's log)"
    return f"{type(err).__name__} (details in the site's log)"

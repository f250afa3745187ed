"""The wire contract between the coordinator's ServerApp and the sites' ClientApp.

Plain Python (no Flower import): the ServerApp packs `RoundInstructions.to_config()` into a
Flower ConfigRecord, the ClientApp reads it back with `RoundInstructions.from_config`.

What goes to a site each round: the global weights (``arrays``), the instructions below
(round, model version and architecture, the catalogue as gzip-compressed JSON with its
sha256, the version to serve, local training and DP settings). What comes back: new weights
(``arrays``) and the aggregate numbers in `TRAIN_METRICS` / `EVAL_METRICS` / `COUNT_METRICS`,
plus the site's name and serving version (``site``). Nothing else: no shopper ids, no items,
no event rows (tests/integration checks every reply).

The catalogue travels with every message because it is public (the product list, never
behaviour) and small next to the weights (an embedding row per item), and because a site
that joins late or lost its disk must still be able to build inputs over the exact
vocabulary the weights were trained on; the sha256 makes a corrupted copy an error.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import ConfigError, VocabError
from shared.vocab import ItemVocab

# Record keys inside a Message's RecordDict.
ARRAYS = "arrays"  # ArrayRecord: model weights, state_dict names
SERVE_ARRAYS = "serve-arrays"  # ArrayRecord: weights of the published version (evaluate only)
CONFIG = "config"  # ConfigRecord: RoundInstructions
METRICS = "metrics"  # MetricRecord: the site's aggregate numbers
SITE = "site"  # ConfigRecord: {"name": ..., "serving": ..., "reason": ...}

# Metric names of a train reply (every train reply carries all of them, refusals included).
TRAIN_METRICS: tuple[str, ...] = (
    "num-examples",  # shoppers that contributed (FedAvg weight); 1 per device in app mode
    "train-loss",
    "epsilon",  # cumulative, PRV accountant, of this site's shoppers (store mode), else 0
    "epsilon-rdp",  # the same under RDP (cross-check)
    "delta",
    "epsilon-budget",  # the site's budget (0 = none)
    "new-events",  # events recorded since this site's previous training round
    "refused",  # 1 = the site refused (budget), no weights in the reply
    "train-seconds",
)
COUNT_METRICS: tuple[str, ...] = ("new-events", "events", "epsilon", "epsilon-budget")

QUERY_EVENT_COUNTS = "event-counts"  # ConfigRecord "ask" of a query message

# Where runs write when no directory is given: the project's git-ignored state/.
STATE_DIR_ENV = "FEDREC_STATE_DIR"


def default_state_dir() -> Path:
    """``$FEDREC_STATE_DIR`` or ``./state`` (resolved)."""
    return Path(os.environ.get(STATE_DIR_ENV) or Path.cwd() / "state").resolve()


# A gzip bomb must not exhaust a site's memory: the catalogue's JSON is capped.
MAX_CATALOGUE_BYTES = 256 * 1024 * 1024


def encode_catalogue(vocab: ItemVocab) -> tuple[bytes, str]:
    """The catalogue as gzip-compressed canonical JSON, and its sha256 (of the JSON)."""
    text = vocab.to_json().encode()
    return gzip.compress(text, compresslevel=6, mtime=0), hashlib.sha256(text).hexdigest()


def decode_catalogue(blob: bytes, sha256: str) -> ItemVocab:
    """Inverse of `encode_catalogue`; raises `VocabError` on corruption or a wrong hash."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(blob)) as fh:
            text = fh.read(MAX_CATALOGUE_BYTES + 1)
    except (OSError, EOFError) as err:
        raise VocabError(f"catalogue is not valid gzip: {err}") from err
    if len(text) > MAX_CATALOGUE_BYTES:
        raise VocabError(f"catalogue is larger than {MAX_CATALOGUE_BYTES} bytes")
    actual = hashlib.sha256(text).hexdigest()
    if actual != sha256:
        raise VocabError(f"catalogue sha256 {actual[:12]} does not match {sha256[:12]}")
    return ItemVocab.from_json(text.decode())


@dataclass(frozen=True)
class RoundInstructions:
    """Everything a site needs for one train or evaluate message besides the weights."""

    server_round: int
    model_version: str  # version name of the weights in ``arrays``
    model_kind: str
    model_config: dict[str, Any]  # full config dict of the model (n_items included)
    catalogue: ItemVocab
    serve_version: str = ""  # the version the site must serve ("" = keep what it serves)
    privacy_mode: str = "store"  # "store" | "app" | "distributed" | "none"
    local_epochs: int = 1
    batch_size: int = 64
    learning_rate: float = 1e-3
    local_optimizer: str = "adam"  # without store DP: "adam" | "sgd"
    local_steps: int = 0  # > 0: this many steps on uniform random batches, not epochs
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_k: int = 10
    # Distributed DP (docs/privacy.md): Poisson rate q, the number of shares m the noise is
    # sized for (each site adds sigma C / sqrt(m)), the public divisor of a share and the
    # SecAgg+ range it must fit in, and the parameters not trained (comma-separated).
    sample_rate: float = 0.0
    noise_shares: int = 1
    share_scale: float = 1.0
    share_range: float = 8.0
    frozen: str = ""
    # What a distributed round computes: "gradient" (one DP-SGD step) or "popularity" (the
    # DP item counts that seed the output bias, released once).
    dp_task: str = "gradient"
    # Lineage and privacy statement of the versions sent, so a site's copy of a model
    # directory says what the coordinator's says: {"privacy": {...}, "parent", "round",
    # "metrics"} (see shared.artifacts.ModelMetadata).
    model_meta: dict[str, Any] = field(default_factory=dict)
    serve_meta: dict[str, Any] = field(default_factory=dict)

    def to_config(self) -> dict[str, Any]:
        """Flat ConfigRecord values (str, int, float, bool, bytes)."""
        blob, sha = encode_catalogue(self.catalogue)
        return {
            "server-round": self.server_round,
            "model-version": self.model_version,
            "model-kind": self.model_kind,
            "model-config": json.dumps(self.model_config, sort_keys=True),
            "catalogue-gz": blob,
            "catalogue-sha256": sha,
            "serve-version": self.serve_version,
            "privacy-mode": self.privacy_mode,
            "local-epochs": self.local_epochs,
            "batch-size": self.batch_size,
            "learning-rate": self.learning_rate,
            "local-optimizer": self.local_optimizer,
            "local-steps": self.local_steps,
            "noise-multiplier": self.noise_multiplier,
            "max-grad-norm": self.max_grad_norm,
            "seed": self.seed,
            "eval-k": self.eval_k,
            "sample-rate": self.sample_rate,
            "noise-shares": self.noise_shares,
            "share-scale": self.share_scale,
            "share-range": self.share_range,
            "frozen": self.frozen,
            "dp-task": self.dp_task,
            "model-meta": json.dumps(self.model_meta, sort_keys=True),
            "serve-meta": json.dumps(self.serve_meta, sort_keys=True),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RoundInstructions:
        """Parse `to_config` output; raises `ConfigError`/`VocabError` naming the problem."""
        try:
            model_config = json.loads(_get(config, "model-config", str))
            if not isinstance(model_config, dict):
                raise ConfigError("model-config must be a JSON object")
            return cls(
                server_round=_get(config, "server-round", int),
                model_version=_get(config, "model-version", str),
                model_kind=_get(config, "model-kind", str),
                model_config=model_config,
                catalogue=decode_catalogue(
                    _get(config, "catalogue-gz", bytes), _get(config, "catalogue-sha256", str)
                ),
                serve_version=_get(config, "serve-version", str),
                privacy_mode=_get(config, "privacy-mode", str),
                local_epochs=_get(config, "local-epochs", int),
                batch_size=_get(config, "batch-size", int),
                learning_rate=float(_get(config, "learning-rate", float)),
                local_optimizer=_get(config, "local-optimizer", str, "adam"),
                local_steps=_get(config, "local-steps", int, 0),
                noise_multiplier=float(_get(config, "noise-multiplier", float)),
                max_grad_norm=float(_get(config, "max-grad-norm", float)),
                seed=_get(config, "seed", int),
                eval_k=_get(config, "eval-k", int),
                sample_rate=float(_get(config, "sample-rate", float, 0.0)),
                noise_shares=_get(config, "noise-shares", int, 1),
                share_scale=float(_get(config, "share-scale", float, 1.0)),
                share_range=float(_get(config, "share-range", float, 8.0)),
                frozen=_get(config, "frozen", str, ""),
                dp_task=_get(config, "dp-task", str, "gradient"),
                model_meta=_json_object(config, "model-meta"),
                serve_meta=_json_object(config, "serve-meta"),
            )
        except json.JSONDecodeError as err:
            raise ConfigError(f"model-config is not valid JSON: {err}") from err


def _json_object(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = json.loads(_get(config, key, str))
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a JSON object")
    return value


_REQUIRED = object()


def _get(config: Mapping[str, Any], key: str, kind: type, default: Any = _REQUIRED) -> Any:
    if key not in config:
        if default is not _REQUIRED:
            return default  # a key newer than the sender (distributed-DP settings)
        raise ConfigError(f"round instructions lack {key!r}")
    value = config[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"round instruction {key!r} must be {kind.__name__}, got {value!r}")
    return value

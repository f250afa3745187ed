"""The federation's settings: `[tool.flwr.app.config]` (kebab-case), read once into a dataclass.

Every key of pyproject's ``[tool.flwr.app.config]`` is a field here (``num-rounds`` ->
``num_rounds``) with the same default; `flwr run --run-config 'key=value ...'` overrides
them. `RunConfig.from_mapping` checks types and ranges and names the offending key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from coordinator.errors import RunConfigError
from shared.federated import default_state_dir

Mode = Literal["rounds", "continuous"]
StrategyName = Literal["fedavg", "fedadam", "fedmedian", "fedtrimmedavg"]
PrivacyMode = Literal["store", "app", "distributed", "none"]
PublishPolicy = Literal["auto", "manual"]


@dataclass(frozen=True)
class RunConfig:
    """Settings of one federated run (defaults = pyproject's ``[tool.flwr.app.config]``)."""

    # --- rounds and sites
    mode: Mode = "rounds"  # "rounds": num-rounds then stop; "continuous": the feedback loop
    num_rounds: int = 3  # rounds of this run ("continuous": the cap, 0 = no cap)
    strategy: StrategyName = "fedavg"
    trim_beta: float = 0.2  # fedtrimmedavg: fraction cut off each tail
    fedadam_eta: float = 0.01  # fedadam: server learning rate
    fedadam_tau: float = 0.001  # fedadam: adaptivity
    fraction_train: float = 1.0  # share of connected sites asked to train each round
    fraction_evaluate: float = 1.0
    min_sites: int = 2  # a round waits for this many connected sites and asks at least these
    quorum: int = 2  # valid updates needed to aggregate; fewer = round recorded as missed
    round_timeout: float = 600.0  # seconds the server waits for replies in each phase
    max_update_norm: float = 100.0  # L2 norm of (update - global) above which it is rejected
    publish: PublishPolicy = "auto"  # "auto": each new version is served at once
    # --- privacy
    privacy_mode: PrivacyMode = "store"  # store: DP-SGD per site; app: client-level DP
    noise_multiplier: float = 1.0  # store mode: DP-SGD noise (sigma)
    max_grad_norm: float = 1.0  # store mode: per-shopper clipping bound
    app_noise_multiplier: float = 1.0  # app mode: noise on the aggregate (sigma)
    app_clipping_norm: float = 1.0  # app mode: clip of each device's update
    app_target_delta: float = 1e-5  # app mode: delta for the accountant
    app_population: int = 0  # app mode: devices in the population (0 = connected sites)
    app_max_epsilon: float = 0.0  # app mode: stop before exceeding (0 = no cap)
    secagg: bool = False  # SecAgg+ (legacy Flower workflow): the server sees only sums
    secagg_num_shares: int = 3  # must be odd and > 2
    secagg_threshold: int = 2  # shares needed to reconstruct; < num-shares
    # Must exceed every site's num-examples, and stay close to it: each site's weight is
    # quantised as num-examples / max-weight, so precision falls as max-weight grows.
    secagg_max_weight: float = 1000.0
    secagg_clipping_range: float = 8.0  # weights are clipped to +-this before quantisation
    # --- distributed DP-FedSGD under SecAgg+ (privacy-mode "distributed"; docs/privacy.md)
    dist_sample_rate: float = 0.1  # q: each shopper joins a round with this probability
    dist_noise_shares: int = 0  # m: each site adds sigma C / sqrt(m) noise (0 = quorum)
    dist_server_lr: float = 0.01  # server Adam step size on the noisy mean gradient
    dist_epsilon_budget: float = 0.0  # population epsilon cap at the coordinator (0 = none)
    dist_delta: float = 1e-5  # delta of the coordinator's population ledger
    # sigma of the DP item counts that seed the output bias in the run's first round
    # (0 = no popularity release; it is one of num-rounds)
    dist_popularity_noise: float = 0.0
    frozen: str = ""  # comma-separated parameter names not trained (public item vectors)
    # --- local training (sent to sites with each round)
    local_epochs: int = 1
    batch_size: int = 64
    learning_rate: float = 0.001
    # Without store DP: "adam" (a fresh Adam each round) or "sgd" (plain gradient steps).
    local_optimizer: Literal["adam", "sgd"] = "adam"
    # > 0: exactly this many local steps, each on shoppers drawn uniformly at random, instead
    # of local-epochs passes. local-steps = 1 with local-optimizer = "sgd", learning-rate = 1
    # and strategy = "fedadam" is FedSGD with a server Adam (docs/federated.md).
    local_steps: int = 0
    # "cosine": round r of R trains with lr x (m + (1 - m) (1 + cos(pi (r - 1) / (R - 1))) / 2),
    # m = lr-min-ratio; the last rounds take small steps, as centralized training's decay
    # does. "constant" (and mode "continuous", which has no last round): lr every round.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_min_ratio: float = 0.05
    # --- model and catalogue
    model_kind: str = "gru"
    model_config: str = "{}"  # JSON object merged over the model kind's defaults
    catalogue: str = ""  # vocab.json or a model directory; "" = the registry's head model
    # A fresh model's item tables from public attributes ({"item": [attr, ...]} JSON; "" =
    # random init), in the tables named ("input", "output"): shared.item_vectors.
    item_attributes: str = ""
    item_attribute_tables: str = "input,output"
    init_model: str = ""  # model directory to start from; "" = registry head or fresh
    seed: int = 0
    eval_k: int = 10  # evaluation cut-off (HR@k, NDCG@k)
    state_dir: str = ""  # "" = $FEDREC_STATE_DIR or ./state
    # --- continuous mode (the feedback loop)
    poll_interval: float = 30.0  # seconds between event-count queries
    min_new_events: int = 100  # a site is "ready" with this many events since its last round
    min_ready_sites: int = 2  # a round starts when this many sites are ready ...
    round_interval: float = 0.0  # ... or when this many seconds passed (0 = never)
    max_seconds: float = 0.0  # stop the loop after this long (0 = until `flwr stop`)

    def __post_init__(self) -> None:
        self._check()

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from kebab-case keys (``context.run_config``); unknown keys are errors."""
        hints = typing.get_type_hints(cls)
        known = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise RunConfigError(f"unknown run-config key(s): {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            field = known[key]
            kwargs[field.name] = _coerce(key, value, hints[field.name])
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        """The kebab-case form (what `from_mapping` reads)."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    # ------------------------------------------------------------------ derived
    @property
    def resolved_state_dir(self) -> Path:
        """The state directory this run writes to."""
        return Path(self.state_dir).resolve() if self.state_dir else default_state_dir()

    @property
    def registry_path(self) -> Path:
        """The coordinator's SQLite registry."""
        return self.resolved_state_dir / "coordinator" / "coordinator.db"

    @property
    def model_store(self) -> Path:
        """Where the coordinator keeps a model directory per version."""
        return self.resolved_state_dir / "coordinator" / "models"

    def round_learning_rate(self, index: int) -> float:
        """The local learning rate of this run's ``index``-th round (1-based)."""
        if self.lr_schedule == "constant" or self.mode != "rounds" or self.num_rounds < 2:
            return self.learning_rate
        progress = min(1.0, max(0.0, (index - 1) / (self.num_rounds - 1)))
        m = self.lr_min_ratio
        return self.learning_rate * (m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * progress)))

    @property
    def frozen_parameters(self) -> tuple[str, ...]:
        """``frozen`` split into parameter names."""
        return tuple(name.strip() for name in self.frozen.split(",") if name.strip())

    @property
    def model_overrides(self) -> dict[str, Any]:
        """``model-config`` parsed (already checked to be a JSON object)."""
        return dict(json.loads(self.model_config))

    # ------------------------------------------------------------------ checks
    def _check(self) -> None:
        positive_ints = ("num_rounds", "local_epochs", "batch_size", "min_sites", "quorum")
        for name in positive_ints:
            value = getattr(self, name)
            minimum = 0 if name == "num_rounds" else 1
            if value < minimum:
                raise RunConfigError(f"{_key(name)} must be >= {minimum}, got {value}")
        if self.mode == "rounds" and self.num_rounds < 1:
            raise RunConfigError("num-rounds must be >= 1 in mode 'rounds'")
        for name in ("fraction_train", "fraction_evaluate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise RunConfigError(f"{_key(name)} must be in [0, 1], got {value}")
        if self.fraction_train == 0.0:
            raise RunConfigError("fraction-train must be > 0")
        if self.quorum > self.min_sites:
            raise RunConfigError(
                f"quorum ({self.quorum}) cannot exceed min-sites ({self.min_sites}): "
                "every round would miss it"
            )
        positive_floats = (
            "round_timeout",
            "learning_rate",
            "max_grad_norm",
            "app_clipping_norm",
            "secagg_max_weight",
            "secagg_clipping_range",
            "poll_interval",
            "fedadam_eta",
            "fedadam_tau",
        )
        for name in positive_floats:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise RunConfigError(f"{_key(name)} must be a positive number, got {value}")
        for name in ("noise_multiplier", "app_noise_multiplier", "max_update_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise RunConfigError(f"{_key(name)} must be >= 0, got {value}")
        for name in ("app_target_delta",):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise RunConfigError(f"{_key(name)} must be in (0, 1), got {value}")
        if self.local_optimizer not in ("adam", "sgd"):
            raise RunConfigError(
                f"local-optimizer must be adam or sgd, got {self.local_optimizer!r}"
            )
        if self.local_steps < 0:
            raise RunConfigError(f"local-steps must be >= 0, got {self.local_steps}")
        if self.privacy_mode in ("store", "distributed") and (
            self.local_steps or self.local_optimizer != "adam"
        ):
            # Their steps are DP-SGD's, planned by the accountant (docs/privacy.md).
            raise RunConfigError(
                f"local-steps and local-optimizer do not apply to privacy-mode "
                f"{self.privacy_mode!r} (its steps are DP-SGD's)"
            )
        if self.lr_schedule not in ("constant", "cosine"):
            raise RunConfigError(
                f"lr-schedule must be constant or cosine, got {self.lr_schedule!r}"
            )
        if not 0.0 <= self.lr_min_ratio <= 1.0:
            raise RunConfigError(f"lr-min-ratio must be in [0, 1], got {self.lr_min_ratio}")
        if not 0.0 <= self.trim_beta < 0.5:
            raise RunConfigError(f"trim-beta must be in [0, 0.5), got {self.trim_beta}")
        if self.eval_k < 1:
            raise RunConfigError(f"eval-k must be >= 1, got {self.eval_k}")
        try:
            overrides = json.loads(self.model_config)
        except json.JSONDecodeError as err:
            raise RunConfigError(f"model-config is not valid JSON: {err}") from err
        if not isinstance(overrides, dict):
            raise RunConfigError("model-config must be a JSON object")
        self._check_privacy()

    def _check_privacy(self) -> None:
        if self.privacy_mode == "app":
            if self.app_noise_multiplier <= 0:
                raise RunConfigError("app mode needs app-noise-multiplier > 0")
            if self.secagg:
                raise RunConfigError(
                    "secagg cannot be combined with privacy-mode 'app' in flwr 1.42: "
                    "Flower's client-level DP wrappers exist only in the Message API and "
                    "SecAgg+ only in the legacy API"
                )
            if self.strategy != "fedavg":
                raise RunConfigError(
                    "privacy-mode 'app' needs strategy 'fedavg' (Flower's accountant "
                    "requires plain FedAvg aggregation)"
                )
        tables = [t.strip() for t in self.item_attribute_tables.split(",") if t.strip()]
        if not tables or set(tables) - {"input", "output"}:
            raise RunConfigError(
                "item-attribute-tables must name input and/or output, got "
                f"{self.item_attribute_tables!r}"
            )
        if self.item_attributes and not Path(self.item_attributes).is_absolute():
            # The ServerApp runs in Flower's app directory, not where `flwr run` was typed.
            raise RunConfigError(
                f"item-attributes must be an absolute path, got {self.item_attributes!r}"
            )
        if self.privacy_mode == "distributed":
            self._check_distributed()
        elif self.frozen_parameters:
            raise RunConfigError("frozen is used by privacy-mode 'distributed' only")
        if self.secagg:
            if self.secagg_num_shares <= 2 or self.secagg_num_shares % 2 == 0:
                # An even number makes every client fail in `_share_keys` while the round
                # still "completes" having aggregated nothing (stack findings).
                raise RunConfigError(
                    f"secagg-num-shares must be odd and > 2, got {self.secagg_num_shares}"
                )
            if not 2 <= self.secagg_threshold < self.secagg_num_shares:
                raise RunConfigError(
                    "secagg-threshold must be >= 2 and < secagg-num-shares, got "
                    f"{self.secagg_threshold}"
                )
            if self.strategy != "fedavg":
                raise RunConfigError("secagg sums updates: it needs strategy 'fedavg'")
            if self.mode == "continuous":
                raise RunConfigError("secagg runs a fixed number of rounds (mode 'rounds')")

    def _check_distributed(self) -> None:
        if not self.secagg:
            # Without SecAgg+ the coordinator would see each site's share, which carries
            # only 1/m of the noise: the guarantee would not hold against it.
            raise RunConfigError(
                "privacy-mode 'distributed' needs secagg = true: each site's share carries "
                "only part of the noise, so the coordinator must see nothing but their sum"
            )
        if not self.noise_multiplier > 0:
            raise RunConfigError("privacy-mode 'distributed' needs noise-multiplier > 0")
        if not 0.0 < self.dist_sample_rate <= 1.0:
            raise RunConfigError(f"dist-sample-rate must be in (0, 1], got {self.dist_sample_rate}")
        if self.dist_noise_shares < 0 or self.dist_noise_shares > self.quorum:
            raise RunConfigError(
                f"dist-noise-shares must be in [0, quorum={self.quorum}] (0 = quorum), got "
                f"{self.dist_noise_shares}: the coordinator must never sum fewer shares "
                "than the noise is sized for"
            )
        if not (math.isfinite(self.dist_server_lr) and self.dist_server_lr > 0):
            raise RunConfigError(f"dist-server-lr must be > 0, got {self.dist_server_lr}")
        if not (math.isfinite(self.dist_epsilon_budget) and self.dist_epsilon_budget >= 0):
            raise RunConfigError(
                f"dist-epsilon-budget must be >= 0, got {self.dist_epsilon_budget}"
            )
        if not 0.0 < self.dist_delta < 1.0:
            raise RunConfigError(f"dist-delta must be in (0, 1), got {self.dist_delta}")
        if not (math.isfinite(self.dist_popularity_noise) and self.dist_popularity_noise >= 0):
            raise RunConfigError(
                f"dist-popularity-noise must be >= 0, got {self.dist_popularity_noise}"
            )
        if self.dist_popularity_noise > 0 and self.num_rounds < 2:
            raise RunConfigError(
                "dist-popularity-noise takes the run's first round: num-rounds must be >= 2"
            )
        if len(set(self.frozen_parameters)) != len(self.frozen_parameters):
            raise RunConfigError("frozen names a parameter twice")


def _key(name: str) -> str:
    return name.replace("_", "-")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check one run-config value against its field's type; ints widen to floats."""
    if typing.get_origin(hint) is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise RunConfigError(f"{key} must be one of {', '.join(map(str, allowed))}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise RunConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RunConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RunConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise RunConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise RunConfigError(f"{key}: unsupported type {hint}")  # pragma: no cover

"""The A/B testing contract between the coordinator and the sites (plain Python, no Flower).

An experiment compares two or more registered model versions ("arms") on live traffic. The
coordinator defines it (`ExperimentSpec`), Flower query messages carry the definition to
every site (``query.ab_sync``) and the arms' weights to the sites that lack them
(``query.ab_models``); each site assigns shoppers to arms with `assign_arm` (a hash of the
experiment id and the shopper id: deterministic, so a shopper always sees the same arm, and
independent across experiments), serves each arm's model, logs impressions and outcomes in
its own ``site.db``, and answers ``ab_sync`` with per-arm counts only (`report_key`): shoppers
exposed, clicked, carted, converted. Nothing about an individual shopper leaves the site.

Reply metrics of ``ab_sync``, for experiment number ``e`` of the message and arm ``a``:
``ab.e.a.<count>`` (the released count, Laplace-noised when the experiment's epsilon > 0),
``ab.e.epsilon`` (the epsilon of that release, 0 = exact), ``ab.e.seq`` (the report sequence
number it answers), ``ab.e.active`` (1 when the site serves the experiment), ``ab.e.missing``
(arm models the site does not hold), ``ab.e.refused`` (1 when the site releases nothing),
and ``ab.epsilon-spent`` / ``ab.epsilon-budget`` (the site's A/B privacy account).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.errors import ConfigError

AB_SYNC = "ab_sync"  # Flower message type "query.ab_sync"
AB_MODELS = "ab_models"  # Flower message type "query.ab_models"
EXPERIMENTS = "experiments"  # ConfigRecord key: JSON list of ExperimentSpec
MODELS = "models"  # ConfigRecord key of ab_models: JSON list of arm model descriptions
MISSING = "missing"  # ConfigRecord key of an ab_sync reply: JSON list of versions not held
COUNTS: tuple[str, ...] = ("exposed", "clicked", "carted", "converted")
EXACT_ONLY_COUNTS: tuple[str, ...] = ("impressions",)  # per-shopper unbounded: never noised
STATUSES = ("running", "stopped")
MAX_ARMS = 8
MAX_WINDOW_S = 30 * 86_400.0
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


def arm_array_key(j: int) -> str:
    """ArrayRecord key of the j-th model in an ``ab_models`` message."""
    return f"ab-arm-{j}"


def report_key(experiment: int, arm: int, count: str) -> str:
    """Metric key of one released count: ``ab.<experiment>.<arm>.<count>``."""
    return f"ab.{experiment}.{arm}.{count}"


def experiment_key(experiment: int, what: str) -> str:
    """Metric key of a per-experiment number: ``ab.<experiment>.<what>``."""
    return f"ab.{experiment}.{what}"


@dataclass(frozen=True)
class ArmSpec:
    """One arm: a name shown in reports, the model version it serves, its traffic weight."""

    name: str
    version: str
    weight: float


@dataclass(frozen=True)
class ExperimentSpec:
    """An A/B experiment as the sites receive it."""

    experiment_id: str
    arms: tuple[ArmSpec, ...]
    window_s: float = 1800.0  # an outcome counts up to this long after the impression
    epsilon: float = 0.0  # Laplace noise per report (unit: one shopper); 0 = exact counts
    report_seq: int = 1  # a site makes a new release only for a newer sequence number
    status: str = "running"  # "running": serve it; "stopped": stop serving, report once more

    def __post_init__(self) -> None:
        if not _ID_RE.fullmatch(self.experiment_id):
            raise ConfigError(
                f"experiment id {self.experiment_id!r} must be 1-64 of A-Z a-z 0-9 _ . + -"
            )
        if not 2 <= len(self.arms) <= MAX_ARMS:
            raise ConfigError(f"an experiment needs 2 to {MAX_ARMS} arms, got {len(self.arms)}")
        if len({a.version for a in self.arms}) != len(self.arms):
            raise ConfigError("each arm must serve a different model version")
        if len({a.name for a in self.arms}) != len(self.arms):
            raise ConfigError("arm names must differ")
        for arm in self.arms:
            if not _ID_RE.fullmatch(arm.name) or not _ID_RE.fullmatch(arm.version):
                raise ConfigError(f"arm {arm.name!r} / version {arm.version!r} is not a safe name")
            if not (math.isfinite(arm.weight) and arm.weight > 0):
                raise ConfigError(f"arm {arm.name} needs a traffic weight > 0, got {arm.weight}")
        if not (math.isfinite(self.window_s) and 0 < self.window_s <= MAX_WINDOW_S):
            raise ConfigError(f"window must be in (0, {MAX_WINDOW_S:.0f}] seconds")
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise ConfigError(f"epsilon per report must be >= 0 (0 = exact), got {self.epsilon}")
        if self.report_seq < 0:
            raise ConfigError("report_seq must be >= 0")
        if self.status not in STATUSES:
            raise ConfigError(f"status must be one of {STATUSES}, got {self.status!r}")

    @property
    def weights(self) -> tuple[float, ...]:
        """Traffic weights in arm order."""
        return tuple(a.weight for a in self.arms)

    @property
    def window_ms(self) -> int:
        """The outcome window in milliseconds."""
        return int(self.window_s * 1000)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "experiment_id": self.experiment_id,
            "arms": [{"name": a.name, "version": a.version, "weight": a.weight} for a in self.arms],
            "window_s": self.window_s,
            "epsilon": self.epsilon,
            "report_seq": self.report_seq,
            "status": self.status,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentSpec:
        """Parse `to_dict` output; `ConfigError` naming the problem."""
        try:
            arms = tuple(
                ArmSpec(str(a["name"]), str(a["version"]), float(a["weight"])) for a in data["arms"]
            )
            return cls(
                experiment_id=str(data["experiment_id"]),
                arms=arms,
                window_s=float(data["window_s"]),
                epsilon=float(data["epsilon"]),
                report_seq=int(data["report_seq"]),
                status=str(data["status"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"malformed experiment definition: {err!r}") from err


def encode_experiments(specs: Sequence[ExperimentSpec]) -> str:
    """The ``experiments`` ConfigRecord value."""
    return json.dumps([s.to_dict() for s in specs], sort_keys=True)


def decode_experiments(text: str) -> list[ExperimentSpec]:
    """Inverse of `encode_experiments`; `ConfigError` on anything else."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"experiments are not valid JSON: {err}") from err
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise ConfigError("experiments must be a JSON list of objects")
    specs = [ExperimentSpec.from_dict(d) for d in data]
    if len({s.experiment_id for s in specs}) != len(specs):
        raise ConfigError("experiment ids repeat in one message")
    return specs


def assign_arm(experiment_id: str, user_id: str, weights: Sequence[float]) -> int:
    """The arm (index) of a shopper: sha256(experiment id, shopper id) mapped onto the weights.

    Deterministic (the same shopper always gets the same arm of an experiment, on every site
    and after restarts), uniform in expectation over shoppers, and independent between
    experiments (the experiment id is part of the hash).
    """
    digest = hashlib.sha256(f"{experiment_id}\x1f{user_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
    total = float(sum(weights))
    edge = 0.0
    for arm, weight in enumerate(weights):
        edge += weight / total
        if u < edge:
            return arm
    return len(weights) - 1  # float rounding at the top edge

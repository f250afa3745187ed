"""The model zoo: one file per model, built by kind name from a config dict."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from shared.errors import ModelError
from shared.models.dot_product import DotProduct, DotProductConfig
from shared.models.gru4rec import GRU4Rec, GRU4RecConfig
from shared.models.popularity import Popularity, PopularityConfig
from shared.models.sasrec import SASRec, SASRecConfig


class SequentialModel(Protocol):
    """What every model offers: per-position states and a linear head over the catalogue.

    ``forward(items)`` is ``head(encode(items))``; items are (B, T) int64, left-padded with 0.
    """

    config: Any
    head: nn.Linear

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """Per-position states: (B, T) int64 -> (B, T, H)."""
        ...

    def __call__(self, items: torch.Tensor) -> torch.Tensor:
        """Per-position logits: (B, T) int64 -> (B, T, n_items + 1)."""
        ...


# kind -> (config class, model class).
MODEL_KINDS: dict[str, tuple[type[Any], Callable[[Any], nn.Module]]] = {
    "gru": (GRU4RecConfig, GRU4Rec),
    "sasrec": (SASRecConfig, SASRec),
    "pop": (PopularityConfig, Popularity),
    "mf": (DotProductConfig, DotProduct),
}


def build_model(kind: str, config: dict[str, Any]) -> nn.Module:
    """Instantiate model ``kind`` from a plain config dict (as stored in config.json)."""
    try:
        config_cls, model_cls = MODEL_KINDS[kind]
    except KeyError as err:
        raise ModelError(f"unknown model kind {kind!r}; known: {sorted(MODEL_KINDS)}") from err
    try:
        return model_cls(config_cls(**config))
    except (TypeError, ValueError) as err:
        raise ModelError(f"invalid config for model {kind!r}: {err}") from err


def config_dict(model: nn.Module) -> dict[str, Any]:
    """The plain-dict form of a model's frozen config dataclass."""
    return dataclasses.asdict(model.config)  # type: ignore[call-overload]


def model_kind(model: nn.Module) -> str:
    """The registered kind name of a model instance."""
    for kind, (_, cls) in MODEL_KINDS.items():
        if type(model) is cls:
            return kind
    raise ModelError(f"{type(model).__name__} is not a registered model")

"""Checks every site update must pass before it may be aggregated.

An update is rejected (and the site named in the log and the registry) when its weights
have other names or shapes than the global model's, contain NaN or Inf, or moved further
from the global model than ``max_norm`` in L2 norm; or when its reported example count is
not a positive finite number. One bad site must not poison the average of the others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from coordinator.errors import UpdateRejectedError


def update_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``update - reference`` over all arrays (float64 accumulation)."""
    total = 0.0
    for name, ref in reference.items():
        diff = np.asarray(update[name], dtype=np.float64) - np.asarray(ref, dtype=np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def check_update(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    max_norm: float,
) -> float:
    """Raise `UpdateRejectedError` unless ``update`` is acceptable; returns its norm.

    ``max_norm`` 0 disables the norm bound (shape and finiteness are always checked).
    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        raise UpdateRejectedError(
            "weights do not match the global model: "
            + (f"missing {missing[:3]}" if missing else "")
            + (" " if missing and extra else "")
            + (f"unexpected {extra[:3]}" if extra else "")
        )
    for name, ref in reference.items():
        arr = update[name]
        if arr.shape != ref.shape:
            raise UpdateRejectedError(f"{name} has shape {arr.shape}, expected {ref.shape}")
        if arr.dtype.kind not in "fiub":
            raise UpdateRejectedError(f"{name} has non-numeric dtype {arr.dtype}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise UpdateRejectedError(f"{name} holds {bad} non-finite value(s) (NaN/Inf)")
    norm = update_norm(update, reference)
    if not math.isfinite(norm):
        raise UpdateRejectedError("update norm is not finite")
    if max_norm > 0 and norm > max_norm:
        raise UpdateRejectedError(f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}")
    return norm


def check_weight(num_examples: object) -> int:
    """The FedAvg weight a site reported, if it is a positive finite count."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, int | float):
        raise UpdateRejectedError(f"num-examples must be a number, got {num_examples!r}")
    if not math.isfinite(num_examples) or num_examples <= 0:
        raise UpdateRejectedError(f"num-examples must be positive and finite, got {num_examples}")
    return int(num_examples)


def check_metrics(metrics: Mapping[str, object]) -> None:
    """Every reported metric must be a finite number (lists of them included)."""
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise UpdateRejectedError(f"metric {key!r} is not a finite number: {v!r}")

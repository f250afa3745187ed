"""Update validation: names, shapes, finiteness, norm bound, weights and metrics."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from coordinator.errors import UpdateRejectedError
from coordinator.validation import check_metrics, check_update, check_weight, update_norm

REF = {"emb": np.zeros((4, 3), np.float32), "bias": np.zeros(3, np.float32)}


def test_a_small_finite_update_passes_and_reports_its_norm() -> None:
    update = {"emb": np.full((4, 3), 0.5, np.float32), "bias": np.zeros(3, np.float32)}
    assert check_update(update, REF, max_norm=10.0) == pytest.approx(math.sqrt(12 * 0.25))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad: float) -> None:
    update = {"emb": np.zeros((4, 3), np.float32), "bias": np.array([0, bad, 0], np.float32)}
    with pytest.raises(UpdateRejectedError, match="non-finite"):
        check_update(update, REF, max_norm=0)


def test_wrong_shapes_and_names_are_rejected() -> None:
    with pytest.raises(UpdateRejectedError, match="shape"):
        check_update({"emb": np.zeros((5, 3), np.float32), "bias": REF["bias"]}, REF, 0)
    with pytest.raises(UpdateRejectedError, match="missing"):
        check_update({"emb": REF["emb"]}, REF, 0)
    with pytest.raises(UpdateRejectedError, match="unexpected"):
        check_update({**REF, "extra": np.zeros(1)}, REF, 0)


def test_norm_above_the_bound_is_rejected_and_zero_disables_it() -> None:
    update = {"emb": np.full((4, 3), 10.0, np.float32), "bias": REF["bias"]}
    with pytest.raises(UpdateRejectedError, match="exceeds the bound"):
        check_update(update, REF, max_norm=1.0)
    assert check_update(update, REF, max_norm=0.0) > 1.0


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, st.integers(1, 20), elements=st.floats(-100, 100, width=32)))
def test_update_norm_is_the_l2_distance(values: np.ndarray) -> None:
    ref = {"w": np.zeros_like(values)}
    assert update_norm({"w": values}, ref) == pytest.approx(
        float(np.linalg.norm(values.astype(np.float64))), rel=1e-9, abs=1e-9
    )


@pytest.mark.parametrize("weight", [0, -3, float("nan"), float("inf"), True, "7"])
def test_bad_weights_are_rejected(weight: object) -> None:
    with pytest.raises(UpdateRejectedError, match="num-examples"):
        check_weight(weight)


def test_metrics_must_be_finite_numbers() -> None:
    check_metrics({"loss": 1.0, "hist": [1.0, 2.0]})
    with pytest.raises(UpdateRejectedError, match="loss"):
        check_metrics({"loss": float("nan")})

"""Every registered model: shapes, the padding contract, int64 inputs, registry round trips."""

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import ModelError
from shared.models import MODEL_KINDS, build_model, config_dict, model_kind
from shared.models.popularity import Popularity
from shared.sequences import pad_left

N_ITEMS = 40
MAX_LEN = 12
KINDS = sorted(MODEL_KINDS)
SMALL = {
    "gru": {"dim": 8, "hidden": 12},
    "sasrec": {"dim": 8, "n_heads": 2, "n_layers": 2},
    "mf": {"dim": 8},
    "pop": {},
}


def _model(kind: str, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    model = build_model(kind, {"n_items": N_ITEMS, "max_len": MAX_LEN, **SMALL[kind]})
    if isinstance(model, Popularity):
        model.fit_counts(np.arange(1, N_ITEMS + 1).repeat(np.arange(1, N_ITEMS + 1)))
    return model.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_forward_is_head_of_encode_with_catalogue_width(kind: str) -> None:
    # Arrange
    model = _model(kind)
    items = torch.randint(0, N_ITEMS + 1, (3, 7))
    # Act
    logits = model(items)
    states = model.encode(items)
    # Assert
    assert logits.shape == (3, 7, N_ITEMS + 1)
    assert logits.dtype == torch.float32
    assert states.shape[:2] == (3, 7)
    assert model.head.in_features == states.shape[2]
    torch.testing.assert_close(logits, model.head(states))


@pytest.mark.parametrize("kind", KINDS)
def test_head_is_an_untied_linear(kind: str) -> None:
    model = _model(kind)
    assert isinstance(model.head, torch.nn.Linear)
    item_emb = getattr(model, "item_emb", None)
    if item_emb is not None:
        assert model.head.weight.data_ptr() != item_emb.weight.data_ptr()


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=15, deadline=None)
@given(
    history=st.lists(st.integers(1, N_ITEMS), min_size=1, max_size=MAX_LEN),
    extra_pad=st.integers(0, 9),
)
def test_scores_do_not_depend_on_left_padding(
    kind: str, history: list[int], extra_pad: int
) -> None:
    # The contract that lets training trim batches while serving pads to max_len.
    model = _model(kind)
    seq = np.asarray(history, dtype=np.int64)
    tight = torch.from_numpy(pad_left([seq], len(seq)))
    padded = torch.from_numpy(pad_left([seq], len(seq) + extra_pad))
    with torch.no_grad():
        a = model(tight)[:, -1]
        b = model(padded)[:, -1]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gru", "sasrec", "mf"])
def test_batch_rows_are_independent(kind: str) -> None:
    # A row's scores must not depend on the other rows of its batch (masks, no leakage).
    model = _model(kind)
    rows = torch.from_numpy(pad_left([np.array([3, 4, 5]), np.array([7]), np.arange(1, 13)], 12))
    with torch.no_grad():
        together = model(rows)[:, -1]
        alone = torch.cat([model(rows[i : i + 1])[:, -1] for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gru", "sasrec", "mf"])
def test_positions_are_causal(kind: str) -> None:
    # Changing a later item never changes the scores at an earlier position.
    model = _model(kind)
    a = torch.tensor([[0, 0, 3, 4, 5, 6]])
    b = torch.tensor([[0, 0, 3, 4, 9, 1]])
    with torch.no_grad():
        torch.testing.assert_close(model(a)[:, :4], model(b)[:, :4])
        assert not torch.allclose(model(a)[:, -1], model(b)[:, -1])


def test_sasrec_reads_histories_longer_than_its_position_table() -> None:
    model = _model("sasrec")
    with torch.no_grad():
        out = model(torch.randint(1, N_ITEMS + 1, (2, MAX_LEN + 5)))
    assert torch.isfinite(out).all()


def test_popularity_scores_follow_training_counts() -> None:
    model = build_model("pop", {"n_items": 5})
    assert isinstance(model, Popularity)
    model.fit_counts(np.array([2, 2, 2, 5, 5, 1]))
    with torch.no_grad():
        scores = model(torch.tensor([[0, 4]]))[0, -1]
    assert torch.argsort(scores[1:], descending=True)[:3].add(1).tolist() == [2, 5, 1]
    assert scores[3] == scores[4]  # unseen items tie


@pytest.mark.parametrize("kind", KINDS)
def test_registry_round_trip(kind: str) -> None:
    model = _model(kind)
    assert model_kind(model) == kind
    rebuilt = build_model(kind, config_dict(model))
    assert rebuilt.config == model.config
    config: Any = model.config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.n_items = 3
    assert dataclasses.is_dataclass(config)


@pytest.mark.parametrize("kind", KINDS)
def test_no_tensor_state_outside_parameters_and_buffers(kind: str) -> None:
    # No stored device or numpy array: .to() and Opacus see every tensor.
    model = _model(kind)
    for value in vars(model).values():
        assert not isinstance(value, torch.Tensor | np.ndarray | torch.device)


def test_build_model_rejects_unknown_kind_and_bad_config() -> None:
    with pytest.raises(ModelError, match="unknown model kind"):
        build_model("lstm", {"n_items": 3})
    with pytest.raises(ModelError, match="invalid config"):
        build_model("gru", {"n_items": 3, "wings": 2})
    with pytest.raises(ModelError, match="invalid config"):
        build_model("sasrec", {"n_items": 3, "dim": 10, "n_heads": 3})
    with pytest.raises(ModelError, match="not a registered model"):
        model_kind(torch.nn.Linear(2, 2))

"""Item vectors from public attributes: matrix, SVD vectors, model tables, cold-start means."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import DataError, ModelError
from shared.item_vectors import (
    attribute_matrix,
    attribute_mean,
    attribute_vectors,
    init_item_tables,
    principal_scores,
)
from shared.models import build_model
from shared.vocab import ItemVocab

VOCAB = ItemVocab(["i1", "i2", "i3", "i4"])
ATTRS = {"i1": ["brand:a", "cat:x"], "i2": ["brand:a"], "i3": ["cat:y"]}  # i4: none


def test_matrix_rows_are_unit_length_and_padding_and_bare_items_are_zero() -> None:
    # Act
    m, names = attribute_matrix(VOCAB, ATTRS)
    # Assert
    assert names == ["brand:a", "cat:x", "cat:y"]
    assert m.shape == (5, 3)
    np.testing.assert_allclose(np.linalg.norm(m[1:4], axis=1), 1.0)
    assert not m[0].any() and not m[4].any()
    np.testing.assert_allclose(m[1], [2**-0.5, 2**-0.5, 0.0])


def test_full_rank_vectors_reproduce_the_attribute_cosines() -> None:
    # Arrange: dim >= number of attributes, so the SVD loses nothing
    m, _ = attribute_matrix(VOCAB, ATTRS)
    # Act
    v = attribute_vectors(VOCAB, ATTRS, dim=8).double().numpy()
    # Assert: dot products equal the cosines of the attribute sets, up to one global scale
    gram, target = v[1:] @ v[1:].T, m[1:] @ m[1:].T
    scale = gram[0, 0] / target[0, 0]
    np.testing.assert_allclose(gram, target * scale, atol=1e-6)
    norms = np.linalg.norm(v[1:4], axis=1)
    assert norms.mean() == pytest.approx(1.0)
    assert not v[0].any() and not v[4].any()


def test_init_item_tables_writes_both_tables_and_checks_the_model() -> None:
    # Arrange
    model = build_model("gru", {"n_items": 4, "dim": 6, "hidden": 5, "max_len": 5})
    # Act
    names = init_item_tables(model, VOCAB, ATTRS, ("input", "output"))
    # Assert
    assert names == ["item_emb.weight", "head.weight"]
    emb, head = model.item_emb.weight, model.head.weight  # type: ignore[union-attr]
    assert (emb.shape, head.shape) == (torch.Size([5, 6]), torch.Size([5, 5]))
    torch.testing.assert_close(emb, attribute_vectors(VOCAB, ATTRS, 6))
    torch.testing.assert_close(head, attribute_vectors(VOCAB, ATTRS, 5))
    with pytest.raises(ModelError, match="unknown item table"):
        init_item_tables(model, VOCAB, ATTRS, ("middle",))
    with pytest.raises(ModelError, match="rows"):
        init_item_tables(model, ItemVocab(["i1", "i2"]), ATTRS, ("input",))
    with pytest.raises(DataError, match="no item"):
        attribute_matrix(VOCAB, {"other": ["a"]})


def test_a_new_item_borrows_the_mean_of_known_items_sharing_its_attributes() -> None:
    # Arrange: i1 and i2 are known; i3 is new (cat:y, carried by no known item), i4 has none
    m, _ = attribute_matrix(VOCAB, ATTRS)
    values = np.array([0.0, 4.0, 2.0, 99.0, 99.0])
    known = np.array([False, True, True, False, False])
    # Act
    out = attribute_mean(values, known, m)
    # Assert: brand:a -> mean(4, 2) = 3, cat:x -> 4; i1 = mean(3, 4); i2 = 3
    np.testing.assert_allclose(out[1:3], [3.5, 3.0])
    # no usable attribute: the mean over the known items
    np.testing.assert_allclose(out[3:], [3.0, 3.0])
    with pytest.raises(DataError, match="no known item"):
        attribute_mean(values, np.zeros(5, dtype=bool), m)
    with pytest.raises(DataError, match="one row per item"):
        attribute_mean(values[:3], known[:3], m)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 5), max_size=4), min_size=2, max_size=12),
    st.data(),
)
def test_attribute_means_stay_within_the_known_values(
    rows: list[list[int]], data: st.DataObject
) -> None:
    # Arrange: random items, attributes and values; at least one known item
    vocab = ItemVocab([f"i{k}" for k in range(len(rows))])
    attrs = {f"i{k}": [f"a{a}" for a in row] for k, row in enumerate(rows)}
    if not any(rows):
        attrs["i0"] = ["a0"]
    m, _ = attribute_matrix(vocab, attrs)
    n = len(rows) + 1
    flags = data.draw(st.lists(st.booleans(), min_size=n - 1, max_size=n - 1))
    known = np.array([False, *flags])
    known[data.draw(st.integers(1, n - 1))] = True
    values = np.array(data.draw(st.lists(st.floats(-5, 5), min_size=n, max_size=n)))
    # Act
    out = attribute_mean(values, known, m)
    # Assert: every result is a mean of known values, so it lies within their range
    lo, hi = values[known].min(), values[known].max()
    assert np.all(out >= lo - 1e-9) and np.all(out <= hi + 1e-9)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    a=st.integers(1, 40),
    k=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_principal_scores_equal_the_truncated_svd(n: int, a: int, k: int, seed: int) -> None:
    # Arrange: tall or wide, random axes, singular values 1 apart (axes well defined)
    rng = np.random.default_rng(seed)
    q = min(n, a)
    left, _ = np.linalg.qr(rng.normal(size=(n, q)))
    right, _ = np.linalg.qr(rng.normal(size=(a, q)))
    m = (left * np.arange(q, 0, -1.0)) @ right.T
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    r = min(k, len(s))
    # Act
    scores = principal_scores(m, k)
    # Assert: the same rank-r subspace and lengths (columns are defined up to sign)
    assert scores.shape == (n, r)
    np.testing.assert_allclose(np.abs(scores), np.abs(u[:, :r] * s[:r]), atol=1e-6)
    np.testing.assert_allclose(scores @ scores.T, (u[:, :r] * s[:r] ** 2) @ u[:, :r].T, atol=1e-6)


def test_principal_scores_drop_the_axes_of_a_rank_deficient_matrix() -> None:
    # Arrange: two identical rows and one zero column: rank 1 of a possible 2
    m = np.array([[1.0, 0.0], [1.0, 0.0]])
    # Act
    scores = principal_scores(m, 2)
    # Assert
    assert scores.shape == (2, 1)
    np.testing.assert_allclose(np.abs(scores[:, 0]), [1.0, 1.0])

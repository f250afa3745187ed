"""The item vocabulary: canonical order, JSON round-trips, hashing and errors."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import VocabError
from shared.vocab import PAD_INDEX, PAD_TOKEN, ItemVocab

ITEM_IDS = st.lists(
    st.text(min_size=1, max_size=12).filter(lambda s: s != PAD_TOKEN), unique=True, max_size=40
)


@settings(max_examples=50, deadline=None)
@given(ITEM_IDS)
def test_json_round_trip_keeps_ids_order_and_hash(ids: list[str]) -> None:
    vocab = ItemVocab(ids)
    back = ItemVocab.from_json(vocab.to_json())
    assert back == vocab
    assert back.item_ids == tuple(ids)
    assert back.sha256 == vocab.sha256
    assert hash(back) == hash(vocab)


@settings(max_examples=50, deadline=None)
@given(ITEM_IDS)
def test_encode_decode_round_trip_and_padding_is_never_an_item(ids: list[str]) -> None:
    vocab = ItemVocab(ids)
    indices = vocab.encode(ids)
    assert indices.dtype == np.int64
    assert PAD_INDEX not in indices.tolist()
    assert vocab.decode(indices) == ids
    assert len(vocab) == vocab.n_items + 1


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 10**30), unique=True, min_size=1, max_size=30))
def test_from_items_orders_integer_ids_numerically_whatever_the_input_order(
    numbers: list[int],
) -> None:
    vocab = ItemVocab.from_items(str(n) for n in reversed(numbers))
    assert vocab.item_ids == tuple(str(n) for n in sorted(numbers))
    assert ItemVocab.from_items(str(n) for n in numbers) == vocab


def test_from_items_sorts_mixed_ids_as_strings_and_deduplicates() -> None:
    vocab = ItemVocab.from_items(["b", "10", "a", "9", "b"])
    assert vocab.item_ids == ("10", "9", "a", "b")


def test_equal_vocabularies_have_equal_hashes_and_different_ones_do_not() -> None:
    assert ItemVocab(["1", "2"]).sha256 == ItemVocab(["1", "2"]).sha256
    assert ItemVocab(["1", "2"]).sha256 != ItemVocab(["2", "1"]).sha256


def test_save_and_load(tmp_path: Path) -> None:
    vocab = ItemVocab(["x", "y"])
    vocab.save(tmp_path / "vocab.json")
    assert ItemVocab.load(tmp_path / "vocab.json") == vocab


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ItemVocab(["a", "a"]), "duplicate"),
        (lambda: ItemVocab([PAD_TOKEN]), "reserved"),
        (lambda: ItemVocab.from_json("{not json"), "not valid JSON"),
        (lambda: ItemVocab.from_json('{"format": 99, "items": []}'), "format"),
        (lambda: ItemVocab.from_json('{"format": 1, "items": [1, 2]}'), "list of strings"),
        (lambda: ItemVocab(["a"]).index("b"), "unknown item"),
        (lambda: ItemVocab(["a"]).encode(["b"]), "unknown item"),
        (lambda: ItemVocab(["a"]).decode([0]), "not an item"),
        (lambda: ItemVocab(["a"]).decode([2]), "not an item"),
        (lambda: ItemVocab.load(Path("/nonexistent/vocab.json")), "cannot read"),
    ],
)
def test_errors_are_vocab_errors(make: object, match: str) -> None:
    with pytest.raises(VocabError, match=match):
        make()  # type: ignore[operator]


def test_unknown_ids_map_to_the_given_index() -> None:
    assert ItemVocab(["a"]).encode(["a", "zz"], unknown=PAD_INDEX).tolist() == [1, 0]

"""The coordinator <-> site wire contract: round instructions and the catalogue codec."""

import gzip
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import federated
from shared.errors import ConfigError, VocabError
from shared.federated import RoundInstructions, decode_catalogue, encode_catalogue
from shared.vocab import ItemVocab


def _instr(vocab: ItemVocab) -> RoundInstructions:
    return RoundInstructions(
        server_round=4,
        model_version="v1",
        model_kind="gru",
        model_config={"n_items": vocab.n_items, "max_len": 20},
        catalogue=vocab,
        serve_version="v0",
        privacy_mode="none",
        learning_rate=0.01,
        local_optimizer="sgd",
        local_steps=3,
    )


@settings(max_examples=30, deadline=None)
@given(
    st.sets(
        st.text(alphabet="abcdefgh0123456789-", min_size=1, max_size=12), min_size=1, max_size=50
    )
)
def test_instructions_round_trip(items: set[str]) -> None:
    vocab = ItemVocab.from_items(items)
    instr = _instr(vocab)
    assert RoundInstructions.from_config(instr.to_config()) == instr


def test_catalogue_is_checked_against_its_hash() -> None:
    blob, sha = encode_catalogue(ItemVocab.from_items(["a", "b"]))
    assert decode_catalogue(blob, sha) == ItemVocab.from_items(["a", "b"])
    with pytest.raises(VocabError, match="does not match"):
        decode_catalogue(blob, "0" * 64)
    with pytest.raises(VocabError, match="gzip"):
        decode_catalogue(b"not gzip", sha)


def test_a_gzip_bomb_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(federated, "MAX_CATALOGUE_BYTES", 1000)
    text = b"x" * 5000
    with pytest.raises(VocabError, match="larger than"):
        decode_catalogue(gzip.compress(text), hashlib.sha256(text).hexdigest())


def test_missing_or_mistyped_keys_are_named() -> None:
    config = _instr(ItemVocab.from_items(["a"])).to_config()
    del config["batch-size"]
    with pytest.raises(ConfigError, match="batch-size"):
        RoundInstructions.from_config(config)
    config = _instr(ItemVocab.from_items(["a"])).to_config()
    config["server-round"] = "4"
    with pytest.raises(ConfigError, match="server-round"):
        RoundInstructions.from_config(config)

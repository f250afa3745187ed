"""Model directories: complete, verifiable, atomic, loadable for every model kind."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from shared.artifacts import (
    CONFIG_FILE,
    METADATA_FILE,
    ONNX_FILE,
    VOCAB_FILE,
    WEIGHTS_FILE,
    PrivacyStatement,
    load_model_dir,
    read_metadata,
    save_model_dir,
    verify_model_dir,
)
from shared.errors import ModelError, VocabError
from shared.explanations import EXPLAIN_FILE
from shared.models import MODEL_KINDS, build_model
from shared.models.popularity import Popularity
from shared.sequences import serving_input
from shared.vocab import ItemVocab

SMALL = {
    "gru": {"dim": 8, "hidden": 8},
    "sasrec": {"dim": 8, "n_heads": 2, "n_layers": 1},
    "mf": {"dim": 8},
    "pop": {},
}
VOCAB = ItemVocab.from_items([str(i) for i in range(100, 130)])


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(kind, {"n_items": VOCAB.n_items, "max_len": 6, **SMALL[kind]})
    if isinstance(model, Popularity):
        model.fit_counts(np.arange(1, 31).repeat(np.arange(1, 31)))
    return model


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
def test_round_trip_of_every_kind(kind: str, tmp_path: Path) -> None:
    # Arrange
    model = _model(kind)
    out = tmp_path / "m"
    # Act
    meta = save_model_dir(out, model, VOCAB, metrics={"test_ndcg@10": 0.5})
    loaded, vocab, meta2 = load_model_dir(out)
    # Assert: files, metadata and identical scores in torch and in the ONNX graph
    assert {p.name for p in out.iterdir()} == {
        ONNX_FILE,
        WEIGHTS_FILE,
        VOCAB_FILE,
        CONFIG_FILE,
        EXPLAIN_FILE,
        METADATA_FILE,
    }
    assert meta2 == meta and meta.kind == kind and meta.top_k == 30
    assert vocab == VOCAB and meta.vocab_sha256 == VOCAB.sha256
    assert meta.metrics == {"test_ndcg@10": 0.5}
    items = torch.from_numpy(serving_input(np.array([3, 1, 7]), 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(items), model.eval()(items))
    session = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    _, ids = session.run(None, {"items": items.numpy(), "exclude": np.zeros((1, 1), np.int64)})
    with torch.no_grad():
        ref = model(items)[0, -1, 1:].argsort(descending=True)[:5] + 1
    assert ids[0, :5].tolist() == ref.tolist()


def test_corrupt_file_is_detected(tmp_path: Path) -> None:
    out = tmp_path / "m"
    save_model_dir(out, _model("mf"), VOCAB)
    with (out / WEIGHTS_FILE).open("r+b") as fh:
        fh.seek(40)
        fh.write(b"\x00garbage")
    with pytest.raises(ModelError, match=r"weights\.pt is corrupt"):
        verify_model_dir(out)


def test_missing_file_and_missing_directory(tmp_path: Path) -> None:
    out = tmp_path / "m"
    save_model_dir(out, _model("gru"), VOCAB)
    (out / ONNX_FILE).unlink()
    with pytest.raises(ModelError, match=r"model\.onnx is missing"):
        load_model_dir(out)
    with pytest.raises(ModelError, match="not a model directory"):
        read_metadata(tmp_path / "nothing-here")


def test_malformed_metadata_is_a_model_error(tmp_path: Path) -> None:
    out = tmp_path / "m"
    save_model_dir(out, _model("gru"), VOCAB)
    (out / METADATA_FILE).write_text("[1, 2]")
    with pytest.raises(ModelError, match="not a JSON object"):
        read_metadata(out)
    (out / METADATA_FILE).write_text(json.dumps({"format": 99}))
    with pytest.raises(ModelError, match="unsupported metadata format"):
        read_metadata(out)


def test_replacing_a_directory_keeps_it_complete(tmp_path: Path) -> None:
    # Arrange: an existing model directory
    out = tmp_path / "m"
    first = save_model_dir(out, _model("gru"), VOCAB, version="v1")
    # Act: a save that fails half-way (vocabulary of the wrong size)
    with pytest.raises(VocabError):
        save_model_dir(out, _model("gru"), ItemVocab.from_items(["a", "b"]), version="v2")
    # Assert: the old directory is intact and no temporary sibling is left behind
    assert verify_model_dir(out) == first
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    # Act: a successful replacement
    second = save_model_dir(out, _model("sasrec"), VOCAB, version="v2")
    assert verify_model_dir(out).version == second.version == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_privacy_statement_round_trip(tmp_path: Path) -> None:
    privacy = PrivacyStatement(epsilon=2.5, delta=1e-5, accountant="prv", mechanism="dp-sgd")
    save_model_dir(tmp_path / "m", _model("mf"), VOCAB, privacy=privacy, round=3, parent="v0")
    meta = read_metadata(tmp_path / "m")
    assert meta.privacy == privacy and meta.round == 3 and meta.parent == "v0"
    assert "2.5" in privacy.describe() and "prv" in privacy.describe()
    assert PrivacyStatement().describe() == "not differentially private"


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "m"
    save_model_dir(out, _model("gru"), VOCAB)
    config = json.loads((out / CONFIG_FILE).read_text())
    config["model"]["dim"] = 16
    text = json.dumps(config)
    (out / CONFIG_FILE).write_text(text)
    meta = json.loads((out / METADATA_FILE).read_text())
    from shared.artifacts import sha256_file

    meta["files"][CONFIG_FILE] = sha256_file(out / CONFIG_FILE)  # a consistent but wrong dir
    (out / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="cannot rebuild"):
        load_model_dir(out)

"""The ONNX serving graph of every model kind against torch, in a real ONNX Runtime session."""

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import ModelError
from shared.models import MODEL_KINDS, build_model
from shared.models.popularity import Popularity
from shared.onnx_export import INPUT_NAMES, OUTPUT_NAMES, export_onnx, serving_top_k
from shared.sequences import pad_left

N_ITEMS = 150
MAX_LEN = 10
KINDS = sorted(MODEL_KINDS)
SMALL = {
    "gru": {"dim": 8, "hidden": 12},
    "sasrec": {"dim": 8, "n_heads": 2, "n_layers": 2},
    "mf": {"dim": 8},
    "pop": {},
}


def _model(kind: str) -> Any:
    torch.manual_seed(1)
    model: Any = build_model(kind, {"n_items": N_ITEMS, "max_len": MAX_LEN, **SMALL[kind]})
    if isinstance(model, Popularity):
        # distinct counts, so that the top-10 has no ties to order arbitrarily
        model.fit_counts(np.arange(1, N_ITEMS + 1).repeat(np.arange(1, N_ITEMS + 1)))
    else:
        with torch.no_grad():  # a trained-looking head: spread-out scores
            model.head.weight.normal_(0.0, 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in KINDS:
        model = _model(kind)
        path = tmp_path_factory.mktemp(kind) / "model.onnx"
        k = export_onnx(model, path)
        onnx.checker.check_model(str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out[kind] = (model, session, k)
    return out


def _torch_top(
    model: Any, items: np.ndarray, exclude: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        logits = model(torch.from_numpy(items))[:, -1].clone()  # (B, V)
    logits[:, 0] = float("-inf")
    for row, ex in enumerate(exclude):
        logits[row, ex[ex > 0]] = float("-inf")
    scores, ids = torch.topk(logits, k, dim=1)
    return scores.numpy(), ids.numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_graph_has_the_serving_signature(kind: str, sessions: dict[str, Any]) -> None:
    _, session, k = sessions[kind]
    assert [i.name for i in session.get_inputs()] == list(INPUT_NAMES)
    assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES)
    assert k == serving_top_k(N_ITEMS) == 100
    items_shape = session.get_inputs()[0].shape
    assert isinstance(items_shape[0], str) and isinstance(items_shape[1], str)  # dynamic


@pytest.mark.parametrize("kind", KINDS)
@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batch=st.integers(1, 5),
    seq_len=st.integers(1, MAX_LEN),
    n_exclude=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_onnx_matches_torch(
    kind: str,
    sessions: dict[str, Any],
    batch: int,
    seq_len: int,
    n_exclude: int,
    seed: int,
) -> None:
    # Arrange: left-padded histories of random lengths, exactly as serving builds them
    model, session, k = sessions[kind]
    rng = np.random.default_rng(seed)
    histories = [
        rng.integers(1, N_ITEMS + 1, size=rng.integers(1, seq_len + 1)) for _ in range(batch)
    ]
    items = pad_left(histories, seq_len)
    exclude = rng.integers(0, N_ITEMS + 1, size=(batch, n_exclude)).astype(np.int64)
    # Act
    scores, ids = session.run(None, {"items": items, "exclude": exclude})
    ref_scores, ref_ids = _torch_top(model, items, exclude, k)
    # Assert
    assert scores.shape == (batch, k) and ids.dtype == np.int64
    assert np.abs(scores - ref_scores).max() < 1e-4
    np.testing.assert_array_equal(ids[:, :10], ref_ids[:, :10])
    assert (ids > 0).all()  # padding is never recommended
    for row in range(batch):
        assert not set(ids[row].tolist()) & set(exclude[row][exclude[row] > 0].tolist())


@pytest.mark.parametrize("kind", KINDS)
def test_single_shopper_padded_to_max_len(kind: str, sessions: dict[str, Any]) -> None:
    model, session, k = sessions[kind]
    items = pad_left([np.array([5, 17, 3])], MAX_LEN)  # B=1, T=max_len, mostly padding
    exclude = np.zeros((1, 1), dtype=np.int64)
    scores, ids = session.run(None, {"items": items, "exclude": exclude})
    ref_scores, ref_ids = _torch_top(model, items, exclude, k)
    assert np.abs(scores - ref_scores).max() < 1e-4
    np.testing.assert_array_equal(ids[:, :10], ref_ids[:, :10])


def test_small_catalogue_exports_top_k_of_its_size(tmp_path: Path) -> None:
    model = build_model("mf", {"n_items": 7, "max_len": 4, "dim": 4}).eval()
    k = export_onnx(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    _, ids = session.run(
        None, {"items": np.array([[0, 1, 2, 3]]), "exclude": np.zeros((1, 1), dtype=np.int64)}
    )
    assert k == 7 and ids.shape == (1, 7)
    assert sorted(ids[0].tolist()) == list(range(1, 8))


def test_export_of_an_unexportable_module_is_a_model_error(tmp_path: Path) -> None:
    class Unexportable(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(2, 4)

        def encode(self, items: torch.Tensor) -> torch.Tensor:
            x = items.float()[..., None].expand(-1, -1, 2)  # (B, T, 2)
            return torch.linalg.eigvalsh(x[..., None] * x[..., None, :])  # no ONNX op

    with pytest.raises(ModelError, match="ONNX export"):
        export_onnx(Unexportable(), tmp_path / "u.onnx")
    with pytest.raises(ModelError, match="no encode"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "l.onnx")


@pytest.mark.parametrize("kind", KINDS)
def test_padding_is_masked_in_the_folded_bias_not_by_a_pass_over_the_scores(
    kind: str, tmp_path: Path
) -> None:
    # Arrange
    path = tmp_path / "model.onnx"
    export_onnx(_model(kind), path)
    graph = onnx.load(str(path)).graph
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    # Act: the node computing the catalogue's logits, and whatever reads its output
    (head,) = [
        n
        for n in graph.node
        if n.op_type == "Gemm"
        and len(n.input) == 3
        and constants.get(n.input[2], np.zeros(0)).shape == (N_ITEMS + 1,)
    ]
    readers = [n.op_type for n in graph.node if head.output[0] in n.input]
    # Assert: the bias is a constant with -inf at index 0, and the logits go straight on
    bias = constants[head.input[2]]
    assert bias.shape == (N_ITEMS + 1,)
    assert bias[0] == -np.inf and np.isfinite(bias[1:]).all()
    assert readers in (["ScatterElements"], ["Slice", "ScatterElements"])

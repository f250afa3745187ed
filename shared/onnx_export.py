"""ONNX export of any model as a serving graph: history in, top-k items out.

The graph is the serving contract between training (torch) and the edge (ONNX Runtime only):

- inputs:  ``items``   (B, T) int64, the shopper's recent items, left-padded with 0;
           ``exclude`` (B, E) int64, items that must not be recommended (0 = none).
- outputs: ``scores``  (B, K) float32, descending;
           ``item_ids`` (B, K) int64, model indices (vocab) of the top-K items.

B, T and E are dynamic; K is fixed at export (`SERVING_TOP_K`, or the catalogue size when
smaller) and recorded in the model's metadata. Padding (index 0) is never recommended.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from shared.errors import ModelError

if TYPE_CHECKING:
    from shared.models import SequentialModel

SERVING_TOP_K = 100
ONNX_OPSET = 18
INPUT_NAMES = ("items", "exclude")
OUTPUT_NAMES = ("scores", "item_ids")


class ServingGraph(nn.Module):
    """Wraps a sequential model: last-position logits, exclusions, top-k."""

    padding_mask: torch.Tensor  # (V,): -inf at the padding index, 0 elsewhere

    def __init__(self, model: SequentialModel, top_k: int) -> None:
        super().__init__()
        self.model = model
        self.top_k = top_k
        weight = model.head.weight
        mask = torch.zeros(model.head.out_features, dtype=weight.dtype, device=weight.device)
        mask[0] = float("-inf")
        self.register_buffer("padding_mask", mask, persistent=False)

    def forward(self, items: torch.Tensor, exclude: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, T), (B, E) int64 -> scores (B, K) float32, item ids (B, K) int64."""
        h = self.model.encode(items)[:, -1, :]  # (B, H)
        head = self.model.head
        # Padding is never an answer: its bias is -inf. Parameters and a buffer only, so the
        # exporter folds the sum into a constant and the graph makes no extra (B, V) pass.
        bias = self.padding_mask if head.bias is None else head.bias + self.padding_mask  # (V,)
        logits = nn.functional.linear(h, head.weight, bias)  # (B, V)
        neg_inf = torch.full_like(logits[:, :1], float("-inf"))  # (B, 1)
        logits = logits.scatter(1, exclude, neg_inf.expand(-1, exclude.shape[1]))  # (B, V)
        scores, ids = torch.topk(logits, self.top_k, dim=1)  # (B, K)
        return scores, ids


def serving_top_k(n_items: int, top_k: int = SERVING_TOP_K) -> int:
    """The K a graph is exported with for a catalogue of ``n_items``."""
    return max(1, min(top_k, n_items))


def export_onnx(model: nn.Module, path: Path, top_k: int = SERVING_TOP_K) -> int:
    """Write ``model`` as a single-file ONNX serving graph; returns the K it was built with.

    The TorchScript-based exporter is used on purpose: it takes ~0.1 s instead of ~10 s for
    the dynamo exporter, keeps weights inline (one file to hash and swap), and emits the ONNX
    GRU op with dynamic batch and sequence axes. Each received federated model is exported
    on the edge, so export time is paid every round.
    """
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear) or not callable(getattr(model, "encode", None)):
        raise ModelError(f"{type(model).__name__} has no encode() and linear head to export")
    n_items = int(head.out_features) - 1
    k = serving_top_k(n_items, top_k)
    graph = ServingGraph(cast("SequentialModel", model), k).eval()
    max_len = int(getattr(getattr(model, "config", None), "max_len", 50))
    items = torch.ones((2, max_len), dtype=torch.int64)
    exclude = torch.zeros((2, 1), dtype=torch.int64)
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter's deprecation notice, tracer notes on shape checks
            # inside nn.GRU, and its batch-size caution for GRU (the parity tests run other
            # batch sizes) are noise for every caller.
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined]
            warnings.filterwarnings("ignore", message=".*batch_size other than 1.*")
            torch.onnx.export(
                graph,
                (items, exclude),
                str(path),
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={
                    "items": {0: "batch", 1: "seq"},
                    "exclude": {0: "batch", 1: "n_exclude"},
                    "scores": {0: "batch"},
                    "item_ids": {0: "batch"},
                },
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
    except Exception as err:  # the exporter raises many unrelated types
        raise ModelError(f"ONNX export of {type(model).__name__} failed: {err}") from err
    return k

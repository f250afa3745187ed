"""The model's single-item attribution tables, saved in every model directory for explanations.

A recommendation answers "because you viewed X" by asking the model itself which item of the
shopper's history makes it score the recommended item highest on its own. For every item x
the table ``context`` holds the model's state after the one-item history ``[x]``
(``encode([[x]])[:, -1]``), and ``target`` holds the output layer's row of every item, so
``context[x] @ target[r]`` is the logit of r after x alone, minus r's bias (a constant for a
given r, which cannot change which history item wins). The edge (`edge_client.explain`)
needs only numpy to pick, for each recommended item, the history item with the largest such
logit.

File: ``explain.npz`` (uncompressed NumPy archive, no pickles) with two float16 arrays of
shape (n_items + 1, H); row 0 is padding (zero). float16 halves the file; the argmax it
feeds is insensitive to that rounding except between near-ties. Every model kind exports it:
for the popularity model both tables are zero (its scores do not depend on the history),
which the edge reads as "no item of the history explains this".
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shared.errors import ModelError

if TYPE_CHECKING:
    from torch import nn

EXPLAIN_FILE = "explain.npz"
CONTEXT = "context"
TARGET = "target"
_CHUNK = 4096  # items encoded per forward pass


def explanation_tables(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """``context`` and ``target`` (each (n_items + 1, H) float16) of a model in eval mode."""
    import torch
    from torch import nn

    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear) or not callable(getattr(model, "encode", None)):
        raise ModelError(f"{type(model).__name__} has no encode() and linear head to explain")
    n_rows = int(head.out_features)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            states = []
            for start in range(0, n_rows, _CHUNK):
                items = torch.arange(start, min(start + _CHUNK, n_rows)).unsqueeze(1)  # (C, 1)
                states.append(model.encode(items)[:, -1, :].float())  # type: ignore[operator]  # (C, H)
            context = torch.cat(states).cpu().numpy()  # (V, H)
            target = head.weight.detach().float().cpu().numpy()  # (V, H)
    finally:
        model.train(was_training)
    context[0] = 0.0  # padding is never a reason
    if context.shape != target.shape:
        raise ModelError(
            f"{type(model).__name__}: state size {context.shape} differs from the output "
            f"layer {target.shape}; single-item attribution needs both in the same space"
        )
    if not (np.isfinite(context).all() and np.isfinite(target).all()):
        raise ModelError(f"{type(model).__name__}: non-finite weights, cannot explain")
    return context.astype(np.float16), target.astype(np.float16)


def write_explanations(model: nn.Module, path: Path) -> None:
    """Write ``explain.npz`` for ``model`` at ``path`` (fsynced)."""
    import os

    context, target = explanation_tables(model)
    buffer = io.BytesIO()
    np.savez(buffer, context=context, target=target)  # names: CONTEXT, TARGET
    with path.open("wb") as fh:
        fh.write(buffer.getvalue())
        fh.flush()
        os.fsync(fh.fileno())


def read_explanations(data: bytes, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``explain.npz`` bytes; `ModelError` unless both tables are (n_items + 1, H)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            context = np.asarray(archive[CONTEXT])
            target = np.asarray(archive[TARGET])
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"{EXPLAIN_FILE} is not a valid archive of the two tables: {err}") from err
    for name, table in ((CONTEXT, context), (TARGET, target)):
        if table.ndim != 2 or table.shape[0] != n_items + 1 or table.dtype.kind != "f":
            raise ModelError(
                f"{EXPLAIN_FILE}: {name} has shape {table.shape} ({table.dtype}), expected "
                f"({n_items + 1}, H) floats"
            )
    if context.shape != target.shape:
        raise ModelError(f"{EXPLAIN_FILE}: {CONTEXT} and {TARGET} differ in shape")
    return context, target

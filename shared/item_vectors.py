"""Item vectors from public catalogue attributes, to initialise (and freeze) the item tables.

Under user-level DP the item tables are the hard part of a recommender: each item's row is
learned only from the few shoppers who bought it, while DP noise lands on every row
(docs/results.md, "what each lever buys"). The catalogue's attributes (Beauty: brand and
categories) are public, cost no privacy, and are shared by many items, so vectors built
from them carry the structure ("same brand", "same category") that DP-SGD cannot afford to
learn item by item.

`attribute_vectors` embeds each item's attribute set with a rank-``dim`` SVD of the
item x attribute matrix (each item's row L2-normalised, so the dot product of two items'
vectors approximates the cosine of their attribute sets, the best rank-``dim`` fit in the
least-squares sense); items without attributes get a zero vector. `init_item_tables`
writes them into a model's input table (``item_emb``) and/or output table (the ``head``'s
weight), scaled to mean row norm ``scale``. Row 0 (padding) stays zero. `attribute_mean`
lets a new item borrow a per-item quantity (a count, a learned bias) from the known items
that share its attributes (cold start, docs/cold_start.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.errors import DataError, ModelError
from shared.vocab import ItemVocab

TABLES = ("input", "output")


def read_item_attributes(path: Path) -> dict[str, list[str]]:
    """``{"item id": [attribute, ...]}`` JSON (S3-Rec's ``*_item2attributes.json`` or alike)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a readable item-attributes JSON file ({err})") from err
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise DataError(f'{path}: expected {{"item id": [attribute, ...], ...}}')
    return {str(k): [str(a) for a in v] for k, v in data.items()}


def attribute_matrix(
    vocab: ItemVocab, attributes: Mapping[str, Sequence[str]]
) -> tuple[np.ndarray, list[str]]:
    """(n_items + 1, A) rows L2-normalised (row 0 and items without attributes are zero)."""
    names = sorted({str(a) for item in vocab.item_ids for a in attributes.get(item, [])})
    if not names:
        raise DataError("no item of the catalogue has an attribute")
    column = {a: j for j, a in enumerate(names)}
    m = np.zeros((vocab.n_items + 1, len(names)), dtype=np.float64)
    for index, item in enumerate(vocab.item_ids, start=1):
        cols = sorted({column[str(a)] for a in attributes.get(item, [])})
        if cols:
            m[index, cols] = 1.0 / math.sqrt(len(cols))
    return m, names


def attribute_vectors(
    vocab: ItemVocab, attributes: Mapping[str, Sequence[str]], dim: int, scale: float = 1.0
) -> torch.Tensor:
    """(n_items + 1, dim) float32 item vectors from attributes, mean row norm ``scale``."""
    if dim < 1 or not scale > 0:
        raise DataError("dim must be >= 1 and scale > 0")
    m, _ = attribute_matrix(vocab, attributes)
    vectors = np.zeros((vocab.n_items + 1, dim), dtype=np.float64)
    scores = principal_scores(m[1:], dim)
    vectors[1:, : scores.shape[1]] = scores
    norms = np.linalg.norm(vectors[1:], axis=1)
    mean = norms[norms > 0].mean() if (norms > 0).any() else 1.0
    return torch.from_numpy(vectors * (scale / mean)).float()


def principal_scores(m: np.ndarray, k: int) -> np.ndarray:
    """(n, min(k, rank)) U_k S_k of m = U S V^T: the rows' coordinates on the top k axes.

    Computed from the eigendecomposition of the smaller Gram matrix (A x A or n x n), not a
    full SVD: on Beauty's 12,101 x 637 matrix 0.12 s against 0.9 s for ``np.linalg.svd``.
    The SVD also stalled for minutes inside Flower's simulation process, where each fork
    of Ray's processes stops OpenBLAS's thread pool mid-call (docs/results.md, § 5).
    Eigenvalues below ``1e-9`` of the largest are rank deficiency, not axes.
    """
    n, a = m.shape
    tall = a <= n
    eigvals, vectors = np.linalg.eigh(m.T @ m if tall else m @ m.T)  # ascending
    order = np.argsort(eigvals)[::-1][:k]
    keep = order[eigvals[order] > 1e-9 * max(float(eigvals.max()), 1e-300)]
    if tall:
        return np.asarray(m @ vectors[:, keep])  # m^T m = V S^2 V^T, and m V = U S
    return np.asarray(vectors[:, keep] * np.sqrt(eigvals[keep]))  # m m^T = U S^2 U^T


def init_item_tables(
    model: nn.Module,
    vocab: ItemVocab,
    attributes: Mapping[str, Sequence[str]],
    tables: Sequence[str] = TABLES,
    scale: float = 1.0,
) -> list[str]:
    """Write attribute vectors into the model's item tables; returns their parameter names.

    ``input`` is ``item_emb.weight`` (n_items + 1, dim), ``output`` is ``head.weight``
    (n_items + 1, hidden); each gets vectors of its own width.
    """
    unknown = sorted(set(tables) - set(TABLES))
    if unknown:
        raise ModelError(f"unknown item table(s) {unknown}; known: {', '.join(TABLES)}")
    targets = {"input": "item_emb", "output": "head"}
    names: list[str] = []
    with torch.no_grad():
        for table in tables:
            module = getattr(model, targets[table], None)
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                raise ModelError(f"{type(model).__name__} has no {targets[table]} table")
            if weight.shape[0] != vocab.n_items + 1:
                raise ModelError(
                    f"{targets[table]}.weight has {weight.shape[0]} rows, the catalogue "
                    f"{vocab.n_items} items + padding"
                )
            vectors = attribute_vectors(vocab, attributes, int(weight.shape[1]), scale)
            weight.copy_(vectors.to(weight.dtype))
            names.append(f"{targets[table]}.weight")
    return names


def attribute_mean(values: np.ndarray, known: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Per item, the mean over its attributes of the mean ``values`` of *known* items with it.

    How a new item (no interaction yet) borrows a per-item quantity, such as a popularity
    count or a learned output bias, from the known items that share its public attributes.
    ``values`` (V + 1,), ``known`` (V + 1,) bool, ``matrix`` the (V + 1, A) item x attribute
    matrix of `attribute_matrix` (nonzero = has the attribute). An item none of whose
    attributes a known item carries gets the mean over all known items.
    """
    values = np.asarray(values, dtype=np.float64)
    known = np.asarray(known, dtype=bool)
    if values.shape != known.shape or matrix.shape[0] != len(values):
        raise DataError("values, known and the attribute matrix must have one row per item")
    if not known.any():
        raise DataError("no known item to borrow from")
    has = (matrix != 0).astype(np.float64)  # (V + 1, A)
    known_has = has * known[:, None]
    carriers = known_has.sum(axis=0)  # (A,) known items with each attribute
    per_attribute = np.divide(
        known_has.T @ values, carriers, out=np.zeros(has.shape[1]), where=carriers > 0
    )
    usable = (carriers > 0).astype(np.float64)
    n = has @ usable  # (V + 1,) attributes of each item that some known item carries
    fallback = np.full(len(values), float(values[known].mean()))
    return np.divide(has @ (per_attribute * usable), n, out=fallback, where=n > 0)

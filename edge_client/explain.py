"""Why an item is recommended, in words a shopper understands: "because you viewed X".

The reason is derived from the served model (`shared.explanations`): for a recommended item
r and each item x of the shopper's model input, the model's logit of r after the one-item
history ``[x]`` is ``context[x] @ target[r]`` (plus r's bias, the same for every x). The
history item with the largest logit is the one that, on its own, makes the model recommend
r most; the reason names it and what the shopper did with it (viewed, added to the cart,
saved, bought, rated). Ties go to the most recent item; the recommended item itself is named
only when it is the shopper's only input. Numpy only: serving never loads torch.

A model whose scores ignore the history (the popularity model: zero tables) explains nothing
item by item; its items say so honestly (`history_free_reason`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

# What the shopper did with the item the reason names, newest event of that item first.
VERBS: Mapping[str, str] = {
    "view": "viewed {item}",
    "cart": "added {item} to your cart",
    "fav": "saved {item}",
    "purchase": "bought {item}",
    "rating": "rated {item}",
}


def because(item_id: str, event_type: str | None) -> str:
    """``because you viewed i3`` (the verb follows the shopper's latest event of the item)."""
    template = VERBS.get(event_type or "", "looked at {item}")
    return "because you " + template.format(item=item_id)


def history_free_reason(version: str) -> str:
    """Reason of a model whose scores do not depend on the shopper's history."""
    return f"popular with shoppers across stores (model {version})"


@dataclass(frozen=True, eq=False)
class ItemExplainer:
    """The served model's single-item attribution tables (rows = vocab indices)."""

    context: np.ndarray  # (V, H) float16: state after the one-item history [x]
    target: np.ndarray  # (V, H) float16: output-layer row of each item

    @cached_property
    def history_free(self) -> bool:
        """True when the model's scores cannot depend on the history (all-zero states).

        Cached: the scan reads the whole (V, H) table, ~5 ms at 50k items, once per model
        instead of once per request (measured with cProfile on `Recommender.recommend`).
        """
        return not bool(np.any(self.context))

    def attribute(self, history: np.ndarray, recommended: Sequence[int] | np.ndarray) -> np.ndarray:
        """For each recommended index, the position in ``history`` that explains it best.

        ``history`` holds the model input's vocab indices, oldest first (L,); returns (k,)
        positions into it. Each recommended item is attributed to the history item after
        which the model alone scores it highest; ties go to the most recent position, and an
        item is attributed to itself only when nothing else is in the history.
        """
        rec = np.asarray(recommended, dtype=np.int64)
        hist = np.asarray(history, dtype=np.int64)
        if len(hist) == 0 or len(rec) == 0:
            return np.zeros(len(rec), dtype=np.int64)
        ctx = self.context[hist].astype(np.float32)  # (L, H)
        tgt = self.target[rec].astype(np.float32)  # (k, H)
        scores = ctx @ tgt.T  # (L, k): logit of each recommended item after each item alone
        if len(hist) > 1:
            own = hist[:, None] == rec[None, :]  # (L, k): the recommended item itself
            others = ~own.all(axis=0)  # recommended items with another history item
            scores = np.where(own & others[None, :], -np.inf, scores)
        # argmax over the reversed history: equal scores go to the most recent position
        return (len(hist) - 1 - np.argmax(scores[::-1], axis=0)).astype(np.int64)

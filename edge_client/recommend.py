"""Real-time recommendations: the shopper's latest events through the served model.

Nothing is cached between requests: each answer reads the shopper's newest events from the
store, so an event accepted a moment ago already shapes the next answer. Without a model,
for a shopper the model cannot read, or to fill a short list, the answer is this site's most
popular items. Every item carries a short reason that says which of the two produced it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from edge_client.inference import LoadedModel, ModelServer, RankBatcher
from edge_client.store import EventStore

Source = Literal["model", "popularity", "model+popularity"]

# How many events are read beyond the model's window, when some of the newest events are
# of items the model does not know (they are dropped, as in training).
_HISTORY_OVERREAD = 8
_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class RecommendedItem:
    """One recommended item, its score and why it is recommended."""

    item_id: str
    score: float
    reason: str


@dataclass(frozen=True)
class Recommendation:
    """An answer: items best first; ``model_version`` is set when the model ranked any."""

    user_id: str
    items: list[RecommendedItem]
    model_version: str | None
    source: Source
    history_events: int  # events of this shopper the model read


def model_reason(version: str, n_events: int) -> str:
    """Reason text of a model-ranked item."""
    plural = "" if n_events == 1 else "s"
    return f"next-item model {version}, from your last {n_events} event{plural}"


def popularity_reason(n_events: int) -> str:
    """Reason text of a popularity item (cold start or fill-in)."""
    plural = "" if n_events == 1 else "s"
    return f"popular at this store ({n_events} event{plural})"


class Recommender:
    """Combines the event store and the model server into top-k answers."""

    def __init__(self, store: EventStore, models: ModelServer | None = None) -> None:
        self.store = store
        self.models = models

    def history(self, model: LoadedModel, user_id: str) -> np.ndarray:
        """The shopper's newest events the model knows, as vocab indices, oldest first.

        Items outside the vocabulary are dropped before cutting to ``max_len``, exactly as
        `shared.sequences.build_sequences` does for training.
        """
        limit = model.max_len
        raw = self.store.history(user_id, limit)
        known = model.known(raw)
        if len(known) < limit and len(raw) == limit:
            known = model.known(self.store.history(user_id, limit * _HISTORY_OVERREAD))
        return known[-limit:]

    def _prepare(
        self, user_id: str, exclude_purchased: bool
    ) -> tuple[LoadedModel | None, np.ndarray, np.ndarray, set[str]]:
        """The model snapshot, the shopper's model input, the exclusions, the purchases."""
        model = self.models.current if self.models is not None else None
        purchased = self.store.purchased_items(user_id) if exclude_purchased else set()
        if model is None:
            return None, _EMPTY, _EMPTY, purchased
        return model, self.history(model, user_id), model.known(purchased), purchased

    def _finish(
        self,
        user_id: str,
        k: int,
        model: LoadedModel | None,
        n_history: int,
        ranked: tuple[np.ndarray, np.ndarray] | None,
        purchased: set[str],
    ) -> Recommendation:
        """Model items first (best first), then popular items to fill ``k``."""
        items: list[RecommendedItem] = []
        if model is not None and ranked is not None:
            reason = model_reason(model.version, n_history)
            names = model.item_ids
            for score, idx in zip(ranked[0].tolist(), ranked[1].tolist(), strict=True):
                if not math.isfinite(score) or len(items) == k:
                    break  # excluded items come last, scored -inf
                items.append(RecommendedItem(names[idx - 1], score, reason))
        from_model = len(items)
        if len(items) < k:
            taken = purchased | {item.item_id for item in items}
            for item_id, n in self.store.popularity(k - len(items), exclude=taken):
                items.append(RecommendedItem(item_id, float(n), popularity_reason(n)))
        if from_model == 0:
            source: Source = "popularity"
        elif from_model == len(items):
            source = "model"
        else:
            source = "model+popularity"
        return Recommendation(
            user_id=user_id,
            items=items,
            model_version=model.version if model is not None and from_model else None,
            source=source,
            history_events=n_history,
        )

    def recommend(
        self, user_id: str, k: int = 10, *, exclude_purchased: bool = True
    ) -> Recommendation:
        """The top ``k`` items for ``user_id`` now; purchased items excluded by default."""
        model, history, exclude, purchased = self._prepare(user_id, exclude_purchased)
        ranked = model.rank(history, exclude) if model is not None and len(history) else None
        return self._finish(user_id, k, model, len(history), ranked, purchased)

    async def recommend_batched(
        self, batcher: RankBatcher, user_id: str, k: int = 10, *, exclude_purchased: bool = True
    ) -> Recommendation:
        """`recommend`, with the inference shared with concurrent requests (same answer)."""
        model, history, exclude, purchased = self._prepare(user_id, exclude_purchased)
        ranked = None
        if model is not None and len(history):
            ranked = await batcher.rank(model, history, exclude)
        return self._finish(user_id, k, model, len(history), ranked, purchased)

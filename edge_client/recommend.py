"""Real-time recommendations: the shopper's latest events through the served model.

No shopper's answer is cached between requests: each reads the shopper's newest events
from the store, so an event accepted a moment ago already shapes the next answer. Without a
model, for a shopper the model cannot read, or to fill a short list, the answer is this
site's most popular items, recent ones first when a window is set (`edge_client.popularity`).
Every item carries a reason a shopper understands: for model items the item of their
history that the model credits (`edge_client.explain`: "because you viewed X"), for popular
items the store's event count.

During an A/B experiment (`edge_client.ab_serving`) the shopper's arm model ranks instead of
the served version; every answer is recorded as an impression (`edge_client.outcomes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from edge_client.explain import because, history_free_reason
from edge_client.inference import LoadedModel, ModelServer, RankBatcher
from edge_client.popularity import SitePopularity
from edge_client.store import EventStore

if TYPE_CHECKING:
    from edge_client.ab_serving import ArmAssignment, ExperimentServing
    from edge_client.outcomes import ImpressionLog

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
    experiment_id: str | None = None  # the A/B experiment the shopper is in, if any
    arm: str | None = None  # ... and the arm's name


@dataclass(frozen=True)
class _Plan:
    """What an answer is computed from: the model (and arm), its input, the exclusions."""

    model: LoadedModel | None
    history: np.ndarray  # vocab indices the model reads, oldest first
    exclude: np.ndarray
    purchased: set[str]
    arm: ArmAssignment | None = None
    # (item_id, event_type) of the events the history was cut from, newest first: what
    # the reasons say the shopper did with an item, without reading the store again.
    window: list[tuple[str, str]] = field(default_factory=list)
    # what the graph reads: ``history`` itself, or a multi-behaviour model's tokens
    model_input: np.ndarray = field(default_factory=lambda: _EMPTY)


def model_reason(version: str, n_events: int) -> str:
    """Reason text of a model-ranked item when the model directory has no explanations."""
    plural = "" if n_events == 1 else "s"
    return f"next-item model {version}, from your last {n_events} event{plural}"


class Recommender:
    """Combines the event store and the model server into top-k answers."""

    def __init__(
        self,
        store: EventStore,
        models: ModelServer | None = None,
        *,
        experiments: ExperimentServing | None = None,
        impressions: ImpressionLog | None = None,
        popularity: SitePopularity | None = None,
    ) -> None:
        self.store = store
        self.models = models
        self.popularity = popularity or SitePopularity(store)
        self.experiments = experiments
        self.impressions = impressions

    def history(self, model: LoadedModel, user_id: str) -> np.ndarray:
        """The shopper's newest events the model knows, as vocab indices, oldest first."""
        return self._window(model, user_id)[0]

    def _window(
        self, model: LoadedModel, user_id: str
    ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
        """`history`, what the graph reads for it, and the newest events it was cut from.

        Items outside the vocabulary are dropped before cutting to ``max_len``, exactly as
        `shared.sequences.build_sequences` does for training; when that leaves the input
        short, a deeper window is read once.
        """
        limit = model.max_len
        window = self.store.recent_items(user_id, limit)
        known, inputs = model.model_input(window[::-1])
        if len(known) < limit and len(window) == limit:
            window = self.store.recent_items(user_id, limit * _HISTORY_OVERREAD)
            known, inputs = model.model_input(window[::-1])
        return known[-limit:], inputs[-limit:], window

    def _prepare(self, user_id: str, exclude_purchased: bool) -> _Plan:
        """The model snapshot (the shopper's A/B arm's, if any), its input, the exclusions."""
        model = self.models.current if self.models is not None else None
        arm = None
        if self.experiments is not None:
            assigned = self.experiments.assign(user_id)
            if assigned is not None:
                arm, model = assigned
        purchased = self.store.purchased_items(user_id) if exclude_purchased else set()
        if model is None:
            return _Plan(None, _EMPTY, _EMPTY, purchased, arm)
        history, inputs, window = self._window(model, user_id)
        return _Plan(model, history, model.known(purchased), purchased, arm, window, inputs)

    def _reasons(self, model: LoadedModel, plan: _Plan, recommended: list[int]) -> list[str]:
        """A shopper-readable reason per recommended index, from the model's own tables."""
        history = plan.history
        explainer = model.explainer
        if explainer is None:
            return [model_reason(model.version, len(history))] * len(recommended)
        if explainer.history_free:
            return [history_free_reason(model.version)] * len(recommended)
        names = model.item_ids
        credited = [names[history[p] - 1] for p in explainer.attribute(history, recommended)]
        kinds: dict[str, str] = {}
        for item, kind in plan.window:  # newest first: the latest event of each item wins
            kinds.setdefault(item, kind)
        return [because(item, kinds.get(item)) for item in credited]

    def _finish(
        self,
        user_id: str,
        k: int,
        plan: _Plan,
        ranked: tuple[np.ndarray, np.ndarray] | None,
    ) -> Recommendation:
        """Model items first (best first), then popular items to fill ``k``."""
        model, purchased = plan.model, plan.purchased
        items: list[RecommendedItem] = []
        if model is not None and ranked is not None:
            names = model.item_ids
            picked: list[tuple[float, int]] = []
            for score, idx in zip(ranked[0].tolist(), ranked[1].tolist(), strict=True):
                if not math.isfinite(score) or len(picked) == k:
                    break  # excluded items come last, scored -inf
                picked.append((score, idx))
            reasons = self._reasons(model, plan, [i for _, i in picked])
            for (score, idx), reason in zip(picked, reasons, strict=True):
                items.append(RecommendedItem(names[idx - 1], score, reason))
        from_model = len(items)
        if len(items) < k:
            taken = purchased | {item.item_id for item in items}
            for item_id, n, reason in self.popularity.top(k - len(items), exclude=taken):
                items.append(RecommendedItem(item_id, float(n), reason))
        if from_model == 0:
            source: Source = "popularity"
        elif from_model == len(items):
            source = "model"
        else:
            source = "model+popularity"
        arm = plan.arm
        rec = Recommendation(
            user_id=user_id,
            items=items,
            model_version=model.version if model is not None and from_model else None,
            source=source,
            history_events=len(plan.history),
            experiment_id=arm.experiment_id if arm is not None else None,
            arm=arm.arm_name if arm is not None else None,
        )
        if self.impressions is not None:
            self.impressions.record(
                user_id,
                [item.item_id for item in items],
                source=source,
                model_version=rec.model_version or "",
                experiment_id=arm.experiment_id if arm is not None else "",
                arm=arm.arm if arm is not None else -1,
            )
        return rec

    def recommend(
        self, user_id: str, k: int = 10, *, exclude_purchased: bool = True
    ) -> Recommendation:
        """The top ``k`` items for ``user_id`` now; purchased items excluded by default."""
        plan = self._prepare(user_id, exclude_purchased)
        model = plan.model
        ranked = None
        if model is not None and len(plan.history):
            ranked = model.rank(plan.model_input, plan.exclude)
        return self._finish(user_id, k, plan, ranked)

    async def recommend_batched(
        self, batcher: RankBatcher, user_id: str, k: int = 10, *, exclude_purchased: bool = True
    ) -> Recommendation:
        """`recommend`, with the inference shared with concurrent requests (same answer)."""
        plan = self._prepare(user_id, exclude_purchased)
        ranked = None
        if plan.model is not None and len(plan.history):
            ranked = await batcher.rank(plan.model, plan.model_input, plan.exclude)
        return self._finish(user_id, k, plan, ranked)

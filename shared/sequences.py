"""Per-shopper sequences, the leave-one-out split and left-padded model inputs.

Sequences are stored in CSR form (one flat array plus offsets) so that a million shoppers
cost three numpy arrays, not a million Python lists. Model inputs are always left-padded to
the model's ``max_len`` (index 0 = padding), in training, evaluation and serving alike, so a
shopper's history gives the same answer everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from shared.errors import DataError
from shared.events import EVENT_TYPE_CODES, check_event_frame, sort_events
from shared.vocab import PAD_INDEX, ItemVocab


@dataclass(frozen=True)
class UserSequences:
    """Chronological item sequences of many shoppers (CSR: ``offsets`` into flat arrays)."""

    user_ids: tuple[str, ...]
    offsets: np.ndarray  # (U + 1,) int64
    items: np.ndarray  # (N,) int64 vocab indices, never PAD_INDEX
    event_types: np.ndarray  # (N,) int8 codes of EVENT_TYPE_CODES
    ts_ms: np.ndarray  # (N,) int64

    def __post_init__(self) -> None:
        n = len(self.items)
        if len(self.offsets) != len(self.user_ids) + 1 or self.offsets[0] != 0:
            raise DataError("sequence offsets do not match the users")
        if self.offsets[-1] != n or len(self.event_types) != n or len(self.ts_ms) != n:
            raise DataError("sequence arrays have inconsistent lengths")

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def lengths(self) -> np.ndarray:
        """Number of events of each shopper, (U,) int64."""
        return np.diff(self.offsets)

    @property
    def n_events(self) -> int:
        """Total number of events over all shoppers."""
        return int(self.offsets[-1])

    def items_of(self, u: int) -> np.ndarray:
        """The item indices of shopper number ``u`` in time order."""
        return self.items[self.offsets[u] : self.offsets[u + 1]]

    def item_lists(self) -> list[np.ndarray]:
        """Each shopper's items as its own array (views, no copy)."""
        return np.split(self.items, self.offsets[1:-1])

    def event_type_lists(self) -> list[np.ndarray]:
        """Each shopper's event-type codes as its own array (views, no copy)."""
        return np.split(self.event_types, self.offsets[1:-1])

    def token_lists(self, n_items: int) -> list[np.ndarray]:
        """Each shopper's `behaviour_tokens` (the inputs of a multi-behaviour model)."""
        tokens = behaviour_tokens(self.items, self.event_types, n_items)
        return np.split(tokens, self.offsets[1:-1])

    def select(self, users: np.ndarray) -> UserSequences:
        """The sequences of the shoppers at positions ``users`` (an int array)."""
        starts, ends = self.offsets[users], self.offsets[users + 1]
        lengths = ends - starts
        return self._take(tuple(self.user_ids[i] for i in users), _ranges(starts, lengths), lengths)

    def truncate(self, drop_last: int) -> UserSequences:
        """Every sequence without its last ``drop_last`` events (shoppers left empty stay)."""
        lengths = np.maximum(self.lengths - drop_last, 0)
        return self._take(self.user_ids, _ranges(self.offsets[:-1], lengths), lengths)

    def prefixes(self, lengths: np.ndarray) -> UserSequences:
        """Every sequence cut to its first ``lengths[u]`` events ((U,) int, each <= its length)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if len(lengths) != len(self) or (lengths < 0).any() or (lengths > self.lengths).any():
            raise DataError("prefix lengths must be one per shopper, within each sequence")
        return self._take(self.user_ids, _ranges(self.offsets[:-1], lengths), lengths)

    def without_items(self, drop: np.ndarray) -> UserSequences:
        """Every sequence without the events of the items flagged in ``drop`` ((V + 1,) bool).

        Shoppers left empty stay (as in `truncate`); what remains keeps its order.
        """
        keep = ~drop[self.items]
        owner = np.repeat(np.arange(len(self)), self.lengths)[keep]
        return self._take(self.user_ids, keep, np.bincount(owner, minlength=len(self)))

    def _take(
        self, user_ids: tuple[str, ...], take: np.ndarray, lengths: np.ndarray
    ) -> UserSequences:
        """The events at ``take`` (indices or a mask), ``lengths[k]`` of them for shopper k."""
        return UserSequences(
            user_ids=user_ids,
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            items=self.items[take],
            event_types=self.event_types[take],
            ts_ms=self.ts_ms[take],
        )


N_BEHAVIOURS = len(EVENT_TYPE_CODES)  # the codes 1..N of a multi-behaviour model's tokens
PURCHASE_CODE = EVENT_TYPE_CODES["purchase"]


def behaviour_tokens(items: np.ndarray, event_types: np.ndarray, n_items: int) -> np.ndarray:
    """Item and event type in one input id: ``item + (n_items + 1) * code`` (int64).

    Code 0 (no type known) leaves the item id itself; padding (item 0, code 0) stays 0.
    """
    return np.asarray(items, dtype=np.int64) + (n_items + 1) * np.asarray(
        event_types, dtype=np.int64
    )


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each pair, vectorised."""
    if len(lengths) == 0 or lengths.sum() == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    flat = np.arange(ends[-1], dtype=np.int64)
    return flat - np.repeat(ends - lengths, lengths) + np.repeat(starts, lengths)


def build_sequences(events: pd.DataFrame, vocab: ItemVocab) -> UserSequences:
    """Group an event log into per-shopper sequences over ``vocab``.

    Events of items outside the vocabulary are dropped (a model cannot score them); shoppers
    are ordered by id and ties in time keep input order, so the result is deterministic.
    """
    check_event_frame(events)
    ordered = sort_events(events)
    items = vocab.encode(ordered["item_id"].astype(str), unknown=PAD_INDEX)
    keep = items != PAD_INDEX
    ordered, items = ordered[keep], items[keep]
    users = ordered["user_id"].astype(str).to_numpy()
    if len(users) == 0:
        return UserSequences((), np.zeros(1, np.int64), items, np.zeros(0, np.int8), items.copy())
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    offsets = np.r_[starts, len(users)].astype(np.int64)
    codes = ordered["event_type"].map(EVENT_TYPE_CODES).to_numpy(dtype=np.int8)
    return UserSequences(
        user_ids=tuple(users[starts]),
        offsets=offsets,
        items=items.astype(np.int64),
        event_types=codes,
        ts_ms=ordered["ts_ms"].to_numpy(dtype=np.int64),
    )


@dataclass(frozen=True)
class EvalSet:
    """Next-item targets with the history the model sees (and that ranking masks)."""

    histories: UserSequences
    targets: np.ndarray  # (U,) int64

    def __len__(self) -> int:
        return len(self.targets)


@dataclass(frozen=True)
class DataSplit:
    """Training sequences plus validation and test targets."""

    train: UserSequences
    valid: EvalSet
    test: EvalSet
    kind: str


def leave_one_out(seqs: UserSequences, min_events: int = 3) -> DataSplit:
    """Last event = test, second-last = validation, the rest = training (S3-Rec protocol).

    Shoppers with fewer than ``min_events`` events are kept for training only.
    """
    if min_events < 3:
        raise DataError("leave-one-out needs at least 3 events per evaluated shopper")
    lengths = seqs.lengths
    evaluated = np.flatnonzero(lengths >= min_events)
    short = np.flatnonzero(lengths < min_events)
    ev = seqs.select(evaluated)
    last = ev.offsets[1:] - 1
    train_part = ev.truncate(2)
    train = _concat(train_part, seqs.select(short)) if len(short) else train_part
    return DataSplit(
        train=train,
        valid=EvalSet(histories=train_part, targets=ev.items[last - 1]),
        test=EvalSet(histories=ev.truncate(1), targets=ev.items[last]),
        kind="leave-one-out",
    )


def _concat(a: UserSequences, b: UserSequences) -> UserSequences:
    return UserSequences(
        user_ids=a.user_ids + b.user_ids,
        offsets=np.concatenate([a.offsets, a.offsets[-1] + b.offsets[1:]]),
        items=np.concatenate([a.items, b.items]),
        event_types=np.concatenate([a.event_types, b.event_types]),
        ts_ms=np.concatenate([a.ts_ms, b.ts_ms]),
    )


def pad_left(sequences: list[np.ndarray], length: int) -> np.ndarray:
    """Stack the last ``length`` entries of each sequence, left-padded with 0: (B, length)."""
    out = np.zeros((len(sequences), length), dtype=np.int64)
    for row, seq in enumerate(sequences):
        tail = seq[-length:] if length else seq[:0]
        if len(tail):
            out[row, length - len(tail) :] = tail
    return out


def next_item_examples(
    train: UserSequences, max_len: int, behaviour_items: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One training example per shopper: inputs and next-item targets, each (U, max_len).

    Position t of the targets is the item that followed input position t; padded positions
    have target 0, which the loss ignores. Shoppers with fewer than two events give nothing.
    With ``behaviour_items`` (a multi-behaviour model's ``n_items``) the inputs are its
    `behaviour_tokens`; the targets stay item indices.
    """
    lists = train.item_lists()
    sources = train.token_lists(behaviour_items) if behaviour_items else lists
    kept = [i for i, s in enumerate(lists) if len(s) >= 2]
    inputs = pad_left([sources[i][:-1] for i in kept], max_len)
    targets = pad_left([lists[i][1:] for i in kept], max_len)
    return inputs, targets


def serving_input(history: np.ndarray, max_len: int) -> np.ndarray:
    """The model input for one shopper's history (oldest first): (1, max_len), left-padded.

    Training, evaluation and the edge all build inputs this way (`pad_left`), so the same
    history gives the same scores in torch and in ONNX Runtime.
    """
    return pad_left([np.asarray(history, dtype=np.int64)], max_len)


# A real ms timestamp is after 1995 (see shared.cleaning); order-only positions are tiny.
_ORDER_ONLY_CEILING_MS = 10**11  # 1973-03-03


def _prefix(seqs: UserSequences, lengths: np.ndarray) -> UserSequences:
    """Each sequence cut to its first ``lengths[u]`` events."""
    take = _ranges(seqs.offsets[:-1], lengths)
    return UserSequences(
        user_ids=seqs.user_ids,
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        items=seqs.items[take],
        event_types=seqs.event_types[take],
        ts_ms=seqs.ts_ms[take],
    )


def _first_at_or_after(seqs: UserSequences, t_ms: int) -> np.ndarray:
    """Per shopper, the number of its events before ``t_ms`` (sequences are time-sorted)."""
    before = np.r_[0, np.cumsum(seqs.ts_ms < t_ms)].astype(np.int64)
    return before[seqs.offsets[1:]] - before[seqs.offsets[:-1]]


def temporal_split(
    seqs: UserSequences,
    t_valid_ms: int,
    t_test_ms: int,
    *,
    timestamps: str,
    min_history: int = 1,
) -> DataSplit:
    """Global time split: train before ``t_valid_ms``, then one validation and one test target.

    - train: every shopper's events with ``ts < t_valid_ms``;
    - validation: each shopper's first event in ``[t_valid_ms, t_test_ms)``, with all of its
      earlier events as history;
    - test: each shopper's first event at or after ``t_test_ms``, with all earlier events
      (validation window included) as history.

    Shoppers whose history would be shorter than ``min_history`` are not evaluated.
    ``timestamps`` is the dataset's `EventDataset.timestamps`; order-only positions are refused.
    """
    if timestamps != "real":
        raise DataError(
            "a time-based split needs wall-clock timestamps; this dataset only has the order "
            "of events (use leave_one_out)"
        )
    if len(seqs.ts_ms) and int(seqs.ts_ms.max()) < _ORDER_ONLY_CEILING_MS:
        raise DataError(
            "timestamps look like positions, not milliseconds (all before 1973); "
            "a time-based split needs wall-clock timestamps"
        )
    if not t_valid_ms < t_test_ms:
        raise DataError(f"t_valid ({t_valid_ms}) must be before t_test ({t_test_ms})")
    if min_history < 1:
        raise DataError("min_history must be at least 1")
    lengths = seqs.lengths
    n_train = _first_at_or_after(seqs, t_valid_ms)
    n_before_test = _first_at_or_after(seqs, t_test_ms)
    train_all = _prefix(seqs, n_train)
    nonempty = np.flatnonzero(n_train > 0)
    train = train_all.select(nonempty) if len(nonempty) < len(seqs) else train_all

    valid_users = np.flatnonzero((n_before_test > n_train) & (n_train >= min_history))
    test_users = np.flatnonzero((lengths > n_before_test) & (n_before_test >= min_history))
    return DataSplit(
        train=train,
        valid=EvalSet(
            histories=_prefix(seqs, n_train).select(valid_users),
            targets=seqs.items[seqs.offsets[valid_users] + n_train[valid_users]],
        ),
        test=EvalSet(
            histories=_prefix(seqs, n_before_test).select(test_users),
            targets=seqs.items[seqs.offsets[test_users] + n_before_test[test_users]],
        ),
        kind="temporal",
    )


def time_split_points(
    seqs: UserSequences, valid_quantile: float = 0.8, test_quantile: float = 0.9
) -> tuple[int, int]:
    """``(t_valid_ms, t_test_ms)`` at the given quantiles of all event timestamps."""
    if not 0.0 < valid_quantile < test_quantile < 1.0:
        raise DataError("need 0 < valid_quantile < test_quantile < 1")
    if seqs.n_events == 0:
        raise DataError("no events to choose split times from")
    t_valid, t_test = np.quantile(seqs.ts_ms, [valid_quantile, test_quantile], method="higher")
    if not t_valid < t_test:
        raise DataError(
            f"the {valid_quantile:.0%} and {test_quantile:.0%} time quantiles coincide; "
            "choose quantiles further apart"
        )
    return int(t_valid), int(t_test)

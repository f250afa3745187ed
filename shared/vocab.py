"""The item vocabulary: raw catalogue ids <-> model indices, with 0 reserved for padding.

The vocabulary is part of every model (saved beside its weights) and is public: it is the
product catalogue, not anybody's behaviour. The same items always get the same indices: ids
are sorted numerically when every id is an integer, otherwise as strings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from shared.errors import VocabError

PAD_INDEX = 0
PAD_TOKEN = "<pad>"
VOCAB_FORMAT = 1


def _numeric_key(raw: str) -> tuple[int, str, str]:
    """Numeric order for digit strings of any length (no int conversion, no overflow)."""
    stripped = raw.lstrip("0")
    return (len(stripped), stripped, raw)


class ItemVocab:
    """An immutable mapping between raw item ids (str) and indices 1..n_items."""

    def __init__(self, item_ids: Sequence[str]) -> None:
        ids = [str(i) for i in item_ids]
        if len(set(ids)) != len(ids):
            raise VocabError("item vocabulary has duplicate ids")
        if PAD_TOKEN in ids:
            raise VocabError(f"{PAD_TOKEN!r} is reserved for padding")
        self._ids: tuple[str, ...] = tuple(ids)
        self._index: dict[str, int] = {raw: i + 1 for i, raw in enumerate(self._ids)}

    @classmethod
    def from_items(cls, item_ids: Iterable[str]) -> ItemVocab:
        """Build the canonical vocabulary of a set of items (deterministic order)."""
        unique = sorted({str(i) for i in item_ids})
        if unique and all(i.isdigit() for i in unique):
            unique.sort(key=_numeric_key)
        return cls(unique)

    @property
    def n_items(self) -> int:
        """Catalogue size, padding excluded; models have ``n_items + 1`` output rows."""
        return len(self._ids)

    def __len__(self) -> int:
        return len(self._ids) + 1

    def __contains__(self, raw_id: object) -> bool:
        return raw_id in self._index

    @property
    def item_ids(self) -> tuple[str, ...]:
        """Raw ids in index order (index 1 first)."""
        return self._ids

    def index(self, raw_id: str) -> int:
        """The index of one raw id; raises `VocabError` when unknown."""
        try:
            return self._index[raw_id]
        except KeyError as err:
            raise VocabError(f"unknown item id {raw_id!r}") from err

    def encode(self, raw_ids: Iterable[str], unknown: int | None = None) -> np.ndarray:
        """Indices of ``raw_ids`` (int64); unknown ids map to ``unknown`` or raise."""
        get = self._index.get
        out = []
        for raw in raw_ids:
            idx = get(raw)
            if idx is None:
                if unknown is None:
                    raise VocabError(f"unknown item id {raw!r}")
                idx = unknown
            out.append(idx)
        return np.asarray(out, dtype=np.int64)

    def decode(self, indices: Iterable[int]) -> list[str]:
        """Raw ids of model indices; padding and out-of-range indices raise."""
        out = []
        for i in indices:
            if not 1 <= int(i) <= len(self._ids):
                raise VocabError(f"index {int(i)} is not an item (1..{len(self._ids)})")
            out.append(self._ids[int(i) - 1])
        return out

    def to_json(self) -> str:
        """Canonical JSON text; its sha256 identifies the vocabulary."""
        return json.dumps({"format": VOCAB_FORMAT, "items": list(self._ids)}, separators=(",", ":"))

    @property
    def sha256(self) -> str:
        """Hash of the canonical JSON: equal vocabularies have equal hashes."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str) -> ItemVocab:
        """Parse `to_json` output; raises `VocabError` on anything else."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise VocabError(f"vocabulary is not valid JSON: {err}") from err
        if not isinstance(data, dict) or data.get("format") != VOCAB_FORMAT:
            raise VocabError("vocabulary JSON has no supported 'format' field")
        items = data.get("items")
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise VocabError("vocabulary JSON 'items' must be a list of strings")
        return cls(items)

    def save(self, path: Path) -> None:
        """Write the canonical JSON to ``path``."""
        path.write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> ItemVocab:
        """Read a vocabulary written by `save`."""
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise VocabError(f"cannot read vocabulary {path}: {err}") from err

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ItemVocab) and self._ids == other._ids

    def __hash__(self) -> int:
        return hash(self._ids)

    def __repr__(self) -> str:
        return f"ItemVocab(n_items={self.n_items}, sha256={self.sha256[:12]})"

"""The impression log: what `ImpressionLog.flush` writes is exactly what was recorded."""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from edge_client.outcomes import ImpressionLog

# Wider than the ids the service accepts (ID_PATTERN): unicode, quotes, digit-only and
# JSON-looking text. Left out: NUL (SQLite's JSON functions end a string there) and lone
# surrogates (not UTF-8: sqlite3 refuses to bind them on any path); no id can hold either.
CHARS = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))
TEXT = st.text(CHARS, min_size=1, max_size=20)
IMPRESSION = st.tuples(
    st.integers(min_value=0, max_value=2**62),
    TEXT,
    st.lists(TEXT, min_size=1, max_size=12),
    st.sampled_from(["model", "popularity", "model+popularity"]),
    st.text(CHARS, max_size=10),
    st.text(CHARS, max_size=10),
    st.integers(min_value=-1, max_value=3),
)


def _stored(db: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        heads = conn.execute(
            "SELECT id, shown_ms, user_id, source, model_version, experiment_id, arm "
            "FROM rec_impressions ORDER BY id"
        ).fetchall()
        items = conn.execute(
            "SELECT impression_id, position, item_id FROM rec_impression_items "
            "ORDER BY impression_id, position"
        ).fetchall()
    by_id: dict[int, list[str]] = {}
    for rid, _, item in items:
        by_id.setdefault(rid, []).append(item)
    return [(*h, by_id.get(h[0], [])) for h in heads]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(IMPRESSION, max_size=6), min_size=1, max_size=3))
def test_flushes_store_every_impression_exactly_with_consecutive_ids(
    flushes: list[list[tuple[int, str, list[str], str, str, str, int]]],
) -> None:
    # Arrange
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "site.db"
        log = ImpressionLog(db)
        expected: list[tuple[object, ...]] = []
        # Act: several flushes, so ids must continue from what is already stored
        for batch in flushes:
            for shown, user, items, source, version, experiment, arm in batch:
                log.record(
                    user,
                    items,
                    source=source,
                    model_version=version,
                    experiment_id=experiment,
                    arm=arm,
                    shown_ms=shown,
                )
                expected.append(
                    (len(expected) + 1, shown, user, source, version, experiment, arm, items)
                )
            assert log.flush() == len(batch)
        log.close()
        # Assert: same values and types (no JSON text left in a column), items in order
        assert _stored(db) == expected
        assert log.pending == 0

"""Online, WAL-safe backups of the SQLite files (site.db, coordinator.db, superlink.db).

Copying a live SQLite file with ``cp`` can produce a corrupt copy: in WAL mode the newest
committed transactions live in ``-wal`` until a checkpoint. SQLite's online backup API
copies a consistent snapshot through a read transaction instead — writers are not blocked
in WAL mode, and the copy holds every transaction committed before the backup started.
The copy is written to a temporary file, checked with ``PRAGMA integrity_check``, fsynced
and renamed into place, so a backup file that exists is complete.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deploy.errors import DeployError


@dataclass(frozen=True)
class BackupResult:
    """Where a backup went, how big it is and that it passed the integrity check."""

    source: str
    destination: str
    bytes: int
    pages: int
    seconds: float
    integrity: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def backup_sqlite(source: Path, destination: Path) -> BackupResult:
    """Copy a live SQLite database to ``destination`` with the online backup API.

    Raises `DeployError` when the source cannot be read or the copy fails its integrity
    check (the partial copy is removed).
    """
    if not source.is_file():
        raise DeployError(f"{source} does not exist")
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(f".{destination.name}.partial")
    tmp.unlink(missing_ok=True)
    started = time.perf_counter()
    try:
        # Read-only URI: the backup never creates, migrates or writes the source.
        src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            dst = sqlite3.connect(tmp)
            try:
                src.backup(dst)  # one step: a single consistent snapshot
                pages = int(dst.execute("PRAGMA page_count").fetchone()[0])
                integrity = str(dst.execute("PRAGMA integrity_check").fetchone()[0])
                dst.execute("PRAGMA journal_mode=DELETE")  # a self-contained single file
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as err:
        tmp.unlink(missing_ok=True)
        raise DeployError(f"backup of {source} failed: {err}") from err
    if integrity != "ok":
        tmp.unlink(missing_ok=True)
        raise DeployError(f"backup of {source} failed its integrity check: {integrity}")
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    tmp.replace(destination)
    dir_fd = os.open(destination.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return BackupResult(
        source=str(source),
        destination=str(destination),
        bytes=destination.stat().st_size,
        pages=pages,
        seconds=round(time.perf_counter() - started, 3),
        integrity=integrity,
    )


def backup_name(source: Path, when: dt.datetime | None = None) -> str:
    """``<parent>-<stem>-<UTC timestamp>.db``, e.g. ``store-01-site-20261128T101500Z.db``."""
    stamp = (when or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{source.resolve().parent.name}-{source.stem}-{stamp}.db"


def prune_backups(directory: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` backups of each database in ``directory``."""
    if keep < 1:
        raise DeployError(f"keep must be at least 1, got {keep}")
    groups: dict[str, list[Path]] = {}
    for path in directory.glob("*.db"):
        prefix = path.stem.rsplit("-", 1)[0]
        groups.setdefault(prefix, []).append(path)
    removed = []
    for paths in groups.values():
        for old in sorted(paths)[:-keep]:
            old.unlink()
            removed.append(old)
    return removed

"""The upload journal: a durable record of checkpoint uploads promised and finished.

One SQLite database per run, `upload-journal.sqlite3` in the run's out dir, in WAL mode. The
uploader records an intent (where the checkpoint lies, its digest, where it goes) before it
queues the upload, and marks it published once the checkpoint is verified and the manifest
and `latest` point at it. An intent still open after the process died is an upload to redo:
`loopbridge resume OUT_DIR`, or the uploader itself when the run starts again, finishes it.

WAL with `synchronous=NORMAL` makes each commit durable against the process dying (SIGKILL,
OOM, preemption), which is the failure this journal is for, without an fsync per commit.
There is no index beyond the primary key: each commit then writes one page, which is what the
training thread waits for, and the open intents are read once per run (a scan of a few rows).
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from loopbridge._exceptions import JournalError
from loopbridge._types import ManifestRow

__all__ = ["JOURNAL_FILE", "UploadIntent", "UploadJournal", "find_journals"]

JOURNAL_FILE = "upload-journal.sqlite3"
_APPLICATION_ID = 0x4C42524A  # "LBRJ": tells our journal from any other SQLite file
_SCHEMA_VERSION = 2  # 2: store_options column, no secondary index

_SCHEMA = """
CREATE TABLE IF NOT EXISTS intents (
    id           INTEGER PRIMARY KEY,
    dest         TEXT    NOT NULL,
    run_prefix   TEXT    NOT NULL,
    step         INTEGER NOT NULL,
    path         TEXT    NOT NULL,
    size_bytes   INTEGER NOT NULL,
    digest       TEXT,
    created_at   REAL    NOT NULL,
    is_final     INTEGER NOT NULL,
    run_name     TEXT    NOT NULL,
    store_options TEXT   NOT NULL DEFAULT '{}',
    state        TEXT    NOT NULL CHECK (state IN ('pending', 'published', 'failed')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    error        TEXT,
    recorded_at  REAL    NOT NULL,
    finished_at  REAL
);
"""


@dataclass(frozen=True, slots=True)
class UploadIntent:
    """One recorded upload: the checkpoint, where it goes, and how far it got.

    `store_options` are what reopening the store needs besides `dest` (such as
    `endpoint_url`), never credentials.
    """

    id: int
    dest: str
    run_prefix: str
    row: ManifestRow
    state: str
    attempts: int
    error: str | None
    store_options: dict[str, str]


class UploadJournal:
    """A run's upload journal; safe to use from the loop thread and the bridge thread."""

    def __init__(self, path: Path, *, exclusive: bool = True) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # Held while open, so `loopbridge resume` cannot abort the uploads of a live run;
        # the kernel lets go of it when the process dies, even by SIGKILL.
        self._owner = _claim(path) if exclusive else None
        existed = path.exists() and path.stat().st_size > 0
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            self._release()
            raise JournalError(_unreadable(path, exc)) from exc
        self._lock = threading.Lock()
        try:
            self._open(existed)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            self._release()
            raise JournalError(_unreadable(path, exc)) from exc
        except JournalError:
            self._db.close()
            self._release()
            raise

    def _open(self, existed: bool) -> None:
        db = self._db
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        if existed and app_id == 0:
            # Created by a process that died before it wrote our id: empty, so still new.
            existed = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0
        if existed and app_id != _APPLICATION_ID:
            msg = (
                f"{self.path} is not a loopbridge upload journal (application_id {app_id:#x}); "
                f"move it aside, or point loopbridge at the run's own out dir"
            )
            raise JournalError(msg)
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if existed and version != _SCHEMA_VERSION:
            msg = (
                f"{self.path} is an upload journal of schema {version}, and this loopbridge "
                f"reads schema {_SCHEMA_VERSION}; resume it with the loopbridge that wrote it"
            )
            raise JournalError(msg)
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA journal_mode=WAL")
        if not existed:
            # One WAL transaction (no fsync at NORMAL): the journal is created in ~15 ms, not 25.
            db.executescript(
                f"BEGIN; PRAGMA application_id={_APPLICATION_ID};"
                f" PRAGMA user_version={_SCHEMA_VERSION}; {_SCHEMA} COMMIT;"
            )

    def __enter__(self) -> UploadJournal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database (the WAL is folded back into it) and let go of the claim."""
        with self._lock:
            self._db.close()
        self._release()

    def _release(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.close()  # closing the descriptor drops the flock

    def record_intent(
        self,
        dest: str,
        run_prefix: str,
        row: ManifestRow,
        store_options: Mapping[str, str] | None = None,
    ) -> int:
        """Durably record that `row` is to be uploaded to `dest`; return the intent's id."""
        options = json.dumps(dict(store_options), sort_keys=True) if store_options else "{}"
        cursor = self._execute(
            "record an upload intent",
            "INSERT INTO intents (dest, run_prefix, step, path, size_bytes, digest,"
            " created_at, is_final, run_name, store_options, state, recorded_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?)",
            (
                dest,
                run_prefix,
                row.step,
                str(row.path),
                row.size_bytes,
                row.digest,
                row.created_at,
                int(row.is_final),
                row.run_name,
                options,
                time.time(),
            ),
        )
        intent_id = cursor.lastrowid
        if intent_id is None:  # pragma: no cover - sqlite always sets it after an INSERT
            raise JournalError(f"{self.path}: the intent was not recorded")
        return intent_id

    def mark_attempt(self, intent_id: int) -> None:
        """Count one more attempt at an intent."""
        self._execute(
            "count an upload attempt",
            "UPDATE intents SET attempts = attempts + 1 WHERE id = ?",
            (intent_id,),
        )

    def set_digest(self, intent_id: int, digest: str) -> None:
        """Record an intent's digest, known only once its upload had read the checkpoint."""
        self._execute(
            "record a checkpoint digest",
            "UPDATE intents SET digest = ? WHERE id = ? AND digest IS NULL",
            (digest, intent_id),
        )

    def mark_published(self, intent_id: int) -> None:
        """Record that the intent's checkpoint is published and verified."""
        self._execute(
            "mark an upload published",
            "UPDATE intents SET state = 'published', error = NULL, finished_at = ? WHERE id = ?",
            (time.time(), intent_id),
        )

    def mark_failed(self, intent_id: int, error: str) -> None:
        """Record that an attempt failed; the intent stays open for a later resume."""
        self._execute(
            "mark an upload failed",
            "UPDATE intents SET state = 'failed', error = ?, finished_at = ? WHERE id = ?",
            (error[:2000], time.time(), intent_id),
        )

    def _execute(self, what: str, sql: str, args: tuple[object, ...] = ()) -> sqlite3.Cursor:
        """Run one statement under the lock; a database error becomes a JournalError."""
        with self._lock:
            try:
                return self._db.execute(sql, args)
            except sqlite3.Error as exc:
                msg = f"{self.path}: could not {what} ({exc}); check the disk and the file"
                raise JournalError(msg) from exc

    def open_intents(self) -> list[UploadIntent]:
        """The intents not yet published, oldest first: what a resume has to finish."""
        return self._select("WHERE state != 'published' ORDER BY id")

    def intents(self) -> list[UploadIntent]:
        """Every intent, oldest first."""
        return self._select("ORDER BY id")

    def _select(self, where: str) -> list[UploadIntent]:
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT id, dest, run_prefix, step, path, size_bytes, digest, created_at,"
                    " is_final, run_name, state, attempts, error, store_options"
                    f" FROM intents {where}"
                ).fetchall()
            except sqlite3.Error as exc:
                raise JournalError(_unreadable(self.path, exc)) from exc
        return [
            UploadIntent(
                id=r[0],
                dest=r[1],
                run_prefix=r[2],
                row=ManifestRow(
                    step=r[3],
                    path=Path(r[4]),
                    size_bytes=r[5],
                    digest=r[6],
                    created_at=r[7],
                    is_final=bool(r[8]),
                    run_name=r[9],
                ),
                state=r[10],
                attempts=r[11],
                error=r[12],
                store_options=_options(r[13]),
            )
            for r in rows
        ]


def _claim(path: Path) -> IO[str]:
    """Take the journal's lock file, or say which process holds it."""
    lock_path = path.with_name(path.name + ".lock")
    handle = lock_path.open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        msg = (
            f"{path} is in use by a running process ({holder}); resume its uploads only "
            f"once that process has ended (its own run finishes them)"
        )
        raise JournalError(msg) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def find_journals(out_dir: Path) -> Iterator[Path]:
    """Every upload journal at or below `out_dir` (an experiment holds one per run)."""
    yield from sorted(out_dir.rglob(JOURNAL_FILE))


def _options(text: str) -> dict[str, str]:
    """Store options read back from their JSON column; anything unexpected is dropped."""
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): str(v) for k, v in data.items() if isinstance(v, str)}


def _unreadable(path: Path, exc: BaseException) -> str:
    return (
        f"{path} cannot be read as an upload journal ({exc}); it is corrupt or not a "
        f"journal. Move it aside; the checkpoints it recorded are still listed in the run's "
        f"manifest.jsonl"
    )

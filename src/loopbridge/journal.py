"""The upload journal: a durable record of checkpoint uploads promised and finished.

One SQLite database per run, `upload-journal.sqlite3` in the run's out dir, in WAL mode. The
uploader records an intent (where the checkpoint lies, its digest, where it goes) before it
queues the upload, and marks it published once the checkpoint is verified and the manifest
and `latest` point at it. An intent still open after the process died is an upload to redo:
`loopbridge resume OUT_DIR`, or the uploader itself when the run starts again, finishes it.

WAL with `synchronous=NORMAL` makes each commit durable against the process dying (SIGKILL,
OOM, preemption), which is the failure this journal is for, without an fsync per commit.
Checkpoint paths are stored relative to the journal's directory when they lie under it
(absolute otherwise), so a journal resumes from any working directory, and after its out dir
was moved or copied whole.

There is no index beyond the primary key: each commit then writes one page, which is what
the training thread waits for, and the open intents are read once per run (a scan of a few
rows).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from loopbridge._exceptions import JournalError
from loopbridge._types import ManifestRow

__all__ = [
    "JOURNAL_FILE",
    "UploadIntent",
    "UploadJournal",
    "find_journals",
    "journal_file",
    "journal_rank",
]

JOURNAL_FILE = "upload-journal.sqlite3"
_RANK_JOURNAL = re.compile(r"upload-journal\.rank-(\d{5,})\.sqlite3")
_APPLICATION_ID = 0x4C42524A  # "LBRJ": tells our journal from any other SQLite file
# While a process has the journal open, the main file says so ("LBRO"), checkpointed at open;
# close() sets "LBRJ" back. A main file that says "open" with no -wal file beside it was
# copied or moved without its write-ahead log, which holds the records since it was opened.
_APPLICATION_ID_OPEN = 0x4C42524F
_OURS = (_APPLICATION_ID, _APPLICATION_ID_OPEN)
_WAL_MODE = 2  # the SQLite header's read/write version bytes in WAL mode
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

    def __init__(self, path: Path, *, exclusive: bool = True, holder: str | None = None) -> None:
        self.path = path = Path(path).absolute()
        self._dir_prefix = os.path.join(str(path.parent), "")  # with its trailing separator
        self._last_options: tuple[dict[str, str], str] | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        # Held while open, so `loopbridge resume` cannot abort the uploads of a live run;
        # the kernel lets go of it when the process dies, even by SIGKILL.
        self._owner = _claim(path, holder or _default_holder()) if exclusive else None
        existed = path.exists() and path.stat().st_size > 0
        if existed:
            try:
                _check_wal_present(path)
            except JournalError:
                self._release()
                raise
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
        if existed and app_id not in _OURS:
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
                f"BEGIN; PRAGMA application_id={_APPLICATION_ID_OPEN};"
                f" PRAGMA user_version={_SCHEMA_VERSION}; {_SCHEMA} COMMIT;"
            )
        else:
            db.execute(f"PRAGMA application_id={_APPLICATION_ID_OPEN}")
        # Into the main file, so that a copy of it alone shows it was open (see _OURS).
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        # The first commit into an empty WAL writes its header and fdatasyncs it (even at
        # NORMAL): done now, at open, rather than by the first intent on the training thread.
        db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    def __enter__(self) -> UploadJournal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database (the WAL is folded back into it) and let go of the claim."""
        with self._lock:
            # A read-only or broken journal: closing is what matters here.
            with contextlib.suppress(sqlite3.Error):
                self._db.execute(f"PRAGMA application_id={_APPLICATION_ID}")
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
        options = self._options_json(store_options)
        cursor = self._execute(
            "record an upload intent",
            "INSERT INTO intents (dest, run_prefix, step, path, size_bytes, digest,"
            " created_at, is_final, run_name, store_options, state, recorded_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?)",
            (
                dest,
                run_prefix,
                row.step,
                self._stored_path(row.path),
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

    def _options_json(self, store_options: Mapping[str, str] | None) -> str:
        """The store options as stored; an uploader's are the same each time, so kept."""
        if not store_options:
            return "{}"
        last = self._last_options
        if last is not None and last[0] == store_options:
            return last[1]
        options = dict(store_options)
        text = json.dumps(options, sort_keys=True)
        self._last_options = (options, text)
        return text

    def _stored_path(self, path: Path) -> str:
        """`path` relative to the journal's directory when under it, else absolute.

        String operations, not pathlib's: this runs on the training thread per checkpoint,
        and `Path.absolute().relative_to()` cost about 10 µs of it.
        """
        text = os.fspath(path)
        if not os.path.isabs(text):
            text = os.path.join(os.getcwd(), text)
        inside = self._dir_prefix
        return text[len(inside) :] if text.startswith(inside) else text

    def _read_path(self, text: str) -> Path:
        """A stored path, absolute: relative ones are relative to the journal's directory.

        Journals written before paths were stored this way hold paths relative to the
        working directory of the run (`runs/a/checkpoints/step-1`); the longest tail of such
        a path that exists under the journal's directory is taken.
        """
        stored = Path(text)
        if stored.is_absolute():
            return stored
        base = self.path.parent
        candidate = base / stored
        if not candidate.exists():
            for i in range(1, len(stored.parts)):
                legacy = base.joinpath(*stored.parts[i:])
                if legacy.exists():
                    return legacy
        return candidate

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

    def withdraw(self, intent_id: int) -> None:
        """Remove an intent no longer wanted (a later run superseded its step)."""
        self._execute("withdraw an upload intent", "DELETE FROM intents WHERE id = ?", (intent_id,))

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
                    path=self._read_path(r[4]),
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


RESUME_HOLDER = "loopbridge resume"


def _default_holder() -> str:
    """Who holds a journal by default: a run, and the command that started it."""
    command = " ".join(sys.argv)[:200] or "python"
    return f"a training run: {command}"


def _claim(path: Path, holder: str) -> IO[str]:
    """Take the journal's lock file, or say which process holds it and what it is."""
    lock_path = path.with_name(path.name + ".lock")
    handle = lock_path.open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid, _, what = handle.read().strip().partition(" ")
        handle.close()
        who = f"pid {pid}" if pid.isdigit() else "another process"
        if what.startswith(RESUME_HOLDER):
            msg = (
                f"{path} is held by another `loopbridge resume` ({who}), which is finishing "
                f"its uploads now; wait for it to end (or stop it: kill {pid}), then run "
                f"resume again if it reports anything left"
            )
        else:
            what = what or "a process that has the journal open"
            msg = (
                f"{path} is in use by a running process ({who}: {what}); resume its "
                f"uploads only once that process has ended (its own run finishes them)"
            )
        raise JournalError(msg) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} {holder}\n")
    handle.flush()
    return handle


def _check_wal_present(path: Path) -> None:
    """Refuse a journal whose main file was copied or moved without its -wal file."""
    try:
        with path.open("rb") as f:
            header = f.read(100)
    except OSError:
        return  # sqlite reports what is wrong with the file
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        return
    wal_mode = header[18] == _WAL_MODE
    app_id = int.from_bytes(header[68:72], "big")
    wal = path.with_name(path.name + "-wal")
    if wal_mode and app_id in (0, _APPLICATION_ID_OPEN) and not wal.exists():
        msg = (
            f"{path} was not closed by the process that wrote it, and its write-ahead log "
            f"{wal.name} is missing: the records since it was opened are in that file, so "
            f"this copy would look as if nothing were open. Copy {wal.name} (and {path.name}) "
            f"from where the run wrote them, side by side, then resume again"
        )
        raise JournalError(msg)


MAX_DEPTH = 4
"""How far below the out dir journals are looked for: a run's own out dir is depth 0, and
an experiment's runs sit a few levels below its directory."""


def journal_file(rank: int = 0) -> str:
    """The journal's file name for a rank: JOURNAL_FILE for rank 0 (and one process).

    Sharded ranks that share one out dir (Lightning's `default_root_dir`) each keep their
    own journal there: rank r > 0 writes `upload-journal.rank-0000r.sqlite3`.
    """
    return JOURNAL_FILE if rank == 0 else f"upload-journal.rank-{rank:05d}.sqlite3"


def journal_rank(path: Path) -> int | None:
    """The rank a journal file belongs to by its name (0 for JOURNAL_FILE); None if no journal."""
    if path.name == JOURNAL_FILE:
        return 0
    match = _RANK_JOURNAL.fullmatch(path.name)
    return int(match.group(1)) if match else None


def find_journals(out_dir: Path, max_depth: int = MAX_DEPTH) -> Iterator[Path]:
    """Every upload journal at most `max_depth` directories below `out_dir`.

    Sorted by directory; within one, the other ranks' journals come before rank 0's (the
    publisher of a sharded step). Hidden directories and symlinked ones are not entered;
    unreadable ones are skipped.
    """
    found: list[tuple[Path, bool, int, Path]] = []
    root = Path(out_dir)
    base_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        for name in filenames:
            rank = journal_rank(Path(name))
            if rank is not None:
                found.append((here, rank == 0, rank, here / name))
        if len(here.parts) - base_depth >= max_depth:
            dirnames.clear()
        else:
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    for *_, path in sorted(found):
        yield path


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

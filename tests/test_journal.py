"""The upload journal: durable intents, their states, and refusal of files that are not ours."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from loopbridge._exceptions import JournalError
from loopbridge._types import ManifestRow
from loopbridge.journal import (
    JOURNAL_FILE,
    RESUME_HOLDER,
    UploadJournal,
    find_journals,
    journal_file,
    journal_rank,
)


def _row(step: int, tmp_path: Path, *, final: bool = False) -> ManifestRow:
    return ManifestRow(
        step=step,
        path=tmp_path / f"step-{step:08d}",
        size_bytes=100 + step,
        digest=f"sha256:{step:064x}",
        created_at=1000.0 + step,
        is_final=final,
        run_name="run-a",
    )


class TestIntents:
    def test_an_intent_reads_back_as_recorded(self, tmp_path: Path) -> None:
        """Every field of the row, the destination and the store options come back unchanged."""
        with UploadJournal(tmp_path / JOURNAL_FILE) as journal:
            row = _row(3, tmp_path, final=True)
            intent_id = journal.record_intent(
                "s3://b/p", "p/run-a", row, {"endpoint_url": "http://127.0.0.1:9"}
            )
            (intent,) = journal.intents()
        assert intent.id == intent_id
        assert (intent.dest, intent.run_prefix, intent.row) == ("s3://b/p", "p/run-a", row)
        assert (intent.state, intent.attempts, intent.error) == ("pending", 0, None)
        assert intent.store_options == {"endpoint_url": "http://127.0.0.1:9"}

    def test_each_intent_keeps_the_store_options_it_was_given(self, tmp_path: Path) -> None:
        """Options that change between intents (the same dict changed, a new one, none) are
        stored as each intent had them."""
        options = {"endpoint_url": "http://127.0.0.1:9"}
        given: list[dict[str, str] | None] = []
        with UploadJournal(tmp_path / JOURNAL_FILE) as journal:
            for step in range(1, 6):
                if step == 2:
                    options["region"] = "eu-west-1"  # the same dict, changed
                if step == 3:
                    options = {"endpoint_url": "http://127.0.0.1:8"}
                current = None if step == 5 else options
                given.append(None if current is None else dict(current))
                journal.record_intent("s3://b/p", "p", _row(step, tmp_path), current)
            stored = [intent.store_options for intent in journal.intents()]
        assert stored == [g or {} for g in given]

    def test_states_move_from_pending_to_failed_to_published(self, tmp_path: Path) -> None:
        """A failed intent stays open with its error; a published one leaves the open list."""
        with UploadJournal(tmp_path / JOURNAL_FILE) as journal:
            first = journal.record_intent("file:///r", "run-a", _row(1, tmp_path))
            second = journal.record_intent("file:///r", "run-a", _row(2, tmp_path))
            journal.mark_attempt(first)
            journal.mark_failed(first, "PermanentStoreError: refused")
            journal.mark_attempt(second)
            journal.mark_published(second)
            assert [(i.id, i.state, i.attempts) for i in journal.intents()] == [
                (first, "failed", 1),
                (second, "published", 1),
            ]
            (still_open,) = journal.open_intents()
            assert still_open.error == "PermanentStoreError: refused"
            journal.mark_attempt(first)
            journal.mark_published(first)
            assert journal.open_intents() == []
            assert journal.intents()[0].error is None

    def test_open_intents_come_oldest_first(self, tmp_path: Path) -> None:
        """Resume order is recording order, so a run's checkpoints publish in step order."""
        with UploadJournal(tmp_path / JOURNAL_FILE) as journal:
            for step in (5, 6, 7):
                journal.record_intent("file:///r", "run-a", _row(step, tmp_path))
            assert [i.row.step for i in journal.open_intents()] == [5, 6, 7]

    def test_two_threads_record_without_losing_an_intent(self, tmp_path: Path) -> None:
        """The loop thread records while the bridge thread marks; nothing is lost."""
        with UploadJournal(tmp_path / JOURNAL_FILE) as journal:
            ids: list[int] = []

            def record() -> None:
                ids.extend(
                    journal.record_intent("file:///r", "run-a", _row(s, tmp_path))
                    for s in range(200)
                )

            thread = threading.Thread(target=record)
            thread.start()
            thread.join(30)
            for intent_id in ids[:100]:
                journal.mark_published(intent_id)
            assert len(journal.intents()) == 200
            assert len(journal.open_intents()) == 100


class TestDurability:
    def test_intents_survive_the_process_being_killed(self, tmp_path: Path) -> None:
        """A process that records and dies by SIGKILL leaves its intent readable (WAL)."""
        path = tmp_path / JOURNAL_FILE
        script = (
            "import os, signal, sys\n"
            "from pathlib import Path\n"
            "from loopbridge.journal import UploadJournal\n"
            "from loopbridge._types import ManifestRow\n"
            "j = UploadJournal(Path(sys.argv[1]))\n"
            "row = ManifestRow(step=9, path=Path('/x'), size_bytes=1, digest=None,"
            " created_at=0.0)\n"
            "j.record_intent('file:///r', 'run', row)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script, str(path)], check=False, capture_output=True, timeout=60
        )
        assert done.returncode == -9, done.stderr.decode()
        with UploadJournal(path) as journal:
            assert [i.row.step for i in journal.open_intents()] == [9]

    def test_reopening_keeps_what_was_recorded(self, tmp_path: Path) -> None:
        """A journal closed and opened again has the same intents and states."""
        path = tmp_path / JOURNAL_FILE
        with UploadJournal(path) as journal:
            journal.mark_published(journal.record_intent("file:///r", "run", _row(1, tmp_path)))
            journal.record_intent("file:///r", "run", _row(2, tmp_path))
        with UploadJournal(path) as journal:
            assert [(i.row.step, i.state) for i in journal.intents()] == [
                (1, "published"),
                (2, "pending"),
            ]


class TestOpenStartsTheWal:
    """Opening writes the WAL's header, whose first write SQLite fdatasyncs even at NORMAL:
    the first intent (on the training thread, at the first checkpoint) then only appends."""

    def test_a_new_journal(self, tmp_path: Path) -> None:
        path = tmp_path / JOURNAL_FILE
        with UploadJournal(path):
            assert path.with_name(JOURNAL_FILE + "-wal").stat().st_size > 0

    def test_a_reopened_journal(self, tmp_path: Path) -> None:
        path = tmp_path / JOURNAL_FILE
        with UploadJournal(path) as journal:
            journal.record_intent("file:///r", "run", _row(3, tmp_path))
        with UploadJournal(path) as journal:
            assert path.with_name(JOURNAL_FILE + "-wal").stat().st_size > 0
            assert [i.row.step for i in journal.open_intents()] == [3]


class TestRefusals:
    def test_garbage_bytes_are_a_journal_error_naming_the_file(self, tmp_path: Path) -> None:
        """A corrupt file is refused with its path and what to do, not a sqlite3 traceback."""
        path = tmp_path / JOURNAL_FILE
        path.write_bytes(b"\x00garbage, not a database\xff" * 200)
        with pytest.raises(JournalError, match="cannot be read as an upload journal") as info:
            UploadJournal(path)
        assert str(path) in str(info.value)
        assert "Move it aside" in str(info.value)

    def test_a_foreign_sqlite_file_is_refused_and_left_alone(self, tmp_path: Path) -> None:
        """Another program's SQLite database is not ours: refused, and not modified."""
        path = tmp_path / JOURNAL_FILE
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE notes (text TEXT)")
        db.commit()
        db.close()
        before = path.read_bytes()
        with pytest.raises(JournalError, match="is not a loopbridge upload journal"):
            UploadJournal(path)
        assert path.read_bytes() == before

    def test_another_schema_version_is_refused(self, tmp_path: Path) -> None:
        """A journal of another schema says which loopbridge can resume it."""
        path = tmp_path / JOURNAL_FILE
        UploadJournal(path).close()
        db = sqlite3.connect(path)
        db.execute("PRAGMA user_version=99")
        db.close()
        with pytest.raises(JournalError, match="schema 99"):
            UploadJournal(path)

    def test_a_closed_journal_raises_journal_error(self, tmp_path: Path) -> None:
        """Writing after close is a JournalError naming the file, not a bare sqlite3 error."""
        journal = UploadJournal(tmp_path / JOURNAL_FILE)
        journal.close()
        with pytest.raises(JournalError, match="could not record an upload intent"):
            journal.record_intent("file:///r", "run", _row(1, tmp_path))


class TestFinding:
    def test_find_journals_walks_an_experiment(self, tmp_path: Path) -> None:
        """Every run's journal below the directory is found, sorted, and nothing else."""
        for run in ("b", "a/x"):
            UploadJournal(tmp_path / run / JOURNAL_FILE).close()
        (tmp_path / "other.sqlite3").write_bytes(b"")
        assert list(find_journals(tmp_path)) == [
            tmp_path / "a/x" / JOURNAL_FILE,
            tmp_path / "b" / JOURNAL_FILE,
        ]

    def test_every_ranks_journal_in_a_shared_out_dir_is_found_rank_zero_last(
        self, tmp_path: Path
    ) -> None:
        """Sharded ranks sharing an out dir: each rank's journal, the publisher's after them."""
        assert journal_file(0) == JOURNAL_FILE
        assert journal_file(1) == "upload-journal.rank-00001.sqlite3"
        for rank in (0, 2, 1):
            UploadJournal(tmp_path / "out" / journal_file(rank)).close()
        UploadJournal(tmp_path / "solo" / JOURNAL_FILE).close()
        (tmp_path / "out" / "upload-journal.rank-x.sqlite3").write_bytes(b"")
        found = list(find_journals(tmp_path))
        assert found == [
            tmp_path / "out" / journal_file(1),
            tmp_path / "out" / journal_file(2),
            tmp_path / "out" / JOURNAL_FILE,
            tmp_path / "solo" / JOURNAL_FILE,
        ]
        assert [journal_rank(path) for path in found] == [1, 2, 0, 0]
        assert journal_rank(tmp_path / "upload-journal.rank-x.sqlite3") is None


class TestOwnership:
    """A journal is claimed by the process that has it open, until that process ends."""

    def test_second_opener_is_refused_with_the_holder_named(self, tmp_path: Path) -> None:
        """Another process cannot open a journal this one holds; the error names our pid."""
        path = tmp_path / JOURNAL_FILE
        with UploadJournal(path):
            code = (
                "import sys\n"
                "from pathlib import Path\n"
                "from loopbridge.journal import UploadJournal\n"
                "from loopbridge._exceptions import JournalError\n"
                "try:\n"
                f"    UploadJournal(Path({str(path)!r}))\n"
                "except JournalError as exc:\n"
                "    print(exc)\n"
                "    sys.exit(3)\n"
            )
            proc = subprocess.run(
                [sys.executable, "-c", code],
                check=False,
                capture_output=True,
                text=True,
                timeout=60,
            )
        assert proc.returncode == 3, proc.stderr
        assert "in use by a running process" in proc.stdout
        assert f"pid {os.getpid()}" in proc.stdout

    def test_claim_ends_when_the_holder_is_killed(self, tmp_path: Path) -> None:
        """A journal held by a process killed with SIGKILL can be opened at once after."""
        path = tmp_path / JOURNAL_FILE
        code = (
            "import sys\n"
            "from pathlib import Path\n"
            "from loopbridge.journal import UploadJournal\n"
            f"journal = UploadJournal(Path({str(path)!r}))\n"
            "print('held', flush=True)\n"
            "sys.stdin.read()\n"
        )
        holder = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "held"
            with pytest.raises(JournalError, match="in use by a running process"):
                UploadJournal(path)
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=30)
        finally:
            if holder.poll() is None:
                holder.kill()
            for stream in (holder.stdin, holder.stdout):
                if stream is not None:
                    stream.close()
        with UploadJournal(path) as journal:
            assert journal.open_intents() == []

    def test_close_lets_go(self, tmp_path: Path) -> None:
        """While open, a second opener is refused; once closed, it opens and reads the record."""
        path = tmp_path / JOURNAL_FILE
        first = UploadJournal(path)
        first.record_intent("file:///r", "run", _row(1, tmp_path))
        with pytest.raises(JournalError, match="in use by a running process"):
            UploadJournal(path)
        first.close()
        with UploadJournal(path) as again:
            assert [i.row.step for i in again.open_intents()] == [1]


_KILLED_WRITER = (
    "import os, signal, sys\n"
    "from pathlib import Path\n"
    "from loopbridge.journal import UploadJournal\n"
    "from loopbridge._types import ManifestRow\n"
    "j = UploadJournal(Path(sys.argv[1]))\n"
    "for step in (1, 2):\n"
    "    row = ManifestRow(step=step, path=Path('/x'), size_bytes=1, digest=None,"
    " created_at=0.0)\n"
    "    j.record_intent('file:///r', 'run', row)\n"
    "os.kill(os.getpid(), signal.SIGKILL)\n"
)


def _killed_writer(path: Path) -> None:
    """A process records two intents in `path` and dies by SIGKILL, leaving the -wal file."""
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(path)],
        check=False,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == -9, done.stderr.decode()


class TestCopiedWithoutWal:
    """A journal whose main file travelled without its -wal file is refused, saying so."""

    def test_main_file_alone_is_refused_naming_the_wal(self, tmp_path: Path) -> None:
        """Copied alone after a crash, the journal says its -wal file is missing, not 'nothing'."""
        original = tmp_path / "run" / JOURNAL_FILE
        original.parent.mkdir()
        _killed_writer(original)
        wal = original.with_name(JOURNAL_FILE + "-wal")
        assert wal.exists()
        copy = tmp_path / "copy" / JOURNAL_FILE
        copy.parent.mkdir()
        shutil.copy(original, copy)
        with pytest.raises(JournalError) as info:
            UploadJournal(copy)
        message = str(info.value)
        assert f"{copy} was not closed by the process that wrote it" in message
        assert f"{JOURNAL_FILE}-wal is missing" in message
        assert "Copy" in message
        assert not copy.with_name(JOURNAL_FILE + "-wal").exists()  # left as found
        shutil.copy(wal, copy.with_name(JOURNAL_FILE + "-wal"))
        with UploadJournal(copy) as journal:
            assert [i.row.step for i in journal.open_intents()] == [1, 2]

    def test_a_cleanly_closed_journal_travels_alone(self, tmp_path: Path) -> None:
        """After close(), the main file holds everything and needs no -wal file."""
        original = tmp_path / "run" / JOURNAL_FILE
        with UploadJournal(original) as journal:
            journal.record_intent("file:///r", "run", _row(3, tmp_path))
        assert not original.with_name(JOURNAL_FILE + "-wal").exists()
        copy = tmp_path / "copy" / JOURNAL_FILE
        copy.parent.mkdir()
        shutil.copy(original, copy)
        with UploadJournal(copy) as journal:
            assert [i.row.step for i in journal.open_intents()] == [3]


class TestPaths:
    """Checkpoint paths resolve from any working directory and after the out dir moves."""

    def test_relative_paths_are_stored_relative_to_the_journal(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A row with a relative path (a relative out_dir) reads back absolute, from anywhere."""
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        monkeypatch.chdir(tmp_path / "a")
        checkpoint = Path("runs/x/checkpoints/step-00000001")
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(b"w")
        row = ManifestRow(step=1, path=checkpoint, size_bytes=1, digest=None, created_at=0.0)
        with UploadJournal(Path("runs/x") / JOURNAL_FILE) as journal:
            journal.record_intent("file:///r", "run", row)
        stored = sqlite3.connect(tmp_path / "a/runs/x" / JOURNAL_FILE).execute(
            "SELECT path FROM intents"
        )
        assert stored.fetchall() == [("checkpoints/step-00000001",)]
        monkeypatch.chdir(tmp_path / "b")
        with UploadJournal(tmp_path / "a/runs/x" / JOURNAL_FILE) as journal:
            (intent,) = journal.open_intents()
        assert intent.row.path == tmp_path / "a/runs/x/checkpoints/step-00000001"
        moved = tmp_path / "moved"
        shutil.move(tmp_path / "a/runs/x", moved)
        with UploadJournal(moved / JOURNAL_FILE) as journal:
            (intent,) = journal.open_intents()
        assert intent.row.path == moved / "checkpoints/step-00000001"
        assert intent.row.path.exists()

    def test_paths_outside_the_out_dir_are_absolute(self, tmp_path: Path) -> None:
        """A checkpoint elsewhere is stored with its absolute path."""
        elsewhere = tmp_path / "elsewhere" / "ckpt"
        with UploadJournal(tmp_path / "run" / JOURNAL_FILE) as journal:
            row = ManifestRow(step=1, path=elsewhere, size_bytes=1, digest=None, created_at=0.0)
            journal.record_intent("file:///r", "run", row)
            assert journal.open_intents()[0].row.path == elsewhere

    def test_journals_of_older_versions_find_their_checkpoints(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A path stored relative to the old working directory is found under the journal."""
        out = tmp_path / "runs" / "x"
        checkpoint = out / "checkpoints" / "step-00000002"
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(b"w")
        with UploadJournal(out / JOURNAL_FILE) as journal:
            journal.record_intent("file:///r", "run", _row(2, tmp_path))
        db = sqlite3.connect(out / JOURNAL_FILE)
        db.execute("UPDATE intents SET path = 'runs/x/checkpoints/step-00000002'")
        db.commit()
        db.close()
        monkeypatch.chdir("/")
        with UploadJournal(out / JOURNAL_FILE) as journal:
            assert journal.open_intents()[0].row.path == checkpoint


class TestHolders:
    """A refused opener learns who holds the journal: a resume, or a training run."""

    def _held_by(self, path: Path, holder: str | None) -> str:
        code = (
            "import sys\n"
            "from pathlib import Path\n"
            "from loopbridge.journal import UploadJournal\n"
            f"journal = UploadJournal(Path({str(path)!r}), holder={holder!r})\n"
            "print('held', flush=True)\n"
            "sys.stdin.read()\n"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", code, "--train-flag"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "held"
            with pytest.raises(JournalError) as info:
                UploadJournal(path)
            return str(info.value).replace(str(proc.pid), "PID")
        finally:
            proc.kill()
            proc.wait(timeout=30)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()

    def test_another_resume_is_named_as_one(self, tmp_path: Path) -> None:
        """Held by `loopbridge resume`: the message says so, with its pid and what to do."""
        message = self._held_by(tmp_path / JOURNAL_FILE, RESUME_HOLDER)
        assert "is held by another `loopbridge resume` (pid PID)" in message
        assert "kill PID" in message
        assert "running process" not in message

    def test_a_training_run_is_named_with_its_command(self, tmp_path: Path) -> None:
        """Held by a run: the message names the pid and the command that started it."""
        message = self._held_by(tmp_path / JOURNAL_FILE, None)
        assert "in use by a running process (pid PID: a training run: -c --train-flag)" in message


class TestFindingIsBounded:
    """Journals are looked for a few levels down, not in hidden directories."""

    def test_depth_and_hidden_directories(self, tmp_path: Path) -> None:
        """Depth 4 is found, depth 5 and hidden directories are not."""
        wanted = tmp_path / "a" / "b" / "c" / "d" / JOURNAL_FILE
        too_deep = tmp_path / "a" / "b" / "c" / "d" / "e" / JOURNAL_FILE
        hidden = tmp_path / ".cache" / JOURNAL_FILE
        for path in (wanted, too_deep, hidden):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
        assert list(find_journals(tmp_path)) == [wanted]
        assert sorted(find_journals(tmp_path, max_depth=5)) == sorted([wanted, too_deep])

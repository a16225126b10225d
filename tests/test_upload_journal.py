"""The uploader's journal bookkeeping: one journal per out dir, closed after its last upload."""

from __future__ import annotations

from pathlib import Path

import pytest

import loopbridge as lb
from loopbridge._exceptions import JournalError
from loopbridge._types import ManifestRow
from loopbridge.callbacks import CheckpointUploader, _upload_journal
from loopbridge.callbacks._upload_journal import JournalBook, store_options
from loopbridge.journal import JOURNAL_FILE, UploadJournal
from loopbridge.stores import LocalStore, S3Store


def _row(step: int) -> ManifestRow:
    return ManifestRow(step, Path(f"/ckpt/{step}"), 1, None, 0.0)


class TestJournalBook:
    def test_one_journal_per_out_dir_opened_on_first_use(self, tmp_path: Path) -> None:
        """The same journal comes back for an out dir until it is closed."""
        book = JournalBook()
        first = book.get(tmp_path / "a")
        assert isinstance(first, UploadJournal)
        assert book.get(tmp_path / "a") is first
        assert book.get(tmp_path / "b") is not first
        book.close_all()

    def test_close_waits_for_the_last_upload(self, tmp_path: Path) -> None:
        """A journal closed at train end stays open until its uploads mark their results."""
        book = JournalBook()
        journal = book.get(tmp_path)
        assert isinstance(journal, UploadJournal)
        entry = book.entry(tmp_path, journal, journal.record_intent("file:///r", "run", _row(1)))
        book.close(tmp_path)
        entry.attempt()
        entry.published()
        entry.done()
        with pytest.raises(JournalError):
            journal.intents()  # closed now
        reopened = book.get(tmp_path)
        assert isinstance(reopened, UploadJournal)
        assert reopened is not journal
        assert [i.state for i in reopened.intents()] == ["published"]
        book.close(tmp_path)

    def test_a_broken_journal_is_one_error_until_closed(self, tmp_path: Path) -> None:
        """A corrupt journal gives the same JournalError each time (reported once), until close."""
        (tmp_path / JOURNAL_FILE).write_bytes(b"not a database" * 100)
        book = JournalBook()
        error = book.get(tmp_path)
        assert isinstance(error, JournalError)
        assert book.get(tmp_path) is error
        book.close(tmp_path)
        again = book.get(tmp_path)
        assert isinstance(again, JournalError)
        assert again is not error

    def test_marks_on_a_closed_journal_are_logged_not_raised(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A journal write that fails never fails the upload; it is logged."""
        journal = UploadJournal(tmp_path / JOURNAL_FILE)
        intent_id = journal.record_intent("file:///r", "run", _row(1))
        entry = JournalBook().entry(tmp_path, journal, intent_id)
        journal.close()
        entry.published()
        entry.failed(RuntimeError("boom"))
        assert "not updated" in caplog.text


class TestStoreOptions:
    def test_s3_options_keep_the_endpoint_without_credentials(self) -> None:
        """What a resume needs to reopen an S3 store, with no user or password in it."""
        store = S3Store("b", endpoint_url="http://user:secret@127.0.0.1:9000/x", region="eu-1")
        assert store_options(store) == {"endpoint_url": "http://127.0.0.1:9000/x", "region": "eu-1"}
        assert store_options(S3Store("b")) == {}

    def test_local_stores_need_nothing_but_their_url(self, tmp_path: Path) -> None:
        """A local store reopens from its file:// URL alone."""
        assert store_options(LocalStore(tmp_path)) == {}


class _Boom(Exception):
    pass


def _save(state: lb.LoopState, path: Path) -> None:
    path.write_bytes(b"w" * 64)


def _run(tmp_path: Path, *, fail_at: int | None = None, preflight: bool = True) -> None:
    """Train 3 steps with a checkpoint each, uploading to a local directory."""

    def step(state: lb.LoopState, batch: lb.TrainingBatch) -> dict[str, float]:
        if state.step == fail_at:
            raise _Boom
        return {"loss": 1.0}

    lb.TrainLoop(
        step,
        range(3),
        out_dir=tmp_path / "out",
        save=_save,
        checkpoint_every=1,
        callbacks=[CheckpointUploader(str(tmp_path / "remote"), preflight=preflight)],
        run_name="run",
        drain_timeout=30,
    ).run()


class TestJournalPerRun:
    def test_opened_once_per_run_and_closed_after_it(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Opened at train start and held: the first checkpoint does not open it again."""
        opened: list[Path] = []

        class Counted(UploadJournal):
            def __init__(self, path: Path) -> None:
                opened.append(path)
                super().__init__(path)

        monkeypatch.setattr(_upload_journal, "UploadJournal", Counted)
        _run(tmp_path)
        assert opened == [tmp_path / "out" / JOURNAL_FILE]
        with UploadJournal(tmp_path / "out" / JOURNAL_FILE) as journal:  # let go of
            assert [i.state for i in journal.intents()] == ["published"] * 3

    @pytest.mark.parametrize("preflight", [True, False])
    def test_a_run_failing_before_its_first_checkpoint_lets_go_of_it(
        self, tmp_path: Path, preflight: bool
    ) -> None:
        """The journal held since train start is closed when the failed run's bridge shuts down."""
        with pytest.raises(_Boom):
            _run(tmp_path, fail_at=0, preflight=preflight)
        with UploadJournal(tmp_path / "out" / JOURNAL_FILE) as journal:  # no JournalError
            assert journal.intents() == []

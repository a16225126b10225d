"""Pure pieces of the read path: range planning, the download sink, the layout parsers."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from loopbridge._digest import bytes_digest
from loopbridge._exceptions import IntegrityError
from loopbridge.callbacks._layout import (
    parse_latest,
    parse_manifest,
    parse_marker,
    run_key,
    step_dir,
)
from loopbridge.stores._s3_download import plan_ranges
from loopbridge.stores._sink import TMP_MARK, FileSink, remove_stale

MiB = 1 << 20


class TestPlanRanges:
    def test_small_object_is_one_request(self) -> None:
        """Up to the threshold an object comes in one GET, the empty one included."""
        assert plan_ranges(5, 8 * MiB, 8, 8 * MiB) == [(0, 4)]
        assert plan_ranges(0, 8 * MiB, 8, 8 * MiB) == [(0, -1)]

    def test_ranges_cover_the_object_without_gaps(self) -> None:
        """Ranges are contiguous, inclusive, and end at the last byte."""
        for size in (8 * MiB + 1, 64 * MiB, 256 * MiB + 3, 10 * 1024 * MiB):
            ranges = plan_ranges(size, 8 * MiB, 8, 8 * MiB)
            assert ranges[0][0] == 0
            assert ranges[-1][1] == size - 1
            assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(ranges))

    def test_range_size_between_one_and_eight_parts(self) -> None:
        """About two ranges per slot, never under part_size nor over 8 parts."""
        assert plan_ranges(256 * MiB, 8 * MiB, 8, 8 * MiB)[0] == (0, 16 * MiB - 1)
        assert plan_ranges(64 * MiB, 8 * MiB, 8, 8 * MiB)[0] == (0, 8 * MiB - 1)
        assert plan_ranges(10 * 1024 * MiB, 8 * MiB, 8, 8 * MiB)[0] == (0, 64 * MiB - 1)


class TestFileSink:
    def test_out_of_order_writes_hash_in_order(self, tmp_path: Path) -> None:
        """Pieces written at their offsets in any order give the file's digest once hashed."""
        data = bytes(range(256)) * 40_000
        target = tmp_path / "d" / "file"
        sink = FileSink.open(target, "k")
        sink.write_at(6_000_000, data[6_000_000:])
        sink.write_at(0, data[:6_000_000])
        sink.hash_written(len(data))
        assert not target.exists()
        assert sink.commit(len(data), bytes_digest(data)) == (len(data), bytes_digest(data))
        assert target.read_bytes() == data
        assert list(target.parent.glob(TMP_MARK + "*")) == []

    def test_wrong_digest_or_size_never_reaches_the_path(self, tmp_path: Path) -> None:
        """commit refuses bytes that differ from what was expected; the name stays free."""
        target = tmp_path / "file"
        sink = FileSink.open(target, "some/key")
        sink.write_next(b"abc")
        with pytest.raises(IntegrityError, match=r"'some/key' refused: its digest is blake3:"):
            sink.commit(3, "blake3:" + "0" * 64)
        sink.discard()
        sink = FileSink.open(target, "some/key", "sha256")
        sink.write_next(b"abc")
        with pytest.raises(IntegrityError, match=r"'some/key' refused: its digest is sha256:"):
            sink.commit(3, "sha256:" + "0" * 64)
        sink.discard()
        sink = FileSink.open(target, "some/key")
        sink.write_next(b"ab")
        with pytest.raises(IntegrityError, match=r"2 bytes arrived, not the 3"):
            sink.commit(3, None)
        sink.discard()
        assert list(tmp_path.iterdir()) == []

    def test_remove_stale_clears_only_temporary_files(self, tmp_path: Path) -> None:
        """Leftovers of a killed download go; finished files stay."""
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / f"{TMP_MARK}x-file").write_bytes(b"half")
        (tmp_path / "a" / "file").write_bytes(b"whole")
        assert remove_stale(tmp_path) == 1
        assert [p.name for p in (tmp_path / "a").iterdir()] == ["file"]


ENTRY = {
    "step": 4,
    "prefix": "step-00000004",
    "digest": "blake3:" + "ab" * 32,
    "size_bytes": 3,
    "files": [{"path": "step-00000004", "size": 3, "digest": "blake3:" + "ab" * 32}],
}
# As versions before BLAKE3 wrote it: a sha256 digest, and each file's hex as "sha256".
OLD_ENTRY = {
    **ENTRY,
    "digest": "sha256:" + "ab" * 32,
    "files": [{"path": "step-00000004", "size": 3, "sha256": "ab" * 32}],
}


class TestLayout:
    def test_names_match_the_uploaders(self) -> None:
        """Step directories and run keys are laid out as CheckpointUploader writes them."""
        assert step_dir(42) == "step-00000042"
        assert run_key("p", run="r") == "p/r"
        assert run_key("", experiment="my exp", arm="a", run="r0") == "my%20exp/a/r0"

    @pytest.mark.parametrize("entry", [ENTRY, OLD_ENTRY], ids=["blake3", "older-sha256"])
    def test_marker_and_manifest_parse(self, entry: dict[str, Any]) -> None:
        """A marker and a manifest entry read back as the same checkpoint, a file one."""
        marker = parse_marker(json.dumps(entry).encode(), "k")
        manifest = parse_manifest(json.dumps({"checkpoints": [entry]}).encode(), "m")
        assert manifest == [marker]
        assert marker.kind == "file"
        assert marker.files_digest() == marker.digest == entry["digest"]

    def test_a_directory_digest_is_rebuilt_from_its_files_in_their_algorithm(self) -> None:
        """Both algorithms combine shard digests the same way; a mixed set is refused."""
        for algorithm in ("blake3", "sha256"):
            files = [
                {"path": "b", "size": 2, "digest": f"{algorithm}:" + "22" * 32},
                {"path": "a", "size": 1, "digest": f"{algorithm}:" + "11" * 32},
            ]
            lines = f"a\t1\t{'11' * 32}\nb\t2\t{'22' * 32}\n".encode()
            entry = {**ENTRY, "digest": bytes_digest(lines, algorithm), "files": files}
            marker = parse_marker(json.dumps(entry).encode(), "k")
            assert (marker.kind, marker.files_digest()) == ("dir", entry["digest"])
        mixed = [{**files[0], "digest": "blake3:" + "22" * 32}, files[1]]
        with pytest.raises(IntegrityError, match=r"k: a checkpoint entry .*different algorithms"):
            parse_marker(json.dumps({**ENTRY, "files": mixed}).encode(), "k")

    @pytest.mark.parametrize("digest", ["ab" * 32, "md5:ab", "blake3:"])
    def test_an_unknown_digest_is_refused_naming_the_key(self, digest: str) -> None:
        """A digest without an algorithm loopbridge checks makes the entry damaged."""
        for entry in (
            {**ENTRY, "digest": digest},
            {**ENTRY, "files": [{"path": "x", "size": 3, "digest": digest}]},
        ):
            with pytest.raises(IntegrityError, match=r"^k: a checkpoint entry .*unsupported"):
                parse_marker(json.dumps(entry).encode(), "k")

    def test_damaged_documents_are_refused_naming_the_key(self) -> None:
        """Unreadable JSON, missing fields and unsafe paths are IntegrityErrors with the key."""
        with pytest.raises(IntegrityError, match=r"^r/latest: the latest pointer is not valid"):
            parse_latest(b"{", "r/latest")
        with pytest.raises(IntegrityError, match=r"r/manifest.json: a checkpoint entry lacks"):
            parse_manifest(json.dumps({"checkpoints": [{"step": 1}]}).encode(), "r/manifest.json")
        bad = {**ENTRY, "files": [{"path": "../x", "size": 1, "sha256": "00"}]}
        with pytest.raises(IntegrityError, match=r"unsafe file path '../x'"):
            parse_marker(json.dumps(bad).encode(), "k")


class _Body:
    """A response body that delivers `data`, or breaks after `cut` bytes like a reset."""

    def __init__(self, data: bytes, cut: int | None = None) -> None:
        self._data = data
        self._cut = cut
        self._pos = 0

    async def read(self, amount: int) -> bytes:
        if self._cut is not None and self._pos >= self._cut:
            raise ConnectionResetError("reset by peer")
        end = self._pos + amount if self._cut is None else min(self._pos + amount, self._cut)
        chunk = self._data[self._pos : end]
        self._pos += len(chunk)
        return chunk

    def close(self) -> None:
        pass


class _Client:
    """Answers GetObject from `data`; the first GET of each range breaks midway."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.ranges: list[str] = []
        self._broken: set[int] = set()

    async def get_object(self, *, Bucket: str, Key: str, **extra: str) -> dict[str, object]:
        spec = extra["Range"].removeprefix("bytes=")
        self.ranges.append(spec)
        first, last = (int(x) for x in spec.split("-"))
        body = self.data[first : last + 1]
        cut = None
        if last not in self._broken:
            self._broken.add(last)
            cut = len(body) // 2 + 123
        return {"Body": _Body(body, cut)}


class TestRangeRetry:
    async def test_a_broken_range_resumes_where_it_stopped(self, tmp_path: Path) -> None:
        """A range cut off midway is retried from its first missing byte; the file is whole."""
        from loopbridge.stores import S3Store
        from loopbridge.stores._s3_download import CHUNK, _fetch

        data = hashlib.sha256(b"seed").digest() * (12 * MiB // 32)
        store = S3Store("bucket", part_size=5 * MiB, retry_base_delay=0)
        client = _Client(data)

        async def fake_client() -> _Client:
            return client

        store._client = fake_client  # type: ignore[method-assign]
        sink = FileSink.open(tmp_path / "f", "key")
        from loopbridge.stores._s3_client import _Counter

        counter = _Counter()
        await _fetch(store, "key", len(data), None, sink=sink, counter=counter)
        assert sink.commit(len(data), bytes_digest(data))[0] == len(data)
        assert (tmp_path / "f").read_bytes() == data
        assert counter.retries == 3
        # Each retry asked for the rest of its range only, from a whole 1 MiB chunk boundary.
        retried = client.ranges[3:]
        assert sorted(retried) == sorted(
            f"{start + (size // 2 + 123) // CHUNK * CHUNK}-{end}"
            for start, end, size in [
                (0, 5 * MiB - 1, 5 * MiB),
                (5 * MiB, 10 * MiB - 1, 5 * MiB),
                (10 * MiB, 12 * MiB - 1, 2 * MiB),
            ]
        )

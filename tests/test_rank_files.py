"""Which files of a sharded step directory each rank uploads, and its part's snapshot."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from loopbridge._digest import combine_shard_digests
from loopbridge._row_digest import claim_digest
from loopbridge._types import ManifestRow
from loopbridge.callbacks._rank_files import dcp_rank, is_part, rank_part, take_part, upload_part
from loopbridge.stores import open_store

SHARED = [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]


class TestDcpRank:
    @pytest.mark.parametrize(
        ("rel", "rank"),
        [
            ("__0_0.distcp", 0),
            ("__1_0.distcp", 1),
            ("__12_3.distcp", 12),
            ("model/__1_2.distcp", 1),
            (".metadata", None),
            ("meta.pt", None),
            ("shard.distcp", None),
            ("__1_0.distcp.tmp", None),
            ("x__1_0.distcp", None),
            ("__1_0.distcp/inner", None),
        ],
    )
    def test_names(self, rel: str, rank: int | None) -> None:
        """Only FileSystemWriter's `__<rank>_<n>.distcp` data files name a rank."""
        assert dcp_rank(rel) == rank


class TestRankPart:
    def test_own_dir_without_dcp_files_is_all_mine(self) -> None:
        """Each rank its own dir (ranks_worker.py's layout): every file, whatever its name."""
        files = ["shard-00001.bin", "meta.json", "sub/extra.bin"]
        assert rank_part(files, 1) == sorted(files)

    def test_own_dcp_dir_is_all_mine(self) -> None:
        """Only my own DCP files (and .metadata) in the dir: not shared, all mine."""
        files = [".metadata", "__1_0.distcp", "__1_1.distcp"]
        assert rank_part(files, 1) == files

    def test_shared_dcp_dir_each_rank_its_data_and_rank_zero_the_rest(self) -> None:
        """Another rank's data file makes it shared: rank 0 also owns every non-data file."""
        assert rank_part(SHARED, 0) == [".metadata", "__0_0.distcp", "meta.pt"]
        assert rank_part(SHARED, 1) == ["__1_0.distcp"]

    def test_shared_parts_cover_every_file_exactly_once(self) -> None:
        """Over the ranks, the parts are a partition of the directory."""
        files = [*SHARED, "__0_1.distcp", "__2_0.distcp", "extra/notes.txt", "odd.distcp"]
        parts = [rank_part(files, rank) for rank in range(3)]
        assert sorted(f for part in parts for f in part) == sorted(files)
        assert parts[2] == ["__2_0.distcp"]
        assert "odd.distcp" in parts[0]  # a .distcp not named by rank belongs to rank 0

    def test_nested_dirs(self) -> None:
        """Data files in subdirectories count the same (one DCP checkpoint per component)."""
        files = ["model/.metadata", "model/__0_0.distcp", "optim/__1_0.distcp", "meta.pt"]
        assert rank_part(files, 0) == ["meta.pt", "model/.metadata", "model/__0_0.distcp"]
        assert rank_part(files, 1) == ["optim/__1_0.distcp"]

    def test_no_files_of_mine(self) -> None:
        """A rank that wrote nothing into a shared dir has an empty part (it still reports)."""
        assert rank_part(SHARED, 3) == []
        assert rank_part([".metadata", "__0_0.distcp"], 1) == []

    def test_empty_dir_and_duplicates(self) -> None:
        """Nothing is nothing; a name listed twice is one file."""
        assert rank_part([], 0) == []
        assert rank_part(["b", "a", "a"], 0) == ["a", "b"]


def _shared_step(tmp_path: Path) -> ManifestRow:
    step = tmp_path / "checkpoints" / "epoch=0-step=2.ckpt"
    step.mkdir(parents=True)
    for i, name in enumerate(SHARED):
        (step / name).write_bytes(bytes([i + 1]) * (100 * (i + 1)))
    return ManifestRow.for_checkpoint(step, step=2, run_name="r")


class TestTakePart:
    def test_a_shared_dir_gets_a_snapshot_of_my_files_only(self, tmp_path: Path) -> None:
        """Hard links of rank 1's files; its row's size is theirs; the digest is still to come."""
        row = _shared_step(tmp_path)
        part = take_part(row, 1)
        assert part is not None
        assert is_part(part.path)
        assert part.path.name == row.path.name
        assert sorted(p.name for p in part.path.iterdir()) == ["__1_0.distcp"]
        mine = row.path / "__1_0.distcp"
        assert (part.path / "__1_0.distcp").stat().st_ino == mine.stat().st_ino
        assert part.size_bytes == mine.stat().st_size
        assert (part.step, part.run_name, part.digest) == (2, "r", None)
        assert claim_digest(part) is not None  # the uploader hashes it while uploading

    def test_rank_zero_gets_the_metadata_too(self, tmp_path: Path) -> None:
        row = _shared_step(tmp_path)
        part = take_part(row, 0)
        assert part is not None
        assert sorted(p.name for p in part.path.iterdir()) == [
            ".metadata",
            "__0_0.distcp",
            "meta.pt",
        ]

    def test_an_own_dir_or_a_file_needs_no_part(self, tmp_path: Path) -> None:
        """All files mine (or a single file): None, the row is uploaded as it is."""
        own = tmp_path / "own"
        own.mkdir()
        (own / "shard-00001.bin").write_bytes(b"x")
        assert take_part(ManifestRow.for_checkpoint(own, step=1), 1) is None
        single = tmp_path / "model.ckpt"
        single.write_bytes(b"x")
        assert take_part(ManifestRow.for_checkpoint(single, step=1), 1) is None
        assert not is_part(own)

    def test_an_empty_part_uploads_nothing_and_has_the_empty_digest(self, tmp_path: Path) -> None:
        """Rank 3 wrote nothing: an empty part, whose upload sends nothing and sets its digest."""
        row = _shared_step(tmp_path)
        part = take_part(row, 3)
        assert part is not None
        assert is_part(part.path)
        assert list(part.path.iterdir()) == []
        assert part.size_bytes == 0
        claim = claim_digest(part)
        store = open_store(str(tmp_path / "store"))
        sent: list[str] = []
        shards = asyncio.run(upload_part(store, part, "run/step-00000002", sent, claim))
        assert (shards, sent) == ([], [])
        assert part.digest == combine_shard_digests([])

    def test_a_non_empty_part_uploads_its_files(self, tmp_path: Path) -> None:
        """The part's files go to the step's prefix under their names in the step dir."""
        row = _shared_step(tmp_path)
        part = take_part(row, 1)
        assert part is not None
        claim = claim_digest(part)
        store = open_store(str(tmp_path / "store"))
        sent: list[str] = []
        shards = asyncio.run(upload_part(store, part, "run/step-00000002", sent, claim))
        assert [s.rel for s in shards] == ["__1_0.distcp"]
        assert sent == ["run/step-00000002/__1_0.distcp"]
        stored = tmp_path / "store" / "run" / "step-00000002" / "__1_0.distcp"
        assert stored.read_bytes() == (row.path / "__1_0.distcp").read_bytes()
        assert part.digest is not None

"""PartBuffers: which buffers come back, and how many are kept."""

from __future__ import annotations

from loopbridge.stores._part_buffers import PartBuffers


class TestReuse:
    def test_a_buffer_given_back_for_reuse_is_the_next_of_its_size(self) -> None:
        pool = PartBuffers(keep=2)
        first = pool.take(16)
        pool.give_back(first, reuse=True)
        assert pool.take(16) is first

    def test_one_not_for_reuse_is_dropped(self) -> None:
        pool = PartBuffers(keep=2)
        first = pool.take(16)
        pool.give_back(first, reuse=False)
        assert pool.kept == 0
        assert pool.take(16) is not first

    def test_a_kept_buffer_of_another_size_is_freed_not_handed_out(self) -> None:
        pool = PartBuffers(keep=2)
        small = pool.take(8)
        pool.give_back(small, reuse=True)
        big = pool.take(16)
        assert len(big) == 16
        assert big is not small
        assert pool.kept == 0

    def test_no_more_than_keep_are_kept(self) -> None:
        pool = PartBuffers(keep=2)
        taken = [pool.take(4) for _ in range(5)]
        for buffer in taken:
            pool.give_back(buffer, reuse=True)
        assert pool.kept == 2

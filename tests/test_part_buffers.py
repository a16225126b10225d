"""PartBuffers: which buffers come back, and how many are kept."""

from __future__ import annotations

import random

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

    def test_a_kept_buffer_of_another_size_stays_while_there_is_room(self) -> None:
        pool = PartBuffers(keep=3)
        small = pool.take(8)
        pool.give_back(small, reuse=True)
        big = pool.take(16)
        assert len(big) == 16
        pool.give_back(big, reuse=True)
        assert pool.take(8) is small
        assert pool.take(16) is big

    def test_the_longest_unused_makes_room_for_a_new_size(self) -> None:
        pool = PartBuffers(keep=2)
        old, older = pool.take(8), pool.take(8)
        pool.give_back(older, reuse=True)
        pool.give_back(old, reuse=True)
        pool.take(16)  # no 16-byte buffer kept: one 8-byte one goes, the longest unused
        assert pool.kept == 1
        assert pool.take(8) is old


class TestBound:
    def test_kept_and_taken_never_exceed_keep_whatever_the_sizes(self) -> None:
        """Random takes and returns of mixed sizes, never more out than `keep` (the slots)."""
        rng = random.Random(7)
        for keep in (1, 2, 5):
            pool = PartBuffers(keep=keep)
            out: list[bytearray] = []
            for _ in range(2000):
                if out and (len(out) == keep or rng.random() < 0.5):
                    pool.give_back(out.pop(rng.randrange(len(out))), reuse=rng.random() < 0.9)
                else:
                    out.append(pool.take(rng.choice((8, 16, 24))))
                assert pool.kept + len(out) <= keep

"""Which process of a distributed run this is: rank and world size, from torchrun or torch.

torchrun (and most launchers: SLURM wrappers, Lightning, accelerate) exports `RANK`,
`WORLD_SIZE` and `LOCAL_RANK` to every process it starts; those come first because they are
set before any user code runs, so a callback list built before `init_process_group` already
knows its rank. Failing that, an initialised default `torch.distributed` process group is
asked. torch is never imported here: it is used only when the program has imported it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from loopbridge._callback import Callback

__all__ = ["RankInfo", "detect_rank", "every_rank"]

C = TypeVar("C", bound="Callback")


@dataclass(frozen=True, slots=True)
class RankInfo:
    """One process's place in a distributed run; `RankInfo()` is the single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_zero(self) -> bool:
        """Whether this is global rank 0, the rank that logs and publishes by default."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1

    def __str__(self) -> str:
        return f"rank {self.rank}/{self.world_size}"


def detect_rank(environ: Mapping[str, str] | None = None) -> RankInfo:
    """This process's rank, from `RANK`/`WORLD_SIZE`/`LOCAL_RANK` or torch.distributed.

    Raises:
        ValueError: the environment holds a rank that is not a whole number in range.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        rank = _int_var(env, "RANK", 0)
        world_size = _int_var(env, "WORLD_SIZE", 1)
        local_rank = _int_var(env, "LOCAL_RANK", 0)
        if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
            msg = (
                f"RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}: expected "
                f"0 <= RANK < WORLD_SIZE; fix the launcher's environment or unset them"
            )
            raise ValueError(msg)
        return RankInfo(rank=rank, world_size=world_size, local_rank=local_rank)
    if environ is None:
        from_torch = _from_torch()
        if from_torch is not None:
            return from_torch
    return RankInfo()


def _int_var(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        msg = f"{name}={text!r}: expected a whole number; fix the launcher's environment"
        raise ValueError(msg) from None


def _from_torch() -> RankInfo | None:
    """The default process group's rank, if the program imported torch and initialised one."""
    if "torch" not in sys.modules:
        return None  # importing torch costs seconds; a program that never did has no group
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without its distributed package
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    return RankInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local)


def every_rank(callback: C) -> C:
    """Make a rank-0-only callback (a logger) act on every rank; returns the callback.

    Its rows then carry the rank (`state.rank`, `ctx.rank`) so the ranks can be told apart.
    """
    callback.rank_zero_only = False
    return callback

"""WandbLogger: one Weights & Biases run per loopbridge run, written off the training thread.

Mapping: `project` as given; W&B `group` = the experiment's name, `job_type` = the arm, `name` =
the run's name, `config` = the run config. Step metrics are logged with `step=state.step`
(steps completed); evals as `eval/<name>/<metric>`; benchmarks as `bench/<name>/<metric>`
and `bench/<name>/<slice>/<metric>`, their predictions as a `wandb.Table` under
`bench/<name>/predictions` and their tags in the summary (`bench/<name>/tags/<tag>`). The
final state goes to the summary (`loopbridge/status`, `loopbridge/steps_completed`,
`loopbridge/stop_reason`, `loopbridge/error`) and a run that failed finishes with
`exit_code=1`. `mode="offline"` needs no account; `wandb sync` uploads such runs later.

wandb's calls block, and `wandb.init` starts a service process. Each run's calls go to a
daemon thread of its own, in hook order, awaited from a bridge task with a bounded wait
(`init_timeout`, `finish_timeout`): a hung `wandb.init` or `finish()` fails that task by name
in the drain report instead of holding the run past its drain deadline, and, the thread being a
daemon, it cannot hold the process at exit either. Needs the `wandb` extra:
`pip install 'loopbridge[wandb]'`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from loopbridge._exceptions import LoopbridgeError, MissingExtraError
from loopbridge._types import EvalResult
from loopbridge.callbacks._run_logger import Row, RunEnd, RunLogger, RunSink

__all__ = ["WandbLogger", "WandbTimeoutError"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_SETTING = {"init": "init_timeout", "finish": "finish_timeout", "log": "call_timeout"}


class WandbTimeoutError(LoopbridgeError, TimeoutError):
    """A wandb call did not return within its bound; it may still be running in its thread."""


def _import_wandb() -> Any:
    """The wandb module, or an error naming the extra."""
    try:
        import wandb
    except ImportError as exc:
        msg = "WandbLogger needs wandb: install loopbridge[wandb] (pip install 'loopbridge[wandb]')"
        raise MissingExtraError(msg) from exc
    return wandb


class _RunThread:
    """One daemon thread that runs a W&B run's calls in order; a hung call never blocks exit."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None
        ]
        self._jobs = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Queue `fn` behind the calls already queued."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((fn, future))
        return future

    def stop(self) -> None:
        """Let the thread end once the calls queued before this one are done."""
        self._jobs.put(None)

    def _main(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)


class WandbLogger(RunLogger):
    """Logs each run to Weights & Biases: config, step metrics, evals, benchmarks, final state.

    Args:
        project: the W&B project.
        mode: "online", "offline" or "disabled"; wandb's own default (WANDB_MODE) if None.
        entity: the W&B entity (team or user); wandb's default if None.
        dir: where wandb writes its run directories; wandb's default (WANDB_DIR) if None.
        tags: tags for every run.
        settings: a `wandb.Settings` for every run.
        log_predictions: log each benchmark's predictions as a `wandb.Table`.
        init_timeout: seconds `wandb.init` may take before the run is given up.
        finish_timeout: seconds `run.finish()` may take before it is reported as hung.
        call_timeout: seconds any other wandb call (a log) may take.
        flush_interval_s: rows are handed to wandb at least this often.
        flush_rows: rows buffered on the loop thread before they are handed over at once.
        init_kwargs: more keyword arguments for `wandb.init` (e.g. `notes`).
    """

    source = "WandbLogger"

    def __init__(
        self,
        project: str,
        *,
        mode: str | None = None,
        entity: str | None = None,
        dir: str | os.PathLike[str] | None = None,
        tags: Sequence[str] | None = None,
        settings: Any = None,
        log_predictions: bool = True,
        init_timeout: float = 90.0,
        finish_timeout: float = 60.0,
        call_timeout: float = 60.0,
        flush_interval_s: float = 2.0,
        flush_rows: int = 1000,
        init_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(flush_interval_s=flush_interval_s, flush_rows=flush_rows)
        if not project:
            msg = "WandbLogger(project=''): give the W&B project name"
            raise ValueError(msg)
        if mode not in (None, "online", "offline", "disabled"):
            msg = f"WandbLogger(mode={mode!r}): use 'online', 'offline', 'disabled' or None"
            raise ValueError(msg)
        if min(init_timeout, finish_timeout, call_timeout) <= 0:
            msg = (
                f"WandbLogger(init_timeout={init_timeout}, finish_timeout={finish_timeout}, "
                f"call_timeout={call_timeout}): give positive numbers of seconds"
            )
            raise ValueError(msg)
        self.project = project
        self._mode = mode
        self._entity = entity
        self._dir = None if dir is None else os.fspath(dir)
        self._tags = list(tags or [])
        self._settings = settings
        self._log_predictions = log_predictions
        self._init_timeout = init_timeout
        self._finish_timeout = finish_timeout
        self._call_timeout = call_timeout
        self._init_kwargs = dict(init_kwargs or {})
        self._wandb: Any = None
        self.runs: list[Any] = []
        """The wandb run objects created so far, in order."""

    def __repr__(self) -> str:
        return f"WandbLogger({self.project!r}, mode={self._mode!r})"

    def _start(self, *, owns: bool, **fields: Any) -> RunSink:
        # Import on the loop thread at run start, so a missing extra fails the run at once.
        if self._wandb is None:
            self._wandb = _import_wandb()
        return super()._start(owns=owns, **fields)

    # ------------------------------------------------------------------ bridge loop

    async def _call(self, run: RunSink, what: str, bound_s: float, fn: Callable[[], T]) -> T:
        """Run `fn` in the run's thread and wait at most `bound_s` seconds for it."""
        thread: _RunThread = run.handle[0]
        future = thread.submit(fn)
        try:
            async with asyncio.timeout(bound_s):
                return await asyncio.wrap_future(future)
        except TimeoutError as exc:
            if what == "init":
                # Should it return after all, its run must not stay open unowned.
                future.add_done_callback(_finish_late_run)
            msg = (
                f"{self.source}: {what} for run {run.name!r} did not return within {bound_s} s; "
                f"it is left running in a daemon thread (raise {_SETTING[what]} or check the "
                f"wandb service)"
            )
            raise WandbTimeoutError(msg) from exc

    async def _open(self, run: RunSink) -> None:
        wandb = self._wandb
        thread = _RunThread(f"loopbridge-wandb-{run.name}")
        run.handle = (thread, None)
        kwargs: dict[str, Any] = {
            "project": self.project,
            "name": run.name,
            "group": run.experiment,
            "job_type": run.arm,
            "config": run.config,
            "reinit": "create_new",
            **self._init_kwargs,
        }
        for name, value in (
            ("mode", self._mode),
            ("entity", self._entity),
            ("dir", self._dir),
            ("tags", self._tags or None),
            ("settings", self._settings),
        ):
            if value is not None:
                kwargs[name] = value
        try:
            wandb_run = await self._call(
                run, "init", self._init_timeout, lambda: wandb.init(**kwargs)
            )
        except BaseException:
            thread.stop()
            raise
        run.handle = (thread, wandb_run)
        self.runs.append(wandb_run)

    async def _write(self, run: RunSink, rows: list[Row]) -> None:
        wandb_run = run.handle[1]

        def log_rows() -> None:
            for step, _, values in rows:
                wandb_run.log(values, step=step)

        await self._call(run, "log", self._call_timeout, log_rows)

    async def _benchmark(
        self,
        run: RunSink,
        at: int,
        step: int | None,
        result: EvalResult,
        predictions: list[dict[str, Any]],
    ) -> None:
        wandb, wandb_run = self._wandb, run.handle[1]
        name = result.name
        tags = {f"bench/{name}/tags/{k}": v for k, v in result.tags.items()}
        table = _table(wandb, predictions) if self._log_predictions and predictions else None

        def log_extras() -> None:
            if tags:
                wandb_run.summary.update(tags)
            if table is not None:
                wandb_run.log({f"bench/{name}/predictions": table}, step=at)

        await self._call(run, "log", self._call_timeout, log_extras)

    async def _close(self, run: RunSink, end: RunEnd) -> None:
        thread, wandb_run = run.handle
        summary = {
            "loopbridge/status": "completed" if end.ok else "failed",
            "loopbridge/steps_completed": end.steps_completed,
            "loopbridge/stop_reason": end.stop_reason or "",
            "loopbridge/error": end.error or "",
        }

        def finish() -> None:
            wandb_run.summary.update(summary)
            wandb_run.finish(exit_code=0 if end.ok else 1)

        try:
            await self._call(run, "finish", self._finish_timeout, finish)
        finally:
            run.handle = None
            thread.stop()


def _finish_late_run(future: concurrent.futures.Future[Any]) -> None:
    """Finish, as failed, a run whose `wandb.init` returned after its run was given up."""
    if future.cancelled() or future.exception() is not None:
        return
    late = future.result()
    if late is None:
        return
    logger.warning("WandbLogger: wandb.init returned after its timeout; finishing that run")
    try:
        late.finish(exit_code=1)
    except Exception:
        logger.exception("WandbLogger: could not finish a run whose init came late")


def _table(wandb: Any, predictions: list[dict[str, Any]]) -> Any:
    """Prediction rows as a wandb.Table; columns in first-seen order, odd values as text."""
    columns: dict[str, None] = {}
    for row in predictions:
        columns.update(dict.fromkeys(row))
    names = list(columns)
    data = [[_cell(row.get(column)) for column in names] for row in predictions]
    return wandb.Table(columns=names, data=data)


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)

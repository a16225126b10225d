"""HttpDashboard: post step metrics, evals, benchmarks and run lifecycle events as JSON batches.

The loop thread only appends to a per-run buffer; a pump task on the bridge loop takes batches
(by size, by age, at train end and at run end), encodes them and posts them with one
`httpx.AsyncClient`, in order per run.

Payload, `schema_version` 1 (one JSON object per POST, `Content-Type: application/json`)::

    {
      "schema_version": 1,
      "run": {"run_name": str|null, "run_id": str|null, "experiment": str|null,
              "arm": str|null, "group": str|null, "repeat": int|null, "stage": int|null,
              "rank": int, "world_size": int},   # rank fields only under torchrun
      "batch": int,                     # 0, 1, 2... per run, in posting order
      "events": [event, ...]            # in the order the hooks fired ("seq" ascending)
    }

Each event has "seq" (per run, from 0; null for "gap"), "type" and "time" (unix seconds):

- "run_start":  {"config": {...}}                                  (Experiment runs)
- "train_start": {"step": int, "max_steps": int|null, "config": {...}}
- "step":       {"step": int, "metrics": {str: number}}            `step` = steps completed
- "eval":       {"step": int, "name": str, "metrics": {...}}
- "benchmark":  {"step": int|null, "name": str, "metrics": {...}, "breakdowns": {...},
                 "tags": {...}, "predictions": [...]}               `step` null = post-training
- "checkpoint": {"step": int, "path": str, "size_bytes": int, "digest": str|null,
                 "is_final": bool}
- "train_end":  {"step": int, "steps_completed": int, "stop_reason": str}
- "run_end":    {"status": "completed"|"failed", "final_metrics": {...}, "error": str|null}
- "gap":        {"dropped_steps": int}   step rows dropped from a full buffer before this batch

Numbers that JSON cannot hold are sent as strings: "NaN", "Infinity", "-Infinity".

Only "step" events are ever dropped: when the buffer holds `max_buffer_rows` step rows, each
new row pushes out the oldest waiting one. The batch being posted is kept and retried. Drops
are counted exactly, logged, reported through `Bridge.report_loss` (so the drain report is not
ok) and shown in `summary`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loopbridge._callback import Callback
from loopbridge._taskkey import TaskKey
from loopbridge._types import (
    ArmResult,
    EvalResult,
    LogContext,
    LoopArtifacts,
    LoopState,
    ManifestRow,
    RunResult,
    TrainingBatch,
)
from loopbridge.callbacks._dashboard_stream import RunStream, encode_payload
from loopbridge.callbacks._http import (
    ClientSlot,
    HttpRequestError,
    HttpRetryPolicy,
    PermanentHttpError,
    RetryingClient,
)
from loopbridge.callbacks._redact import Redactor

if TYPE_CHECKING:
    pass

__all__ = ["SCHEMA_VERSION", "DashboardSummary", "HttpDashboard"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SOURCE = "HttpDashboard"


@dataclass(frozen=True)
class DashboardSummary:
    """What a dashboard did so far: requests, rows delivered, retries, drops and failures."""

    requests: int
    batches: int
    rows: int
    step_rows: int
    retries: int
    dropped_rows: int
    failed_batches: int
    failed_rows: int


class HttpDashboard(Callback):
    """Posts a run's metrics and events to an HTTP endpoint in ordered JSON batches.

    Args:
        url: where each batch is POSTed. Logs, errors and the repr show only its origin
            (scheme, host, port): its path and query may hold a token.
        headers: sent with every request (e.g. Authorization); secret ones are never logged.
        max_batch_rows: rows per request at most; a full batch is sent at once.
        flush_interval_s: a partial batch is sent once its oldest row is this old.
        max_buffer_rows: step rows waiting at most; beyond it the oldest are dropped.
        timeout: seconds for each HTTP request.
        retry: the retry policy for 5xx, 429, 408, connection errors and timeouts.
        log_full_urls: show the whole URL in logs and errors (userinfo and secret-looking
            query values stay hidden); for debugging, when the path holds no secret.
    """

    rank_zero_only = True  # under torchrun, one set of rows: rank 0's (every_rank() to change)

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        max_batch_rows: int = 500,
        flush_interval_s: float = 2.0,
        max_buffer_rows: int = 50_000,
        timeout: float = 10.0,
        retry: HttpRetryPolicy | None = None,
        log_full_urls: bool = False,
    ) -> None:
        if max_batch_rows < 1 or max_buffer_rows < 1 or flush_interval_s <= 0:
            msg = (
                f"HttpDashboard(max_batch_rows={max_batch_rows}, max_buffer_rows="
                f"{max_buffer_rows}, flush_interval_s={flush_interval_s}): give positive values"
            )
            raise ValueError(msg)
        self._url = url
        self._headers = dict(headers or {})
        self._redactor = Redactor(url, self._headers, full=log_full_urls)
        self._safe_url = self._redactor.url(url)
        self._max_batch_rows = max_batch_rows
        self._flush_interval_s = flush_interval_s
        self._max_buffer_rows = max_buffer_rows
        self._timeout = timeout
        self._retry = retry or HttpRetryPolicy()
        self._stream: RunStream | None = None
        self._run_counter = 0
        self._clients = ClientSlot(self._new_client)
        self._lock = threading.Lock()  # guards the counters written on the bridge loop
        self._batches = 0
        self._rows = 0
        self._step_rows = 0
        self._dropped = 0
        self._failed_batches = 0
        self._failed_rows = 0

    def __repr__(self) -> str:
        return f"HttpDashboard({self._safe_url!r})"

    @property
    def summary(self) -> DashboardSummary:
        """Counters since this callback was created."""
        stats = self._clients.stats()
        with self._lock:
            return DashboardSummary(
                requests=stats.requests,
                batches=self._batches,
                rows=self._rows,
                step_rows=self._step_rows,
                retries=stats.retries,
                dropped_rows=self._dropped,
                failed_batches=self._failed_batches,
                failed_rows=self._failed_rows,
            )

    # ------------------------------------------------------------------ hooks (loop thread)

    def on_run_start(self, ctx: LogContext) -> None:
        """Open this run's stream and queue its run_start event."""
        stream = self._open(
            {
                "run_name": ctx.run_name,
                "run_id": None,
                "experiment": ctx.experiment_name,
                "arm": ctx.arm_name,
                "group": ctx.group_name,
                "repeat": ctx.repeat_index,
                "stage": ctx.stage_index,
                **_rank_of(ctx.rank, ctx.world_size),
            }
        )
        # Held until train_start (or run_end): a batch posted now would carry no run_id, and
        # the run's later batches would then look like another run's.
        self._event(stream, {"type": "run_start", "config": ctx.run_config}, post=False)

    def on_train_start(self, state: LoopState) -> None:
        """Start the run's pump on the bridge and queue the train_start event."""
        stream = self._stream
        if stream is None or stream.train_started:
            # A plain TrainLoop (no on_run_start), or a second loop in the same run.
            stream = self._open(
                {
                    "run_name": state.run_name,
                    "run_id": state.run_id,
                    **_rank_of(state.rank, state.world_size),
                }
            )
        else:
            stream.run = {**stream.run, "run_name": state.run_name, "run_id": state.run_id}
        self._register_shutdown()
        self._event(
            stream,
            {
                "type": "train_start",
                "step": state.step,
                "max_steps": state.max_steps,
                "config": dict(state.config),
            },
        )
        stream.train_started = True

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: TrainingBatch, metrics: dict[str, float]
    ) -> None:
        """Append the step row; nothing else unless the buffer is full or a batch is ready."""
        stream = self._stream
        if stream is None:
            return
        seq = stream.seq
        stream.seq = seq + 1
        steps = stream.steps
        # A copy, because the loop or another callback may reuse the dict after this hook.
        steps.append((seq, state.step, time.time(), metrics.copy()))
        if not stream.pump_running:
            self._start_pump(stream)
        n = len(steps)
        if n > self._max_buffer_rows:
            self._drop_oldest(stream)
        elif n >= self._max_batch_rows and not stream.wake_pending:
            self._wake(stream)

    def on_checkpoint(self, state: LoopState, row: ManifestRow) -> None:
        """Queue a checkpoint event."""
        stream = self._stream
        if stream is not None:
            self._event(
                stream,
                {
                    "type": "checkpoint",
                    "step": row.step,
                    "path": str(row.path),
                    "size_bytes": row.size_bytes,
                    "digest": row.digest,
                    "is_final": row.is_final,
                },
            )

    def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        """Queue an eval event at `state.step`."""
        stream = self._stream
        if stream is not None:
            self._event(
                stream,
                {"type": "eval", "step": state.step, "name": eval_name, "metrics": dict(metrics)},
            )

    def on_benchmark_eval(
        self,
        ctx: LogContext,
        eval_result: EvalResult,
        predictions: list[dict],  # type: ignore[type-arg]  # the contract's exact type
        *,
        step: int | None = None,
    ) -> None:
        """Queue a benchmark event; after training, post it right away."""
        stream = self._stream
        if stream is None:
            return
        self._event(
            stream,
            {
                "type": "benchmark",
                "step": step,
                "name": eval_result.name,
                "metrics": dict(eval_result.metrics),
                "breakdowns": {k: dict(v) for k, v in eval_result.breakdowns.items()},
                "tags": dict(eval_result.tags),
                "predictions": list(predictions),
            },
        )

    def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> None:
        """Queue train_end, report drops, and let the pump post everything before the drain."""
        stream = self._stream
        if stream is None:
            return
        self._event(
            stream,
            {
                "type": "train_end",
                "step": state.step,
                "steps_completed": artifacts.steps_completed,
                "stop_reason": artifacts.stop_reason,
            },
        )
        self._report_drops(stream)
        stream.closing = True
        self._wake(stream)

    def on_run_end(self, ctx: LogContext, run_result: RunResult, arm: ArmResult) -> None:
        """Queue run_end and post what is left of the run."""
        stream = self._stream
        if stream is None:
            return
        error = run_result.error
        self._event(
            stream,
            {
                "type": "run_end",
                "status": str(run_result.status),
                "final_metrics": dict(run_result.final_metrics),
                "error": None if error is None else self._redactor.text(repr(error)),
            },
        )
        self._report_drops(stream)
        stream.closing = True
        self._wake(stream)
        self._stream = None

    # ------------------------------------------------------------------ loop-thread helpers

    def _open(self, run: dict[str, Any]) -> RunStream:
        self._run_counter += 1
        label = f"{_SOURCE} run {run.get('run_name') or self._run_counter}"
        stream = RunStream(run, TaskKey(label, (id(self), self._run_counter)))
        self._stream = stream
        return stream

    def _event(self, stream: RunStream, event: dict[str, Any], *, post: bool = True) -> None:
        now = time.time()
        event["seq"] = stream.next_seq()
        event["time"] = now
        stream.events.append((event["seq"], now, event))
        if post and not stream.pump_running:
            self._start_pump(stream)

    def _drop_oldest(self, stream: RunStream) -> None:
        try:
            row = stream.steps.popleft()
        except IndexError:  # the pump took the rows meanwhile: nothing to drop
            return
        if stream.dropped == 0:
            logger.warning(
                "%s: buffer full (%d step rows) for run %r; dropping the oldest step rows "
                "until %s catches up",
                _SOURCE,
                self._max_buffer_rows,
                stream.run.get("run_name"),
                self._safe_url,
            )
            stream.dropped_first = row[1]
        stream.dropped += 1
        stream.dropped_last = row[1]
        with self._lock:
            self._dropped += 1

    def _report_drops(self, stream: RunStream) -> None:
        new = stream.dropped - stream.dropped_reported
        if new <= 0:
            return
        stream.dropped_reported = stream.dropped
        detail = (
            f"oldest step rows of run {stream.run.get('run_name')!r} (steps "
            f"{stream.dropped_first}..{stream.dropped_last}) while {self._safe_url} lagged; "
            f"raise max_buffer_rows={self._max_buffer_rows} to keep more"
        )
        self._attached_bridge().report_loss(_SOURCE, new, detail)

    def _wake(self, stream: RunStream) -> None:
        stream.wake_pending = True
        loop, wake = stream.loop, stream.wake
        if loop is not None and wake is not None and not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)

    def _start_pump(self, stream: RunStream) -> None:
        # Rare: once per idle period. The pump exits when the buffer is empty, so no task
        # outlives the rows it serves and a drain never waits for an idle pump.
        with stream.lock:
            if stream.pump_running:
                return
            stream.pump_running = True
        self._register_shutdown()
        self.spawn(self._pump(stream), name=f"{_SOURCE}.pump", key=stream.key)

    def _register_shutdown(self) -> None:
        self._clients.register(self._attached_bridge())

    # ------------------------------------------------------------------ bridge loop

    def _new_client(self) -> RetryingClient:
        return RetryingClient(
            name=_SOURCE,
            redactor=self._redactor,
            headers=self._headers,
            timeout=self._timeout,
            policy=self._retry,
        )

    async def _pump(self, stream: RunStream) -> None:
        """Post the run's rows while any wait: full batches at once, the rest by age or at end."""
        try:
            await self._pump_rows(stream)
        except BaseException:
            # A later event (run_end after a failed train_end flush) must find no pump.
            with stream.lock:
                stream.pump_running = False
            raise

    async def _pump_rows(self, stream: RunStream) -> None:
        stream.wake = asyncio.Event()
        stream.loop = asyncio.get_running_loop()
        interval = self._flush_interval_s
        while True:
            stream.wake_pending = False
            age = stream.oldest_age()
            if age is None and not stream.dropped > stream.dropped_announced:
                if self._retire_pump(stream):
                    return
                continue
            full = len(stream.steps) + len(stream.events) >= self._max_batch_rows
            if stream.closing or full or (age is not None and age >= interval):
                rows = stream.take(self._max_batch_rows)
                if rows:
                    await self._deliver(stream, rows)
                continue
            stream.wake.clear()
            wait = interval if age is None else max(0.0, interval - age)
            try:
                async with asyncio.timeout(wait):
                    await stream.wake.wait()
            except TimeoutError:
                pass

    def _retire_pump(self, stream: RunStream) -> bool:
        """Mark the pump stopped; False if a row slipped in and this pump must carry on."""
        # The loop thread appends before it reads `pump_running`, so either it sees False
        # and starts a new pump, or its row is visible to the check below.
        with stream.lock:
            stream.pump_running = False
        if stream.oldest_age() is None:
            return True
        with stream.lock:
            if stream.pump_running:  # the loop thread already started the next pump
                return True
            stream.pump_running = True
            return False

    async def _deliver(self, stream: RunStream, rows: list[dict[str, Any]]) -> None:
        """Post one batch; keep retrying while the run trains, give up once it is closing."""
        payload = {
            "schema_version": SCHEMA_VERSION,
            "run": stream.run,
            "batch": stream.batch,
            "events": rows,
        }
        stream.batch += 1
        body = encode_payload(payload)
        client = self._clients.get()
        headers = {"content-type": "application/json"}
        while True:
            try:
                await client.request("POST", self._url, content=body, headers=headers)
            except PermanentHttpError as exc:
                # Retrying cannot help; count the rows lost and go on with the next batch.
                self._fail(stream, rows, str(exc))
                return
            except HttpRequestError as exc:
                if stream.closing or self._bridge_closing():
                    self._fail(stream, rows, str(exc))
                    left = stream.take_all(self._max_batch_rows)
                    if left:
                        self._fail(stream, left, "the rows after it were abandoned with it")
                    raise
                logger.warning(
                    "%s: %s; will keep retrying batch %d while the run trains",
                    _SOURCE,
                    exc,
                    payload["batch"],
                )
                await _pause(stream, client.policy.max_backoff_s)
                continue
            n_steps = sum(1 for r in rows if r["type"] == "step")
            with self._lock:
                self._batches += 1
                self._rows += len(rows)
                self._step_rows += n_steps
            return

    def _bridge_closing(self) -> bool:
        bridge = self._clients.bridge
        return bridge is not None and bridge.closed

    def _fail(self, stream: RunStream, rows: list[dict[str, Any]], reason: str) -> None:
        with self._lock:
            self._failed_batches += 1
            self._failed_rows += len(rows)
        detail = self._redactor.text(
            f"{len(rows)} rows of run {stream.run.get('run_name')!r} not delivered: {reason}"
        )
        bridge = self._clients.bridge
        if bridge is None:
            logger.error("%s: %s", _SOURCE, detail)
        else:
            # report_loss logs it too, so it is logged once.
            bridge.report_loss(_SOURCE, len(rows), detail)


async def _pause(stream: RunStream, seconds: float) -> None:
    """Sleep between retry rounds, but wake early when train end asks for the final flush."""
    wake = stream.wake
    if wake is None:
        await asyncio.sleep(seconds)
        return
    wake.clear()
    if stream.closing:
        return
    try:
        async with asyncio.timeout(seconds):
            await wake.wait()
    except TimeoutError:
        pass


def _rank_of(rank: int, world_size: int) -> dict[str, int]:
    """The run's `rank` and `world_size` fields under torchrun; none in a single process."""
    return {"rank": rank, "world_size": world_size} if world_size > 1 else {}

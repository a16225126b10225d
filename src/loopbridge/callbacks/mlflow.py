"""MLflowLogger: experiment, group and run onto MLflow's REST API with httpx (no mlflow client).

Mapping: the Experiment is an MLflow experiment (got or created by name); each run group is a
parent run; each run is a child run tagged `mlflow.parentRunId` (or a top-level run when it
has no group). Ids go into `ctx.ids` (`experiment_id`, `group:<name>`, `run_id`) before the
hook returns. A plain TrainLoop gets its experiment and run at `on_train_start`.

Metric names: step metrics as given; evals as `<eval name>/<metric>`; benchmarks as
`bench/<name>/<metric>` and `bench/<name>/<slice>/<metric>`, all at step `state.step` (steps
completed). Benchmark predictions go to the artifact `benchmarks/<name>/step-<N>.json`
(`final.json` after training).

Artifacts go where the run's `artifact_uri` says, as the mlflow client would put them:
`mlflow-artifacts:` through the server's proxied artifact API (`--serve-artifacts`, the
default since MLflow 2); `s3://bucket/...` straight to the bucket through loopbridge's own
`S3Store`, with the usual AWS credentials and `MLFLOW_S3_ENDPOINT_URL` honoured as mlflow
honours it (or `artifact_store_options`, passed to `S3Store`); a local path or `file://`
URI (a server with `--default-artifact-root /dir --no-serve-artifacts` on a shared disk)
through `LocalStore`. Any other scheme is reported as a loss, naming it.

Blocking at run boundaries is kept to what `ctx.ids` needs: `on_experiment_start` looks up (or
creates) the experiment, `on_group_start` and `on_run_start` wait for `runs/create` only. The
params, extra tags and the final status are sent by ordered bridge tasks; the Experiment
drains them right after `on_run_end`, and a failure is in that run's drain report.

MLflow's limits are kept explicitly: at most 1000 metrics, 100 params and 100 tags per
log-batch; keys over 250 characters, or with characters MLflow refuses, are made safe
(characters replaced, long keys cut to a prefix and a hash) with a warning and a
`loopbridge.original_key.<hash>` tag holding the original; param values over 6000 and tag
values over 8000 characters are shortened with a visible marker and a warning, and the full
values are uploaded as the artifact `loopbridge/long_values.json`. NaN and infinities are
sent as the strings "NaN", "Infinity" and "-Infinity". NaN survives as NaN; MLflow's SQL
stores keep +-inf as +-1.7976931348623157e308 (SQL has no infinity), a server-side choice.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from loopbridge._callback import Callback
from loopbridge._taskkey import TaskKey
from loopbridge._types import (
    ArmResult,
    EvalResult,
    ExperimentResult,
    LogContext,
    LoopArtifacts,
    LoopState,
    RunResult,
    RunStatus,
    TrainingBatch,
)
from loopbridge.callbacks._http import (
    ClientSlot,
    HttpRequestError,
    HttpRetryPolicy,
    RetryingClient,
)
from loopbridge.callbacks._mlflow_artifacts import ArtifactWriter
from loopbridge.callbacks._mlflow_limits import (
    MAX_METRICS_PER_BATCH,
    MAX_TAGS_PER_BATCH,
    KeyShortener,
    LongValues,
    flatten_config,
    log_batches,
    mlflow_value,
)
from loopbridge.callbacks._redact import Redactor, safe_url

if TYPE_CHECKING:
    from loopbridge._bridge import Bridge

__all__ = ["MLflowLogger", "flatten_config"]

logger = logging.getLogger(__name__)

_SOURCE = "MLflowLogger"

# A step row as the loop thread queues it: (step, unix ms, {key: value}).
_Row = tuple[int, int, dict[str, float]]
# What runs/create leaves for later: the tags beyond its limit, and shortened long values.
_Setup = tuple[list[dict[str, str]], LongValues]


@dataclass
class _Run:
    """One MLflow run as the loop thread knows it, plus what waits to be logged."""

    run_id: str
    experiment_id: str
    artifact_uri: str
    name: str
    key: TaskKey
    group_run_id: str | None = None
    owns_lifecycle: bool = False  # created at on_train_start (no Experiment): ended there too
    rows: list[_Row] = field(default_factory=list)
    points: int = 0
    first_row_at: float = 0.0
    last_step: int = 0


class MLflowLogger(Callback):
    """Logs experiments, groups, runs, metrics, evals and benchmarks to an MLflow server.

    Args:
        tracking_uri: the server's base URL, e.g. `http://127.0.0.1:5000`.
        experiment_name: overrides the Experiment's name; for a plain TrainLoop, the
            experiment to log into (default "loopbridge").
        headers: sent with every request (e.g. Authorization); never logged.
        flush_points: step-metric points buffered before a log-batch is sent.
        flush_interval_s: a partial buffer is sent once its oldest row is this old.
        timeout: seconds for each HTTP request.
        call_timeout: seconds a hook waits for the experiment or a run to be created.
        retry: the retry policy for 5xx, 429, connection errors and timeouts.
        artifact_store_options: keyword arguments for the `S3Store` that writes artifacts
            when the run's artifact root is `s3://` (e.g. `endpoint_url`, `region`).
        log_full_urls: show whole URLs in logs and errors; by default only the server's
            origin (scheme, host, port) is shown, userinfo never.
    """

    rank_zero_only = True  # under torchrun, one set of rows: rank 0's (every_rank() to change)

    def __init__(
        self,
        tracking_uri: str,
        *,
        experiment_name: str | None = None,
        headers: Mapping[str, str] | None = None,
        flush_points: int = MAX_METRICS_PER_BATCH,
        flush_interval_s: float = 5.0,
        timeout: float = 15.0,
        call_timeout: float = 120.0,
        retry: HttpRetryPolicy | None = None,
        artifact_store_options: Mapping[str, Any] | None = None,
        log_full_urls: bool = False,
    ) -> None:
        scheme = urlsplit(tracking_uri).scheme
        if scheme not in ("http", "https"):
            msg = (
                f"MLflowLogger({safe_url(tracking_uri)!r}): the tracking URI must be an "
                f"http(s) URL of an MLflow server, e.g. http://127.0.0.1:5000"
            )
            raise ValueError(msg)
        self._base = tracking_uri.rstrip("/")
        self._safe_base = safe_url(self._base, full=log_full_urls)
        self._experiment_name = experiment_name
        self._headers = dict(headers or {})
        self._redactor = Redactor(tracking_uri, self._headers, full=log_full_urls)
        self._flush_points = max(1, flush_points)
        self._flush_interval_s = flush_interval_s
        self._timeout = timeout
        self._call_timeout = call_timeout
        self._retry = retry or HttpRetryPolicy()
        self._clients = ClientSlot(self._new_client)
        self._bridges: list[Bridge] = []
        self._experiment_id: str | None = None
        self._groups: dict[str, str] = {}  # group run id -> final status
        self._run: _Run | None = None
        # Shortened keys, filled on the bridge loop: original -> short.
        self._limits = KeyShortener()
        self._artifacts = ArtifactWriter(
            self._base, self._clients, artifact_store_options or {}, self._report_loss
        )

    def __repr__(self) -> str:
        return f"MLflowLogger({self._safe_base!r})"

    # ------------------------------------------------------------------ hooks (loop thread)

    def on_experiment_start(self, ctx: LogContext) -> None:
        """Get or create the MLflow experiment; store its id in `ctx.ids['experiment_id']`."""
        self._attach()
        name = self._experiment_name or ctx.experiment_name
        experiment_id = self.call(self._ensure_experiment(name), timeout=self._call_timeout)
        ctx.ids["experiment_id"] = experiment_id

    def on_group_start(self, ctx: LogContext, group_name: str) -> None:
        """Create the group's parent run; store its id in `ctx.ids['group:<name>']`."""
        self._attach()
        experiment_id = self._experiment_for(ctx)
        tags = {"loopbridge.kind": "group", "loopbridge.group": group_name}
        if ctx.arm_name is not None:
            tags["loopbridge.arm"] = ctx.arm_name
        info, setup = self.call(
            self._create_run(experiment_id, group_name, tags), timeout=self._call_timeout
        )
        ctx.ids[f"group:{group_name}"] = info["run_id"]
        self._groups[info["run_id"]] = "FINISHED"
        key = (_SOURCE, id(self), str(info["run_id"]))
        self._spawn_setup(info, setup, flatten_config(ctx.run_config), key)

    def on_run_start(self, ctx: LogContext) -> None:
        """Create the run under its group (or experiment); store `ctx.ids['run_id']`."""
        self._attach()
        experiment_id = self._experiment_for(ctx)
        name = ctx.run_name or ctx.arm_name or "run"
        tags = {"loopbridge.kind": "run"}
        for tag, value in (
            ("loopbridge.arm", ctx.arm_name),
            ("loopbridge.group", ctx.group_name),
            ("loopbridge.repeat", ctx.repeat_index),
            ("loopbridge.stage", ctx.stage_index),
        ):
            if value is not None:
                tags[tag] = str(value)
        if ctx.world_size > 1:  # acting on every rank (loopbridge.every_rank): say which
            tags["loopbridge.rank"] = str(ctx.rank)
        parent = ctx.ids.get(f"group:{ctx.group_name}") if ctx.group_name else None
        if parent is not None:
            tags["mlflow.parentRunId"] = parent
        info, setup = self.call(
            self._create_run(experiment_id, name, tags), timeout=self._call_timeout
        )
        ctx.ids["run_id"] = info["run_id"]
        run = self._new_run(info, name, group_run_id=parent)
        self._run = run
        self._spawn_setup(info, setup, flatten_config(ctx.run_config), run.key)

    def on_train_start(self, state: LoopState) -> None:
        """Without an Experiment, create the experiment and the run here."""
        if self._run is not None:
            return
        self._attach()
        if self._experiment_id is None:
            name = self._experiment_name or "loopbridge"
            self._experiment_id = self.call(
                self._ensure_experiment(name), timeout=self._call_timeout
            )
        tags = {"loopbridge.kind": "run", "loopbridge.run_id": state.run_id}
        if state.world_size > 1:
            tags["loopbridge.rank"] = str(state.rank)
        info, setup = self.call(
            self._create_run(self._experiment_id, state.run_name, tags),
            timeout=self._call_timeout,
        )
        run = self._new_run(info, state.run_name, group_run_id=None)
        run.owns_lifecycle = True
        self._run = run
        self._spawn_setup(info, setup, flatten_config(state.config), run.key)

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: TrainingBatch, metrics: dict[str, float]
    ) -> None:
        """Queue the step's metrics; send a log-batch when enough points or time piled up."""
        run = self._run
        if run is None:
            return
        now = time.time()
        if not run.rows:
            run.first_row_at = now
        # A copy: the row waits in the buffer while the caller may reuse its dict.
        run.rows.append((state.step, int(now * 1000), metrics.copy()))
        run.last_step = state.step
        run.points += len(metrics)
        if run.points >= self._flush_points or now - run.first_row_at >= self._flush_interval_s:
            self._flush(run)

    def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        """Queue `<eval name>/<metric>` at `state.step` and send."""
        run = self._run
        if run is None:
            return
        values = {f"{eval_name}/{key}": value for key, value in metrics.items()}
        run.rows.append((state.step, int(time.time() * 1000), values))
        run.points += len(values)
        self._flush(run)

    def on_benchmark_eval(
        self,
        ctx: LogContext,
        eval_result: EvalResult,
        predictions: list[dict],  # type: ignore[type-arg]  # the contract's exact type
        *,
        step: int | None = None,
    ) -> None:
        """Log the benchmark's metrics, breakdowns and tags; upload its predictions."""
        run = self._run
        if run is None:
            return
        name = eval_result.name
        at = run.last_step if step is None else step
        values = eval_result.flat_metrics()
        run.rows.append((at, int(time.time() * 1000), values))
        run.points += len(values)
        tags = {f"bench.{name}.{k}": str(v) for k, v in eval_result.tags.items()}
        self._flush(run, tags)
        leaf = "final" if step is None else f"step-{step:08d}"
        path = f"benchmarks/{name}/{leaf}.json"
        # Encoded here, once: the list may be mutated by the caller after the hook.
        body = json.dumps(
            {"benchmark": name, "step": step, "metrics": eval_result.metrics, "rows": predictions},
            default=str,
        ).encode()
        self.spawn(self._upload(run, path, body), name=f"{_SOURCE}.artifact", key=run.key)

    def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> None:
        """Send what is buffered; a run without an Experiment is also marked FINISHED."""
        run = self._run
        if run is None:
            return
        self._flush(run)
        if run.owns_lifecycle:
            self.spawn(self._end_run(run.run_id, "FINISHED"), name=f"{_SOURCE}.end", key=run.key)
            self._run = None

    def on_run_end(self, ctx: LogContext, run_result: RunResult, arm: ArmResult) -> None:
        """Send what is left and set the final status (FINISHED or FAILED), in the background."""
        run = self._run
        if run is None:
            return
        self._run = None
        failed = run_result.status is not RunStatus.COMPLETED
        status = "FAILED" if failed else "FINISHED"
        if failed and run.group_run_id in self._groups:
            self._groups[run.group_run_id] = "FAILED"
        self._flush(run)
        # Not waited for here: the Experiment drains right after this hook, so the status is
        # set before the next run starts, and a failure lands in this run's drain report.
        self.spawn(self._end_run(run.run_id, status), name=f"{_SOURCE}.end", key=run.key)

    def on_experiment_end(self, ctx: LogContext, result: ExperimentResult) -> None:
        """Close every group's parent run (FAILED if one of its runs failed)."""
        groups, self._groups = self._groups, {}
        if groups:
            self.call(self._end_groups(groups), timeout=self._call_timeout)

    # ------------------------------------------------------------------ loop-thread helpers

    def _attach(self) -> None:
        """Register, once per bridge, what must run when it closes, in this order."""
        bridge = self._attached_bridge()
        if not any(b is bridge for b in self._bridges):
            self._bridges.append(bridge)
            # A plain TrainLoop whose step raised never reaches on_train_end; its bridge
            # closes on the way out, and the run must not stay RUNNING forever.
            bridge.add_shutdown_callback(self._fail_open_run)
            bridge.add_shutdown_callback(self._artifacts.aclose)
        self._clients.register(bridge)

    def _experiment_for(self, ctx: LogContext) -> str:
        experiment_id = ctx.ids.get("experiment_id") or self._experiment_id
        if experiment_id is None:
            name = self._experiment_name or ctx.experiment_name
            experiment_id = self.call(self._ensure_experiment(name), timeout=self._call_timeout)
            ctx.ids["experiment_id"] = experiment_id
        return experiment_id

    def _new_run(self, info: Mapping[str, Any], name: str, *, group_run_id: str | None) -> _Run:
        run_id = str(info["run_id"])
        return _Run(
            run_id=run_id,
            experiment_id=str(info["experiment_id"]),
            artifact_uri=str(info.get("artifact_uri", "")),
            name=name,
            key=TaskKey(f"{_SOURCE} run {name}", (id(self), run_id)),
            group_run_id=group_run_id,
        )

    def _spawn_setup(
        self, info: Mapping[str, Any], setup: _Setup, params: dict[str, str], key: object
    ) -> None:
        """Send a new run's params and remaining tags first in its ordered queue."""
        self.spawn(self._log_setup(info, setup, params), name=f"{_SOURCE}.params", key=key)

    def _flush(self, run: _Run, tags: Mapping[str, str] | None = None) -> None:
        rows, run.rows, run.points = run.rows, [], 0
        if rows or tags:
            self.spawn(
                self._log_rows(run, rows, dict(tags or {})), name=f"{_SOURCE}.log", key=run.key
            )

    # ------------------------------------------------------------------ bridge loop

    def _new_client(self) -> RetryingClient:
        return RetryingClient(
            name=_SOURCE,
            redactor=self._redactor,
            headers=self._headers,
            timeout=self._timeout,
            policy=self._retry,
        )

    async def _api(
        self,
        method: str,
        endpoint: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        accept: tuple[int, ...] = (),
    ) -> tuple[int, Any]:
        client = self._clients.get()
        response = await client.request(
            method,
            f"{self._base}/api/2.0/mlflow/{endpoint}",
            json_body=body,
            params=params,
            accept=accept,
        )
        return response.status_code, response.json() if response.content else {}

    async def _ensure_experiment(self, name: str) -> str:
        """The id of the experiment called `name`, created if missing (races tolerated)."""
        for _ in range(2):
            status, found = await self._api(
                "GET", "experiments/get-by-name", params={"experiment_name": name}, accept=(404,)
            )
            if status == 200:
                experiment = found["experiment"]
                if experiment.get("lifecycle_stage") == "deleted":
                    msg = (
                        f"{_SOURCE}: MLflow experiment {name!r} is deleted; restore it in "
                        f"MLflow or pass another experiment_name"
                    )
                    raise HttpRequestError(msg, url=self._safe_base)
                return str(experiment["experiment_id"])
            status, created = await self._api(
                "POST", "experiments/create", body={"name": name}, accept=(400,)
            )
            if status == 200:
                return str(created["experiment_id"])
            if created.get("error_code") != "RESOURCE_ALREADY_EXISTS":
                msg = f"{_SOURCE}: could not create MLflow experiment {name!r}: {created}"
                raise HttpRequestError(self._redactor.text(msg), url=self._safe_base, status=400)
            # Somebody else created it between our lookup and our create: look again.
        msg = f"{_SOURCE}: MLflow experiment {name!r} neither found nor created; check the server"
        raise HttpRequestError(msg, url=self._safe_base)

    async def _create_run(
        self, experiment_id: str, name: str, tags: dict[str, str]
    ) -> tuple[dict[str, Any], _Setup]:
        """Create a run with its first tags; return its info and what `_log_setup` sends."""
        tags = {**tags, "mlflow.runName": name}
        long_values: LongValues = {}
        safe_tags = self._limits.tags(tags, long_values)
        body = {
            "experiment_id": experiment_id,
            "run_name": name,
            "start_time": int(time.time() * 1000),
            "tags": safe_tags[:MAX_TAGS_PER_BATCH],
        }
        _, created = await self._api("POST", "runs/create", body=body)
        info: dict[str, Any] = created["run"]["info"]
        return info, (safe_tags[MAX_TAGS_PER_BATCH:], long_values)

    async def _log_setup(
        self, info: Mapping[str, Any], setup: _Setup, params: dict[str, str]
    ) -> None:
        """Log a new run's params and the tags runs/create did not take."""
        run_id = str(info["run_id"])
        rest_tags, long_values = setup
        safe_params = self._limits.params(params, long_values)
        extra_tags = rest_tags + self._limits.tag_originals(long_values)
        for batch in log_batches(run_id, [], safe_params, extra_tags):
            await self._api("POST", "runs/log-batch", body=batch)
        if long_values:
            content = json.dumps(long_values, indent=1, sort_keys=True).encode()
            await self._artifacts.put(info, "loopbridge/long_values.json", content)

    async def _log_rows(self, run: _Run, rows: list[_Row], tags: dict[str, str]) -> None:
        """Send queued metric rows (and tags) as log-batch requests within MLflow's limits."""
        metrics: list[dict[str, Any]] = []
        for step, timestamp, values in rows:
            for key, value in values.items():
                try:
                    number = mlflow_value(value)
                except (TypeError, ValueError):
                    logger.warning(
                        "%s: metric %r = %r at step %d is not a number; not logged",
                        _SOURCE,
                        key,
                        value,
                        step,
                    )
                    continue
                metrics.append(
                    {
                        "key": self._limits.key(key),
                        "value": number,
                        "timestamp": timestamp,
                        "step": step,
                    }
                )
        long_values: LongValues = {}
        safe_tags = self._limits.tags(tags, long_values) + self._limits.tag_originals(long_values)
        for batch in log_batches(run.run_id, metrics, [], safe_tags):
            await self._api("POST", "runs/log-batch", body=batch)
        if long_values:
            content = json.dumps(long_values, indent=1, sort_keys=True).encode()
            await self._artifacts.put(
                {"artifact_uri": run.artifact_uri}, "loopbridge/long_tag_values.json", content
            )

    async def _upload(self, run: _Run, path: str, content: bytes) -> None:
        await self._artifacts.put({"artifact_uri": run.artifact_uri}, path, content)

    def _report_loss(self, count: int, detail: str) -> None:
        bridge = self._clients.bridge
        if bridge is not None:
            bridge.report_loss(_SOURCE, count, detail)

    async def _end_run(self, run_id: str, status: str) -> None:
        body = {"run_id": run_id, "status": status, "end_time": int(time.time() * 1000)}
        await self._api("POST", "runs/update", body=body)

    async def _fail_open_run(self) -> None:
        """At bridge close: mark FAILED a run that this logger opened and nobody ended."""
        run = self._run
        if run is None or not run.owns_lifecycle:
            return
        self._run = None
        logger.error(
            "%s: run %s ended without on_train_end (the loop raised); marking it FAILED",
            _SOURCE,
            run.name,
        )
        await self._log_rows(run, run.rows, {})
        await self._end_run(run.run_id, "FAILED")

    async def _end_groups(self, groups: Mapping[str, str]) -> None:
        for run_id, status in groups.items():
            await self._end_run(run_id, status)

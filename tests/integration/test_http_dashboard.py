"""HttpDashboard against a real uvicorn server on loopback, its hooks fired as a loop fires them."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.fixtures.http import DashboardServer

import loopbridge as lb
from loopbridge._bridge import Bridge
from loopbridge._report import DrainReport
from loopbridge._types import EvalResult, LoopState, TrainingBatch
from loopbridge.callbacks._http import HttpRetryPolicy
from loopbridge.callbacks.http_dashboard import SCHEMA_VERSION, HttpDashboard

FAST_RETRY = HttpRetryPolicy(
    max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05, jitter_s=0.01
)
TOKEN = "s3cr3t-T0KEN-value-42"
PASSWORD = "pa55-w0rd-in-url"


@pytest.fixture
def bridge() -> Iterator[Bridge]:
    """A bridge closed at the end of the test."""
    with Bridge(name="test-dashboard") as b:
        yield b


def run_steps(
    dash: HttpDashboard,
    bridge: Bridge,
    tmp_path: Path,
    n_steps: int,
    *,
    evals_every: int = 0,
    on_step: Any = None,
) -> DrainReport:
    """Train `n_steps` through TrainLoop with the dashboard registered; its drain report.

    `on_step(n)` runs once step n's hooks and evals have fired (before step n + 1).
    """

    def step(state: LoopState, batch: TrainingBatch) -> dict[str, float]:
        if on_step is not None and state.step:
            on_step(state.step)
        idx = state.step
        return {"loss": 1.0 / (idx + 1), "lr": 0.1, "nan": math.nan}

    def validate(state: LoopState) -> dict[str, float]:
        return {"acc": state.step / n_steps}

    loop = lb.TrainLoop(
        step,
        range(n_steps),
        max_steps=n_steps,
        out_dir=tmp_path / "run-a",
        run_name="run-a",
        callbacks=[dash],
        bridge=bridge,
        evaluators={"val": validate} if evals_every else None,
        eval_every=evals_every or None,
        drain_timeout=30,
        on_drain_failure="warn",
    )
    loop.state.run_id = "id-a"
    report = loop.run().drain_report
    assert report is not None
    return report


def step_numbers(events: list[dict[str, Any]]) -> list[int]:
    """The step numbers of the step events, in arrival order."""
    return [e["step"] for e in events if e["type"] == "step"]


class TestDelivery:
    def test_2000_steps_arrive_complete_in_order_in_few_requests(
        self, dashboard_server: DashboardServer, bridge: Bridge, tmp_path: Path
    ) -> None:
        """2,000 steps arrive once each, in order, in far fewer requests than steps."""
        dash = HttpDashboard(dashboard_server.url + "/ingest", max_batch_rows=200)
        report = run_steps(dash, bridge, tmp_path, 2000, evals_every=500)
        assert report.ok, report
        events = dashboard_server.events()
        assert step_numbers(events) == list(range(1, 2001))
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == len(seqs)
        posts = dashboard_server.posts()
        assert len(posts) <= 2000 // 200 + 5
        payload = posts[0].json()
        assert payload["schema_version"] == SCHEMA_VERSION
        assert payload["run"]["run_id"] == "id-a"
        assert [p.json()["batch"] for p in posts] == list(range(len(posts)))
        first = next(e for e in events if e["type"] == "step")
        assert first["metrics"]["nan"] == "NaN"
        evals = [e for e in events if e["type"] == "eval"]
        assert [e["step"] for e in evals] == [500, 1000, 1500, 2000]
        # Each eval arrives right after the step row it follows.
        for ev in evals:
            i = events.index(ev)
            assert events[i - 1]["type"] == "step"
            assert events[i - 1]["step"] == ev["step"]
        assert events[0]["type"] == "train_start"
        assert events[-1]["type"] == "train_end"
        summary = dash.summary
        assert summary.step_rows == 2000
        assert summary.dropped_rows == 0
        assert summary.failed_batches == 0
        assert summary.requests == len(posts)

    def test_503_for_a_while_then_200_every_row_arrives(
        self, dashboard_server: DashboardServer, bridge: Bridge, tmp_path: Path
    ) -> None:
        """A server answering 503 three times, then 200: every row arrives and retries count."""
        dashboard_server.fail_next(3, 503)
        dash = HttpDashboard(dashboard_server.url, max_batch_rows=50, retry=FAST_RETRY)
        report = run_steps(dash, bridge, tmp_path, 300)
        assert report.ok, report
        assert step_numbers(dashboard_server.events()) == list(range(1, 301))
        statuses = [r.status for r in dashboard_server.posts()]
        assert statuses[:3] == [503, 503, 503]
        assert dash.summary.retries == 3
        assert dash.summary.failed_batches == 0

    def test_429_retry_after_is_honoured(
        self, dashboard_server: DashboardServer, bridge: Bridge, tmp_path: Path
    ) -> None:
        """After a 429 with Retry-After: 1 the next request comes at least 1 s later."""
        dashboard_server.fail_next(1, 429, headers={"Retry-After": "1"})
        dash = HttpDashboard(dashboard_server.url, retry=FAST_RETRY)
        report = run_steps(dash, bridge, tmp_path, 10)
        assert report.ok, report
        posts = dashboard_server.posts()
        assert [p.status for p in posts[:2]] == [429, 200]
        assert posts[1].arrived - posts[0].responded >= 1.0
        assert posts[0].body == posts[1].body  # the same batch, retried
        assert step_numbers(dashboard_server.events()) == list(range(1, 11))

    def test_400_is_reported_and_not_retried(
        self, dashboard_server: DashboardServer, bridge: Bridge, tmp_path: Path
    ) -> None:
        """A 400 is sent once, its rows are reported lost, and later batches still arrive."""
        dashboard_server.fail_next(1, 400, body=b'{"error": "bad schema"}')
        dash = HttpDashboard(dashboard_server.url, max_batch_rows=10, retry=FAST_RETRY)
        report = run_steps(dash, bridge, tmp_path, 100)
        posts = dashboard_server.posts()
        assert posts[0].status == 400
        assert all(p.status == 200 for p in posts[1:])
        rejected = len(posts[0].json()["events"])
        assert dash.summary.retries == 0
        assert dash.summary.failed_batches == 1
        assert dash.summary.failed_rows == rejected
        assert not report.ok
        assert [loss.count for loss in report.losses] == [rejected]
        assert "400" in report.losses[0].detail
        delivered = step_numbers(dashboard_server.events())
        assert (
            len(delivered) + sum(1 for e in posts[0].json()["events"] if e["type"] == "step") == 100
        )


class TestOverflow:
    def test_outage_drops_oldest_steps_exactly_and_keeps_events(
        self, dashboard_server: DashboardServer, bridge: Bridge, tmp_path: Path
    ) -> None:
        """Down long enough to overflow: the drop count is exact and every other event arrives."""
        dashboard_server.set_down(True)
        dash = HttpDashboard(
            dashboard_server.url, max_batch_rows=20, max_buffer_rows=50, retry=FAST_RETRY
        )

        def come_back(step: int) -> None:
            if step == 400:
                # The pump has been failing to post: the first batch is being retried.
                dashboard_server.wait_until(lambda: dashboard_server.aborted_connections >= 2)
                dashboard_server.set_down(False)

        report = run_steps(dash, bridge, tmp_path, 500, evals_every=50, on_step=come_back)
        events = dashboard_server.events()
        delivered = step_numbers(events)
        dropped = 500 - len(delivered)
        assert dropped > 0
        assert len(set(delivered)) == len(delivered)
        assert delivered == sorted(delivered)
        assert dash.summary.dropped_rows == dropped
        assert sum(e["dropped_steps"] for e in events if e["type"] == "gap") == dropped
        assert [loss.count for loss in report.losses] == [dropped]
        assert not report.ok
        assert not report.failed
        # The dropped rows are the oldest waiting ones: what survives is the batch that was
        # in flight during the outage, then every step from some point up to the end.
        breaks = [i for i in range(1, len(delivered)) if delivered[i] != delivered[i - 1] + 1]
        assert len(breaks) <= 1
        tail = delivered[breaks[0] :] if breaks else delivered
        assert tail == list(range(tail[0], 501))
        assert [e["step"] for e in events if e["type"] == "eval"] == list(range(50, 501, 50))
        kinds = [e["type"] for e in events]
        assert kinds.count("train_start") == 1
        assert kinds[-1] == "train_end"


class TestRedaction:
    def test_bearer_token_never_appears_in_logs(
        self,
        dashboard_server: DashboardServer,
        bridge: Bridge,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """An Authorization header reaches the server but never a log line or a loss detail."""
        caplog.set_level(logging.DEBUG)
        dashboard_server.fail_next(1, 503)
        dashboard_server.fail_next(1, 401, body=f"token {TOKEN} expired".encode())
        dash = HttpDashboard(
            dashboard_server.url,
            headers={"Authorization": f"Bearer {TOKEN}"},
            max_batch_rows=10,
            retry=FAST_RETRY,
        )
        report = run_steps(dash, bridge, tmp_path, 30)
        assert dashboard_server.posts()[0].headers["authorization"] == f"Bearer {TOKEN}"
        texts = [r.getMessage() for r in caplog.records] + [str(x) for x in report.losses]
        assert any("401" in t for t in texts)
        assert not [t for t in texts if TOKEN in t]

    def test_token_never_appears_in_logs_or_errors(
        self,
        dashboard_server: DashboardServer,
        bridge: Bridge,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """The token in the header, the URL userinfo and the query never reach logs or errors."""
        caplog.set_level(logging.DEBUG)
        host = dashboard_server.url.removeprefix("http://")
        url = f"http://user:{PASSWORD}@{host}/ingest?token={TOKEN}&project=p"
        dashboard_server.fail_next(2, 503)
        dashboard_server.fail_next(1, 400, body=f"bad token {TOKEN}".encode())
        dash = HttpDashboard(
            url,
            headers={"Authorization": f"Bearer {TOKEN}"},
            max_batch_rows=10,
            retry=FAST_RETRY,
        )
        report = run_steps(dash, bridge, tmp_path, 30)
        posts = dashboard_server.posts()
        # httpx turns URL userinfo into Basic auth, which wins over the header.
        assert posts[0].headers["authorization"].startswith("Basic ")
        assert f"token={TOKEN}" in posts[0].query
        assert report.losses
        texts = [r.getMessage() for r in caplog.records]
        texts += [str(loss) for loss in report.losses]
        texts.append(repr(dash))
        assert any("503" in t for t in texts)
        assert any("400" in t for t in texts)
        leaked = [t for t in texts if TOKEN in t or PASSWORD in t]
        assert not leaked

    def test_failure_at_train_end_is_reported_without_the_token(
        self,
        dashboard_server: DashboardServer,
        bridge: Bridge,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Down at train end: the final flush fails, its rows are counted, no secret leaks."""
        caplog.set_level(logging.DEBUG)
        dashboard_server.set_down(True)
        host = dashboard_server.url.removeprefix("http://")
        url = f"http://{host}/ingest?access_token={TOKEN}"
        dash = HttpDashboard(url, max_batch_rows=1000, retry=FAST_RETRY)
        report = run_steps(dash, bridge, tmp_path, 30)
        assert len(report.failed) == 1
        error = report.failed[0].exception
        assert error is not None
        chain: list[BaseException] = []
        current: BaseException | None = error
        while current is not None:
            chain.append(current)
            current = current.__cause__ or current.__context__
        assert "failed after 4 attempts" in str(error)
        assert sum(loss.count for loss in report.losses) == 32  # train_start, 30 steps, train_end
        assert dash.summary.failed_rows == 32
        texts = [r.getMessage() for r in caplog.records] + [str(e) for e in chain]
        texts += [repr(e) for e in chain] + [str(loss) for loss in report.losses]
        assert not [t for t in texts if TOKEN in t]


class TestExperimentEvents:
    def test_benchmark_and_run_end_after_training_arrive_in_order(
        self, dashboard_server: DashboardServer, bridge: Bridge, tmp_path: Path
    ) -> None:
        """Post-training benchmark and run_end events follow train_end, with predictions,
        fired by an Experiment around its TrainLoop."""
        dash = HttpDashboard(dashboard_server.url)

        def build(ctx: lb.LogContext) -> lb.TrainLoop:
            return lb.TrainLoop(
                lambda state, batch: {"loss": 1.0},
                range(5),
                out_dir=tmp_path / "run-a",
            )

        def bench(state: LoopState) -> tuple[EvalResult, list[dict[str, Any]]]:
            result = EvalResult("bench", {"acc": 0.5}, {"easy": {"acc": 1.0}}, {"v": "1"})
            return result, [{"id": 1, "pred": "x"}]

        result = lb.Experiment(
            "exp", {"a": {}}, build, benchmarks={"bench": bench}, callbacks=[dash], bridge=bridge
        ).run()
        assert result.ok, result
        assert bridge.drain(timeout=10).ok
        kinds = [e["type"] for e in dashboard_server.events()]
        assert kinds[0] == "run_start"
        assert kinds[-3:] == ["train_end", "benchmark", "run_end"]
        bench_event = dashboard_server.events()[-2]
        assert bench_event["predictions"] == [{"id": 1, "pred": "x"}]
        assert bench_event["breakdowns"] == {"easy": {"acc": 1.0}}
        assert dashboard_server.posts()[0].json()["run"]["experiment"] == "exp"

    def test_every_batch_of_a_run_carries_its_run_id(
        self, dashboard_server: DashboardServer, bridge: Bridge, tmp_path: Path
    ) -> None:
        """Nothing is posted between on_run_start and on_train_start (the run_id is not known
        yet), however long that takes: all the run's batches carry one run_id."""
        dash = HttpDashboard(dashboard_server.url)
        hooks = lb.CallbackList([dash], bridge=bridge)
        ctx = lb.LogContext("exp", run_name="run-a")
        hooks.on_run_start(ctx)
        assert bridge.drain(timeout=10).ok  # whatever was spawned by now has run
        assert dashboard_server.posts() == []
        state = LoopState(run_name="run-a", run_id="id-a", max_steps=2, out_dir=tmp_path)
        hooks.on_train_start(state)
        hooks.on_step_end(state, 0, TrainingBatch(0, None), {"loss": 1.0})
        hooks.on_run_end(ctx, lb.RunResult("run-a", lb.RunStatus.COMPLETED), lb.ArmResult("a", {}))
        assert bridge.drain(timeout=10).ok
        posts = [post.json() for post in dashboard_server.posts()]
        assert {post["run"]["run_id"] for post in posts} == {"id-a"}
        kinds = [e["type"] for post in posts for e in post["events"]]
        assert kinds[:2] == ["run_start", "train_start"]
        assert kinds[-1] == "run_end"


def save_weights(state: lb.LoopState, path: Path) -> None:
    """A checkpoint of a few bytes."""
    path.write_bytes(b"weights")


def tiny_build(tmp_path: Path) -> Any:
    """A `build(ctx)` with an evaluator and an in-loop benchmark, 20 steps."""

    def build(ctx: lb.LogContext) -> lb.TrainLoop:
        def bench(state: lb.LoopState) -> tuple[lb.EvalResult, list[dict[str, Any]]]:
            return lb.EvalResult("qa", {"score": state.step / 20}), [{"id": state.step}]

        return lb.TrainLoop(
            lambda state, batch: {"loss": float(batch.data)},
            range(20),
            out_dir=tmp_path / (ctx.run_name or "run"),
            evaluators={"val": lambda state: {"acc": 0.5}},
            eval_every=10,
            benchmarks={"qa": bench},
            save=save_weights,
            checkpoint_every=10,
        )

    return build


class TestWithRunners:
    def test_experiment_runs_post_their_events_in_order(
        self, dashboard_server: DashboardServer, tmp_path: Path
    ) -> None:
        """Each run of a 2 x 2 experiment posts its lifecycle, steps, evals and benchmarks."""
        dash = HttpDashboard(dashboard_server.url, max_batch_rows=8)
        build = tiny_build(tmp_path)
        exp = lb.Experiment(
            "exp",
            arms={"a": {"lr": 1}, "b": {"lr": 2}},
            build=build,
            n_repeats=2,
            benchmarks={"qa": build(lb.LogContext("x")).benchmarks["qa"]},
            callbacks=[dash],
        )
        result = exp.run()
        assert result.ok
        by_run: dict[str, list[dict[str, Any]]] = {}
        for post in dashboard_server.posts():
            payload = post.json()
            by_run.setdefault(payload["run"]["run_name"], []).extend(payload["events"])
        assert sorted(by_run) == ["a-r0", "a-r1", "b-r0", "b-r1"]
        for events in by_run.values():
            kinds = [e["type"] for e in events]
            assert kinds[:2] == ["run_start", "train_start"]
            assert kinds[-3:] == ["train_end", "benchmark", "run_end"]
            assert step_numbers(events) == list(range(1, 21))
            assert [e["seq"] for e in events] == list(range(len(events)))
            evals = [(e["type"], e["step"]) for e in events if e["type"] in ("eval", "benchmark")]
            assert evals == [
                ("eval", 10),
                ("benchmark", 10),
                ("eval", 20),
                ("benchmark", 20),
                ("benchmark", None),
            ]
            assert events[-1]["status"] == "completed"
            checkpoints = [(e["step"], e["is_final"]) for e in events if e["type"] == "checkpoint"]
            assert checkpoints == [(10, False), (20, True)]
        assert dash.summary.dropped_rows == 0

    @pytest.mark.timeout(30)
    def test_failed_plain_loop_flushes_and_does_not_hang(
        self, dashboard_server: DashboardServer, tmp_path: Path
    ) -> None:
        """A step that raises skips train end; buffered rows still arrive and close returns."""

        def step(state: lb.LoopState, batch: Any) -> dict[str, float]:
            if state.step == 30:
                raise RuntimeError("diverged")
            return {"loss": 1.0}

        dash = HttpDashboard(dashboard_server.url, flush_interval_s=0.2)
        loop = lb.TrainLoop(step, range(100), out_dir=tmp_path, callbacks=[dash])
        with pytest.raises(RuntimeError, match="diverged"):
            loop.run()
        assert step_numbers(dashboard_server.events()) == list(range(1, 31))

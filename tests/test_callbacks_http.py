"""Pure logic of the dashboard callbacks: redaction, Retry-After, batching and MLflow limits."""

from __future__ import annotations

import email.utils
import logging
import math
from pathlib import Path

import pytest

from loopbridge._types import LoopState, TrainingBatch
from loopbridge.callbacks._dashboard_stream import RunStream, encode_payload
from loopbridge.callbacks._http import HttpRetryPolicy, parse_retry_after
from loopbridge.callbacks._mlflow_limits import (
    MAX_ITEMS_PER_BATCH,
    MAX_KEY_CHARS,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_PER_BATCH,
    MAX_TAGS_PER_BATCH,
    KeyShortener,
    LongValues,
    flatten_config,
    log_batches,
    mlflow_value,
    shorten,
)
from loopbridge.callbacks._redact import (
    REDACTED,
    Redactor,
    install_log_filter,
    redact_headers,
    redact_text,
    redact_url,
)
from loopbridge.callbacks.http_dashboard import HttpDashboard


class TestRedaction:
    def test_url_userinfo_and_secret_query_values_are_hidden(self) -> None:
        """Userinfo and token-like query values go; the rest of the URL stays readable."""
        url = "https://bob:hunter2@dash.example/api?project=p1&token=abc123&api_key=k9&x=1"
        safe = redact_url(url)
        assert "hunter2" not in safe
        assert "bob" not in safe
        assert "abc123" not in safe
        assert "k9" not in safe
        assert safe == f"https://{REDACTED}@dash.example/api?project=p1&token=***&api_key=***&x=1"

    def test_secret_headers_are_hidden(self) -> None:
        """Authorization, cookies and token/key headers are hidden; others are kept."""
        headers = {
            "Authorization": "Bearer t0k",
            "X-Api-Key": "k",
            "X-Auth-Token": "t",
            "Cookie": "s=1",
            "Content-Type": "application/json",
        }
        safe = redact_headers(headers)
        assert safe["Content-Type"] == "application/json"
        assert {k for k, v in safe.items() if v == REDACTED} == set(headers) - {"Content-Type"}

    def test_free_text_loses_known_and_recognisable_secrets(self) -> None:
        """Known secrets, bearer tokens, URL userinfo and token params vanish from any text."""
        redactor = Redactor(
            "http://u:pw-123456@h/x?access_token=AT-987654", {"Authorization": "Bearer zzz-999999"}
        )
        text = (
            "failed: http://u:pw-123456@h/x?access_token=AT-987654 with Bearer zzz-999999; "
            "also saw zzz-999999 and Authorization: Bearer abcdefghijkl"
        )
        safe = redactor.text(text)
        for secret in ("pw-123456", "AT-987654", "zzz-999999", "abcdefghijkl"):
            assert secret not in safe

    def test_exceptions_are_scrubbed_with_their_causes(self) -> None:
        """A cause chain that quotes a token is redacted in place."""
        redactor = Redactor("http://h/?token=SECRET-VALUE")
        exc = RuntimeError("SECRET-VALUE rejected")
        exc.__cause__ = OSError("connect to http://h/?token=SECRET-VALUE failed")
        redactor.scrub_exception(exc)
        assert "SECRET-VALUE" not in str(exc)
        assert "SECRET-VALUE" not in str(exc.__cause__)

    def test_httpx_log_lines_are_redacted(self, caplog: pytest.LogCaptureFixture) -> None:
        """httpx's own INFO line, which prints the full URL, is redacted by our filter."""
        install_log_filter(["LOGGED-SECRET"])
        caplog.set_level(logging.INFO, logger="httpx")
        logging.getLogger("httpx").info("HTTP Request: %s %s", "POST", "http://h/?k=LOGGED-SECRET")
        assert caplog.records
        assert "LOGGED-SECRET" not in caplog.records[-1].getMessage()

    def test_plain_text_without_secrets_is_unchanged(self) -> None:
        """Redaction leaves ordinary messages alone; a URL keeps only its origin (issue 11)."""
        assert redact_text("HTTP 503 after 3 attempts") == "HTTP 503 after 3 attempts"
        assert redact_text("HTTP 503 from http://host:80/path?page=2") == (
            "HTTP 503 from http://host:80/***"
        )


class TestRetryAfter:
    def test_seconds(self) -> None:
        """Delta-seconds are read as they are."""
        assert parse_retry_after("3") == 3.0
        assert parse_retry_after(" 0 ") == 0.0

    def test_http_date(self) -> None:
        """An HTTP date gives the seconds until then, never negative."""
        now = 1_700_000_000.0
        later = email.utils.formatdate(now + 30, usegmt=True)
        assert parse_retry_after(later, now=now) == pytest.approx(30.0)
        earlier = email.utils.formatdate(now - 30, usegmt=True)
        assert parse_retry_after(earlier, now=now) == 0.0

    def test_garbage_is_ignored(self) -> None:
        """Unreadable values fall back to our own backoff."""
        assert parse_retry_after(None) is None
        assert parse_retry_after("soon") is None
        assert parse_retry_after("nan") is None

    def test_backoff_grows_and_is_capped(self) -> None:
        """Backoff doubles per attempt, is capped, and adds at most the jitter."""
        policy = HttpRetryPolicy(initial_backoff_s=1.0, max_backoff_s=5.0, jitter_s=0.5)
        for attempt, base in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (10, 5.0)):
            assert base <= policy.backoff(attempt) <= base + 0.5


class TestDashboardBuffer:
    def make(self, tmp_path: Path, **kwargs: int) -> tuple[HttpDashboard, RunStream, LoopState]:
        """A dashboard with an open stream, no bridge, and a pump that never starts."""
        dash = HttpDashboard("http://127.0.0.1:9/", **kwargs)  # type: ignore[arg-type]
        stream = dash._open({"run_name": "r"})
        stream.pump_running = True  # nothing posts: the test takes rows itself
        state = LoopState(run_name="r", run_id="r", max_steps=None, out_dir=tmp_path)
        return dash, stream, state

    def step(self, dash: HttpDashboard, state: LoopState, n: int) -> None:
        """Fire n steps."""
        for _ in range(n):
            state.step += 1
            dash.on_step_end(state, state.step - 1, TrainingBatch(state.step, None), {"x": 1.0})

    def test_overflow_drops_oldest_steps_only(self, tmp_path: Path) -> None:
        """Past max_buffer_rows the oldest step rows go, counted; events are all kept."""
        dash, stream, state = self.make(tmp_path, max_buffer_rows=10, max_batch_rows=1000)
        self.step(dash, state, 5)
        dash.on_eval(state, 4, "val", {"acc": 1.0})
        self.step(dash, state, 20)
        assert stream.dropped == 15
        assert dash.summary.dropped_rows == 15
        rows = stream.take(1000)
        assert rows[0] == {"seq": None, "type": "gap", "time": rows[0]["time"], "dropped_steps": 15}
        assert [r["step"] for r in rows[1:] if r["type"] == "step"] == list(range(16, 26))
        assert [r["type"] for r in rows].count("eval") == 1

    def test_take_restores_hook_order_and_batch_size(self, tmp_path: Path) -> None:
        """Steps and events interleave by seq, batches hold at most max_batch_rows."""
        dash, stream, state = self.make(tmp_path, max_batch_rows=4)
        self.step(dash, state, 2)
        dash.on_eval(state, 1, "val", {"acc": 1.0})
        self.step(dash, state, 3)
        first, second = stream.take(4), stream.take(4)
        assert [r["type"] for r in first] == ["step", "step", "eval", "step"]
        assert [r["seq"] for r in first + second] == list(range(6))
        assert stream.take(4) == []

    def test_encoding_keeps_non_finite_numbers_as_strings(self) -> None:
        """NaN and infinities become the strings the schema promises; JSON stays valid."""
        body = encode_payload({"m": {"a": math.nan, "b": math.inf, "c": -math.inf, "d": 1.5}})
        assert body == b'{"m":{"a":"NaN","b":"Infinity","c":"-Infinity","d":1.5}}'

    def test_bad_settings_are_refused(self) -> None:
        """Zero or negative sizes get an error that names them."""
        with pytest.raises(ValueError, match="max_buffer_rows"):
            HttpDashboard("http://h/", max_buffer_rows=0)


class TestMLflowLimits:
    def test_batches_respect_every_limit(self) -> None:
        """log-batch bodies stay within 1000 metrics, 100 params, 100 tags, 1000 items."""
        metrics = [{"key": f"m{i}", "value": 1.0, "timestamp": 0, "step": i} for i in range(2500)]
        params = [{"key": f"p{i}", "value": "v"} for i in range(250)]
        tags = [{"key": f"t{i}", "value": "v"} for i in range(120)]
        bodies = list(log_batches("run", metrics, params, tags))
        for body in bodies:
            assert len(body["metrics"]) <= MAX_METRICS_PER_BATCH
            assert len(body["params"]) <= MAX_PARAMS_PER_BATCH
            assert len(body["tags"]) <= MAX_TAGS_PER_BATCH
            total = len(body["metrics"]) + len(body["params"]) + len(body["tags"])
            assert total <= MAX_ITEMS_PER_BATCH
        assert [m for b in bodies for m in b["metrics"]] == metrics
        assert [p for b in bodies for p in b["params"]] == params
        assert [t for b in bodies for t in b["tags"]] == tags

    def test_no_batches_for_nothing(self) -> None:
        """Nothing to log sends nothing."""
        assert list(log_batches("run", [], [], [])) == []

    def test_flatten_config_uses_dotted_keys(self) -> None:
        """Nested mappings flatten to dotted keys; lists become JSON."""
        config = {"model": {"width": 64, "act": {"name": "gelu"}}, "tags": ["a"], "lr": 0.1}
        assert flatten_config(config) == {
            "model.width": "64",
            "model.act.name": "gelu",
            "tags": '["a"]',
            "lr": "0.1",
        }

    def test_values_over_limit_are_marked_not_silently_cut(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A long value is shortened with a visible marker, a warning, and kept in full."""
        full: LongValues = {}
        value = "x" * 7000
        short = shorten("param", "notes", value, full)
        assert len(short) == 6000
        assert "shortened from 7000 chars" in short
        assert full == {"param": {"notes": value}}
        assert any("notes" in r.getMessage() for r in caplog.records)
        assert shorten("param", "k", "short", full) == "short"

    def test_invalid_characters_are_replaced_without_merging_keys(self) -> None:
        """Keys MLflow refuses are made safe; two that would collide stay apart."""
        limits = KeyShortener()
        assert limits.key("val/loss.x-1 a:b") == "val/loss.x-1 a:b"
        first, second = limits.key("acc@1"), limits.key("acc#1")
        assert first == "acc_1"
        assert second.startswith("acc_1-")
        assert limits.key("acc@1") == first
        assert [t["value"] for t in limits.tag_originals({})] == ["acc@1", "acc#1"]

    def test_long_keys_become_prefix_and_hash_with_original_tagged(self) -> None:
        """A key over 250 characters is shortened once, and its original goes in a tag."""
        limits = KeyShortener()
        key = "a/" * 200
        short = limits.key(key)
        assert len(short) <= MAX_KEY_CHARS
        assert short.startswith("a/a/")
        assert limits.key(key) == short
        assert limits.key("ok") == "ok"
        full: LongValues = {}
        tags = limits.tag_originals(full)
        assert [t["value"] for t in tags] == [key]
        assert tags[0]["key"].startswith("loopbridge.original_key.")
        assert limits.tag_originals(full) == []

    def test_non_finite_values_are_sent_as_strings(self) -> None:
        """NaN and infinities become the strings protobuf JSON reads."""
        assert mlflow_value(math.nan) == "NaN"
        assert mlflow_value(math.inf) == "Infinity"
        assert mlflow_value(-math.inf) == "-Infinity"
        assert mlflow_value(2) == 2.0

"""No secret in a URL reaches any surface: logs (every logger, every level), errors,
tracebacks, reprs, reports, redirect targets, and the demo's output.

A table of secret-bearing URLs (query parameters of many names, a webhook path, userinfo,
a fragment) is crossed with every surface, against the real uvicorn server. Each case uses
its own secret string, because what a Redactor learns is process-wide.
"""

from __future__ import annotations

import itertools
import logging
import subprocess
import sys
import traceback
from pathlib import Path

import httpx
import pytest
from tests.fixtures.http import DashboardServer

import loopbridge as lb
from loopbridge import Bridge, DrainError, DrainReport, LogContext, TrainLoop
from loopbridge._redact import redact_text, safe_url
from loopbridge.callbacks import HttpDashboard, MLflowLogger
from loopbridge.callbacks._http import HttpRequestError, HttpRetryPolicy

FAST = HttpRetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.02, jitter_s=0.0)
_ids = itertools.count()

# {S} is the secret, {H} the server's host:port.
URL_SHAPES = {
    "api-key": "http://{H}/ingest?api-key={S}",
    "code": "http://{H}/ingest?code={S}&project=p",
    "private_token": "http://{H}/ingest?private_token={S}",
    "access_key": "http://{H}/ingest?access_key={S}",
    "token": "http://{H}/ingest?token={S}",
    "any-name": "http://{H}/ingest?p={S}",
    "webhook-path": "http://{H}/hooks/T0000/{S}",
    "userinfo": "http://bot:{S}@{H}/ingest",
    "fragment": "http://{H}/ingest#{S}",
}


def secret() -> str:
    """A fresh secret string for one case."""
    return f"Zk{next(_ids)}x9SECRETq7Wm3"


def url_for(shape: str, server: DashboardServer, value: str) -> str:
    """The case's URL on the test server."""
    host = server.url.removeprefix("http://")
    return URL_SHAPES[shape].format(H=host, S=value)


def exception_texts(exc: BaseException) -> list[str]:
    """Every text an exception chain shows: str, repr, notes, traceback, httpx request URLs."""
    texts = ["".join(traceback.format_exception(exc))]
    todo, seen = [exc], set()
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        texts += [str(current), repr(current), *getattr(current, "__notes__", [])]
        if isinstance(current, httpx.RequestError):
            texts.append(str(current.request.url))
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return texts


def report_texts(report: DrainReport) -> list[str]:
    """Every text a report shows."""
    texts = [repr(report), str(report), report.summary()]
    texts += [str(r) for r in report.failed + report.cancelled + report.pending]
    texts += [repr(r) for r in report.failed + report.cancelled + report.pending]
    texts += [str(loss) for loss in report.losses] + [repr(loss) for loss in report.losses]
    for record in report.failed:
        if record.exception is not None:
            texts += exception_texts(record.exception)
    return texts


def leaks(value: str, texts: list[str]) -> list[str]:
    """The texts that contain the secret, shortened around it."""
    found = []
    for text in texts:
        at = text.find(value)
        if at >= 0:
            found.append(text[max(0, at - 120) : at + 40])
    return found


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every logger at DEBUG, httpx's and httpcore's children included."""
    caplog.set_level(logging.DEBUG)
    return caplog


def log_texts(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The formatted log (with tracebacks) and each record's message."""
    assert any(r.name.startswith("httpcore.") for r in caplog.records), "no httpcore DEBUG"
    return [caplog.text] + [r.getMessage() for r in caplog.records]


class TestRules:
    """The rule itself: URLs show their origin only, whatever the name of the secret."""

    @pytest.mark.parametrize("shape", sorted(URL_SHAPES))
    def test_safe_url_keeps_only_the_origin(self, shape: str) -> None:
        """scheme://host:port, then /*** for whatever else there was."""
        value = secret()
        url = URL_SHAPES[shape].format(H="dash.example:8443", S=value)
        shown = safe_url(url)
        assert value not in shown
        assert shown == "http://dash.example:8443/***"
        assert value not in redact_text(f"POST {url} failed ({url!r})")

    def test_opt_in_shows_the_path_but_never_userinfo(self) -> None:
        """log_full_urls shows the path and plain parameters; userinfo stays hidden."""
        shown = safe_url("https://bot:pw-123456@h.example/v1/ingest?project=p", full=True)
        assert shown == "https://***@h.example/v1/ingest?project=p"

    def test_other_schemes_keep_their_path(self) -> None:
        """s3:// and file:// name objects, not secrets: their path stays, userinfo goes."""
        assert safe_url("s3://bucket/run/step-00000010") == "s3://bucket/run/step-00000010"
        assert safe_url("s3://AKIA:sk-999999@bucket/k") == "s3://***@bucket/k"

    def test_relative_location_in_header_dumps(self) -> None:
        """httpcore's DEBUG header lists hide Location and credential headers."""
        value = secret()
        line = (
            "receive_response_headers.complete return_value=(b'HTTP/1.1', 307, b'Temporary "
            f"Redirect', [(b'location', b'/hooks/{value}'), (b'set-cookie', b's={value}')])"
        )
        assert value not in redact_text(line)

    def test_s3_client_debug_headers(self, caplog: pytest.LogCaptureFixture) -> None:
        """botocore's DEBUG header dumps lose credentials; a handler added now sees that too."""
        value = secret()
        caplog.set_level(logging.DEBUG)
        logging.getLogger("botocore.endpoint").debug(
            "Sending http request: %s",
            f"<AWSPreparedRequest headers={{'x-amz-security-token': b'{value}', "
            f"'Authorization': b'AWS4-HMAC-SHA256 Credential=AK/{value}'}}>",
        )
        assert caplog.records
        assert value not in caplog.text


class TestSurfaces:
    """Each secret-bearing URL x every surface: the secret appears nowhere."""

    @pytest.mark.parametrize("shape", sorted(URL_SHAPES))
    def test_failing_dashboard_run(
        self,
        shape: str,
        dashboard_server: DashboardServer,
        debug_logs: pytest.LogCaptureFixture,
        tmp_path: Path,
    ) -> None:
        """503, a 302 to a secret Location, then delivery: logs, DrainError, report, repr."""
        value = secret()
        url = url_for(shape, dashboard_server, value)
        elsewhere = f"{dashboard_server.url}/moved/{value}?code={value}"
        dashboard_server.fail_next(1, 503)
        dashboard_server.fail_next(1, 302, headers={"location": elsewhere})
        dash = HttpDashboard(url, max_batch_rows=5, retry=FAST)
        loop = TrainLoop(lambda s, b: {"loss": 1.0}, range(20), out_dir=tmp_path, callbacks=[dash])
        with pytest.raises(DrainError) as caught:
            loop.run()
        error = caught.value
        assert "HTTP 302 to" in str(error)  # the redirect was reported, its target redacted
        assert len(dashboard_server.posts()) >= 3
        texts = log_texts(debug_logs) + exception_texts(error) + report_texts(error.report)
        texts.append(repr(dash))
        assert not leaks(value, texts)

    @pytest.mark.parametrize("shape", sorted(URL_SHAPES))
    def test_unreachable_dashboard(
        self,
        shape: str,
        dashboard_server: DashboardServer,
        debug_logs: pytest.LogCaptureFixture,
        tmp_path: Path,
    ) -> None:
        """Connection errors (httpx exceptions carrying the request) leak nothing either."""
        value = secret()
        url = url_for(shape, dashboard_server, value)
        dashboard_server.set_down(True)
        dash = HttpDashboard(url, max_batch_rows=1000, retry=FAST)
        loop = TrainLoop(lambda s, b: {"loss": 1.0}, range(3), out_dir=tmp_path, callbacks=[dash])
        with pytest.raises(DrainError) as caught:
            loop.run()
        report = caught.value.report
        assert report.failed, report.summary()
        chain = exception_texts(report.failed[0].exception or RuntimeError())
        shown = " ".join(chain)
        assert any(e in shown for e in ("ReadError", "ConnectError", "RemoteProtocolError"))
        assert f"{dashboard_server.url}/redacted" in shown  # the httpx request, scrubbed
        texts = log_texts(debug_logs) + exception_texts(caught.value) + report_texts(report)
        assert not leaks(value, texts)

    @pytest.mark.parametrize("shape", sorted(URL_SHAPES))
    def test_mlflow_logger(
        self,
        shape: str,
        dashboard_server: DashboardServer,
        debug_logs: pytest.LogCaptureFixture,
    ) -> None:
        """MLflowLogger's repr and its errors against a server that drops connections."""
        value = secret()
        url = url_for(shape, dashboard_server, value)
        dashboard_server.set_down(True)
        logger = MLflowLogger(url, retry=FAST, call_timeout=30)
        with Bridge(name="mlflow-secrets") as bridge:
            callbacks = lb.CallbackList([logger], bridge=bridge)
            with pytest.raises(HttpRequestError) as caught:
                callbacks.on_experiment_start(LogContext(experiment_name="e"))
        texts = log_texts(debug_logs) + exception_texts(caught.value) + [repr(logger)]
        assert not leaks(value, texts)


class TestDemo:
    """`loopbridge demo --dashboard URL --log-level DEBUG` prints no part of a secret URL."""

    def test_demo_output_has_no_secret(
        self, dashboard_server: DashboardServer, tmp_path: Path
    ) -> None:
        """stdout and stderr of the demo, logging at DEBUG, hold none of the secrets."""
        values = [secret() for _ in range(4)]
        host = dashboard_server.url.removeprefix("http://")
        url = f"http://bot:{values[0]}@{host}/hooks/{values[1]}?api-key={values[2]}"
        dashboard_server.fail_next(1, 503)
        dashboard_server.fail_next(
            1, 302, headers={"location": f"{dashboard_server.url}/to/{values[3]}"}
        )
        command = [
            sys.executable,
            "-m",
            "loopbridge.cli",
            "demo",
            "--out",
            str(tmp_path / "demo"),
            "--dashboard",
            url,
            "--log-level",
            "DEBUG",
            "--repeats",
            "1",
            "--steps",
            "20",
            "--checkpoint-mb",
            "0.01",
            "--eval-every",
            "5",
            "--step-ms",
            "0",
            "--no-progress",
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=90, check=False)
        output = done.stdout + done.stderr
        assert "DEBUG httpcore" in done.stderr, done.stderr[-2000:]
        assert "HTTP 302 to" in output  # the lost batch is named, with the target's origin
        assert len(dashboard_server.posts()) >= 3
        for value in values:
            assert not leaks(value, [output]), leaks(value, [output])

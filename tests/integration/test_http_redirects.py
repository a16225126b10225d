"""3xx answers against the real uvicorn server: only a 2xx is delivery; 307/308 are followed."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.fixtures.http import DashboardServer
from tests.integration.test_http_dashboard import run_steps

from loopbridge._bridge import Bridge
from loopbridge.callbacks._http import (
    MAX_REDIRECTS,
    HttpRedirectError,
    HttpRetryPolicy,
    RetryingClient,
)
from loopbridge.callbacks._redact import Redactor
from loopbridge.callbacks.http_dashboard import HttpDashboard

FAST = HttpRetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02, jitter_s=0.0)
SECRET = "redirect-s3cr3t-9f8e7d"
API_KEY = "api-key-value-5c4b3a"
FOLLOWED = (307, 308)
NOT_FOLLOWED = (300, 301, 302, 303, 304, 305, 306)


def client_for(url: str, headers: dict[str, str] | None = None) -> RetryingClient:
    """A client with a fast retry policy and the endpoint's redactor."""
    return RetryingClient(
        name="test", redactor=Redactor(url, headers), headers=headers, policy=FAST, timeout=5
    )


@pytest.fixture
def other_server() -> Iterator[DashboardServer]:
    """A second server, on another port: another origin."""
    server = DashboardServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


class TestRetryingClientRedirects:
    """The client follows 307/308 with the same method and body, and refuses the other 3xx."""

    @pytest.mark.parametrize("status", FOLLOWED)
    async def test_followed_with_method_and_body(
        self, dashboard_server: DashboardServer, status: int
    ) -> None:
        """A 307/308 is followed: the same POST with the same body reaches the new address."""
        dashboard_server.fail_next(1, status, headers={"location": f"/moved/{SECRET}"})
        headers = {"x-api-key": API_KEY}
        client = client_for(dashboard_server.url, headers)
        body = b'{"events": [1, 2, 3]}'
        try:
            response = await client.request("POST", dashboard_server.url + "/ingest", content=body)
        finally:
            await client.aclose()
        assert response.status_code == 200
        first, second = dashboard_server.posts()
        assert (first.path, first.status) == ("/ingest", status)
        assert (second.method, second.path, second.status) == ("POST", f"/moved/{SECRET}", 200)
        assert second.body == body
        assert second.headers["x-api-key"] == API_KEY  # same origin: the headers stay

    @pytest.mark.parametrize("status", FOLLOWED)
    async def test_other_origin_gets_no_secret_headers(
        self, dashboard_server: DashboardServer, other_server: DashboardServer, status: int
    ) -> None:
        """Followed to another origin, the body goes along but no secret header does."""
        dashboard_server.fail_next(1, status, headers={"location": f"{other_server.url}/in"})
        headers = {"x-api-key": API_KEY, "authorization": f"Bearer {API_KEY}"}
        client = client_for(dashboard_server.url, headers)
        try:
            await client.request("POST", dashboard_server.url + "/ingest", content=b"{}")
        finally:
            await client.aclose()
        (moved,) = other_server.posts()
        assert moved.body == b"{}"
        assert "x-api-key" not in moved.headers
        assert "authorization" not in moved.headers

    @pytest.mark.parametrize("status", NOT_FOLLOWED)
    async def test_other_3xx_fail_naming_the_target(
        self, dashboard_server: DashboardServer, status: int
    ) -> None:
        """Any other 3xx raises HttpRedirectError naming the target's origin, not its secret."""
        location = f"{dashboard_server.url}/elsewhere/{SECRET}?code={SECRET}"
        dashboard_server.fail_next(1, status, headers={"location": location})
        client = client_for(dashboard_server.url)
        try:
            with pytest.raises(HttpRedirectError) as caught:
                await client.request("POST", dashboard_server.url + "/ingest", content=b"{}")
        finally:
            await client.aclose()
        error = caught.value
        text = str(error)
        assert f"answered HTTP {status} to {dashboard_server.url}" in text
        assert "only a 2xx is" in text
        assert SECRET not in text
        assert SECRET not in repr(error)
        assert error.status == status
        assert error.location is not None
        assert SECRET not in error.location
        assert len(dashboard_server.posts()) == 1  # not retried, not followed

    async def test_3xx_without_location(self, dashboard_server: DashboardServer) -> None:
        """A 3xx with no Location is a failure too, said so."""
        dashboard_server.fail_next(1, 307)
        client = client_for(dashboard_server.url)
        try:
            with pytest.raises(HttpRedirectError, match="answered HTTP 307 with no Location"):
                await client.request("POST", dashboard_server.url + "/ingest", content=b"{}")
        finally:
            await client.aclose()

    async def test_hops_are_bounded(self, dashboard_server: DashboardServer) -> None:
        """A redirect loop stops after MAX_REDIRECTS hops with an error."""
        dashboard_server.fail_next(50, 308, headers={"location": "/again"})
        client = client_for(dashboard_server.url)
        try:
            with pytest.raises(HttpRedirectError, match=f"more than {MAX_REDIRECTS} times"):
                await client.request("POST", dashboard_server.url + "/ingest", content=b"{}")
        finally:
            await client.aclose()
        assert len(dashboard_server.posts()) == MAX_REDIRECTS + 1


class TestDashboardRedirects:
    """HttpDashboard counts a batch delivered only on a 2xx; other 3xx are reported losses."""

    @pytest.fixture
    def bridge(self) -> Iterator[Bridge]:
        with Bridge(name="redirects") as bridge:
            yield bridge

    @pytest.mark.parametrize("status", FOLLOWED)
    def test_followed_redirect_delivers(
        self, dashboard_server: DashboardServer, bridge: Bridge, tmp_path: Path, status: int
    ) -> None:
        """Every row arrives at the redirect target, and the drain is clean."""
        dashboard_server.fail_next(1, status, headers={"location": "/v2/ingest"})
        dash = HttpDashboard(dashboard_server.url + "/ingest", max_batch_rows=100, retry=FAST)
        report = run_steps(dash, bridge, tmp_path, 20)
        assert report.ok, report.summary()
        steps = [e["step"] for e in dashboard_server.events() if e["type"] == "step"]
        assert steps == list(range(1, 21))
        assert dash.summary.failed_batches == 0

    @pytest.mark.parametrize("status", NOT_FOLLOWED)
    def test_other_3xx_is_a_reported_loss(
        self,
        dashboard_server: DashboardServer,
        bridge: Bridge,
        tmp_path: Path,
        status: int,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """A 3xx answer is not delivery: the rows are counted lost and the target is named."""
        caplog.set_level(logging.DEBUG)
        location = f"{dashboard_server.url}/hooks/{SECRET}"
        dashboard_server.fail_next(1, status, headers={"location": location})
        dash = HttpDashboard(dashboard_server.url + "/ingest", max_batch_rows=1000, retry=FAST)
        report = run_steps(dash, bridge, tmp_path, 5)
        assert not report.ok
        (loss,) = report.losses
        assert loss.count == 7  # train_start, 5 steps, train_end: all in the one batch
        assert f"HTTP {status} to {dashboard_server.url}" in loss.detail
        assert dash.summary.failed_batches == 1
        assert dash.summary.rows == 0
        texts = [r.getMessage() for r in caplog.records] + [str(loss), repr(report)]
        assert not [t for t in texts if SECRET in t]

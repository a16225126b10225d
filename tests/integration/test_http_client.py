"""RetryingClient on its own, in async tests, against the real uvicorn server on loopback."""

from __future__ import annotations

import email.utils
import time

import pytest
from tests.fixtures.http import DashboardServer

from loopbridge.callbacks._http import (
    HttpRequestError,
    HttpRetryPolicy,
    PermanentHttpError,
    RetryingClient,
)
from loopbridge.callbacks._redact import Redactor

FAST = HttpRetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02, jitter_s=0.0)


def client_for(url: str, policy: HttpRetryPolicy = FAST) -> RetryingClient:
    """A client with the test's retry policy."""
    return RetryingClient(name="test", redactor=Redactor(url), policy=policy, timeout=5)


class TestRetryingClient:
    async def test_connection_errors_are_retried_then_reported(
        self, dashboard_server: DashboardServer
    ) -> None:
        """A server that drops every connection costs max_attempts tries, then a clear error."""
        dashboard_server.set_down(True)
        client = client_for(dashboard_server.url)
        try:
            with pytest.raises(HttpRequestError, match="failed after 3 attempts") as caught:
                await client.request("POST", dashboard_server.url + "/x", content=b"{}")
        finally:
            await client.aclose()
        assert not isinstance(caught.value, PermanentHttpError)
        assert client.stats.requests == 3
        assert client.stats.retries == 2
        assert dashboard_server.aborted_connections >= 3

    async def test_retry_after_http_date_is_honoured(
        self, dashboard_server: DashboardServer
    ) -> None:
        """Retry-After given as an HTTP date holds the retry until that moment."""
        when = email.utils.formatdate(time.time() + 2, usegmt=True)
        # The moment the header names, on the monotonic clock the server records with.
        target = email.utils.parsedate_to_datetime(when).timestamp()
        target_monotonic = time.monotonic() + (target - time.time())
        dashboard_server.fail_next(1, 503, headers={"Retry-After": when})
        client = client_for(dashboard_server.url)
        try:
            response = await client.request("POST", dashboard_server.url + "/x", content=b"{}")
        finally:
            await client.aclose()
        assert response.status_code == 200
        first, second = dashboard_server.posts()[:2]
        assert second.arrived > first.responded
        # Not before the named moment (50 ms for the two clocks read apart).
        assert second.arrived >= target_monotonic - 0.05

    async def test_retry_after_is_capped(self, dashboard_server: DashboardServer) -> None:
        """A Retry-After of an hour waits only the policy's cap."""
        dashboard_server.fail_next(1, 429, headers={"Retry-After": "3600"})
        policy = HttpRetryPolicy(max_attempts=2, retry_after_cap_s=0.1)
        client = client_for(dashboard_server.url, policy)
        try:
            await client.request("POST", dashboard_server.url + "/x", content=b"{}")
        finally:
            await client.aclose()
        first, second = dashboard_server.posts()[:2]
        assert 0.1 <= second.arrived - first.responded < 5.0

    async def test_accepted_status_is_returned_not_raised(
        self, dashboard_server: DashboardServer
    ) -> None:
        """A status the caller expects (404 on a lookup) comes back as a response, untried."""
        dashboard_server.fail_next(1, 404)
        client = client_for(dashboard_server.url)
        try:
            response = await client.request("GET", dashboard_server.url + "/x", accept=(404,))
        finally:
            await client.aclose()
        assert response.status_code == 404
        assert client.stats.retries == 0
        assert client.stats.failures == 0

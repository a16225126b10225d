"""The posting side of the dashboard callbacks: retry policy, errors, one client per loop.

Everything here runs on the bridge loop. Retries cover 5xx, 408, 429 (honouring Retry-After,
capped), connection errors and timeouts, with exponential backoff and jitter; other 4xx are
raised at once as PermanentHttpError. Only a 2xx is success: a 307 or 308 is followed with
the same method and body (at most MAX_REDIRECTS hops; secret headers are not sent to another
origin), and any other 3xx is raised as HttpRedirectError naming the target. Every message
is redacted (see `_redact`).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    retry_if_result,
    stop_after_attempt,
)

from loopbridge._exceptions import LoopbridgeError
from loopbridge.callbacks._redact import Redactor, is_secret_header

if TYPE_CHECKING:
    from loopbridge._bridge import Bridge

__all__ = [
    "MAX_REDIRECTS",
    "ClientSlot",
    "HttpRedirectError",
    "HttpRequestError",
    "HttpRetryPolicy",
    "PermanentHttpError",
    "RetryingClient",
    "parse_retry_after",
]

logger = logging.getLogger(__name__)


class HttpRequestError(LoopbridgeError):
    """A request failed after its retries; the message and `url` are redacted."""

    def __init__(
        self, message: str, *, url: str, status: int | None = None, attempts: int = 1
    ) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.attempts = attempts


class PermanentHttpError(HttpRequestError):
    """The server refused the request with a 4xx that retrying cannot fix (not 408 or 429)."""


class HttpRedirectError(PermanentHttpError):
    """The server answered a 3xx that is not followed (or too many); `location` is redacted."""

    def __init__(
        self, message: str, *, url: str, status: int, location: str | None, attempts: int = 1
    ) -> None:
        super().__init__(message, url=url, status=status, attempts=attempts)
        self.location = location


MAX_REDIRECTS = 5
"""307/308 hops followed per request at most."""
_FOLLOWED = frozenset({307, 308})


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or HTTP date), or None."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds):
        return None
    return max(0.0, seconds)


_RETRYABLE_STATUS = frozenset({408, 429})


def _is_retryable_status(status: int) -> bool:
    return status >= 500 or status in _RETRYABLE_STATUS


@dataclass(frozen=True)
class HttpRetryPolicy:
    """How to retry: attempts, exponential backoff with jitter, and the cap on `Retry-After`.

    `max_attempts` counts requests, the first included. `retry_after_cap_s` bounds how long
    a server's `Retry-After` can hold us, so a hostile header cannot stall a drain.
    """

    max_attempts: int = 6
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 10.0
    jitter_s: float = 0.25
    retry_after_cap_s: float = 60.0

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based), jitter included."""
        base = min(self.max_backoff_s, self.initial_backoff_s * 2.0 ** (attempt - 1))
        return base + random.uniform(0.0, self.jitter_s)  # jitter, not crypto


@dataclass
class RequestStats:
    """Counters of one client: requests sent, retries, and requests that finally failed."""

    requests: int = 0
    retries: int = 0
    failures: int = 0


class RetryingClient:
    """One `httpx.AsyncClient` on the bridge loop, with the retry policy and redaction.

    Create and use it only on the bridge loop; `aclose()` it from a shutdown callback.
    """

    def __init__(
        self,
        *,
        name: str,
        redactor: Redactor,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        policy: HttpRetryPolicy | None = None,
    ) -> None:
        self._name = name
        self._redactor = redactor
        self._policy = policy or HttpRetryPolicy()
        self.stats = RequestStats()
        # verify stays at httpx's default (True): a dashboard token must not go to an impostor.
        self._client = httpx.AsyncClient(headers=dict(headers or {}), timeout=timeout)

    @property
    def policy(self) -> HttpRetryPolicy:
        """The retry policy in force."""
        return self._policy

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    def _wait(self, state: RetryCallState) -> float:
        outcome = state.outcome
        if outcome is not None and not outcome.failed:
            response = outcome.result()
            if not isinstance(response, httpx.Response):
                return self._policy.backoff(state.attempt_number)
            hinted = parse_retry_after(response.headers.get("retry-after"))
            if hinted is not None:
                return min(hinted, self._policy.retry_after_cap_s)
        return self._policy.backoff(state.attempt_number)

    def _before_sleep(self, state: RetryCallState) -> None:
        self.stats.retries += 1
        outcome = state.outcome
        if outcome is None:
            reason = "unknown"
        elif outcome.failed:
            exc = outcome.exception()
            reason = self._redactor.text(f"{type(exc).__name__}: {exc}")
        else:
            reason = f"HTTP {outcome.result().status_code}"
        wait = state.upcoming_sleep
        logger.warning(
            "%s: attempt %d failed (%s); retrying in %.2fs",
            self._name,
            state.attempt_number,
            reason,
            wait,
        )

    async def request(
        self,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        content: bytes | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        accept: Collection[int] = (),
    ) -> httpx.Response:
        """Send one request, retrying transient failures; return the 2xx response.

        Statuses in `accept` (e.g. 404 for a lookup) are returned rather than raised. A 307
        or 308 is followed with the same method and body, up to MAX_REDIRECTS hops.

        Raises:
            HttpRedirectError: any other 3xx, or too many hops; the target is named.
            PermanentHttpError: a 4xx other than 408/429; it is never retried.
            HttpRequestError: transient failures outlasted the policy.
        """
        policy = self._policy

        retrying = AsyncRetrying(
            stop=stop_after_attempt(policy.max_attempts),
            wait=self._wait,
            retry=(
                retry_if_exception(lambda e: isinstance(e, httpx.TransportError))
                | retry_if_result(lambda r: _is_retryable_status(r.status_code))
            ),
            before_sleep=self._before_sleep,
            retry_error_callback=lambda state: state,
            reraise=False,
        )

        async def attempt() -> httpx.Response:
            self.stats.requests += 1
            response = await self._client.request(
                method, url, json=json_body, content=content, params=params, headers=headers
            )
            return await self._follow(response)

        outcome: Any = await retrying(attempt)
        safe_url = self._redactor.url(url)
        if isinstance(outcome, RetryCallState):
            self.stats.failures += 1
            self._raise_exhausted(outcome, method, safe_url)
        response: httpx.Response = outcome
        status = response.status_code
        if 300 <= status < 400 and status not in accept:
            self.stats.failures += 1
            self._raise_redirect(response, method, safe_url)
        if response.status_code >= 400 and response.status_code not in accept:
            self.stats.failures += 1
            body = self._redactor.text(response.text[:500])
            msg = (
                f"{self._name}: {method} {safe_url} was refused with HTTP "
                f"{response.status_code} (not retried): {body}"
            )
            raise PermanentHttpError(msg, url=safe_url, status=response.status_code)
        return response

    async def _follow(self, response: httpx.Response) -> httpx.Response:
        """Follow 307/308 (same method and body) up to MAX_REDIRECTS hops; return the last."""
        for _ in range(MAX_REDIRECTS):
            following = response.next_request
            if response.status_code not in _FOLLOWED or following is None:
                return response
            if _origin(following.url) != _origin(response.request.url):
                # httpx drops Authorization on the way to another origin; drop every secret.
                for name in [n for n in following.headers if is_secret_header(n)]:
                    del following.headers[name]
            await response.aclose()
            response = await self._client.send(following)
        return response

    def _raise_redirect(self, response: httpx.Response, method: str, safe_url: str) -> NoReturn:
        status = response.status_code
        location = response.headers.get("location")
        target = None
        if location is not None:
            target = self._redactor.url(response.request.url.join(location))
        if status in _FOLLOWED and response.next_request is not None:
            what = f"was redirected more than {MAX_REDIRECTS} times (the last hop: HTTP {status})"
        else:
            what = f"answered HTTP {status}"
        to = f" to {target}" if target else " with no Location"
        msg = (
            f"{self._name}: {method} {safe_url} {what}{to}; not delivered: only a 2xx is, "
            f"and only 307/308 (which keep the method and body) are followed. Point the URL "
            f"at the final address"
        )
        raise HttpRedirectError(msg, url=safe_url, status=status, location=target)

    def _raise_exhausted(self, state: RetryCallState, method: str, safe_url: str) -> NoReturn:
        outcome = state.outcome
        attempts = state.attempt_number
        if outcome is not None and outcome.failed:
            exc = outcome.exception()
            if exc is None:  # tenacity keeps the exception of every failed outcome
                exc = RuntimeError("unknown failure")
            self._redactor.scrub_exception(exc)
            reason = self._redactor.text(f"{type(exc).__name__}: {exc}")
            msg = (
                f"{self._name}: {method} {safe_url} failed after {attempts} attempts ({reason}); "
                f"check that the server is reachable, or raise max_attempts"
            )
            raise HttpRequestError(msg, url=safe_url, attempts=attempts) from exc
        status = outcome.result().status_code if outcome is not None else None
        msg = (
            f"{self._name}: {method} {safe_url} still answered HTTP {status} after "
            f"{attempts} attempts; the server is unhealthy, or raise max_attempts"
        )
        raise HttpRequestError(msg, url=safe_url, status=status, attempts=attempts)


class ClientSlot:
    """Holds one `RetryingClient` per bridge loop: made lazily on the loop, closed at close().

    A TrainLoop without an Experiment closes its bridge at the end of the run; the next run's
    bridge then gets a fresh client, and the counters of the old one are kept.
    """

    def __init__(self, factory: Callable[[], RetryingClient]) -> None:
        self._factory = factory
        self._client: RetryingClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bridges: list[Bridge] = []
        self._closed_stats = RequestStats()

    def register(self, bridge: Bridge) -> None:
        """Close the client when `bridge` closes; call from the loop thread (cheap if done)."""
        if not any(b is bridge for b in self._bridges):
            bridge.add_shutdown_callback(self._aclose)
            self._bridges.append(bridge)

    @property
    def bridge(self) -> Bridge | None:
        """The bridge registered last: the one serving the current run."""
        return self._bridges[-1] if self._bridges else None

    def get(self) -> RetryingClient:
        """The client of the running (bridge) loop, created on first use."""
        loop = asyncio.get_running_loop()
        client = self._client
        if client is None or self._loop is not loop:
            if client is not None:
                self._keep_stats(client)
            client = self._factory()
            self._client, self._loop = client, loop
        return client

    def stats(self) -> RequestStats:
        """Requests, retries and failures of every client this slot has made."""
        client = self._client
        total = RequestStats(**vars(self._closed_stats))
        if client is not None:
            total.requests += client.stats.requests
            total.retries += client.stats.retries
            total.failures += client.stats.failures
        return total

    def _keep_stats(self, client: RetryingClient) -> None:
        self._closed_stats.requests += client.stats.requests
        self._closed_stats.retries += client.stats.retries
        self._closed_stats.failures += client.stats.failures

    async def _aclose(self) -> None:
        client = self._client
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.aclose()

"""HTTP plumbing shared by the dashboard callbacks: redaction, retry policy, one posting client.

Everything here runs on the bridge loop except the redaction helpers, which are pure.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    retry_if_result,
    stop_after_attempt,
)

from loopbridge._exceptions import LoopbridgeError

if TYPE_CHECKING:
    from loopbridge._bridge import Bridge

__all__ = [
    "REDACTED",
    "ClientSlot",
    "HttpRequestError",
    "HttpRetryPolicy",
    "PermanentHttpError",
    "Redactor",
    "RetryingClient",
    "parse_retry_after",
    "redact_headers",
    "redact_url",
]

logger = logging.getLogger(__name__)

REDACTED = "***"

# Header names whose values are credentials, and query parameter names that carry them.
_SECRET_HEADER_WORDS = ("authorization", "token", "secret", "password", "api-key", "apikey")
_SECRET_HEADER_NAMES = frozenset({"cookie", "set-cookie", "x-api-key", "api-key"})
_SECRET_QUERY_NAMES = frozenset(
    {
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "auth",
        "auth_token",
        "key",
        "api_key",
        "apikey",
        "secret",
        "client_secret",
        "password",
        "passwd",
        "pwd",
        "sig",
        "signature",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
    }
)
# Free text may quote a URL with credentials that we were never told about (a redirect).
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&;](?:" + "|".join(re.escape(n) for n in sorted(_SECRET_QUERY_NAMES)) + r"))="
    r"[^&#\s\"']*",
    re.IGNORECASE,
)
_BEARER = re.compile(r"(?P<scheme>\b(?:bearer|basic|token)\s+)[A-Za-z0-9._~+/=-]{8,}", re.I)


def _is_secret_header(name: str) -> bool:
    lowered = name.lower()
    return lowered in _SECRET_HEADER_NAMES or any(w in lowered for w in _SECRET_HEADER_WORDS)


def redact_url(url: str | httpx.URL) -> str:
    """The URL with its userinfo and credential-bearing query values replaced by `***`."""
    text = str(url)
    try:
        parts = urlsplit(text)
    except ValueError:
        return redact_text(text)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, REDACTED if k.lower() in _SECRET_QUERY_NAMES else v) for k, v in pairs],
            safe="*",
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_headers(headers: Mapping[str, str] | httpx.Headers) -> dict[str, str]:
    """A copy of the headers with credential values replaced by `***`."""
    return {k: (REDACTED if _is_secret_header(k) else v) for k, v in headers.items()}


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Free text with known secrets, URL userinfo, secret query values and bearer tokens hidden."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m['name']}={REDACTED}", text)
    return _BEARER.sub(lambda m: f"{m['scheme']}{REDACTED}", text)


class Redactor:
    """Hides the secrets of one endpoint (its URL credentials and secret headers) in any text."""

    def __init__(self, url: str, headers: Mapping[str, str] | None = None) -> None:
        secrets: set[str] = set()
        parts = urlsplit(url)
        if parts.username:
            secrets.add(parts.username)
        if parts.password:
            secrets.add(parts.password)
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name.lower() in _SECRET_QUERY_NAMES and value:
                secrets.add(value)
        for name, value in (headers or {}).items():
            if _is_secret_header(name) and value:
                secrets.add(value)
                # "Bearer abc" leaks "abc" on its own too; the scheme word is no secret.
                secrets.update(p for p in value.split()[1:] if len(p) >= 6)
        # Longest first, so that a secret containing another is hidden whole.
        self._secrets = tuple(sorted(secrets, key=len, reverse=True))

    @property
    def secrets(self) -> tuple[str, ...]:
        """The secret strings this redactor hides."""
        return self._secrets

    def text(self, text: str) -> str:
        """`text` with every known and recognisable secret hidden."""
        return redact_text(text, self._secrets)

    def scrub_exception(self, exc: BaseException) -> BaseException:
        """Redact the messages of `exc` and its causes in place, so tracebacks leak nothing."""
        seen: set[int] = set()
        current: BaseException | None = exc
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            current.args = tuple(self.text(a) if isinstance(a, str) else a for a in current.args)
            current = current.__cause__ or current.__context__
        return exc


class _RedactingFilter(logging.Filter):
    """Redacts the URLs httpx logs at INFO ("HTTP Request: POST <url>"), which carry tokens."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._secrets: tuple[str, ...] = ()

    def add(self, secrets: Iterable[str]) -> None:
        with self._lock:
            merged = set(self._secrets) | {s for s in secrets if s}
            self._secrets = tuple(sorted(merged, key=len, reverse=True))

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True
        redacted = redact_text(message, self._secrets)
        if redacted != message:
            record.msg = redacted
            record.args = ()
        return True


_HTTPX_LOG_FILTER = _RedactingFilter()


def _install_log_filter(secrets: Iterable[str]) -> None:
    """Make httpx's own request logging redact our secrets, once per process."""
    _HTTPX_LOG_FILTER.add(secrets)
    for name in ("httpx", "httpcore"):
        log = logging.getLogger(name)
        if _HTTPX_LOG_FILTER not in log.filters:
            log.addFilter(_HTTPX_LOG_FILTER)


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
        _install_log_filter(redactor.secrets)
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
        """Send one request, retrying transient failures; return the 2xx/3xx response.

        Statuses in `accept` (e.g. 404 for a lookup) are returned rather than raised.

        Raises:
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
            return await self._client.request(
                method, url, json=json_body, content=content, params=params, headers=headers
            )

        outcome: Any = await retrying(attempt)
        safe_url = redact_url(url)
        if isinstance(outcome, RetryCallState):
            self.stats.failures += 1
            self._raise_exhausted(outcome, method, safe_url)
        response: httpx.Response = outcome
        if response.status_code >= 400 and response.status_code not in accept:
            self.stats.failures += 1
            body = self._redactor.text(response.text[:500])
            msg = (
                f"{self._name}: {method} {safe_url} was refused with HTTP "
                f"{response.status_code} (not retried): {body}"
            )
            raise PermanentHttpError(msg, url=safe_url, status=response.status_code)
        return response

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

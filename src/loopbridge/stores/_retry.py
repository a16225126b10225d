"""Which S3 failures are worth retrying, and the tenacity policy that retries them.

botocore's own retries are switched off (`total_max_attempts=1`) so that this policy is the
only one: every retry is counted and logged, and every attempt is bounded by an asyncio
timeout, which also covers the `Expect: 100-continue` wait that ignores `read_timeout`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_base

from loopbridge._exceptions import PermanentStoreError, StoreError

__all__ = ["RetryPolicy", "call_with_retries", "error_code", "is_slowdown", "is_transient"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "BadGateway",
        "GatewayTimeout",
    }
)
_SLOWDOWN_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestThrottled"})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently a remote call is retried.

    `max_attempts` counts requests, the first one included. Waits grow exponentially from
    `base_delay` up to `max_delay`, with jitter; after a SlowDown the wait is at least
    `slowdown_delay` (doubling per attempt), as S3 asks. Each attempt is cut off after
    `call_timeout` seconds.
    """

    max_attempts: int = 5
    base_delay: float = 0.25
    max_delay: float = 20.0
    slowdown_delay: float = 1.0
    call_timeout: float = 120.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            msg = (
                f"max_attempts must be at least 1 (one request, no retry), got {self.max_attempts}"
            )
            raise ValueError(msg)
        if self.call_timeout <= 0 or self.base_delay < 0 or self.max_delay < 0:
            msg = "call_timeout must be positive and the retry delays not negative"
            raise ValueError(msg)


def error_code(exc: BaseException | None) -> tuple[str | None, int | None]:
    """The S3 error code and HTTP status of a botocore ClientError, else (None, None)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None, None
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return (str(code) if code is not None else None), (int(status) if status else None)


def is_slowdown(exc: BaseException | None) -> bool:
    """Whether the server asked us to slow down (SlowDown, throttling or HTTP 429/503)."""
    code, status = error_code(exc)
    return code in _SLOWDOWN_CODES or status in {429, 503}


# 501 NotImplemented: the store lacks what a header asks for (a checksum algorithm, say);
# asking again does not add it.
_NEVER_TRANSIENT = frozenset({"NotImplemented"})


def is_transient(exc: BaseException) -> bool:
    """Whether a failed call may succeed if repeated: 5xx, throttling, resets, timeouts."""
    if isinstance(exc, StoreError):
        # Our own verdicts (integrity, permanent) are final.
        return False
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    code, status = error_code(exc)
    if code is not None or status is not None:
        if code in _NEVER_TRANSIENT:
            return False
        return code in _TRANSIENT_CODES or (status is not None and (status >= 500 or status == 429))
    try:
        import aiohttp
        from botocore import exceptions as bexc
    except ImportError:  # pragma: no cover - only reached without the s3 extra
        return False
    network = (
        bexc.ConnectionError,  # refused or reset connections (EndpointConnectionError...)
        bexc.HTTPClientError,  # read/connect timeouts, connections closed mid-response
        bexc.IncompleteReadError,
        bexc.ResponseStreamingError,
        aiohttp.ClientConnectionError,
        aiohttp.ClientPayloadError,
    )
    return isinstance(exc, network)


class _Backoff(wait_base):
    """Exponential backoff with jitter, longer after a SlowDown."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy

    def __call__(self, retry_state: RetryCallState) -> float:
        policy = self._policy
        growth = 2 ** (retry_state.attempt_number - 1)
        ceiling = min(policy.max_delay, policy.base_delay * growth)
        # "Equal jitter": at least half the step, so waits still grow, spread to avoid herds.
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if is_slowdown(exc):
            delay = max(delay, min(policy.max_delay, policy.slowdown_delay * growth))
        return float(delay)


def _describe(exc: BaseException) -> str:
    """A short reason for a failure that never includes request headers or credentials."""
    code, status = error_code(exc)
    if code is not None or status is not None:
        message = getattr(exc, "response", {}).get("Error", {}).get("Message") or ""
        tail = f": {message}" if message else ""
        return f"{code} (HTTP {status}){tail}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__ + (f": {exc}" if str(exc) else "")


_CHECKSUM_MISMATCH = frozenset({"BadDigest", "XAmzContentChecksumMismatch", "InvalidDigest"})


def _permanent_hint(exc: BaseException) -> str:
    """What the user can do about a permanent refusal."""
    code, status = error_code(exc)
    if code == "NoSuchBucket":
        return "create the bucket or fix the bucket name in the destination URL"
    if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}:
        return "check the AWS credentials configured for this process"
    if status == 403 or code == "AccessDenied":
        return "check that the credentials may write and list this bucket and prefix"
    if code in _CHECKSUM_MISMATCH:
        return "the store computed another checksum for the body than was sent: not trusted"
    if code == "NotImplemented" or "checksum" in _describe(exc).lower():
        return (
            "if this store does not take the CRC32C checksum sent with each body, set the S3 "
            "option checksum='crc32' or 'none' (CheckpointUploader(store_options="
            "{'checksum': 'crc32'}), loopbridge resume --store-option checksum=crc32)"
        )
    return "this request will not succeed if repeated; check the destination and its settings"


async def call_with_retries(
    call: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    what: str,
    key: str,
    on_retry: Callable[[], None],
) -> T:
    """Run `call` until it succeeds, retrying transient failures under `policy`.

    `what` names the operation and object (`S3 PutObject s3://bucket/key`) for logs and errors.

    Raises:
        PermanentStoreError: the failure is not transient (403, NoSuchBucket, 400...).
        StoreError: every attempt failed transiently.
    """

    def before_sleep(state: RetryCallState) -> None:
        on_retry()
        exc = state.outcome.exception() if state.outcome is not None else None
        reason = _describe(exc) if exc is not None else "failed"
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        logger.info(
            "%s: attempt %d failed (%s); retrying in %.2fs",
            what,
            state.attempt_number,
            reason,
            wait,
        )

    retrying = AsyncRetrying(
        stop=stop_after_attempt(policy.max_attempts),
        wait=_Backoff(policy),
        retry=retry_if_exception(is_transient),
        before_sleep=before_sleep,
        reraise=True,
    )
    attempts = 0
    try:
        async for attempt in retrying:
            with attempt:
                attempts += 1
                with anyio.fail_after(policy.call_timeout):
                    return await call()
    except StoreError:
        raise
    except Exception as exc:
        if is_transient(exc):
            msg = f"{what} failed after {attempts} attempts: {_describe(exc)}"
            raise StoreError(msg, key=key) from exc
        msg = f"{what} was refused: {_describe(exc)}; {_permanent_hint(exc)}"
        raise PermanentStoreError(msg, key=key) from exc
    # AsyncRetrying either returns from inside the loop or raises; this is unreachable.
    msg = f"{what}: the retry loop ended without a result"
    raise StoreError(msg, key=key)

"""Which S3 failures are retried, and how long the store waits between attempts."""

from __future__ import annotations

from typing import Any

import pytest
from tenacity import RetryCallState

from loopbridge._exceptions import IntegrityError, PermanentStoreError, StoreError
from loopbridge.stores._retry import (
    RetryPolicy,
    _Backoff,
    call_with_retries,
    is_slowdown,
    is_transient,
)


def _ignore() -> None:
    """An on_retry callback that counts nothing."""


def _client_error(code: str, status: int, message: str = "m") -> Exception:
    from botocore.exceptions import ClientError

    response: Any = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    error: Exception = ClientError(response, "PutObject")
    return error


class TestClassification:
    @pytest.mark.parametrize(
        ("code", "status"),
        [
            ("SlowDown", 503),
            ("InternalError", 500),
            ("ServiceUnavailable", 503),
            ("RequestTimeout", 400),
            ("Throttling", 400),
            ("Whatever", 502),
            ("TooManyRequests", 429),
        ],
    )
    def test_transient_answers(self, code: str, status: int) -> None:
        """5xx, throttling and S3's 400 RequestTimeout are worth retrying."""
        assert is_transient(_client_error(code, status))

    @pytest.mark.parametrize(
        ("code", "status"),
        [
            ("AccessDenied", 403),
            ("NoSuchBucket", 404),
            ("InvalidArgument", 400),
            ("BadDigest", 400),
            ("NotImplemented", 501),
        ],
    )
    def test_permanent_answers(self, code: str, status: int) -> None:
        """403, NoSuchBucket and other 4xx are not, nor 501 NotImplemented."""
        assert not is_transient(_client_error(code, status))

    def test_network_failures_are_transient(self) -> None:
        """Resets, refused connections and timeouts are retried."""
        from botocore.exceptions import ConnectionClosedError, EndpointConnectionError

        assert is_transient(ConnectionResetError())
        assert is_transient(TimeoutError())
        assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
        assert is_transient(ConnectionClosedError(endpoint_url="http://x"))

    def test_our_own_verdicts_are_final(self) -> None:
        """An integrity failure is never retried."""
        assert not is_transient(IntegrityError("bad", key="k"))

    def test_slowdown_is_recognised(self) -> None:
        """SlowDown and 503s ask for a longer wait; a 500 does not."""
        assert is_slowdown(_client_error("SlowDown", 503))
        assert not is_slowdown(_client_error("InternalError", 500))


class TestBackoff:
    def _state(self, attempt: int, exc: BaseException) -> RetryCallState:
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = attempt
        state.set_exception((type(exc), exc, None))
        return state

    def test_waits_grow_and_stay_under_the_cap(self) -> None:
        """The wait grows with the attempt, with jitter, and never passes max_delay."""
        wait = _Backoff(RetryPolicy(base_delay=0.1, max_delay=1.0, slowdown_delay=0.0))
        error = _client_error("InternalError", 500)
        for attempt, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (6, 1.0)):
            delay = wait(self._state(attempt, error))
            assert ceiling / 2 <= delay <= ceiling

    def test_slowdown_waits_at_least_its_own_delay(self) -> None:
        """After a SlowDown the wait is at least slowdown_delay, doubling per attempt."""
        wait = _Backoff(RetryPolicy(base_delay=0.001, max_delay=10.0, slowdown_delay=0.5))
        error = _client_error("SlowDown", 503)
        assert wait(self._state(1, error)) >= 0.5
        assert wait(self._state(3, error)) >= 2.0


class TestCallWithRetries:
    async def test_permanent_error_is_tried_once(self) -> None:
        """A 403 fails at the first attempt with the operation and the fix in the message."""
        calls = []

        async def call() -> None:
            calls.append(1)
            raise _client_error("AccessDenied", 403)

        with pytest.raises(PermanentStoreError, match=r"S3 PutObject s3://b/k was refused"):
            await call_with_retries(
                call, policy=RetryPolicy(), what="S3 PutObject s3://b/k", key="k", on_retry=_ignore
            )
        assert len(calls) == 1

    @pytest.mark.parametrize(
        ("code", "status", "message", "hint"),
        [
            ("InvalidRequest", 400, "Unsupported checksum algorithm CRC32C", "checksum='crc32'"),
            ("InvalidArgument", 400, "x-amz-checksum-crc32c is not valid", "checksum='crc32'"),
            ("NotImplemented", 501, "A header you provided is not implemented", "'none'"),
            ("BadDigest", 400, "The CRC32C you specified did not match", "not trusted"),
            ("XAmzContentChecksumMismatch", 400, "checksum mismatch", "not trusted"),
            ("InvalidRequest", 400, "Missing required header", "will not succeed if repeated"),
        ],
    )
    async def test_a_refused_checksum_names_the_option_that_changes_it(
        self, code: str, status: int, message: str, hint: str
    ) -> None:
        """A store that rejects the body's checksum gets the fix: checksum='crc32' or 'none';
        a mismatch is not blamed on the option."""

        async def call() -> None:
            raise _client_error(code, status, message)

        with pytest.raises(PermanentStoreError) as caught:
            await call_with_retries(
                call, policy=RetryPolicy(), what="S3 PutObject s3://b/k", key="k", on_retry=_ignore
            )
        assert hint in str(caught.value)
        assert message in str(caught.value)
        if hint == "not trusted":
            assert "checksum='crc32'" not in str(caught.value)

    async def test_transient_errors_retry_until_success_and_are_counted(self) -> None:
        """Two 500s then success: three calls, two counted retries."""
        outcomes: list[Exception | None] = [
            _client_error("InternalError", 500),
            _client_error("InternalError", 500),
            None,
        ]
        retries: list[int] = []

        async def call() -> str:
            outcome = outcomes.pop(0)
            if outcome is not None:
                raise outcome
            return "ok"

        result = await call_with_retries(
            call,
            policy=RetryPolicy(base_delay=0.0),
            what="S3 PutObject s3://b/k",
            key="k",
            on_retry=lambda: retries.append(1),
        )
        assert result == "ok"
        assert len(retries) == 2

    async def test_each_attempt_is_bounded_by_the_call_timeout(self) -> None:
        """A call that never returns times out per attempt and fails as a StoreError."""
        import asyncio

        async def call() -> None:
            await asyncio.Event().wait()

        with pytest.raises(StoreError, match="failed after 2 attempts: timed out"):
            await call_with_retries(
                call,
                policy=RetryPolicy(max_attempts=2, base_delay=0.0, call_timeout=0.05),
                what="S3 GetObject s3://b/k",
                key="k",
                on_retry=_ignore,
            )

    def test_policy_refuses_zero_attempts(self) -> None:
        """max_attempts counts requests, so it must be at least one."""
        with pytest.raises(ValueError, match="max_attempts must be at least 1"):
            RetryPolicy(max_attempts=0)

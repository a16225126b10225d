"""Keeping credentials out of logs and errors: URLs, headers, free text and exceptions.

Pure functions plus one logging filter, which hides our secrets in the lines httpx itself
logs at INFO ("HTTP Request: POST <full url>"), since those carry query tokens.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx

__all__ = [
    "REDACTED",
    "Redactor",
    "install_log_filter",
    "redact_headers",
    "redact_text",
    "redact_url",
]

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
    """Whether a header's value is a credential, judged by its name."""
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


def install_log_filter(secrets: Iterable[str]) -> None:
    """Make httpx's own request logging redact our secrets, once per process."""
    _HTTPX_LOG_FILTER.add(secrets)
    for name in ("httpx", "httpcore"):
        log = logging.getLogger(name)
        if _HTTPX_LOG_FILTER not in log.filters:
            log.addFilter(_HTTPX_LOG_FILTER)

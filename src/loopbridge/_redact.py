"""Keeping secrets out of everything loopbridge writes: logs, errors, reprs and reports.

The rule, chosen so that it cannot miss: an http(s) or ws(s) URL is shown as its origin
only, `scheme://host:port`, followed by `/***` when it had more (path, query or fragment).
A token in a webhook's path, in a query parameter of any name, or in a redirect target is
thus never shown. Userinfo (`user:password@`) is hidden in every URL of every scheme. Other
schemes (`s3://bucket/key`, `file://...`) keep their path, which names objects, not
credentials, but lose userinfo and the values of secret-looking query parameters.

Opting in: a callback built with `log_full_urls=True` registers its URL, and URLs under it
are shown in full, userinfo and secret-looking query values still hidden. Secret header
values (Authorization, API keys, cookies) and the credentials a URL carries are known
secrets, replaced by `***` wherever they appear.

Where it applies:
- `redact_text` and `safe_url`, in every message, error text and repr loopbridge builds;
- a log record factory, installed when loopbridge is imported: every record of the
  `loopbridge`, `httpx`, `httpcore`, `aiobotocore`, `botocore` and `aiohttp` loggers and
  their children, at every level, has its
  message, traceback text and stack redacted as it is created, so the rule holds whatever
  handlers exist and whenever they were added (a logger filter misses child loggers; a
  handler filter misses later handlers). Exceptions logged there are scrubbed in place.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx

__all__ = [
    "REDACTED",
    "Redactor",
    "add_secrets",
    "allow_full_urls",
    "install_log_redaction",
    "is_secret_header",
    "redact_headers",
    "redact_text",
    "redact_url",
    "safe_url",
    "scrub_exception",
]

REDACTED = "***"

_ORIGIN_ONLY = frozenset({"http", "https", "ws", "wss"})
_SECRET_HEADER_WORDS = ("authorization", "token", "secret", "password", "api-key", "apikey")
_SECRET_HEADER_NAMES = frozenset({"cookie", "set-cookie", "x-api-key", "api-key"})
# Headers whose values are URLs or carry one: hidden in header dumps (httpcore's DEBUG lines).
_URL_HEADER_NAMES = frozenset({"location", "content-location", "refresh", "link", "referer"})
_SECRET_QUERY_WORDS = (
    "token",
    "key",
    "secret",
    "pass",
    "pwd",
    "auth",
    "sig",
    "code",
    "cred",
    "session",
)
# A URL in free text: up to whitespace, a quote or an angle bracket.
_URL = re.compile(r"\b(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]{0,15})://(?P<rest>[^\s'\"<>`\\]*)")
_TRAILING = ".,;:!?)]}"
# Header pairs as httpcore logs them, (b'name', b'value'), and as dict reprs print them.
_HEADER_TUPLE = re.compile(
    r"(?P<head>\(b(?P<q>['\"])(?P<name>[A-Za-z0-9_-]{1,64})(?P=q),\s*b(?P<q2>['\"]))"
    r"(?P<value>.*?)(?P=q2)\)"
)
_HEADER_DICT = re.compile(r"(?P<head>'(?P<name>[A-Za-z0-9_-]{1,64})':\s*b?')(?P<value>[^']*)'")
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&;][A-Za-z0-9_.-]*(?:"
    + "|".join(_SECRET_QUERY_WORDS)
    + r")[A-Za-z0-9_.-]*)=[^&#\s\"']*",
    re.IGNORECASE,
)
_BEARER = re.compile(r"(?P<scheme>\b(?:bearer|basic|token)\s+)[A-Za-z0-9._~+/=-]{8,}", re.I)


class _Registry:
    """What the whole process hides and shows; replaced whole under the lock, read freely."""

    known: tuple[str, ...] = ()
    full_prefixes: tuple[str, ...] = ()
    factory: Callable[..., logging.LogRecord] | None = None


_lock = threading.Lock()
_registry = _Registry()


def is_secret_header(name: str) -> bool:
    """Whether a header's value is a credential, judged by its name."""
    lowered = name.lower()
    return lowered in _SECRET_HEADER_NAMES or any(w in lowered for w in _SECRET_HEADER_WORDS)


def _is_secret_query(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_QUERY_WORDS)


_MIN_GLOBAL = 8
"""Shorter secrets are hidden only in their own endpoint's texts: process-wide, a short one
("u", "test") would blot out ordinary words everywhere. URLs are covered by the rule anyway."""


def add_secrets(secrets: Iterable[str]) -> None:
    """Hide these strings in every text and log record from now on (process-wide)."""
    with _lock:
        merged = set(_registry.known) | {s for s in secrets if len(s) >= _MIN_GLOBAL}
        _registry.known = tuple(sorted(merged, key=len, reverse=True))


def allow_full_urls(url: str) -> None:
    """Show URLs under `url` in full (userinfo and secret-looking query values still hidden)."""
    parts = urlsplit(url)
    prefix = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
    with _lock:
        if prefix not in _registry.full_prefixes:
            _registry.full_prefixes = (*_registry.full_prefixes, prefix)


def redact_url(url: str | httpx.URL) -> str:
    """The whole URL with its userinfo and the values of secret-looking parameters hidden.

    This is what `log_full_urls=True` shows; by default loopbridge shows `safe_url`.
    """
    text = str(url)
    try:
        parts = urlsplit(text)
    except ValueError:
        return f"{text.partition('://')[0]}://{REDACTED}"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED if _is_secret_query(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def safe_url(url: str | httpx.URL, *, full: bool = False) -> str:
    """The URL as loopbridge shows it: its origin only (see the module docstring)."""
    text = str(url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return REDACTED if text else text
    if full or _full_allowed(text) or scheme.lower() not in _ORIGIN_ONLY:
        return redact_url(text)
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    host = rest[:end].rpartition("@")[2]
    tail = rest[end:]
    hidden = f"/{REDACTED}" if tail not in ("", "/") else tail
    return f"{scheme}://{host}{hidden}"


def _full_allowed(text: str) -> bool:
    prefixes = _registry.full_prefixes
    if not prefixes:
        return False
    scheme, _, rest = text.partition("://")
    authority, slash, path = rest.partition("/")
    bare = f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"
    return any(bare.startswith(p) for p in prefixes)


def redact_headers(headers: Mapping[str, str] | httpx.Headers) -> dict[str, str]:
    """A copy of the headers with credential values replaced by `***`."""
    return {k: (REDACTED if is_secret_header(k) else v) for k, v in headers.items()}


def _url_repl(match: re.Match[str]) -> str:
    rest = match["rest"]
    kept = len(rest) - len(rest.rstrip(_TRAILING))
    trailing = rest[len(rest) - kept :] if kept else ""
    url = f"{match['scheme']}://{rest[: len(rest) - kept]}"
    return safe_url(url) + trailing


def _header_repl(match: re.Match[str]) -> str:
    lowered = match["name"].lower()
    if lowered in _URL_HEADER_NAMES or is_secret_header(lowered):
        end = match.group(0)[match.end("value") - match.start() :]
        return f"{match['head']}{REDACTED}{end}"
    return match.group(0)


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with known secrets, URL paths and queries, credentials and tokens hidden."""
    for secret in (*secrets, *_registry.known):
        if secret and secret in text:
            text = text.replace(secret, REDACTED)
    if "://" in text:
        text = _URL.sub(_url_repl, text)
    if "'" in text or '"' in text:
        text = _HEADER_TUPLE.sub(_header_repl, text)
        text = _HEADER_DICT.sub(_header_repl, text)
    text = _QUERY_SECRET.sub(lambda m: f"{m['name']}={REDACTED}", text)
    return _BEARER.sub(lambda m: f"{m['scheme']}{REDACTED}", text)


def scrub_exception(exc: BaseException, secrets: Iterable[str] = ()) -> BaseException:
    """Redact, in place, the messages, notes and httpx requests of `exc` and its causes."""
    secrets = tuple(secrets)
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        current.args = tuple(
            redact_text(a, secrets) if isinstance(a, str) else a for a in current.args
        )
        notes = getattr(current, "__notes__", None)
        if isinstance(notes, list):
            notes[:] = [redact_text(n, secrets) if isinstance(n, str) else n for n in notes]
        if isinstance(current, httpx.RequestError | httpx.HTTPStatusError):
            _scrub_request(current)
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return exc


def _scrub_request(exc: httpx.RequestError | httpx.HTTPStatusError) -> None:
    try:
        request = exc.request
    except RuntimeError:  # an httpx error raised without a request
        return
    safe = safe_url(request.url)
    if safe != str(request.url):
        exc.request = httpx.Request(request.method, safe.replace(REDACTED, "redacted"))


class Redactor:
    """Hides the secrets of one endpoint (its URL's credentials, secret headers) in any text."""

    def __init__(
        self, url: str, headers: Mapping[str, str] | None = None, *, full: bool = False
    ) -> None:
        self.full = full
        secrets: set[str] = set()
        parts = urlsplit(url)
        if parts.username:
            secrets.add(parts.username)
        if parts.password:
            secrets.add(parts.password)
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if _is_secret_query(name) and len(value) >= 4:
                secrets.add(value)
        if not full:
            # A token in the path (webhooks): a long segment, or one mixing letters and digits.
            for segment in parts.path.split("/"):
                mixed = any(c.isdigit() for c in segment) and any(c.isalpha() for c in segment)
                if len(segment) >= 16 or (len(segment) >= 8 and mixed):
                    secrets.add(segment)
        for name, value in (headers or {}).items():
            if is_secret_header(name) and value:
                secrets.add(value)
                # "Bearer abc" leaks "abc" on its own too; the scheme word is no secret.
                secrets.update(p for p in value.split()[1:] if len(p) >= 6)
        # Longest first, so that a secret containing another is hidden whole.
        self._secrets = tuple(sorted(secrets, key=len, reverse=True))
        add_secrets(self._secrets)
        if full:
            allow_full_urls(url)

    @property
    def secrets(self) -> tuple[str, ...]:
        """The secret strings this redactor hides."""
        return self._secrets

    def url(self, url: str | httpx.URL) -> str:
        """A URL as this endpoint's messages show it."""
        return safe_url(url, full=self.full)

    def text(self, text: str) -> str:
        """`text` with every known and recognisable secret hidden."""
        return redact_text(text, self._secrets)

    def scrub_exception(self, exc: BaseException) -> BaseException:
        """Redact the messages of `exc` and its causes in place, so tracebacks leak nothing."""
        return scrub_exception(exc, self._secrets)


# ---------------------------------------------------------------------- the log records

# loopbridge's own loggers and those of the HTTP clients it drives (httpx for dashboards and
# MLflow; aiobotocore, botocore and aiohttp for S3, whose DEBUG lines dump request headers).
_LOGGERS = ("loopbridge", "httpx", "httpcore", "aiobotocore", "botocore", "aiohttp")


def _covered(name: str) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in _LOGGERS)


def _scrub_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a broken format: the handler reports it; nothing to redact
        return
    safe = redact_text(message)
    if safe != message:
        record.msg, record.args = safe, ()
    if record.exc_info and record.exc_info[1] is not None:
        scrub_exception(record.exc_info[1])
        record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = redact_text(record.stack_info)


def install_log_redaction() -> None:
    """Redact every record of loopbridge's loggers and its HTTP clients' as it is made.

    Wraps the current log record factory (once; idempotent), so a factory installed before
    keeps working. Called when loopbridge is imported.
    """
    with _lock:
        if _registry.factory is not None and logging.getLogRecordFactory() is _registry.factory:
            return
        previous = logging.getLogRecordFactory()

        def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            if _covered(record.name):
                _scrub_record(record)
            return record

        logging.setLogRecordFactory(make_record)
        _registry.factory = make_record


install_log_redaction()

"""Redaction for the HTTP callbacks: the rule and its tools live in `loopbridge._redact`."""

from __future__ import annotations

from loopbridge._redact import (
    REDACTED,
    Redactor,
    add_secrets,
    is_secret_header,
    redact_headers,
    redact_text,
    redact_url,
    safe_url,
    scrub_exception,
)

__all__ = [
    "REDACTED",
    "Redactor",
    "install_log_filter",
    "is_secret_header",
    "redact_headers",
    "redact_text",
    "redact_url",
    "safe_url",
    "scrub_exception",
]

install_log_filter = add_secrets
"""Hide these strings in every log record (the name the HTTP client has always used)."""

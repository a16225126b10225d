"""S3 store options by name: checked for the uploader, written to and read from the journal.

`CheckpointUploader(store_options={...})` and `loopbridge resume --store-option NAME=VALUE`
take any `S3Store` keyword by name. The journal keeps them as strings (its column is a JSON
object of strings), so each option's type is known here to read it back.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from loopbridge.stores import ObjectStore, open_store
from loopbridge.stores.keys import normalize_prefix

__all__ = [
    "S3_OPTIONS",
    "check_store_options",
    "decode_options",
    "encode_options",
    "open_upload_store",
]

_BOOL = frozenset({"verify_etag", "sign_payload", "content_md5"})
_INT = frozenset({"part_size", "multipart_threshold", "max_concurrency", "max_attempts"})
_FLOAT = frozenset(
    {
        "connect_timeout",
        "read_timeout",
        "call_timeout",
        "retry_base_delay",
        "retry_max_delay",
        "retry_slowdown_delay",
    }
)
_STR = frozenset({"endpoint_url", "region", "profile", "addressing_style", "checksum"})
S3_OPTIONS = _BOOL | _INT | _FLOAT | _STR
"""Every `S3Store` keyword an uploader or a resume can set by name."""


def check_store_options(dest: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` as a dict, refused with the valid names if one is unknown or misplaced.

    Raises:
        ValueError: `dest` is not an `s3://` URL, or an option name is not an S3Store keyword.
    """
    if options and not _is_s3(dest):
        msg = (
            f"store_options={dict(options)!r} apply to s3:// destinations only, not {dest!r}; "
            f"drop them, or pass an opened store with store="
        )
        raise ValueError(msg)
    unknown = sorted(set(options) - S3_OPTIONS)
    if unknown:
        msg = (
            f"unknown S3 store option(s) {', '.join(unknown)}; valid names are "
            f"{', '.join(sorted(S3_OPTIONS))}"
        )
        raise ValueError(msg)
    return dict(options)


def open_upload_store(
    dest: str | os.PathLike[str],
    store: ObjectStore | None,
    explicit: Mapping[str, Any],
    store_options: Mapping[str, Any] | None,
) -> tuple[ObjectStore, str, dict[str, Any] | None]:
    """The uploader's store, its key prefix, and the S3 options it was opened with (if any).

    `explicit` are the uploader's own S3 keywords; `store_options` win over them.

    Raises:
        ValueError: `dest` or an option is invalid, or options come with an opened store.
    """
    if store is not None:
        if store_options:
            msg = (
                f"store_options={dict(store_options)!r} configure a store the uploader opens "
                f"from dest; with store= given, set them on that store instead"
            )
            raise ValueError(msg)
        return store, normalize_prefix(os.fspath(dest)), None
    text = os.fspath(dest)
    extra = check_store_options(text, store_options or {})
    if not _is_s3(text):
        return open_store(text), "", None
    options = {**explicit, **extra}
    return open_store(text, **options), "", options


def _is_s3(dest: str) -> bool:
    """Whether `dest` is an S3 URL (the scheme in any case, as URLs allow)."""
    return dest[:5].lower() == "s3://"


def encode_options(options: Mapping[str, Any]) -> dict[str, str]:
    """Options as the journal stores them: strings, None left out (never credentials)."""
    out = {}
    for name, value in options.items():
        if value is None or name not in S3_OPTIONS:
            continue
        out[name] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


def decode_options(options: Mapping[str, str]) -> dict[str, Any]:
    """Options read back from the journal or a command line, each with its type.

    Raises:
        ValueError: an option is unknown or its value is not of its type.
    """
    out: dict[str, Any] = {}
    options = _renamed(options)
    for name, text in check_store_options("s3://", options).items():
        try:
            out[name] = _parse(name, str(text))
        except ValueError:
            msg = f"S3 store option {name}={text!r}: {_expected(name)}"
            raise ValueError(msg) from None
    return out


def _renamed(options: Mapping[str, str]) -> Mapping[str, str]:
    """Options as named now: journals from before `checksum` held `checksum_crc32`."""
    if "checksum_crc32" not in options:
        return options
    renamed = dict(options)
    old = str(renamed.pop("checksum_crc32"))
    try:
        crc32 = _parse_bool(old)
    except ValueError:
        msg = f"S3 store option checksum_crc32={old!r}: true or false (now checksum=crc32|none)"
        raise ValueError(msg) from None
    renamed.setdefault("checksum", "crc32" if crc32 else "none")
    return renamed


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in {"true", "false", "1", "0", "yes", "no"}:
        raise ValueError(text)
    return lowered in {"true", "1", "yes"}


def _parse(name: str, text: str) -> Any:
    if name in _BOOL:
        return _parse_bool(text)
    if name in _INT:
        return int(text)
    if name in _FLOAT:
        return float(text)
    return text


def _expected(name: str) -> str:
    if name in _BOOL:
        return "expected true or false"
    if name in _INT:
        return "expected a whole number"
    return "expected a number"

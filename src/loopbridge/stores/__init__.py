"""Object stores the checkpoint uploader writes to: S3 (the `s3` extra) and local files.

`open_store(url)` builds one from `s3://bucket/prefix`, `file:///dir` or a plain path.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import unquote, urlsplit

from loopbridge.stores.keys import escape_segment, join_key
from loopbridge.stores.local import LocalStore
from loopbridge.stores.protocol import (
    CleansStaleUploads,
    GetResult,
    ObjectInfo,
    ObjectStore,
    PutResult,
    PutsInOrder,
    put_in_order,
)
from loopbridge.stores.s3 import S3Store

__all__ = [
    "CleansStaleUploads",
    "GetResult",
    "LocalStore",
    "ObjectInfo",
    "ObjectStore",
    "PutResult",
    "PutsInOrder",
    "S3Store",
    "escape_segment",
    "join_key",
    "open_store",
    "put_in_order",
]


def open_store(url: str | os.PathLike[str], **options: Any) -> ObjectStore:
    """Build the store a destination URL names; `options` go to the store's constructor.

    `s3://bucket/prefix` gives an `S3Store` (aioboto3 is imported only when it first talks
    to S3); `file:///dir` or a plain path gives a `LocalStore`.

    Raises:
        ValueError: the URL has another scheme, no bucket, or an unsafe prefix, or it is a
            mistyped URL (`s3:/bucket/x`, `s3:bucket`, `s3//bucket`) that would otherwise
            become a local directory.
    """
    text = os.fspath(url)
    if "://" not in text:
        if not text:
            msg = "empty store destination: give s3://bucket/prefix, file:///dir or a path"
            raise ValueError(msg)
        return LocalStore(_local_path(text), **options)
    parts = urlsplit(text)
    if parts.scheme == "s3":
        if not parts.netloc:
            msg = f"S3 destination {text!r} has no bucket: write it as s3://bucket/prefix"
            raise ValueError(msg)
        if parts.query or parts.fragment:
            msg = f"S3 destination {text!r} has a query or fragment; give s3://bucket/prefix only"
            raise ValueError(msg)
        return S3Store(parts.netloc, parts.path, **options)
    if parts.scheme == "file":
        if parts.netloc not in {"", "localhost"}:
            msg = (
                f"file URL {text!r} names the host {parts.netloc!r}; write file:///absolute/dir "
                f"(three slashes) or a plain path"
            )
            raise ValueError(msg)
        return LocalStore(unquote(parts.path), **options)
    msg = f"unsupported store URL scheme {parts.scheme!r} in {text!r}: use s3://, file:// or a path"
    raise ValueError(msg)


# A known scheme followed by one slash, none, or no colon: a typo for a URL, not a path.
_SCHEME_TYPO = re.compile(r"^(s3[an]?|gs|gcs|file|https?|az|abfss?|hdfs)(:/?(?!/)|//)", re.I)


def _local_path(text: str) -> str:
    """The directory a destination without `://` names; a mistyped URL is refused."""
    match = _SCHEME_TYPO.match(text)
    if match is None:
        return text
    scheme = match.group(1).lower()
    rest = text[match.end() :].lstrip("/")
    if scheme == "file" and match.group(2).startswith(":/"):
        return "/" + unquote(rest)  # `file:/dir`: a valid file URL without an authority
    slashes = "///" if scheme == "file" else "//"
    example = f"{scheme}:{slashes}{rest or 'bucket/prefix'}"
    msg = (
        f"store destination {text!r} looks like a mistyped {scheme}:// URL, and would become "
        f"a local directory named {text.partition('/')[0]!r}; write {example!r} "
        f"({'three' if scheme == 'file' else 'two'} slashes after the colon), or './{text}' if "
        f"you do mean a local directory"
    )
    raise ValueError(msg)

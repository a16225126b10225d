"""Safe object keys: names from users and the filesystem become keys that cannot escape.

`join_key` refuses what would make a key ambiguous or escape its prefix (`..`, `.`, empty
segments, absolute paths, backslashes, control characters). `escape_segment` turns a free-form
name, such as an experiment or run name, into one segment that `join_key` accepts.
"""

from __future__ import annotations

import re
from urllib.parse import quote

__all__ = ["escape_segment", "join_key", "normalize_prefix"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_segment(segment: str, part: str) -> None:
    """Refuse one `/`-separated segment of `part` that is not a plain name."""
    problem = None
    if segment == "":
        problem = "an empty segment (a leading, doubled or trailing '/')"
    elif segment in {".", ".."}:
        problem = f"the segment {segment!r}, which would climb out of its prefix"
    elif "\\" in segment:
        problem = f"a backslash in {segment!r}, which some stores read as a separator"
    elif _CONTROL.search(segment):
        problem = f"a control character in {segment!r}"
    if problem is not None:
        msg = (
            f"unsafe object key part {part!r}: it contains {problem}; use relative names "
            f"without '.', '..' or empty segments, or pass free-form names through "
            f"loopbridge.stores.keys.escape_segment()"
        )
        raise ValueError(msg)


def join_key(*parts: str) -> str:
    """Join key parts with `/`, refusing absolute parts and unsafe segments.

    Empty parts are skipped, so an empty prefix joins cleanly.

    Raises:
        ValueError: a part is absolute or has an empty, `.`, `..` or otherwise unsafe segment.
    """
    segments: list[str] = []
    for part in parts:
        if part == "":
            continue
        if part.startswith("/"):
            msg = (
                f"unsafe object key part {part!r}: it is absolute; object keys are relative "
                f"to the store's prefix, so drop the leading '/'"
            )
            raise ValueError(msg)
        for segment in part.split("/"):
            _check_segment(segment, part)
            segments.append(segment)
    return "/".join(segments)


def normalize_prefix(prefix: str) -> str:
    """Return `prefix` without surrounding slashes, checked segment by segment ('' is allowed)."""
    stripped = prefix.strip("/")
    return join_key(stripped) if stripped else ""


def escape_segment(name: str) -> str:
    """Turn a free-form name into one safe key segment by percent-encoding what is unsafe.

    Raises:
        ValueError: `name` is empty.
    """
    if name == "":
        msg = "cannot build an object key segment from an empty name; give the run a name"
        raise ValueError(msg)
    escaped = quote(name, safe="-_.~+=,@")
    if escaped in {".", ".."}:
        escaped = escaped.replace(".", "%2E")
    return escaped

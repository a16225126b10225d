"""The checksums S3 checks request bodies against: which CRC a store sends, and how.

S3 verifies a body against the `x-amz-checksum-*` header sent with it, and reports the CRC of
a multipart object as the CRC of its parts' CRCs with `-N` (a composite). CRC32C, in hardware
through google-crc32c, is the default; CRC32 is what boto3 sends; Content-MD5 is for stores
that take no CRC (see `S3Store`).
"""

from __future__ import annotations

import base64
import os
import zlib
from collections.abc import Callable
from typing import Literal, NamedTuple

__all__ = ["CRC32", "CRC32C", "ChecksumName", "Checksums", "Crc", "resolve_checksum"]

ChecksumName = Literal["crc32c", "crc32", "none"]
"""The checksum S3 checks each body against: `x-amz-checksum-crc32c`, `-crc32`, or none."""


class Crc(NamedTuple):
    """A CRC that S3 checks bodies against, by its name in S3's API ("CRC32C", "CRC32")."""

    name: str
    compute: Callable[[bytes | memoryview], int]

    @property
    def field(self) -> str:
        """Its request parameter and reply field: `ChecksumCRC32C`, `ChecksumCRC32`."""
        return f"Checksum{self.name}"

    def header(self, data: bytes | memoryview) -> str:
        """The base64 big-endian CRC of `data`, as its `x-amz-checksum-*` header carries it."""
        return base64.b64encode(self.compute(data).to_bytes(4, "big")).decode("ascii")

    def composite(self, part_crcs: list[str]) -> str:
        """S3's checksum of a multipart object: the CRC of the parts' CRCs, then `-N`."""
        raw = b"".join(base64.b64decode(crc) for crc in part_crcs)
        return f"{self.header(raw)}-{len(part_crcs)}"


_CRC32C_PIECE = 256 * 1024


def _crc32c(data: bytes | memoryview) -> int:
    import google_crc32c

    if isinstance(data, bytes):
        whole: int = google_crc32c.value(data)
        return whole
    # google-crc32c takes only `bytes`: a view (of a reused part buffer) goes in small copies,
    # which stay in the CPU cache, rather than as one copy of the whole part.
    value = 0
    for start in range(0, len(data), _CRC32C_PIECE):
        value = google_crc32c.extend(value, data[start : start + _CRC32C_PIECE].tobytes())
    return value


CRC32 = Crc("CRC32", zlib.crc32)
CRC32C = Crc("CRC32C", _crc32c)
_BY_NAME: dict[str, Crc | None] = {"crc32c": CRC32C, "crc32": CRC32, "none": None}


def _hardware_crc32c() -> bool:
    """Whether google-crc32c is installed with its C implementation (SSE4.2 / ARMv8 CRC)."""
    try:
        import google_crc32c
    except ImportError:
        return False
    return bool(google_crc32c.implementation == "c")


def resolve_checksum(option: ChecksumName | None) -> Crc | None:
    """The CRC a store sends, from its `checksum` option; None for none.

    By default CRC32C, computed in hardware by google-crc32c (the s3 extra), about twice as
    fast as zlib's CRC32; CRC32 where google-crc32c is missing or has no C implementation;
    none where `AWS_REQUEST_CHECKSUM_CALCULATION=when_required`, as for any AWS tool.
    """
    if option is None:
        setting = os.environ.get("AWS_REQUEST_CHECKSUM_CALCULATION", "when_supported")
        if setting.strip().lower() == "when_required":
            return None
        return CRC32C if _hardware_crc32c() else CRC32
    if option not in _BY_NAME:
        msg = (
            f"S3Store(checksum={option!r}): use 'crc32c', 'crc32' or 'none' (or leave it "
            f"unset: CRC32C where google-crc32c is installed, else CRC32)"
        )
        raise ValueError(msg)
    if option == "crc32c" and not _hardware_crc32c():
        msg = (
            "S3Store(checksum='crc32c') needs google-crc32c with its C implementation: "
            "pip install 'loopbridge[s3]', or use checksum='crc32'"
        )
        raise ValueError(msg)
    return _BY_NAME[option]


class Checksums(NamedTuple):
    """What a body is sent with: its MD5 (Content-MD5) and CRC, each when configured."""

    md5: bytes | None
    crc: str | None
    crc_field: str  # the CRC's botocore parameter: ChecksumCRC32C or ChecksumCRC32

    def headers(self) -> dict[str, str]:
        """botocore parameters for the checksums."""
        extra: dict[str, str] = {}
        if self.md5 is not None:
            extra["ContentMD5"] = base64.b64encode(self.md5).decode("ascii")
        if self.crc is not None:
            extra[self.crc_field] = self.crc
        return extra

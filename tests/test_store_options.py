"""S3 store options by name: every S3Store keyword, checked, and carried through the journal."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from loopbridge.callbacks import CheckpointUploader
from loopbridge.callbacks._store_options import (
    S3_OPTIONS,
    check_store_options,
    decode_options,
    encode_options,
)
from loopbridge.stores import LocalStore, S3Store


def test_every_s3store_keyword_is_an_option() -> None:
    """A keyword added to S3Store must be reachable from the uploader and resume."""
    keywords = set(inspect.signature(S3Store).parameters) - {"bucket", "prefix"}
    assert keywords == S3_OPTIONS


def test_options_round_trip_through_the_journal_form() -> None:
    """Each option's type survives being written as a string and read back."""
    options = {
        "verify_etag": False,
        "sign_payload": True,
        "checksum": "crc32",
        "content_md5": True,
        "part_size": 16 << 20,
        "multipart_threshold": 1 << 30,
        "max_concurrency": 3,
        "max_attempts": 2,
        "connect_timeout": 1.5,
        "read_timeout": 2.5,
        "call_timeout": 30.0,
        "retry_base_delay": 0.1,
        "retry_max_delay": 2.0,
        "retry_slowdown_delay": 0.5,
        "endpoint_url": "http://127.0.0.1:9",
        "region": "eu-west-1",
        "profile": "p",
        "addressing_style": "path",
    }
    assert set(options) == S3_OPTIONS
    assert decode_options(encode_options(options)) == options
    S3Store("bucket", **decode_options(encode_options(options)))


def test_the_uploader_records_its_store_options_for_resume() -> None:
    """verify_etag and the rest go to the store and into what the journal records."""
    uploader = CheckpointUploader(
        "s3://bucket/p",
        endpoint_url="http://user:pw@127.0.0.1:9",
        store_options={"verify_etag": False, "multipart_threshold": 1 << 30},
    )
    recorded = uploader._store_options
    assert recorded["verify_etag"] == "false"
    assert recorded["multipart_threshold"] == str(1 << 30)
    assert recorded["endpoint_url"] == "http://127.0.0.1:9"
    assert "pw" not in str(recorded)
    assert decode_options(recorded)["verify_etag"] is False


@pytest.mark.parametrize(
    ("dest", "options", "store", "match"),
    [
        ("s3://b/p", {"verify_etags": False}, None, "unknown S3 store option.*verify_etags"),
        ("/tmp/x", {"verify_etag": False}, None, "apply to s3:// destinations only"),
        ("", {"verify_etag": False}, LocalStore("/tmp/lb-x"), "set them on that store"),
    ],
)
def test_bad_store_options_are_refused_with_the_fix(
    dest: str, options: dict[str, object], store: LocalStore | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        CheckpointUploader(dest, store=store, store_options=options)


def test_a_wrongly_typed_option_names_the_expected_type() -> None:
    with pytest.raises(ValueError, match="part_size='big': expected a whole number"):
        decode_options({"part_size": "big"})
    with pytest.raises(ValueError, match="verify_etag='maybe': expected true or false"):
        decode_options({"verify_etag": "maybe"})
    assert check_store_options("s3://b", {}) == {}


def test_resume_refuses_a_bad_store_option_on_the_command_line(tmp_path: Path) -> None:
    for bad in ("verify_etag", "nope=1", "part_size=big"):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "loopbridge.cli",
                "resume",
                str(tmp_path),
                "--store-option",
                bad,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, done
        assert "store-option" in done.stderr or "option" in done.stderr


@pytest.mark.parametrize(
    ("old", "new"), [("true", "crc32"), ("false", "none"), ("0", "none"), ("yes", "crc32")]
)
def test_journals_from_before_the_checksum_option_still_resume(old: str, new: str) -> None:
    """A journal written with `checksum_crc32` reopens its store with the same checksum."""
    assert decode_options({"checksum_crc32": old, "part_size": "5242880"}) == {
        "checksum": new,
        "part_size": 5 << 20,
    }


def test_a_bad_old_checksum_value_is_refused_naming_the_new_option() -> None:
    """An unreadable `checksum_crc32` names what it became."""
    with pytest.raises(ValueError, match=r"checksum_crc32='maybe'.*checksum=crc32\|none"):
        decode_options({"checksum_crc32": "maybe"})

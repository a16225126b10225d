"""Safe key building and destination parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from loopbridge.stores import LocalStore, S3Store, open_store
from loopbridge.stores.keys import escape_segment, join_key, normalize_prefix


class TestJoinKey:
    def test_joins_parts_and_skips_empty_ones(self) -> None:
        """Parts are joined with '/', and an empty prefix adds nothing."""
        assert join_key("", "exp", "run/step-1", "model.pt") == "exp/run/step-1/model.pt"

    @pytest.mark.parametrize(
        ("part", "fragment"),
        [
            ("a/../b", "'..'"),
            ("..", "'..'"),
            ("./x", "'.'"),
            ("a//b", "empty segment"),
            ("a/", "empty segment"),
            ("a\\b", "backslash"),
            ("a\x00b", "control character"),
        ],
    )
    def test_refuses_unsafe_segments_naming_the_part(self, part: str, fragment: str) -> None:
        """An unsafe segment is refused with a message naming the part, the problem and the fix."""
        with pytest.raises(ValueError, match="unsafe object key part") as info:
            join_key("prefix", part)
        message = str(info.value)
        assert repr(part) in message
        assert fragment in message
        assert "escape_segment" in message

    def test_refuses_absolute_parts(self) -> None:
        """An absolute part is refused, and the message says to drop the leading '/'."""
        with pytest.raises(ValueError, match=r"absolute.*drop the leading '/'"):
            join_key("prefix", "/etc/passwd")

    def test_normalize_prefix_strips_outer_slashes_only(self) -> None:
        """Outer slashes are dropped; inner empty segments are still refused."""
        assert normalize_prefix("/a/b/") == "a/b"
        assert normalize_prefix("") == ""
        with pytest.raises(ValueError, match="empty segment"):
            normalize_prefix("a//b")


class TestEscapeSegment:
    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            ("run-1", "run-1"),
            ("a/b", "a%2Fb"),
            ("..", "%2E%2E"),
            (".", "%2E"),
            ("lr=0.1,bs=32", "lr=0.1,bs=32"),
            ("with space", "with%20space"),
        ],
    )
    def test_escapes_into_one_safe_segment(self, name: str, expected: str) -> None:
        """Free-form names become one segment that join_key accepts."""
        escaped = escape_segment(name)
        assert escaped == expected
        assert join_key("p", escaped) == f"p/{expected}"

    def test_refuses_an_empty_name(self) -> None:
        """An empty name has no safe segment."""
        with pytest.raises(ValueError, match="empty name"):
            escape_segment("")


class TestOpenStore:
    def test_s3_url_gives_an_s3_store_with_its_prefix(self) -> None:
        """s3://bucket/prefix opens an S3Store without importing or contacting anything."""
        store = open_store("s3://my-bucket/some/prefix/")
        assert isinstance(store, S3Store)
        assert store.url == "s3://my-bucket/some/prefix"

    def test_file_url_and_plain_path_give_local_stores(self, tmp_path: Path) -> None:
        """file:///dir and a plain path both open a LocalStore on that directory."""
        by_url = open_store(tmp_path.as_uri())
        by_path = open_store(tmp_path)
        assert isinstance(by_url, LocalStore)
        assert isinstance(by_path, LocalStore)
        assert by_url.root == by_path.root == tmp_path

    @pytest.mark.parametrize(
        ("url", "match"),
        [
            ("s3:///prefix", "no bucket"),
            ("gs://bucket/x", "unsupported store URL scheme 'gs'"),
            ("file://host/dir", "names the host"),
            ("s3://bucket/a/../b", "unsafe object key part"),
            ("", "empty store destination"),
        ],
    )
    def test_bad_destinations_are_refused_with_the_fix(self, url: str, match: str) -> None:
        """Each malformed destination gets an error that says what to write instead."""
        with pytest.raises(ValueError, match=match):
            open_store(url)

    def test_s3_options_are_checked_eagerly(self) -> None:
        """A part size below S3's minimum is refused when the store is built."""
        with pytest.raises(ValueError, match="part_size must be between 5 MiB and 5 GiB"):
            S3Store("bucket", part_size=1024)

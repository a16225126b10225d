"""The destination pre-flight: prove a checkpoint store can be written before training starts.

`CheckpointUploader` runs it at `on_train_start` (once per uploader), so a destination that
cannot work fails the run before its first step, not as a drain failure after the last one.
It needs no permission beyond uploading: it writes a small probe object under the run's own
prefix and deletes it again (no HeadBucket or ListBucket, which upload-only credentials
often lack). The whole check is bounded by `timeout` seconds. What it finds:

- `s3://` without the `s3` extra installed;
- a local destination that is a regular file, lies under one, or cannot be written
  (permissions, a read-only or immutable directory);
- a bucket that does not exist, credentials that are refused, an endpoint that does not
  answer within the timeout.

Turn it off with `CheckpointUploader(..., preflight=False)`.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from loopbridge._exceptions import DestinationError, MissingExtraError, StoreError
from loopbridge.stores import LocalStore, S3Store
from loopbridge.stores._process import ProcessStore
from loopbridge.stores.keys import join_key

if TYPE_CHECKING:
    from loopbridge._bridge import Bridge
    from loopbridge.stores import ObjectStore

__all__ = ["PROBE_PREFIX", "check_destination"]

logger = logging.getLogger(__name__)

PROBE_PREFIX = ".loopbridge-preflight-"
_OFF = "or skip this check with CheckpointUploader(..., preflight=False)"


def check_destination(
    store: ObjectStore, run_prefix: str, bridge: Bridge, *, timeout: float, need_delete: bool
) -> None:
    """Raise DestinationError, with the fix, unless a probe put and delete under `run_prefix`
    succeed within `timeout` seconds. Runs the remote part on `bridge`'s loop."""
    where = f"{store.url}/{run_prefix}".rstrip("/")
    if isinstance(store, (S3Store, ProcessStore)) and importlib.util.find_spec("aioboto3") is None:
        msg = (
            f"checkpoint destination {where} is on S3, but the `s3` extra is not installed: "
            f"pip install 'loopbridge[s3]', or give a local directory as the destination"
        )
        raise MissingExtraError(msg)
    if isinstance(store, LocalStore):
        _check_local_root(store.root)
    key = join_key(run_prefix, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
    try:
        deleted = bridge.call(_probe(store, key), timeout=timeout)
    except TimeoutError:
        msg = (
            f"checkpoint destination {where} did not accept a {len(_PROBE)}-byte probe "
            f"within {timeout:g} s before training: check the endpoint URL and the network "
            f"(or raise preflight_timeout), {_OFF}"
        )
        raise DestinationError(msg, key=key) from None
    except MissingExtraError:
        raise
    except (StoreError, OSError) as exc:
        msg = (
            f"checkpoint destination {where} cannot be written, found before training: "
            f"{_reason(exc)}; {_OFF}"
        )
        raise DestinationError(msg, key=key) from exc
    if deleted is not None:
        detail = (
            f"the pre-flight probe {store.url}/{key} could not be deleted ({deleted}); "
            f"uploads work, but failed uploads and pruned checkpoints cannot be cleaned up"
        )
        if need_delete:
            msg = f"{detail}, and keep_last needs to delete: allow DeleteObject, {_OFF}"
            raise DestinationError(msg, key=key)
        logger.warning("%s; remove it by hand", detail)


_PROBE = b"loopbridge pre-flight probe; safe to delete\n"


async def _probe(store: ObjectStore, key: str) -> str | None:
    """Put the probe and delete it; the delete's error as text, or None when it went."""
    await store.put_bytes(key, _PROBE, content_type="text/plain")
    try:
        await store.delete([key])
    except (StoreError, OSError) as exc:
        return str(exc)
    return None


def _check_local_root(root: Path) -> None:
    """Refuse a local destination that is a file or lies under one, with the fix."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir():
        return
    if existing == root:
        msg = (
            f"checkpoint destination {root} is a regular file, not a directory: give a "
            f"directory (it is created if missing), or move the file away; {_OFF}"
        )
    else:
        msg = (
            f"checkpoint destination {root} cannot be created: {existing} is a regular "
            f"file, not a directory; give a path whose parents are directories; {_OFF}"
        )
    raise DestinationError(msg, key=None)


def _reason(exc: BaseException) -> str:
    """Why a probe failed, with what to do about a local OSError."""
    if isinstance(exc, StoreError) and isinstance(exc.__cause__, OSError):
        exc = exc.__cause__  # LocalStore wraps a failed mkdir
    if isinstance(exc, OSError):
        path = exc.filename or "the directory"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return (
                f"no permission to create files in {Path(path).parent} ({exc.strerror}); "
                f"choose a directory this process can write, or fix its owner, mode or "
                f"attributes (chmod, chown, chattr -i)"
            )
        if exc.errno == errno.EROFS:
            return f"{Path(path).parent} is on a read-only file system; choose a writable directory"
        if exc.errno in (errno.ENOTDIR, errno.EEXIST):
            return f"{path} is in the way ({exc.strerror}); give a directory path"
        return f"{type(exc).__name__}: {exc}"
    return str(exc)

"""Where MLflowLogger's artifacts go: wherever the run's `artifact_uri` says, as mlflow would.

`mlflow-artifacts:` through the server's proxied artifact API (`--serve-artifacts`);
`s3://bucket/...` straight to the bucket with loopbridge's `S3Store` (the usual AWS
credentials, and `MLFLOW_S3_ENDPOINT_URL` as mlflow honours it); a local path or `file://`
URI through `LocalStore`. Any other scheme is a reported loss that names it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from loopbridge.callbacks._http import ClientSlot
from loopbridge.stores.local import LocalStore
from loopbridge.stores.protocol import ObjectStore
from loopbridge.stores.s3 import S3Store

__all__ = ["ArtifactWriter"]


class ArtifactWriter:
    """Puts JSON artifacts under a run's artifact root; its stores live on the bridge loop.

    Args:
        base: the tracking server's URL (for the proxied artifact API).
        clients: the logger's HTTP client slot.
        store_options: keyword arguments for the `S3Store` of an `s3://` artifact root.
        report_loss: called with (count, detail) for an artifact that has nowhere to go.
    """

    def __init__(
        self,
        base: str,
        clients: ClientSlot,
        store_options: Mapping[str, Any],
        report_loss: Callable[[int, str], None],
    ) -> None:
        self._base = base
        self._clients = clients
        self._store_options = dict(store_options)
        self._report_loss = report_loss
        # Artifact stores by root (an S3 bucket or a local directory).
        self._stores: dict[str, ObjectStore] = {}

    async def put(self, info: Mapping[str, Any], path: str, content: bytes) -> None:
        """Store an artifact where the run's artifact URI (`info["artifact_uri"]`) says."""
        uri = str(info.get("artifact_uri", ""))
        parts = urlsplit(uri)
        if parts.scheme == "mlflow-artifacts":
            await self._put_proxied(parts.path, path, content)
            return
        if parts.scheme == "s3" and parts.netloc:
            store = self._store(f"s3://{parts.netloc}", lambda: self._s3_store(parts.netloc))
            key = f"{parts.path.strip('/')}/{path}".lstrip("/")
        elif parts.scheme == "file" or (not parts.scheme and uri.startswith("/")):
            root = unquote(parts.path) if parts.scheme == "file" else uri
            store = self._store(root, lambda: LocalStore(root))
            key = path
        else:
            detail = (
                f"artifact {path!r} not stored: the run's artifact root {uri!r} is neither "
                f"mlflow-artifacts:, s3:// nor a local path; start the server with "
                f"--serve-artifacts to proxy it"
            )
            self._report_loss(1, detail)
            return
        await store.put_bytes(key, content, content_type="application/json")

    async def aclose(self) -> None:
        """At bridge close: release the stores' clients opened on its loop."""
        for store in self._stores.values():
            await store.aclose()

    def _store(self, root: str, make: Callable[[], ObjectStore]) -> ObjectStore:
        store = self._stores.get(root)
        if store is None:
            store = self._stores[root] = make()
        return store

    def _s3_store(self, bucket: str) -> S3Store:
        options = dict(self._store_options)
        # mlflow's own S3 artifact repository reads this variable; so do we.
        endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in options:
            options["endpoint_url"] = endpoint
        return S3Store(bucket, **options)

    async def _put_proxied(self, artifact_path: str, path: str, content: bytes) -> None:
        """PUT a file through the server's proxied artifact API (`--serve-artifacts`)."""
        root = artifact_path.strip("/")
        url = f"{self._base}/api/2.0/mlflow-artifacts/artifacts/{quote(root)}/{quote(path)}"
        client = self._clients.get()
        await client.request(
            "PUT", url, content=content, headers={"content-type": "application/json"}
        )

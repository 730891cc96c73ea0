"""Blob stores behind one small interface: a local directory (embedded) or S3 (shared).

Keys are `/`-separated segments of `[A-Za-z0-9._-]` (no `..`, no leading dot: temp files start
with a dot and are never listed). Writes are all-or-nothing in both stores: LocalDirStore writes
a temp file, fsyncs and renames it; an S3 PUT is atomic. `serving.identities` builds records on
top, so a crash leaves each identity complete or absent.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from hypernet.errors import InvalidInputError, NotFoundError
from hypernet.files import atomic_write_bytes
from serving.errors import StoreUnavailable

_SEGMENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")


def check_key(key: str) -> str:
    """Return `key` if every segment is safe (no traversal, no hidden names), else raise."""
    parts = key.split("/")
    if not key or not all(_SEGMENT.match(p) and ".." not in p for p in parts):
        raise InvalidInputError(
            f"store key must be `/`-separated segments of [A-Za-z0-9._-] without `..`, got {key!r}"
        )
    return key


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    modified: float  # unix seconds


@runtime_checkable
class Store(Protocol):
    """A flat key -> bytes store. Every method may raise StoreUnavailable (retry later)."""

    def put(self, key: str, data: bytes) -> None:
        """Write `data` under `key` atomically (readers see the old or the new bytes)."""
        ...

    def get(self, key: str) -> bytes:
        """The bytes under `key`. Raises NotFoundError when absent."""
        ...

    def delete(self, key: str) -> None:
        """Remove `key` (no error when already absent)."""
        ...

    def list(self, prefix: str, start_after: str = "", limit: int | None = None) -> list[StoredObject]:
        """Objects whose key starts with `prefix`, sorted by key, after `start_after`."""
        ...

    def describe(self) -> str:
        """Where the store is, for logs and GetServerInfo (never a secret)."""
        ...


class LocalDirStore:
    """Keys are files under `root` (created on first write)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        try:
            atomic_write_bytes(self._path(key), data)
        except OSError as e:
            raise StoreUnavailable(f"local store {self.root} cannot write {key!r}: {e}") from e

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"no object {key!r} in the store") from None
        except OSError as e:
            raise StoreUnavailable(f"local store {self.root} cannot read {key!r}: {e}") from e

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
            fd = os.open(path.parent, os.O_RDONLY)  # make the unlink durable, like the write
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except FileNotFoundError:
            return
        except OSError as e:
            raise StoreUnavailable(f"local store {self.root} cannot delete {key!r}: {e}") from e

    def list(self, prefix: str, start_after: str = "", limit: int | None = None) -> list[StoredObject]:
        base = self.root / prefix[: prefix.rfind("/") + 1] if "/" in prefix else self.root
        if not base.is_dir():
            return []
        found: list[StoredObject] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):
                    continue  # temp files of in-flight writes
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix) and key > start_after:
                    try:
                        st = full.stat()
                    except FileNotFoundError:  # deleted meanwhile
                        continue
                    found.append(StoredObject(key, st.st_size, st.st_mtime))
        found.sort(key=lambda o: o.key)
        return found if limit is None else found[:limit]

    def describe(self) -> str:
        return f"dir:{self.root}"

    def remove_stale_temp_files(self, older_than_s: float, now: float) -> int:
        """Delete temp files of writes interrupted by a crash (kill -9 between the temp write
        and the rename): invisible to `list`, they would otherwise hold partial identity
        weights on disk forever. Returns how many were removed."""
        removed = 0
        if not self.root.is_dir():
            return 0
        for path in self.root.rglob(".*.tmp"):
            try:
                if path.is_file() and now - path.stat().st_mtime > older_than_s:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:  # finished (renamed) or removed meanwhile
                continue
        return removed


class S3Store:
    """Keys are objects under `prefix` in `bucket` of any S3-compatible endpoint (via boto3).

    Credentials come from the usual AWS chain (env, profile, instance role); nothing is logged.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        client=None,
    ):
        if not bucket:
            raise InvalidInputError(f"`bucket` must be a non-empty S3 bucket name, got {bucket!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url or None
        if client is None:
            import boto3
            from botocore.config import Config

            client = boto3.client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=region or os.environ.get("AWS_REGION")
                or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                # Bounded retries with backoff, then UNAVAILABLE to the caller: never hang.
                config=Config(retries={"max_attempts": 3, "mode": "standard"},
                              connect_timeout=5, read_timeout=30),
            )
        self.client = client

    def _call(self, what: str, key: str, fn, **kw):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kw)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFoundError(f"no object {key!r} in the store") from None
            raise StoreUnavailable(f"S3 store {self.describe()} failed to {what} {key!r}: {code}") from e
        except BotoCoreError as e:
            raise StoreUnavailable(
                f"S3 store {self.describe()} failed to {what} {key!r}: {type(e).__name__}"
            ) from e

    def put(self, key: str, data: bytes) -> None:
        self._call("write", key, self.client.put_object, Key=self.prefix + check_key(key), Body=data)

    def get(self, key: str) -> bytes:
        resp = self._call("read", key, self.client.get_object, Key=self.prefix + check_key(key))
        return resp["Body"].read()

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Key=self.prefix + check_key(key))

    def list(self, prefix: str, start_after: str = "", limit: int | None = None) -> list[StoredObject]:
        found: list[StoredObject] = []
        kw = {"Prefix": self.prefix + prefix}
        if start_after:
            kw["StartAfter"] = self.prefix + start_after
        while True:
            if limit is not None:
                kw["MaxKeys"] = max(1, min(1000, limit - len(found)))
            resp = self._call("list", prefix, self.client.list_objects_v2, **kw)
            for o in resp.get("Contents", []):
                key = o["Key"][len(self.prefix):]
                found.append(StoredObject(key, int(o["Size"]), o["LastModified"].timestamp()))
            if not resp.get("IsTruncated") or (limit is not None and len(found) >= limit):
                break
            kw["ContinuationToken"] = resp["NextContinuationToken"]
            kw.pop("StartAfter", None)
        return found if limit is None else found[:limit]

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"


def open_store(spec: str, *, default_dir: Path, endpoint_url: str = "", region: str = "") -> Store:
    """`s3://bucket/prefix` -> S3Store; `file:///dir`, a path or "" (-> `default_dir`) -> local."""
    if spec.startswith("s3://"):
        bucket, _, prefix = spec[len("s3://"):].partition("/")
        return S3Store(bucket, prefix, endpoint_url=endpoint_url or None, region=region or None)
    if spec.startswith("file://"):
        spec = spec[len("file://"):]
    return LocalDirStore(Path(spec) if spec else default_dir)

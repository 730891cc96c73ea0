"""Identity records on a `Store`, scoped per tenant, with TTL expiry.

Layout (two objects per identity, the metadata written last as the commit point):
    blob/<tenant>/<id>.bin    the library's `Identity.to_bytes()` (the personalised weights)
    meta/<tenant>/<id>.json   `IdentityRecord` (what Get/List return)
An identity exists iff its meta object does; a crash between the two writes leaves an orphan
blob that `sweep()` deletes later. Deletion removes meta first, then the blob, then caches.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from hypernet.errors import InvalidInputError, NotFoundError
from serving.store import Store

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: Orphan blobs younger than this may belong to a save in progress: leave them.
ORPHAN_AGE_S = 3600.0


def check_name(kind: str, value: str) -> str:
    """Validate a tenant or identity id before it becomes part of a store key."""
    if not _NAME.match(value or ""):
        raise InvalidInputError(f"`{kind}` must be 1-64 characters of [A-Za-z0-9_-], got {value!r}")
    return value


def new_identity_id() -> str:
    """128 random bits, hex: unguessable, so ids leak nothing about other identities."""
    return secrets.token_hex(16)


@dataclass
class IdentityRecord:
    id: str
    tenant: str
    method: str  # library method name: hyperdreambooth, lidb, lora, textual_inversion, dreambooth
    artifact_bytes: int
    created_at: float
    expires_at: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    base_fingerprint: str = ""
    token: str = ""
    class_noun: str = ""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> IdentityRecord:
        return cls(**json.loads(data))

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


def _meta_key(tenant: str, identity_id: str) -> str:
    return f"meta/{tenant}/{identity_id}.json"


def _blob_key(tenant: str, identity_id: str) -> str:
    return f"blob/{tenant}/{identity_id}.bin"


class IdentityRepository:
    """Tenant-scoped CRUD over a Store. Thread-safe (stateless apart from the blob cache)."""

    def __init__(self, store: Store, ttl_s: float = 0.0, clock: Callable[[], float] = time.time,
                 cache_size: int = 32):
        self.store = store
        self.ttl_s = ttl_s
        self.clock = clock
        self._cache: OrderedDict[tuple[str, str, float], Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ writes
    def save(self, record: IdentityRecord, blob: bytes) -> IdentityRecord:
        """Store blob then metadata; fills `expires_at` from the TTL and `timings["store"]`
        (the blob write, also added to `timings["total"]` when present)."""
        check_name("tenant", record.tenant)
        check_name("identity_id", record.id)
        if self.ttl_s > 0:
            record.expires_at = record.created_at + self.ttl_s
        record.artifact_bytes = len(blob)
        t0 = time.perf_counter()
        self.store.put(_blob_key(record.tenant, record.id), blob)
        took = time.perf_counter() - t0
        record.timings["store"] = took
        if "total" in record.timings:
            record.timings["total"] += took
        self.store.put(_meta_key(record.tenant, record.id), record.to_json())
        return record

    def delete(self, tenant: str, identity_id: str) -> IdentityRecord:
        """Remove every trace of the identity. Raises NotFoundError when it does not exist."""
        record = self.get(tenant, identity_id)
        self._remove(tenant, identity_id)
        return record

    def _remove(self, tenant: str, identity_id: str) -> None:
        self.store.delete(_meta_key(tenant, identity_id))
        self.store.delete(_blob_key(tenant, identity_id))
        with self._lock:
            for k in [k for k in self._cache if k[:2] == (tenant, identity_id)]:
                del self._cache[k]

    # ------------------------------------------------------------------ reads
    def get(self, tenant: str, identity_id: str) -> IdentityRecord:
        """The record, or NotFoundError (also for another tenant's id and for expired ones)."""
        check_name("identity_id", identity_id)
        try:
            record = IdentityRecord.from_json(self.store.get(_meta_key(tenant, identity_id)))
        except NotFoundError:
            raise NotFoundError(
                f"identity {identity_id!r} not found: it never existed for this API key, was "
                "deleted or expired (ListIdentities shows the ones that exist)"
            ) from None
        if record.expired(self.clock()):
            self._remove(tenant, identity_id)
            raise NotFoundError(f"identity {identity_id!r} not found: it expired")
        return record

    def load(self, tenant: str, identity_id: str,
             decode: Callable[[IdentityRecord, bytes], Any]) -> tuple[IdentityRecord, Any]:
        """The record plus its decoded weights (`decode(record, blob)`), cached by
        (tenant, id, created_at)."""
        record = self.get(tenant, identity_id)  # checked every time: deletes and TTL apply at once
        key = (tenant, identity_id, record.created_at)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return record, self._cache[key]
        value = decode(record, self.store.get(_blob_key(tenant, identity_id)))
        with self._lock:
            self._cache[key] = value
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return record, value

    def blob(self, tenant: str, identity_id: str) -> bytes:
        self.get(tenant, identity_id)
        return self.store.get(_blob_key(tenant, identity_id))

    def list(self, tenant: str, page_size: int, page_token: str = "") -> tuple[list[IdentityRecord], str]:
        """One page of the tenant's identities (by id), and the next page's token ("" at the end)."""
        after = ""
        if page_token:
            try:
                after = base64.urlsafe_b64decode(page_token.encode()).decode()
                check_name("page_token", after)
            except (ValueError, InvalidInputError):
                raise InvalidInputError(
                    f"`page_token` must be a next_page_token from ListIdentities, got {page_token!r}"
                ) from None
        prefix = f"meta/{tenant}/"
        now = self.clock()
        out: list[IdentityRecord] = []
        last = ""
        start = prefix + after + ".json" if after else ""
        while len(out) < page_size:
            objs = self.store.list(prefix, start_after=start, limit=page_size + 1)
            if not objs:
                return out, ""
            for o in objs:
                start = o.key
                try:
                    record = IdentityRecord.from_json(self.store.get(o.key))
                except NotFoundError:  # deleted meanwhile
                    continue
                if record.expired(now):
                    continue
                if len(out) == page_size:
                    return out, base64.urlsafe_b64encode(last.encode()).decode()
                out.append(record)
                last = record.id
        more = bool(self.store.list(prefix, start_after=start, limit=1))
        return out, base64.urlsafe_b64encode(last.encode()).decode() if more else ""

    # ------------------------------------------------------------------ housekeeping
    def sweep(self) -> int:
        """Delete expired identities, old orphan blobs and (local store) old temp files of
        interrupted writes. Returns how many identities remain."""
        now = self.clock()
        alive: set[tuple[str, str]] = set()
        for o in self.store.list("meta/"):
            _, tenant, name = o.key.split("/", 2)
            identity_id = name.removesuffix(".json")
            try:
                record = IdentityRecord.from_json(self.store.get(o.key))
            except NotFoundError:
                continue
            if record.expired(now):
                self._remove(tenant, identity_id)
            else:
                alive.add((tenant, identity_id))
        for o in self.store.list("blob/"):
            _, tenant, name = o.key.split("/", 2)
            if (tenant, name.removesuffix(".bin")) not in alive and now - o.modified > ORPHAN_AGE_S:
                self.store.delete(o.key)
        remove_temp = getattr(self.store, "remove_stale_temp_files", None)  # local dirs only
        if remove_temp is not None:
            remove_temp(ORPHAN_AGE_S, now)
        return len(alive)

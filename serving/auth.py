"""API keys -> tenants, compared in constant time.

Keys come from a keys file (lines `tenant:key`, `#` comments; or a YAML/JSON mapping
`{tenant: [key, ...]}`) and/or a `tenant:key,tenant:key` string (HDB_API_KEYS). Only SHA-256
digests of the keys are kept in memory. A presented key is hashed and compared with *every*
known digest via `hmac.compare_digest` (no early exit), so the time taken does not depend on
which key matched, how many characters were right, or whether any matched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from pathlib import Path

import yaml

from hypernet.errors import InvalidInputError
from serving.errors import Unauthenticated
from serving.identities import check_name

DEV_TENANT = "dev"
#: The scheme is case-insensitive (RFC 7235 2.1: "bearer", "BEARER" are the same); the key is not.
_BEARER = re.compile(r"^(?i:bearer) ([\x21-\x7e]{1,512})$")
MIN_KEY_CHARS = 16


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    """Known API keys (as digests) and the tenant each belongs to."""

    def __init__(self, pairs: list[tuple[str, str]]):
        self._entries: list[tuple[bytes, str]] = []
        seen: set[bytes] = set()
        for tenant, key in pairs:
            check_name("tenant", tenant)
            if len(key) < MIN_KEY_CHARS or not re.fullmatch(r"[\x21-\x7e]+", key):
                raise InvalidInputError(
                    f"API key of tenant {tenant!r} must be >= {MIN_KEY_CHARS} printable ASCII "
                    f"characters without spaces, got one of {len(key)} characters"
                )
            d = _digest(key)
            if d in seen:
                raise InvalidInputError(f"API keys must be unique, got a duplicate for {tenant!r}")
            seen.add(d)
            self._entries.append((d, tenant))

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tenants(self) -> set[str]:
        return {t for _, t in self._entries}

    def tenant_for(self, metadata_value: str | None) -> str:
        """The tenant of an `authorization: Bearer KEY` header value.

        Raises:
            Unauthenticated: the header is missing, malformed, or the key is unknown.
        """
        if not metadata_value:
            raise Unauthenticated("missing `authorization: Bearer <API key>` metadata")
        m = _BEARER.match(metadata_value)
        if not m:
            raise Unauthenticated("`authorization` metadata must be `Bearer <API key>`")
        presented = _digest(m.group(1))
        found: str | None = None
        for digest, tenant in self._entries:  # every entry, always: constant time
            if hmac.compare_digest(presented, digest):
                found = tenant
        if found is None:
            raise Unauthenticated("unknown API key")
        return found

    # ------------------------------------------------------------------ loading
    @classmethod
    def parse_inline(cls, text: str) -> list[tuple[str, str]]:
        pairs = []
        for item in filter(None, (s.strip() for s in text.split(","))):
            tenant, sep, key = item.partition(":")
            if not sep:
                raise InvalidInputError("`api_keys` must be `tenant:key[,tenant:key...]`, got an "
                                        "entry without `:`")
            pairs.append((tenant.strip(), key.strip()))
        return pairs

    @classmethod
    def read_file(cls, path: str | Path) -> list[tuple[str, str]]:
        path = Path(path)
        if not path.is_file():
            raise InvalidInputError(f"`keys_file` must be an existing file, got {str(path)!r}")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml", ".json"):
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
            if not isinstance(data, dict):
                raise InvalidInputError(f"`keys_file` must map tenant -> [keys], got {str(path)!r}")
            return [(str(t), str(k)) for t, keys in data.items()
                    for k in ([keys] if isinstance(keys, str) else keys)]
        pairs = []
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                pairs.extend(cls.parse_inline(line))
        return pairs

    @classmethod
    def load(cls, keys_file: str = "", inline: str = "") -> KeyRing:
        pairs = (cls.read_file(keys_file) if keys_file else []) + cls.parse_inline(inline)
        return cls(pairs)

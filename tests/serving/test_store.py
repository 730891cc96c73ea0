"""Both identity stores behind one contract: a local directory and S3 (moto's real server)."""

from __future__ import annotations

import os
import time

import pytest

from hypernet.errors import InvalidInputError, NotFoundError
from serving.errors import StoreUnavailable
from serving.identities import ORPHAN_AGE_S, IdentityRecord, IdentityRepository
from serving.store import LocalDirStore, S3Store

pytestmark = pytest.mark.timeout(120)

BUCKET = "hdb-test"


@pytest.fixture(scope="module")
def moto_endpoint():
    """moto's S3 server on 127.0.0.1 (a free port), with throwaway credentials."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                             "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalDirStore(tmp_path / "store")
    endpoint = request.getfixturevalue("moto_endpoint")
    return S3Store(BUCKET, f"t-{request.node.name[-12:].strip('[]')}-{os.getpid()}",
                   endpoint_url=endpoint)


def test_put_get_overwrite_delete(store):
    store.put("a/b.bin", b"one")
    assert store.get("a/b.bin") == b"one"
    store.put("a/b.bin", b"two")
    assert store.get("a/b.bin") == b"two"
    store.delete("a/b.bin")
    with pytest.raises(NotFoundError):
        store.get("a/b.bin")
    store.delete("a/b.bin")  # idempotent


def test_list_prefix_order_and_paging(store):
    for k in ["x/3", "x/1", "x/2", "y/1"]:
        store.put(k, k.encode())
    assert [o.key for o in store.list("x/")] == ["x/1", "x/2", "x/3"]
    assert [o.key for o in store.list("x/", start_after="x/1", limit=1)] == ["x/2"]
    assert all(o.size == 3 and o.modified > 0 for o in store.list("x/"))
    assert store.list("nothing/") == []


@pytest.mark.parametrize("key", ["../escape", "a/../../b", "", "/abs", "a//b", ".hidden", "a b"])
def test_unsafe_keys_are_rejected(store, key):
    with pytest.raises(InvalidInputError):
        store.put(key, b"x")


def test_local_writes_leave_no_temp_files(tmp_path):
    store = LocalDirStore(tmp_path)
    for i in range(5):
        store.put("k/v", bytes([i]) * 1000)
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["v"]


def test_unreachable_s3_is_store_unavailable():
    store = S3Store(BUCKET, endpoint_url="http://127.0.0.1:9")  # discard port: refused
    with pytest.raises(StoreUnavailable, match="S3 store"):
        store.get("a/b")
    with pytest.raises(StoreUnavailable):
        store.put("a/b", b"x")


class Clock:
    """Wall time that tests move forward (stores stamp objects with real time)."""

    def __init__(self):
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


def _record(tenant: str, identity_id: str, created: float) -> IdentityRecord:
    return IdentityRecord(id=identity_id, tenant=tenant, method="hyperdreambooth",
                          artifact_bytes=0, created_at=created, token="ohwx", class_noun="person")


def test_repository_is_tenant_scoped_and_pages(store):
    repo = IdentityRepository(store)
    for i in range(5):
        repo.save(_record("alice", f"id{i}", 1.0), b"blob%d" % i)
    repo.save(_record("bob", "idb", 1.0), b"bob")
    assert repo.get("alice", "id3").artifact_bytes == 5
    with pytest.raises(NotFoundError):
        repo.get("bob", "id3")
    with pytest.raises(NotFoundError):
        repo.delete("bob", "id3")
    seen, token = [], ""
    while True:
        page, token = repo.list("alice", 2, token)
        assert len(page) <= 2
        seen += [r.id for r in page]
        if not token:
            break
    assert seen == [f"id{i}" for i in range(5)]
    assert repo.blob("alice", "id2") == b"blob2"
    loaded = repo.load("alice", "id2", lambda rec, blob: (rec.id, blob))[1]
    assert loaded == ("id2", b"blob2")
    repo.delete("alice", "id2")
    assert not [o for o in store.list("") if "id2" in o.key]
    with pytest.raises(NotFoundError):
        repo.load("alice", "id2", lambda rec, blob: blob)  # the cache forgot it too


def test_ttl_expiry_and_sweep(store):
    clock = Clock()
    repo = IdentityRepository(store, ttl_s=60.0, clock=clock)
    rec = repo.save(_record("t", "old", clock.t), b"x")
    assert rec.expires_at == clock.t + 60
    repo.save(_record("t", "new", clock.t + 30), b"y")
    store.put("blob/t/orphan.bin", b"half-written identity")  # a crash between the two writes
    clock.t += 61
    with pytest.raises(NotFoundError, match="expired"):
        repo.get("t", "old")
    assert not [o for o in store.list("") if "/old." in o.key]  # deleted on read
    assert [r.id for r in repo.list("t", 10)[0]] == ["new"]
    clock.t += ORPHAN_AGE_S + 1  # the orphan is old now
    assert repo.sweep() == 0  # "new" expired too
    assert store.list("") == []


def test_ids_are_validated_before_touching_the_store(store):
    repo = IdentityRepository(store)
    for bad in ["../x", "a/b", "", "x" * 65]:
        with pytest.raises(InvalidInputError):
            repo.get("t", bad)


def test_server_on_s3_store(make_server, client_for, photo_bytes, moto_endpoint):
    """The service with `--store s3://...` against moto: identities live in the bucket only."""
    import boto3

    bg = make_server(store=f"s3://{BUCKET}/svc", s3_endpoint_url=moto_endpoint)
    c = client_for(bg)
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")

    def keys() -> list[str]:
        return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="svc/").get("Contents", [])]

    ident = c.personalize(photo_bytes, options=c.options(steps=0))
    assert sorted(keys()) == [f"svc/blob/dev/{ident.id}.bin", f"svc/meta/dev/{ident.id}.json"]
    assert c.generate("a photo of ohwx person", ident.id, steps=1)
    assert [i.id for i in c.list_identities()] == [ident.id]
    c.delete_identity(ident.id)
    assert keys() == []

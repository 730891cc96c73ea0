"""Health transitions (loading -> SERVING -> draining) and identity expiry, in process."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hdb_serving_helpers import rpc_code, wait_until

from serving.engine import Engine
from serving.stubs import SERVICE_NAME

pytestmark = pytest.mark.timeout(180)

S = health_pb2.HealthCheckResponse


class GatedEngine(Engine):
    """The real engine, whose load waits for the test's go (so 'loading' can be observed)."""

    def __init__(self, *args, gate: threading.Event):
        super().__init__(*args)
        self.gate = gate

    def load(self) -> None:
        assert self.gate.wait(120)
        super().load()


def test_health_not_serving_until_loaded_and_while_draining(make_server, client_for,
                                                            tiny_base_dir, tiny_hypernet_dir,
                                                            photo_bytes):
    gate = threading.Event()
    engine = GatedEngine(str(tiny_base_dir), str(tiny_hypernet_dir), "cpu", "fp32", gate=gate)
    bg = make_server(engine=engine, wait_ready=False, warmup=True)
    c = client_for(bg)
    watch = health_pb2_grpc.HealthStub(c.channel).Watch(
        health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    statuses = iter(watch)
    assert next(statuses).status == S.NOT_SERVING
    err = rpc_code(c.server_info)
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.details()

    gate.set()  # load + warm up (one generation, one personalisation)
    assert next(statuses).status == S.SERVING
    assert c.server_info().methods  # and calls are served

    job = c.personalize_events(photo_bytes, options=c.options(steps=30))
    events = iter(job)
    next(events)  # accepted before the drain begins
    stopping = asyncio.run_coroutine_threadsafe(bg.server.stop(grace=60), bg.loop)
    assert next(statuses).status == S.NOT_SERVING
    wait_until(lambda: bg.server.state.draining, what="draining")
    err = rpc_code(c.generate, "late", steps=1)
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.details()
    assert list(events)[-1].WhichOneof("event") == "identity"  # the accepted call completed
    stopping.result(60)


def test_identities_expire_after_the_ttl(make_server, client_for, photo_bytes):
    bg = make_server(identity_ttl_s=1.0)
    c = client_for(bg)
    ident = c.personalize(photo_bytes, options=c.options(steps=0))
    life = (ident.expires_at.ToNanoseconds() - ident.created_at.ToNanoseconds()) / 1e9
    assert life == pytest.approx(1.0)
    assert c.server_info().identity_ttl_seconds == 1
    wait_until(lambda: not list(c.list_identities()), timeout=30, what="expiry")
    err = rpc_code(c.generate, "ohwx", ident.id, steps=1)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    bg.call(asyncio.to_thread(bg.server.repo.sweep))
    assert not [p for p in bg.server.repo.store.root.rglob("*") if p.is_file()]


def test_engine_takes_the_default_hypernetwork_from_its_caller(tiny_base_dir, tiny_hypernet_dir):
    """The service only takes paths: without --hypernet it asks `default_hypernet` (which `hdb serve`
    wires to the app's embedded one); with neither, HYPERDREAMBOOTH is unavailable and says why."""
    asked = []

    def default() -> str:
        asked.append(True)
        return str(tiny_hypernet_dir)

    engine = Engine(str(tiny_base_dir), "", "cpu", "fp32", default_hypernet=default)
    engine.load()
    assert asked == [True] and engine.methods()["hyperdreambooth"] == (True, "")

    bare = Engine(str(tiny_base_dir), "", "cpu", "fp32")
    bare.load()
    ok, why = bare.methods()["hyperdreambooth"]
    assert not ok and "--hypernet" in why, why
    assert bare.methods()["lora"][0]  # the other methods still work

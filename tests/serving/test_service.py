"""Every RPC against a real server on a loopback port, over real channels, with tiny models."""

from __future__ import annotations

import io
import re
import struct
import zlib

import grpc
import pytest
from hdb_serving_helpers import rpc_code
from PIL import Image
from safetensors import safe_open

from serving.stubs import pb

pytestmark = pytest.mark.timeout(180)

STEPS = 3  # personalisation fine-tune steps: enough to stream progress, cheap on CPU


@pytest.fixture(scope="module")
def server(make_module_server):
    return make_module_server(max_message_bytes=2 << 20, metrics_port=0, max_images=4)


@pytest.fixture()
def client(server, client_for):
    return client_for(server)


@pytest.fixture(scope="module")
def identity(server, photo_bytes):
    from serving.client import HdbClient

    with HdbClient(server.target) as c:
        return c.personalize(photo_bytes, options=c.options(steps=STEPS, seed=1))


def _png_ok(img: pb.GeneratedImage, size: int) -> None:
    decoded = Image.open(io.BytesIO(img.data))
    assert decoded.size == (size, size) == (img.width, img.height)


def test_health_and_server_info(client):
    assert client.health() == "SERVING"
    assert client.health("") == "SERVING"
    info = client.server_info()
    assert info.default_size == 64 and info.base_fingerprint
    methods = {pb.Method.Name(m.method): m for m in info.methods}
    assert methods["METHOD_HYPERDREAMBOOTH"].available and not methods["METHOD_HYPERDREAMBOOTH"].background
    assert methods["METHOD_DREAMBOOTH"].background
    assert info.limits.max_message_bytes == 2 << 20 and info.limits.max_images == 4
    assert not info.auth_required and "grpcio" in info.versions


def test_personalize_streams_progress_then_identity(client, photo_bytes):
    events = list(client.personalize_events(photo_bytes, options=client.options(steps=STEPS)))
    kinds = [ev.WhichOneof("event") for ev in events]
    assert kinds[0] == "accepted" and kinds[-1] == "identity"
    assert set(kinds[1:-1]) == {"progress"}
    accepted = events[0].accepted
    assert accepted.job_id and not accepted.background
    finetune = [ev.progress for ev in events if ev.WhichOneof("event") == "progress"
                and ev.progress.stage == "finetune"]
    assert finetune and finetune[-1].total == STEPS
    assert [p.step for p in finetune] == sorted(p.step for p in finetune)
    ident = events[-1].identity
    assert ident.method == pb.METHOD_HYPERDREAMBOOTH and ident.artifact_bytes > 0
    assert ident.token == "ohwx" and ident.class_noun == "person"
    for stage in ("decode", "queue", "hypernetwork", "finetune", "store", "total"):
        assert stage in ident.timings, stage
    job = client.get_job(accepted.job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.identity.id == ident.id


def test_identity_crud(client, identity):
    got = client.get_identity(identity.id)
    assert got == identity
    assert identity.id in {i.id for i in client.list_identities()}


def test_list_identities_pages(client, photo_bytes):
    ids = {client.personalize(photo_bytes, options=client.options(steps=0)).id for _ in range(3)}
    pages, token = [], ""
    while True:
        resp = client.stub.ListIdentities(pb.ListIdentitiesRequest(page_size=2, page_token=token))
        pages.append([i.id for i in resp.identities])
        token = resp.next_page_token
        if not token:
            break
    flat = [i for page in pages for i in page]
    assert all(len(p) <= 2 for p in pages) and len(flat) == len(set(flat))
    assert ids <= set(flat)
    err = rpc_code(client.stub.ListIdentities, pb.ListIdentitiesRequest(page_token="%%%"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in err.details()


def test_generate_streams_n_images_with_seeds(client, identity):
    images = client.generate("a photo of ohwx person", identity.id, n=3, steps=2, seed=11)
    assert [i.index for i in images] == [0, 1, 2] and [i.seed for i in images] == [11, 12, 13]
    for img in images:
        _png_ok(img, 64)
        assert img.mime_type == "image/png"
    assert images[0].data != images[1].data  # different seeds, different images


@pytest.mark.parametrize("fmt,mime", [("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_generate_formats_and_base_model(client, fmt, mime):
    (img,) = client.generate("a photo of a person", n=1, steps=2, seed=0, format=fmt, width=72,
                             height=56)
    assert img.mime_type == mime and Image.open(io.BytesIO(img.data)).format == fmt
    assert (img.width, img.height) == (72, 56)


def test_same_seed_same_image(client, identity):
    a = client.generate("a photo of ohwx person", identity.id, steps=2, seed=5)[0]
    b = client.generate("a photo of ohwx person", identity.id, steps=2, seed=5)[0]
    base = client.generate("a photo of ohwx person", steps=2, seed=5)[0]
    assert a.data == b.data and a.data != base.data


def test_personalize_and_generate(client, photo_bytes):
    ident, images = client.personalize_and_generate(
        photo_bytes, ["a photo of ohwx person", "ohwx person as a knight"],
        options=client.options(steps=1), generation=client.generation(n=2, steps=2, seed=3))
    assert ident.id and client.get_identity(ident.id).id == ident.id
    assert sorted((i.prompt_index, i.index) for i in images) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for img in images:
        _png_ok(img, 64)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_export_identity(client, identity, fmt, tmp_path):
    resp = client.export_identity(identity.id, fmt)
    assert resp.filename.endswith(".safetensors") and fmt in resp.filename
    path = tmp_path / "lora.safetensors"
    path.write_bytes(resp.data)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert keys and (all(k.startswith("lora_unet_") for k in keys) if fmt == "kohya"
                     else all(k.startswith("unet.") for k in keys))


def test_delete_removes_every_trace(server, client, photo_bytes):
    events = list(client.personalize_events(photo_bytes, options=client.options(steps=0)))
    job_id, ident = events[0].accepted.job_id, events[-1].identity
    assert client.get_job(job_id).identity.id == ident.id
    client.generate("ohwx", ident.id, steps=1)  # now also in the server's identity cache
    store_root = server.server.repo.store.root
    before = {p.name for p in store_root.rglob("*") if p.is_file()}
    assert any(ident.id in name for name in before)
    client.delete_identity(ident.id)
    after = {p.name for p in store_root.rglob("*") if p.is_file()}
    assert not any(ident.id in name for name in after)
    for call in (lambda: client.get_identity(ident.id),
                 lambda: client.generate("ohwx", ident.id, steps=1),
                 lambda: client.export_identity(ident.id),
                 lambda: client.delete_identity(ident.id)):
        err = rpc_code(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND and ident.id in err.details()
    job = client.get_job(job_id)  # the job remains, without the identity
    assert job.state == pb.JOB_STATE_SUCCEEDED and not job.HasField("identity")
    assert rpc_code(client.watch_job, job_id).code() == grpc.StatusCode.NOT_FOUND


def test_photos_never_reach_the_store(server, client):
    """A noisy photo whose bytes and decoded pixel rows are searched for (the reliability scan's
    needles: chunks from its middle, not a header every PNG shares)."""
    from benchmarks.reliability.privacy import distinctive_photo, needles

    photo, rows = distinctive_photo(seed=3)
    client.personalize(photo, options=client.options(steps=0))
    files = [p for p in server.server.repo.store.root.rglob("*") if p.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        assert not any(n in data for n in needles(photo, rows)), path
        assert path.parts[-3] in ("meta", "blob")


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("photo,needle", [
    (b"", "photo"),
    (b"GIF89a" + b"\x00" * 100, "photo"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "photo"),
    (_png_header_only(20_000, 20_000), "pixels"),
])
def test_bad_photos_are_invalid_argument(client, photo, needle):
    err = rpc_code(client.personalize, photo)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.details()
    assert client.health() == "SERVING"


def test_truncated_photo_is_invalid_argument(client, photo_bytes):
    err = rpc_code(client.personalize, photo_bytes[: len(photo_bytes) // 2])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "photo" in err.details()


NAN = float("nan")


@pytest.mark.parametrize("kwargs,field", [
    (dict(prompt=""), "prompt"),
    (dict(prompt="x" * 1001), "prompt"),
    (dict(n=5), "options.n"),
    (dict(n=-1), "options.n"),
    (dict(steps=151), "options.steps"),
    (dict(steps=-3), "options.steps"),
    (dict(guidance=NAN), "options.guidance"),
    (dict(guidance=float("inf")), "options.guidance"),
    (dict(guidance=-1.0), "options.guidance"),
    (dict(width=60), "options.width"),
    (dict(height=4096), "options.height"),
    (dict(seed=-1), "options.seed"),
    (dict(negative_prompt="y" * 1001), "options.negative_prompt"),
    (dict(identity_id="../../etc/passwd"), "identity_id"),
])
def test_bad_generate_arguments(client, kwargs, field):
    prompt = kwargs.pop("prompt", "a photo")
    identity_id = kwargs.pop("identity_id", "")
    err = rpc_code(client.generate, prompt, identity_id, **kwargs)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert f"`{field}`" in err.details()


def test_unknown_enum_and_options_are_invalid_argument(client, photo_bytes):
    bad = [
        pb.PersonalizeRequest(photo=photo_bytes, method=99),
        pb.PersonalizeRequest(photo=photo_bytes, options=pb.PersonalizeOptions(steps=10**6)),
        pb.PersonalizeRequest(photo=photo_bytes, options=pb.PersonalizeOptions(learning_rate=NAN)),
        pb.PersonalizeRequest(photo=photo_bytes, options=pb.PersonalizeOptions(token="OH WX")),
    ]
    for req in bad:
        err = rpc_code(client.stub.Personalize, req)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    err = rpc_code(client.stub.Generate, pb.GenerateRequest(
        prompt="x", options=pb.GenerationOptions(format=42)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "format" in err.details()
    err = rpc_code(client.stub.ExportIdentity, pb.ExportIdentityRequest(identity_id="a", format=9))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_invalid_utf8_prompt_is_invalid_argument(server, client):
    # Serialise a GenerateRequest by hand with bytes that are not UTF-8 in field 2 (prompt).
    raw = b"\x12\x03\xff\xfe\xfd"
    call = client.channel.unary_stream("/hyperdreambooth.v1.PersonalizationService/Generate",
                                       request_serializer=lambda b: b,
                                       response_deserializer=pb.GeneratedImage.FromString)
    err = rpc_code(call, raw)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in err.details()
    assert client.health() == "SERVING"


def test_oversized_message_is_rejected(client):
    err = rpc_code(client.personalize, b"\xff" * (3 << 20))  # over the 2 MiB limit
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "`photo`" in err.details()
    assert client.health() == "SERVING"


def test_unknown_job_and_identity_are_not_found(client):
    for call in (lambda: client.get_job("0" * 32), lambda: client.cancel_job("0" * 32),
                 lambda: client.watch_job("0" * 32), lambda: client.get_identity("f" * 32)):
        assert rpc_code(call).code() == grpc.StatusCode.NOT_FOUND


def test_request_id_is_echoed(client):
    call = client.stub.GetServerInfo.with_call(pb.GetServerInfoRequest(),
                                               metadata=(("x-request-id", "req-123"),))
    _, rpc = call
    assert ("x-request-id", "req-123") in tuple(rpc.initial_metadata())


def test_metrics_endpoint(server, client, identity):
    import urllib.request

    client.generate("ohwx", identity.id, steps=1)
    text = urllib.request.urlopen(f"http://localhost:{server.server.metrics_port}/metrics",
                                  timeout=10).read().decode()
    assert 'hdb_requests_total{code="OK",method="hyperdreambooth.v1.PersonalizationService/Generate"}' \
        in text
    assert "hdb_batch_size_count" in text and "hdb_queue_depth" in text
    assert 'hdb_stage_seconds_count{stage="queue_wait"}' in text


def test_reflection_serves_the_schema(client):
    """What grpcurl needs: the service list and the file descriptors (with dependencies)."""
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    listed, described = list(stub.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="hyperdreambooth.v1.PersonalizationService")])))
    names = {s.name for s in listed.list_services_response.service}
    assert {"hyperdreambooth.v1.PersonalizationService", "grpc.health.v1.Health"} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in described.file_descriptor_response.file_descriptor_proto]
    (ours,) = [f for f in files if f.package == "hyperdreambooth.v1"]
    assert "Personalize" in {m.name for m in ours.service[0].method}
    assert "google/protobuf/timestamp.proto" in ours.dependency


def test_logs_carry_request_ids_and_no_photo(server, client, caplog):
    """Every line logged while serving a call carries its request id (what `ContextFilter` adds
    in `hdb serve`'s handler), and no form of the photo. Keys and prompts need an authenticated
    server at DEBUG: tests/reliability/test_privacy.py runs that scan on a real `hdb serve`."""
    import logging

    from benchmarks.reliability.privacy import distinctive_photo, scan_logs
    from serving.logs import ContextFilter, JsonFormatter

    caplog.handler.addFilter(ContextFilter())
    caplog.set_level(logging.DEBUG)
    photo, rows = distinctive_photo(seed=5)
    client.personalize(photo, options=client.options(steps=0))
    rpc_lines = [r for r in caplog.records if r.name == "serving.rpc"]
    assert rpc_lines and all(re.fullmatch(r"[0-9a-f]{16}", r.request_id) for r in rpc_lines), \
        [vars(r).get("request_id") for r in rpc_lines]
    assert len({r.request_id for r in rpc_lines}) == 1  # one call, one id
    fmt = JsonFormatter()
    found = scan_logs([fmt.format(r) + "\n" for r in caplog.records], [], photo, rows)
    assert not found["photo_found"] and found["lines"] == len(caplog.records)

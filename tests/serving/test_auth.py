"""API keys, tenant isolation across every RPC, dev-mode rules, TLS."""

from __future__ import annotations

import datetime
import ipaddress

import grpc
import pytest
from hdb_serving_helpers import rpc_code

import serving.auth
from hypernet.errors import InvalidInputError
from serving.auth import KeyRing
from serving.config import ServeConfig
from serving.errors import Unauthenticated
from serving.server import resolve_keyring
from serving.stubs import pb

pytestmark = pytest.mark.timeout(180)

ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdefgh"


def test_keys_file_formats(tmp_path):
    lines = tmp_path / "keys.txt"
    lines.write_text(f"# comment\nalice:{ALICE}\n\nbob:{BOB}  # trailing comment\n")
    yml = tmp_path / "keys.yaml"
    yml.write_text(f"alice: [{ALICE}]\nbob: {BOB}\n")
    for path in (lines, yml):
        ring = KeyRing.load(str(path))
        assert ring.tenants == {"alice", "bob"}
        assert ring.tenant_for(f"Bearer {ALICE}") == "alice"
        assert ring.tenant_for(f"Bearer {BOB}") == "bob"
    assert KeyRing.load("", f"alice:{ALICE}").tenant_for(f"Bearer {ALICE}") == "alice"


@pytest.mark.parametrize("pairs,match", [
    ([("alice", "short")], "at least|>= 16"),
    ([("alice", ALICE), ("bob", ALICE)], "unique"),
    ([("bad tenant", ALICE)], "tenant"),
    ([("alice", ALICE + " space")], "printable"),
])
def test_bad_keys_are_refused_at_startup(pairs, match):
    with pytest.raises(InvalidInputError, match=match):
        KeyRing(pairs)


@pytest.mark.parametrize("header", [None, "", ALICE, f"Basic {ALICE}", "Bearer ", "Bearer x",
                                    f"Bearer {ALICE}x", f"Bearer  {ALICE}", "Bearer \u00e9" * 3])
def test_bad_headers_are_unauthenticated(header):
    with pytest.raises(Unauthenticated):
        KeyRing([("alice", ALICE)]).tenant_for(header)


def test_every_key_is_compared_every_time(monkeypatch):
    """No early exit: the time taken cannot tell which key (or how much of it) matched."""
    ring = KeyRing([("alice", ALICE), ("bob", BOB), ("carol", "carol-key-0123456789abc")])
    calls = []
    real = serving.auth.hmac.compare_digest

    def counting(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(serving.auth.hmac, "compare_digest", counting)
    for header in (f"Bearer {ALICE}", f"Bearer {BOB}", "Bearer nobody-0123456789abcdef"):
        calls.clear()
        try:
            ring.tenant_for(header)
        except Unauthenticated:
            pass
        assert len(calls) == 3


def test_dev_mode_only_when_asked_or_loopback():
    assert resolve_keyring(ServeConfig(host="localhost")) is None
    assert resolve_keyring(ServeConfig(host="127.0.0.1")) is None
    assert resolve_keyring(ServeConfig(host="0.0.0.0", no_auth=True)) is None
    with pytest.raises(InvalidInputError, match="API keys must be configured"):
        resolve_keyring(ServeConfig(host="0.0.0.0"))
    ring = resolve_keyring(ServeConfig(host="0.0.0.0", api_keys=f"alice:{ALICE}"))
    assert ring is not None and ring.tenants == {"alice"}


@pytest.fixture(scope="module")
def auth_server(make_module_server):
    return make_module_server(no_auth=False, api_keys=f"alice:{ALICE},bob:{BOB}")


def test_calls_need_a_valid_key(auth_server, client_for):
    for key in ("", "wrong-key-0123456789abcdef"):
        c = client_for(auth_server, api_key=key)
        err = rpc_code(c.server_info)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert not key or key not in err.details()  # keys never echoed
    anon = client_for(auth_server, api_key="")
    assert anon.health() == "SERVING"  # probes need no key
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(anon.channel)
    (resp,) = list(stub.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert resp.list_services_response.service
    assert client_for(auth_server, api_key=ALICE).server_info().auth_required


@pytest.mark.parametrize("warm", [False, True], ids=["cold-cache", "warm-cache"])
def test_tenants_cannot_see_each_others_identities_or_jobs(auth_server, client_for,
                                                          photo_bytes, warm):
    """warm: alice has just generated with her identity, so its weights sit in the server's
    identity cache when bob probes it; the cache must not answer for another tenant."""
    alice, bob = client_for(auth_server, api_key=ALICE), client_for(auth_server, api_key=BOB)
    events = list(alice.personalize_events(photo_bytes, options=alice.options(steps=0)))
    job_id, ident = events[0].accepted.job_id, events[-1].identity
    cached = lambda: [k for k in auth_server.server.repo._cache if ident.id in k]  # noqa: E731
    if warm:
        assert alice.generate("ohwx", ident.id, steps=1)
        assert cached(), "alice's identity should now be in the identity cache"
    else:
        assert not cached()
    not_found = [
        lambda: bob.get_identity(ident.id),
        lambda: bob.generate("ohwx", ident.id, steps=1),
        lambda: bob.export_identity(ident.id),
        lambda: bob.delete_identity(ident.id),
        lambda: bob.get_job(job_id),
        lambda: bob.watch_job(job_id),
        lambda: bob.cancel_job(job_id),
    ]
    for call in not_found:
        err = rpc_code(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
    assert ident.id not in {i.id for i in bob.list_identities()}
    # ... while alice still has everything
    assert alice.get_identity(ident.id).id == ident.id
    assert alice.get_job(job_id).state == pb.JOB_STATE_SUCCEEDED
    assert alice.generate("ohwx", ident.id, steps=1)
    alice.delete_identity(ident.id)


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return tmp_path / "cert.pem", tmp_path / "key.pem", cert_pem


def test_tls(make_server, client_for, tmp_path):
    cert, key, pem = _self_signed(tmp_path)
    bg = make_server(tls_cert=str(cert), tls_key=str(key), no_auth=False,
                     api_keys=f"alice:{ALICE}")
    assert client_for(bg, api_key=ALICE, root_certificates=pem).server_info().auth_required
    plain = client_for(bg, api_key=ALICE)  # a plaintext client cannot talk to a TLS server
    assert rpc_code(plain.server_info, timeout=5).code() == grpc.StatusCode.UNAVAILABLE


def test_rate_limit_is_per_tenant(make_server, client_for):
    from serving.client import retry_after_ms

    bg = make_server(no_auth=False, api_keys=f"alice:{ALICE},bob:{BOB}", rate_limit_rps=0.01,
                     rate_limit_burst=2)
    alice, bob = client_for(bg, api_key=ALICE), client_for(bg, api_key=BOB)
    alice.server_info()
    alice.server_info()
    err = rpc_code(alice.server_info)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in err.details()
    assert retry_after_ms(err) > 1000
    assert bob.server_info()  # another tenant is unaffected
    assert alice.health() == "SERVING"  # probes are never limited


def test_token_bucket_refills():
    from serving.errors import RateLimited
    from serving.ratelimit import TenantRateLimiter

    now = [0.0]
    limiter = TenantRateLimiter(2.0, 3, clock=lambda: now[0])
    for _ in range(3):
        limiter.acquire("t")
    with pytest.raises(RateLimited) as info:
        limiter.acquire("t")
    assert info.value.retry_after_ms == 500
    now[0] += 0.5
    limiter.acquire("t")
    TenantRateLimiter(0, 1).acquire("t")  # 0 disables

"""The fine-tune's identity term over gRPC (`PersonalizeOptions.identity_weight`):
advertised per method in GetServerInfo (`MethodInfo.identity_term`), honoured by every method that
advertises it (the identity a client exports changes with the weight), refused with
INVALID_ARGUMENT for the others and for bad values, and FAILED_PRECONDITION on a server without
the face encoder, which then says so in GetServerInfo."""

from __future__ import annotations

import math

import grpc
import pytest
import torch
from hdb_serving_helpers import rpc_code
from safetensors.torch import load as st_load

from serving.stubs import pb
from serving.validation import METHOD_ENUMS

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("face_encoder_file")]

ALL_METHODS = [v for v in pb.Method.values() if v != pb.METHOD_UNSPECIFIED]
NAMES = {v: k for k, v in METHOD_ENUMS.items()}


@pytest.fixture(scope="module")
def server(make_module_server):
    return make_module_server()


@pytest.fixture()
def client(server, client_for):
    return client_for(server)


def _weights(c, ident) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in st_load(c.export_identity(ident.id, "diffusers").data).items()}


def _request(photo: bytes, method: int, **options) -> pb.PersonalizeRequest:
    return pb.PersonalizeRequest(photo=photo, method=method, options=pb.PersonalizeOptions(**options))


def test_server_info_advertises_the_term_for_hyperdreambooth_only(client):
    methods = {m.method: m for m in client.server_info().methods}
    assert methods[pb.METHOD_HYPERDREAMBOOTH].identity_term  # the tiny server has the face encoder
    assert not any(m.identity_term for k, m in methods.items() if k != pb.METHOD_HYPERDREAMBOOTH)


@pytest.mark.parametrize("method", ALL_METHODS, ids=pb.Method.Name)
def test_every_method_that_advertises_the_term_honours_it_the_others_refuse_it(client, photo_bytes, method):
    info = {m.method: m for m in client.server_info().methods}.get(method)
    if info is None or not info.available:
        pytest.skip(f"{pb.Method.Name(method)} not available on this server")
    if not info.identity_term:
        err = rpc_code(client.stub.Personalize, _request(photo_bytes, method, steps=1, identity_weight=1.0))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "`options.identity_weight` must be unset for any method but METHOD_HYPERDREAMBOOTH" in err.details()
        return
    name = NAMES[method]
    made = {}
    for w in (None, 0.0, 2.0):
        ident = client.personalize(photo_bytes, name, client.options(steps=2, seed=0, identity_weight=w))
        made[w] = _weights(client, ident)
    off, zero, on = made.values()
    assert off.keys() == on.keys()
    for k in off:  # 0 is off: the same identity as unset
        torch.testing.assert_close(off[k], zero[k])
    assert any(not torch.allclose(off[k], on[k]) for k in off)  # the term changed what the fine-tune learnt


@pytest.mark.parametrize("options, field", [
    ({"identity_weight": -1.0}, "options.identity_weight"),
    ({"identity_weight": 101.0}, "options.identity_weight"),
    ({"identity_weight": math.nan}, "options.identity_weight"),
])
def test_bad_identity_options_are_invalid_argument_naming_the_field(client, photo_bytes, options, field):
    err = rpc_code(client.stub.Personalize, _request(photo_bytes, pb.METHOD_HYPERDREAMBOOTH, steps=1, **options))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"`{field}` must be" in err.details()


def test_a_server_without_the_face_encoder_says_so_and_refuses_the_term(make_server, client_for, photo_bytes,
                                                                       monkeypatch, tmp_path):
    import hypernet.face_encoder as fe

    monkeypatch.delenv(fe.FACE_ENCODER_ENV, raising=False)
    monkeypatch.setenv("HDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fe, "default_face_encoder_dir", lambda: tmp_path / "none")
    c = client_for(make_server())
    info = {m.method: m for m in c.server_info().methods}[pb.METHOD_HYPERDREAMBOOTH]
    assert info.available and not info.identity_term
    err = rpc_code(c.stub.Personalize, _request(photo_bytes, pb.METHOD_HYPERDREAMBOOTH, steps=1, identity_weight=1.0))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "needs the face encoder" in err.details() and "fr_feature.onnx" in err.details()
    c.personalize(photo_bytes, options=c.options(steps=1, seed=0, identity_weight=0.0))  # off still works


def test_client_cli_sends_the_identity_weight(server, client, photo_bytes, tmp_path, capsys):
    """`hdb client personalize --identity-weight W`: the identity it makes is the one the option
    makes through the Python client (same seed), and a bad weight comes back as the server's
    INVALID_ARGUMENT with exit code 1."""
    from hdb.cli import main as run_cli

    photo = tmp_path / "me.png"
    photo.write_bytes(photo_bytes)
    target = ["client", "--target", server.target]
    common = ["personalize", str(photo), "--steps", "2", "--seed", "0", "--out", str(tmp_path / "out")]
    assert run_cli([*target, *common, "--identity-weight", "2"]) == 0
    via_cli = capsys.readouterr().out.strip()
    via_lib = client.personalize(photo_bytes, options=client.options(steps=2, seed=0, identity_weight=2.0))
    plain = client.personalize(photo_bytes, options=client.options(steps=2, seed=0))
    a, b, c = (_weights(client, client.get_identity(i)) for i in (via_cli, via_lib.id, plain.id))
    assert all(torch.allclose(a[k], b[k]) for k in a) and any(not torch.allclose(a[k], c[k]) for k in a)
    assert run_cli([*target, *common, "--identity-weight", "-1"]) == 1
    assert capsys.readouterr().err.startswith("INVALID_ARGUMENT: `options.identity_weight` must be")

"""Several photos of one person through a real gRPC socket: `photos` (1..8) personalises end to
end, an old client's single `photo` still works, and limits answer INVALID_ARGUMENT naming the
photo at fault."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from hdb_serving_helpers import rpc_code
from PIL import Image

from serving.auth import DEV_TENANT
from serving.stubs import pb

pytestmark = pytest.mark.timeout(240)
MAX_MESSAGE = 256 << 10  # small, so that an oversized photo is cheap to send


def _photo(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(make_module_server):
    return make_module_server(max_message_bytes=MAX_MESSAGE)


@pytest.fixture()
def client(server, client_for):
    return client_for(server)


def _num_photos(server, identity_id: str) -> int:
    """How many photos the stored identity was personalised from (read from its blob)."""
    from hypernet.identity import Identity

    _, ident = server.server.core.repo.load(DEV_TENANT, identity_id, lambda _r, blob: Identity.from_bytes(blob))
    return ident.num_photos


def test_three_photos_personalise_end_to_end(server, client):
    photos = [_photo(k) for k in range(3)]
    ident = client.personalize(photos, options=client.options(steps=1, seed=0))
    assert ident.method == pb.METHOD_HYPERDREAMBOOTH and ident.artifact_bytes > 0
    assert _num_photos(server, ident.id) == 3

    ident2, images = client.personalize_and_generate(
        photos, ["a photo of ohwx person"], options=client.options(steps=0, seed=0),
        generation=client.generation(steps=1, seed=3))
    assert _num_photos(server, ident2.id) == 3 and len(images) == 1 and images[0].data


def test_old_clients_single_photo_still_works(server, client):
    req = pb.PersonalizeRequest(photo=_photo(7), options=client.options(steps=0, seed=0))
    events = list(client.stub.Personalize(req, timeout=60))
    assert events[-1].HasField("identity") and events[-1].identity.artifact_bytes > 0
    assert _num_photos(server, events[-1].identity.id) == 1


def _invalid(client, request) -> str:
    err = rpc_code(client.stub.Personalize, request, timeout=60)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    return err.details()


def test_nine_photos_are_invalid_argument_naming_photos(client):
    details = _invalid(client, pb.PersonalizeRequest(photos=[_photo(0)] * 9))
    assert "`photos` must" in details and "1 to 8" in details and "9" in details
    err = rpc_code(client.personalize_and_generate, [_photo(0)] * 9, ["ohwx"])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "`photos` must" in err.details()


def test_a_bad_photo_is_invalid_argument_naming_it(client):
    details = _invalid(client, pb.PersonalizeRequest(photos=[_photo(0), b"not an image", _photo(2)]))
    assert "`photos[1]`" in details
    details = _invalid(client, pb.PersonalizeRequest(photos=[_photo(0), b""]))  # empty
    assert "`photos[1]`" in details
    tiny = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiny, format="PNG")  # decodes, but too small a photo
    details = _invalid(client, pb.PersonalizeRequest(photos=[_photo(0), _photo(1), tiny.getvalue()]))
    assert "`photos[2]`" in details and "got 8x8" in details


def test_a_photo_over_the_message_limit_is_named(client):
    big = b"\xff" * (MAX_MESSAGE + 1024)  # under gRPC's own 4x limit: our check answers
    details = _invalid(client, pb.PersonalizeRequest(photos=[_photo(0), _photo(1), big]))
    assert "`photos[2]`" in details and f"max_message_bytes={MAX_MESSAGE}" in details


def test_photo_and_photos_together_are_refused(client):
    details = _invalid(client, pb.PersonalizeRequest(photo=_photo(0), photos=[_photo(1)]))
    assert "`photo` and `photos` must not both be set" in details


def test_client_cli_takes_several_files(server, tmp_path, capsys):
    import argparse

    import serving.cli

    files = []
    for k in range(3):
        files.append(tmp_path / f"me{k}.png")
        files[-1].write_bytes(_photo(k))
    parser = argparse.ArgumentParser(prog="hdb")
    serving.cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["client", "--target", server.target, "personalize", *map(str, files),
                              "--steps", "0", "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    identity_id = capsys.readouterr().out.strip()
    assert _num_photos(server, identity_id) == 3


def test_lidb_trains_on_several_photos(client):
    """The classic methods' path (`hypernet.methods`) takes all the photos too."""
    ident = client.personalize([_photo(k) for k in range(3)], "lidb", client.options(steps=1, seed=0))
    assert ident.method == pb.METHOD_LIDB and ident.artifact_bytes > 0

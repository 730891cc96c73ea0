"""The other personalisation methods through the service: LIDB in the call, slow methods as
background jobs; their artifacts generate through the unbatched path."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from hdb_serving_helpers import rpc_code
from PIL import Image

from serving.stubs import pb

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def server(make_module_server):
    return make_module_server()


@pytest.fixture()
def client(server, client_for):
    return client_for(server)


def test_lidb_runs_in_the_call_and_generates(client, photo_bytes):
    opts = client.options(steps=4, seed=0, learning_rate=0.3)  # big steps: a visible change
    events = list(client.personalize_events(photo_bytes, "lidb", opts))
    assert not events[0].accepted.background
    assert any(ev.WhichOneof("event") == "progress" for ev in events)
    ident = events[-1].identity
    assert ident.method == pb.METHOD_LIDB and ident.artifact_bytes > 0 and "train" in ident.timings
    images = client.generate("a photo of ohwx person", ident.id, n=3, steps=2, seed=7)
    assert [i.seed for i in images] == [7, 8, 9] and all(i.data for i in images)
    again = client.generate("a photo of ohwx person", ident.id, n=1, steps=2, seed=8)
    assert _max_diff(again[0], images[1]) <= 1  # image i depends on seed + i only
    base = client.generate("a photo of ohwx person", n=1, steps=2, seed=8)
    assert _max_diff(base[0], images[1]) > 1  # the artifact was applied ... and removed:
    assert _max_diff(base[0], client.generate("a photo of ohwx person", steps=2, seed=8)[0]) == 0


def _max_diff(x: pb.GeneratedImage, y: pb.GeneratedImage) -> int:
    a, b = (np.asarray(Image.open(io.BytesIO(i.data)), dtype=np.int16) for i in (x, y))
    return int(np.abs(a - b).max())


@pytest.mark.parametrize("method,enum", [("lora", pb.METHOD_LORA),
                                         ("textual_inversion", pb.METHOD_TEXTUAL_INVERSION)])
def test_slow_methods_are_background_jobs(client, photo_bytes, method, enum):
    base = client.generate("a photo of ohwx person", steps=2, seed=1)[0]
    # a high learning rate: 2 steps that visibly change the image (the defaults barely move it)
    call = client.personalize_events(photo_bytes, method, client.options(steps=2, seed=0, learning_rate=0.05))
    first = next(iter(call))
    assert first.accepted.background and first.accepted.method == enum
    call.cancel()  # leaving does not stop a background job
    final = list(client.watch_job(first.accepted.job_id))[-1]
    assert final.WhichOneof("event") == "identity" and final.identity.method == enum
    assert client.get_job(first.accepted.job_id).state == pb.JOB_STATE_SUCCEEDED
    (img,) = client.generate("a photo of ohwx person", final.identity.id, steps=2, seed=1)
    assert _max_diff(img, base) > 1, f"the {method} identity did not change the image"
    # ... and was removed after: the same base call gives the same image as before
    assert _max_diff(base, client.generate("a photo of ohwx person", steps=2, seed=1)[0]) == 0
    client.delete_identity(final.identity.id)


def test_personalize_and_generate_refuses_background(client, photo_bytes):
    req = pb.PersonalizeAndGenerateRequest(photo=photo_bytes, prompts=["x"],
                                           options=pb.PersonalizeOptions(background=True))
    err = rpc_code(client.stub.PersonalizeAndGenerate, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "background" in err.details()
    err = rpc_code(client.stub.PersonalizeAndGenerate,
                   pb.PersonalizeAndGenerateRequest(photo=photo_bytes))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompts" in err.details()

"""The service on the tiny SDXL and FLUX bases, end to end over real gRPC sockets: GetServerInfo
reports the family and its default size, photo in -> identity out -> images out at that size,
two identities generated in one batched denoiser call equal to each generated alone, and the
per-family size validation (INVALID_ARGUMENT naming the field)."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from conftest import random_hypernet_dir
from hdb_serving_helpers import rpc_code, start_serve_process, wait_until
from PIL import Image

from hypernet.base import make_tiny_pipeline
from hypernet.base.tiny import TINY_RESOLUTION
from serving.client import HdbClient
from serving.stubs import pb

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]

ARCHS = ("sdxl", "flux")
BASE_ARCH = {"sdxl": pb.BASE_ARCH_SDXL, "flux": pb.BASE_ARCH_FLUX}
SIZE_MULTIPLE = {"sdxl": 8, "flux": 16}
PROMPT = "a photo of ohwx person"


@pytest.fixture(scope="module", params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def base_dir(arch, tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp(f"tiny-{arch}"), seed=0, arch=arch)


@pytest.fixture(scope="module")
def server(arch, base_dir, make_server_on, tmp_path_factory):
    hypernet = random_hypernet_dir(base_dir, tmp_path_factory.mktemp(f"hypernet-{arch}"))
    return make_server_on(base_dir, hypernet)(queue_size=16, max_batch=8, max_wait_ms=0,
                                                         max_generate_steps=1000)


@pytest.fixture()
def client(server, client_for):
    return client_for(server)


def _pixels(img: pb.GeneratedImage) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(img.data)), dtype=np.int16)


def test_server_info_reports_the_family_and_its_size(client, arch):
    info = client.server_info()
    assert info.base_arch == BASE_ARCH[arch]
    assert info.default_size == TINY_RESOLUTION  # the base's own, not the family's 1024
    assert info.limits.size_multiple == SIZE_MULTIPLE[arch]
    methods = {m.method: m for m in info.methods}
    assert methods[pb.METHOD_HYPERDREAMBOOTH].available, methods[pb.METHOD_HYPERDREAMBOOTH].detail
    # only the family's methods: no DreamBooth or Textual Inversion of a FLUX transformer
    family = {pb.METHOD_HYPERDREAMBOOTH, pb.METHOD_LIDB, pb.METHOD_LORA}
    if arch == "sdxl":
        family |= {pb.METHOD_TEXTUAL_INVERSION, pb.METHOD_DREAMBOOTH}
    assert set(methods) == family


def test_a_method_the_family_lacks_is_refused_before_any_job(server, client, arch, photo_bytes):
    """FLUX: no DreamBooth (refused at once, no job made); SDXL lacks no method (the refusal is
    checked on the engine that would accept it, without training)."""
    if arch == "flux":
        err = rpc_code(client.personalize, photo_bytes, method="dreambooth")
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "`method` dreambooth is not supported on this flux base" in err.details()
        assert all(job.method != "dreambooth" for job in server.server.core.jobs._jobs.values())
    else:
        server.server.core.engine.check_supported("dreambooth")  # does not raise


def test_photo_in_identity_out_images_out(client, arch, photo_bytes):
    """HyperDreamBooth: the hypernetwork's prediction, then the fast fine-tune with the family's
    objective (flow matching on FLUX), streamed as progress."""
    events = list(client.personalize_events(photo_bytes, options=client.options(steps=2, seed=1)))
    stages = {ev.progress.stage for ev in events if ev.WhichOneof("event") == "progress"}
    assert {"hypernetwork", "finetune"} <= stages, stages
    ident = events[-1].identity
    assert ident.id and ident.method == pb.METHOD_HYPERDREAMBOOTH
    images = client.generate(PROMPT, ident.id, n=2, steps=2, seed=3)
    assert len(images) == 2 and [im.seed for im in images] == [3, 4]
    for im in images:
        assert (im.width, im.height) == (TINY_RESOLUTION, TINY_RESOLUTION)
        assert Image.open(io.BytesIO(im.data)).size == (TINY_RESOLUTION, TINY_RESOLUTION)
    plain = client.generate(PROMPT, "", steps=2, seed=3)[0]
    assert np.abs(_pixels(plain) - _pixels(images[0])).max() > 10  # the identity is applied


def test_two_identities_in_one_batch_equal_each_alone(server, client, arch, photo_bytes):
    """Two users' identities share one denoiser call (the batch-size metric says so) and each
    gets the image it gets alone; the two images differ."""
    a = client.personalize(photo_bytes, options=client.options(steps=0, seed=1)).id
    flipped = np.asarray(Image.open(io.BytesIO(photo_bytes)))[:, ::-1, ::-1].copy()
    buf = io.BytesIO()
    Image.fromarray(flipped).save(buf, format="PNG")
    b = client.personalize(buf.getvalue(), options=client.options(steps=0, seed=2)).id
    asks = [(PROMPT, a, 5), (PROMPT, b, 5)]

    def one(prompt, ident, seed):
        return client.generate_stream(prompt, ident, client.generation(steps=3, seed=seed))

    alone = [list(one(*ask))[0] for ask in asks]
    metric = server.server.metrics.batch_size
    before = {s.name: s.value for s in metric.collect()[0].samples if s.name.endswith(("_count", "_sum"))}
    # a long generation of another shape holds the worker while both asks queue
    blocker = client.generate_stream("a person", "", client.generation(steps=1000, seed=0))
    core = server.server.core
    wait_until(lambda: core.worker.busy and len(core.queue) == 0, what="the blocker to run")
    calls = [one(*ask) for ask in asks]
    wait_until(lambda: len(core.queue) == len(asks), what="both asks queued")
    blocker.cancel()
    together = [list(call)[0] for call in calls]
    after = {s.name: s.value for s in metric.collect()[0].samples if s.name.endswith(("_count", "_sum"))}
    # one batch of 2 images (the cancelled blocker's batch is not observed: it did not finish)
    assert after["hdb_batch_size_count"] - before["hdb_batch_size_count"] == 1
    assert after["hdb_batch_size_sum"] - before["hdb_batch_size_sum"] == len(asks)
    for x, y in zip(alone, together, strict=True):
        assert np.abs(_pixels(x) - _pixels(y)).max() <= 2  # the library test's tolerance
    assert np.abs(_pixels(alone[0]) - _pixels(alone[1])).max() > 10  # two identities, two images


def test_sizes_are_checked_against_the_family(client, arch):
    m = SIZE_MULTIPLE[arch]
    bad = 100 if arch == "flux" else 60  # 100 is a multiple of 4 only; 60 of 4 only
    err = rpc_code(client.generate, PROMPT, "", steps=1, height=bad)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"`options.height` must be a multiple of {m} for {arch}" in err.details()
    if arch == "flux":
        err = rpc_code(client.generate, PROMPT, "", steps=1, negative_prompt="blurry")
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "`options.negative_prompt`" in err.details()
    # a size of the family's multiple (not the default) works
    im = client.generate(PROMPT, "", steps=1, width=TINY_RESOLUTION + m)[0]
    assert (im.width, im.height) == (TINY_RESOLUTION + m, TINY_RESOLUTION)


@pytest.mark.timeout(900)  # a fresh process imports torch and diffusers: slow on a busy 2-core machine
def test_hdb_serve_on_a_flux_base_without_a_hypernetwork(tmp_path, photo_bytes):
    """`hdb serve --base FLUX_DIR` (no --hypernet), the real command in a subprocess: the base's
    family and size in GetServerInfo; the embedded default hypernetwork belongs to the tiny SD 1.x
    base, so it is not built (it could only mismatch): HYPERDREAMBOOTH is listed unavailable with
    the reason and fails FAILED_PRECONDITION, while generation serves."""
    base = make_tiny_pipeline(tmp_path / "flux", seed=0, arch="flux")
    cache = tmp_path / "cache"
    proc, port, logs = start_serve_process(tmp_path, base, env={"HDB_CACHE_DIR": str(cache)})
    try:
        with HdbClient(f"localhost:{port}") as c:
            wait_until(lambda: _health(c) == "SERVING" or proc.poll() is not None, timeout=600,
                       what="SERVING")
            assert _health(c) == "SERVING", "".join(logs[-20:])
            info = c.server_info()
            assert info.base_arch == pb.BASE_ARCH_FLUX and info.default_size == TINY_RESOLUTION
            methods = {m.method: m for m in info.methods}
            hdb = methods[pb.METHOD_HYPERDREAMBOOTH]
            assert not hdb.available and "no hypernetwork for this flux base" in hdb.detail, hdb.detail
            assert pb.METHOD_LIDB in methods
            assert rpc_code(c.personalize, photo_bytes).code() == grpc.StatusCode.FAILED_PRECONDITION
            im = c.generate(PROMPT, "", steps=1, seed=0)[0]
            assert (im.width, im.height) == (TINY_RESOLUTION, TINY_RESOLUTION)
        assert not list(cache.glob("*hypernet*"))  # nothing was built
    finally:
        proc.kill()
        proc.wait()


def _health(client: HdbClient) -> str:
    try:
        return client.health(timeout=5)
    except grpc.RpcError as e:
        return e.code().name

"""Generation with an identity, and many identities in one denoiser call, on the tiny SDXL, SD3 and
FLUX pipelines: the same guarantees as SD 1.x's (tests/personalize/test_identity.py), plus the
per-arch defaults (size, scheduler) and size validation."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from hypernet.adapters.inject import adapted_layers
from hypernet.base import load_pipeline, make_tiny_pipeline
from hypernet.base.arch import NATIVE_RESOLUTION, default_size
from hypernet.base.real_configs import BASES, arch_of, meta_base
from hypernet.base.tiny import TINY_RESOLUTION
from hypernet.batch_generate import GenRequest, generate_batch
from hypernet.errors import InvalidInputError
from hypernet.generate import generate, make_scheduler

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARCHS = ("sdxl", "sd3", "flux")
#: The SD 1.x test's tolerance (test_identity.py): batched and alone differ by round-off only.
MAX_PIXEL_DIFF = 2


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict[str, object]:
    return {a: load_pipeline(make_tiny_pipeline(tmp_path_factory.mktemp(f"tiny-{a}"), seed=0, arch=a),
                             device="cpu", dtype="fp32") for a in ARCHS}


def _px(img) -> np.ndarray:
    return np.asarray(img, dtype=int)


def _diff(a, b) -> int:
    return int(np.abs(_px(a) - _px(b)).max())


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_generation_equals_one_by_one(pipes, make_identity, arch):
    pipe = pipes[arch]
    a, b = make_identity(pipe, seed=5), make_identity(pipe, seed=6, rank=1)
    negative = "" if arch == "flux" else "blurry"  # FLUX takes none (guidance-distilled)
    reqs = [GenRequest("a photo of ohwx person", a, seed=1, steps=3),
            GenRequest("a photo of a person", None, seed=2, steps=3, num_images=2),
            GenRequest("ohwx smiling", b, negative_prompt=negative, seed=3, steps=3)]
    batched = generate_batch(pipe, reqs)  # 4 images, 3 identities (one "none"), one denoiser call per step
    assert [len(x) for x in batched] == [1, 2, 1]
    assert all(not layer.active_adapters() for layer in adapted_layers(pipe).values())
    singles = [generate_batch(pipe, [r])[0] for r in reqs]
    for got, want in zip(batched, singles, strict=True):
        for g_img, w_img in zip(got, want, strict=True):
            assert g_img.size == (TINY_RESOLUTION, TINY_RESOLUTION)
            assert _diff(g_img, w_img) <= MAX_PIXEL_DIFF
    # the identities really change the image, and two identities give two different images
    same_seed = [GenRequest("a photo of ohwx person", i, seed=1, steps=3) for i in (None, b)]
    plain, with_b = (generate_batch(pipe, [r])[0][0] for r in same_seed)
    assert _diff(plain, singles[0][0]) > 10
    assert _diff(with_b, singles[0][0]) > 10


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_an_identity_applied_equals_the_batched_path(pipes, make_identity, arch):
    """`generate(artifact=...)` (the identity merged in as named adapters, as `hdb generate` does)
    gives the image the per-sample path gives, and removes the identity afterwards."""
    pipe = pipes[arch]
    ident = make_identity(pipe, seed=7)
    alone = generate(pipe, "a photo of ohwx person", artifact=ident, steps=3, seed=4)[0]
    batched = generate_batch(pipe, [GenRequest("a photo of ohwx person", ident, seed=4, steps=3)])[0][0]
    assert alone.size == (TINY_RESOLUTION, TINY_RESOLUTION)
    assert _diff(alone, batched) <= MAX_PIXEL_DIFF
    plain = generate(pipe, "a photo of ohwx person", steps=3, seed=4)[0]
    assert _diff(plain, alone) > 10
    assert all(not layer.active_adapters() for layer in adapted_layers(pipe).values())


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_bases_default_to_their_own_size(pipes, arch):
    """FLUX's stock pipeline would pick 1024 px on any base; ours reads the base's configs."""
    assert default_size(pipes[arch]) == TINY_RESOLUTION


@pytest.mark.parametrize("name", sorted(BASES))
def test_real_bases_default_to_their_native_resolution(name):
    """At real shape (meta device): the sizes the configs give are the families' native ones."""
    ns = meta_base(name)
    ns.vae = SimpleNamespace(config=SimpleNamespace(sample_size=BASES[name][3]["sample_size"]))
    assert default_size(ns) == NATIVE_RESOLUTION[arch_of(name)]


@pytest.mark.parametrize("arch,kw,msg", [
    ("flux", {"height": 100}, "`height` must be a multiple of 16 for flux"),
    ("sd3", {"width": 72}, "`width` must be a multiple of 16 for sd3"),
    ("sdxl", {"height": 60}, "`height` must be a multiple of 8 for sdxl"),
    ("flux", {"negative_prompt": "blurry"}, "`negative_prompt` must be empty on a flux base"),
])
def test_bad_sizes_per_arch(pipes, arch, kw, msg):
    with pytest.raises(InvalidInputError, match=msg):
        generate_batch(pipes[arch], [GenRequest("a person", **kw)])
    with pytest.raises(InvalidInputError, match=msg):
        generate(pipes[arch], "a person", **kw)


def test_sizes_valid_for_one_arch_only(pipes):
    """72 px is a multiple of 8 (SDXL takes it) but not of 16 (SD3 must refuse it)."""
    img = generate_batch(pipes["sdxl"], [GenRequest("a person", None, steps=1, height=72, width=64)])[0][0]
    assert img.size == (64, 72)
    with pytest.raises(InvalidInputError, match="`height`"):
        generate_batch(pipes["sd3"], [GenRequest("a person", None, steps=1, height=72, width=64)])


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_flow_matching_bases_sample_with_flow_matching(pipes, arch):
    pipe = pipes[arch]
    assert type(make_scheduler(pipe)).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert make_scheduler(pipe) is not pipe.scheduler
    with pytest.raises(InvalidInputError, match="`scheduler` must be one of"):
        make_scheduler(pipe, "dpmsolver++")
    with pytest.raises(InvalidInputError, match="`scheduler`"):
        generate(pipe, "a person", scheduler="ddim")

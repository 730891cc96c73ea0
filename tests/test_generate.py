"""`hypernet.generate`: argument checks, seeds, the default scheduler, and artifact clean-up."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from hypernet.errors import InvalidInputError
from hypernet.generate import generate, make_scheduler

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _arr(img) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(prompt=""), "`prompt` must be a non-empty string"),
        (dict(steps=0), "`steps` must be an integer in 1..1000"),
        (dict(steps=2.5), "`steps` must be an integer"),
        (dict(guidance=-1.0), "`guidance` must be a number in"),
        (dict(seed=-3), "`seed` must be an integer"),
        (dict(height=60), "`height` must be a multiple of 8"),
        (dict(width=0), "`width` must be a multiple of 8"),
        (dict(num_images=0), "`num_images` must be an integer in 1..16"),
        (dict(scheduler="magic"), "`scheduler` must be one of"),
        (dict(negative_prompt=None), "`negative_prompt` must be a string"),
    ],
)
def test_bad_arguments_name_the_argument(tiny_pipe, kw, match):
    args = dict(prompt="a photo", steps=2)
    args.update(kw)
    prompt = args.pop("prompt")
    with pytest.raises(InvalidInputError, match=match):
        generate(tiny_pipe, prompt, **args)


def test_seeds_are_per_image_and_reproducible(tiny_pipe):
    one = generate(tiny_pipe, "a photo of a person", steps=3, seed=5)
    two = generate(tiny_pipe, "a photo of a person", steps=3, seed=4, num_images=2)
    assert len(two) == 2 and two[0].size == (64, 64) and two[0].mode == "RGB"
    # Image i uses seed + i whatever the batch size (batched math may differ by rounding only).
    assert np.abs(_arr(two[1]) - _arr(one[0])).max() <= 1
    assert np.abs(_arr(two[0]) - _arr(two[1])).max() > 10
    again = generate(tiny_pipe, "a photo of a person", steps=3, seed=5)
    assert np.array_equal(_arr(one[0]), _arr(again[0]))


def test_default_scheduler_is_dpm_solver_pp_and_the_pipe_keeps_its_own(tiny_pipe):
    s = make_scheduler(tiny_pipe, "dpmsolver++")
    assert isinstance(s, DPMSolverMultistepScheduler) and s.config.algorithm_type == "dpmsolver++"
    original = tiny_pipe.scheduler
    a = generate(tiny_pipe, "a photo", steps=3)
    b = generate(tiny_pipe, "a photo", steps=3, scheduler="ddim")
    assert tiny_pipe.scheduler is original
    assert np.abs(_arr(a[0]) - _arr(b[0])).max() > 0


class _PerSampleLiDB:
    """A real LiDB adapter driven with per-sample weights for `rows` samples, recording calls.

    rows=1 works for any batch; rows=3 cannot serve the 2-sample CFG batch of one image, so the
    UNet raises mid-generation - a genuine failure inside the pipeline.
    """

    kind = "lidb"

    def __init__(self, rows: int):
        self.rows = rows
        self.calls: list[str] = []

    def apply(self, pipe) -> None:
        from hypernet.adapters import LiDB, default_spec_for

        self.calls.append("apply")
        self.handle = LiDB(pipe, default_spec_for(pipe), name="per-sample")
        L, s = len(self.handle.layer_names), self.handle.spec
        g = torch.Generator().manual_seed(0)
        self.handle.use(
            {
                "A_train": torch.randn(self.rows, L, s.r, s.a, generator=g),
                "B_train": torch.randn(self.rows, L, s.b, s.r, generator=g),
            }
        )

    def remove(self, pipe) -> None:
        from hypernet.methods._common import unwrap_empty_layers

        self.calls.append("remove")
        self.handle.remove()
        unwrap_empty_layers(pipe)


def test_artifact_is_removed_even_when_generation_fails(tiny_pipe):
    base = _arr(generate(tiny_pipe, "a photo", steps=3)[0])
    ok = _PerSampleLiDB(rows=1)
    assert np.abs(_arr(generate(tiny_pipe, "a photo", steps=3, artifact=ok)[0]) - base).max() > 0
    bad = _PerSampleLiDB(rows=3)
    with pytest.raises(InvalidInputError, match="multiple of the 3 per-sample"):
        generate(tiny_pipe, "a photo", steps=3, artifact=bad)
    assert ok.calls == bad.calls == ["apply", "remove"]
    assert np.array_equal(_arr(generate(tiny_pipe, "a photo", steps=3)[0]), base)

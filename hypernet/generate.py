"""Text-to-image generation with an optional personalisation artifact.

    images = generate(pipe, "a photo of ohwx person as a knight", artifact=load_artifact("me.safetensors"))

The artifact is applied for this call only and always removed again - also when generation
fails - so a shared pipeline never leaks one user's identity into the next request.
DPM-Solver++ (2nd-order multistep) is the default on SD 1.x/2.x and SDXL: it reaches at 20-25
steps the quality DDIM needs ~50 for. The flow-matching bases (SD3, FLUX) sample with their own
flow-matching Euler scheduler (FLUX's pipeline passes it resolution-dependent sigmas that the
DDPM-family solvers do not take), so there "euler" and "base" are the choices.

Sizes default to the base's own (`hypernet.base.arch.default_size`: 1024 on SDXL/SD3/FLUX, 64 on
the tiny bases) and must be multiples of the family's `SIZE_MULTIPLE` (16 for SD3/FLUX).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from PIL import Image

from hypernet.base.arch import FLOW_MATCHING, Arch, check_image_size, default_size, pipeline_arch
from hypernet.errors import InvalidInputError

log = logging.getLogger(__name__)

SCHEDULERS = ("dpmsolver++", "ddim", "euler", "euler-a", "pndm", "ddpm", "base")
#: On flow-matching bases: "euler" is a fresh FlowMatchEulerDiscreteScheduler from the base's config.
FLOW_SCHEDULERS = ("euler", "base")
MAX_STEPS = 1000
MAX_IMAGES = 16
MAX_SIDE = 2048


def schedulers_for(arch: Arch) -> tuple[str, ...]:
    """The scheduler names generation accepts on a base of `arch`."""
    return FLOW_SCHEDULERS if FLOW_MATCHING[arch] else SCHEDULERS


def default_scheduler(arch: Arch) -> str:
    """DPM-Solver++ on noise-prediction bases; flow-matching Euler (the family's own) on SD3/FLUX."""
    return "euler" if FLOW_MATCHING[arch] else "dpmsolver++"


def make_scheduler(pipe, name: str | None = None):
    """An inference scheduler named `name` (None: the arch's default), built from the base's own
    noise-schedule config: a fresh object (so a call never shares step state with the pipeline's
    scheduler), except for "base", which is the pipeline's own.

    Raises:
        InvalidInputError: a name the base's family does not sample with (`schedulers_for`).
    """
    arch = pipeline_arch(pipe)
    name = default_scheduler(arch) if name is None else name
    cfg = pipe.scheduler.config
    if FLOW_MATCHING[arch]:
        if name not in FLOW_SCHEDULERS:
            raise InvalidInputError(f"`scheduler` must be one of {FLOW_SCHEDULERS} on a flow-matching base "
                                    f"({arch}), got {name!r}")
        return pipe.scheduler if name == "base" else type(pipe.scheduler).from_config(cfg)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2)
    classes = {
        "ddim": DDIMScheduler,
        "euler": EulerDiscreteScheduler,
        "euler-a": EulerAncestralDiscreteScheduler,
        "pndm": PNDMScheduler,
        "ddpm": DDPMScheduler,
    }
    if name == "base":
        return pipe.scheduler
    if name not in classes:
        raise InvalidInputError(f"`scheduler` must be one of {SCHEDULERS}, got {name!r}")
    return classes[name].from_config(cfg)


def check_generate_args(
    prompt: Any,
    negative_prompt: Any,
    steps: Any,
    guidance: Any,
    seed: Any,
    height: Any,
    width: Any,
    num_images: Any,
    scheduler: Any,
    arch: Arch = "sd15",
) -> None:
    """Validate everything up front, naming the argument, what it must be and what it got.

    `arch` is the base's family: sizes must be multiples of its `SIZE_MULTIPLE`, the scheduler
    one of `schedulers_for(arch)` (None: the default), and FLUX takes no negative prompt (it is
    guidance-distilled: there is no classifier-free guidance pass that would use one).
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidInputError(f"`prompt` must be a non-empty string, got {prompt!r}")
    if not isinstance(negative_prompt, str):
        raise InvalidInputError(f"`negative_prompt` must be a string, got {type(negative_prompt).__name__}")
    if not _is_int(steps) or not 1 <= steps <= MAX_STEPS:
        raise InvalidInputError(f"`steps` must be an integer in 1..{MAX_STEPS}, got {steps!r}")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance <= 50:
        raise InvalidInputError(f"`guidance` must be a number in [0, 50], got {guidance!r}")
    if not _is_int(seed) or not 0 <= seed < 2**63:
        raise InvalidInputError(f"`seed` must be an integer in [0, 2**63), got {seed!r}")
    if arch == "flux" and negative_prompt:
        raise InvalidInputError(f"`negative_prompt` must be empty on a flux base (guidance-distilled, no "
                                f"classifier-free guidance), got {negative_prompt!r}")
    for name, v in (("height", height), ("width", width)):
        check_image_size(name, v, arch, MAX_SIDE)
    if not _is_int(num_images) or not 1 <= num_images <= MAX_IMAGES:
        raise InvalidInputError(f"`num_images` must be an integer in 1..{MAX_IMAGES}, got {num_images!r}")
    if scheduler is not None and scheduler not in schedulers_for(arch):
        raise InvalidInputError(f"`scheduler` must be one of {schedulers_for(arch)} on {arch}, got {scheduler!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def generate(
    pipe,
    prompt: str,
    *,
    artifact=None,
    negative_prompt: str = "",
    steps: int = 25,
    guidance: float = 7.5,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    num_images: int = 1,
    scheduler: str | None = None,
) -> list[Image.Image]:
    """Generate `num_images` images; image i uses seed `seed + i` (so it does not depend on
    `num_images`), drawn on the CPU so a seed gives the same start noise on every device.

    Args:
        artifact: anything with `apply(pipe)` / `remove(pipe)` (see `hypernet.methods.Artifact`).
        height, width: default the base's own size (`default_size`).
        scheduler: "dpmsolver++" (default), "ddim", "euler", "euler-a", "pndm", "ddpm", or
            "base" (the pipeline's own); on SD3/FLUX "euler" (default, flow matching) or "base".

    Raises:
        InvalidInputError: a bad argument; IncompatibleAdapterError: an artifact for another base.
    """
    # 1. Check inputs
    arch = pipeline_arch(pipe)
    check_generate_args(prompt, negative_prompt, steps, guidance, seed, height, width, num_images, scheduler, arch)
    height, width = height or default_size(pipe), width or default_size(pipe)
    # 2. Scheduler and generators
    sched = make_scheduler(pipe, scheduler)
    generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(num_images)]
    # 3. Apply the artifact; always take it off again
    original = pipe.scheduler
    applied = False
    try:
        if artifact is not None:
            artifact.apply(pipe)
            applied = True
        pipe.scheduler = sched
        # 4. Denoise and decode
        out = pipe(
            prompt=[prompt] * num_images,
            # always the string, also "": SDXL's pipeline would zero the embedding of a missing one,
            # and then an image would differ from the same request batched (`generate_batch`)
            negative_prompt=None if arch == "flux" else [negative_prompt] * num_images,
            num_inference_steps=steps,
            guidance_scale=float(guidance),
            height=height,
            width=width,
            generator=generators,
            output_type="pil",
        )
    finally:
        pipe.scheduler = original
        if applied:
            artifact.remove(pipe)
    return list(out.images)


__all__ = ["FLOW_SCHEDULERS", "SCHEDULERS", "check_generate_args", "default_scheduler", "generate", "make_scheduler",
           "schedulers_for"]

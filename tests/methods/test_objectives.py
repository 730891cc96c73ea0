"""The per-arch training objective (hypernet/training/objectives.py) on tiny SD 1.x, SDXL, SD3 and
FLUX pipelines: conditioning equals the stock pipelines', SD 1.x is `diffusion_loss` bit for bit,
flow matching follows the stock scheduler, and the one training loop lowers the loss on each."""

from __future__ import annotations

import pytest
import torch

from hypernet.base import load_pipeline
from hypernet.base.arch import ARCHS, denoiser
from hypernet.errors import InvalidInputError
from hypernet.training import TrainConfig, build_train_data, diffusion_loss, encode_images, objective_for, train

PROMPTS = ["a photo of ohwx person", "a ohwx face in the snow"]


@pytest.fixture(scope="module")
def pipes(tiny_arch_dir, tiny_base_dir) -> dict:
    out = {a: load_pipeline(tiny_arch_dir(a), device="cpu", dtype="fp32") for a in ARCHS if a != "sd15"}
    out["sd15"] = load_pipeline(tiny_base_dir, device="cpu", dtype="fp32")
    return out


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # (n, 3, 64, 64)


def test_sd15_objective_is_diffusion_loss_bit_for_bit(pipes):
    pipe = pipes["sd15"]
    obj = objective_for(pipe)
    lat = encode_images(pipe, _pixels(2))
    emb, pooled = obj.encode_prompts(pipe, PROMPTS)
    assert pooled is None
    with torch.no_grad():
        got = obj.loss(pipe.unet, lat, emb, torch.Generator().manual_seed(3), reduction="none")
        want = diffusion_loss(pipe.unet, obj.scheduler, lat, emb, torch.Generator().manual_seed(3), reduction="none")
    assert torch.equal(got, want)


def test_sdxl_conditioning_equals_stock_encode_prompt(pipes):
    """Both CLIPs' penultimate states + the projected pooled output, as diffusers computes them,
    also from token ids with grad (the path text-side training takes)."""
    pipe = pipes["sdxl"]
    obj = objective_for(pipe)
    emb, pooled = obj.encode_prompts(pipe, PROMPTS)
    want_emb, _, want_pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    assert emb.shape == (2, 77, 64) and pooled.shape == (2, 32)
    torch.testing.assert_close(emb, want_emb, rtol=0, atol=0)
    torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=0)
    ids = obj.tokenize(pipe, PROMPTS)
    assert ids.shape == (2, 2, 77) and not torch.equal(ids[:, 0], ids[:, 1])  # tokenizer_2 pads with "!"


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_mmdit_conditioning_and_refusals(pipes, arch):
    pipe = pipes[arch]
    obj = objective_for(pipe)
    emb, pooled = obj.encode_prompts(pipe, PROMPTS)
    net = denoiser(pipe)
    assert emb.shape[-1] == net.config.joint_attention_dim and pooled.shape == (2, net.config.pooled_projection_dim)
    lat = encode_images(pipe, _pixels(2))
    with pytest.raises(InvalidInputError, match="min_snr_gamma"):
        obj.loss(net, lat, emb, torch.Generator(), 5.0, pooled=pooled)
    with pytest.raises(InvalidInputError, match="pooled"):
        obj.loss(net, lat, emb, torch.Generator())
    with pytest.raises(InvalidInputError, match="sd15 or sdxl"):
        obj.tokenize(pipe, PROMPTS)
    with pytest.raises(InvalidInputError, match="density"):
        objective_for(pipe, density="cosine")


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_flow_matching_path_and_target_follow_the_stock_scheduler(pipes, arch):
    """x_t is the stock scheduler's `scale_noise`, and one stock Euler step from x_t to s = 0 with
    the target as model output lands on x0: the target's sign and scale are the sampler's."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = pipes[arch]
    obj = objective_for(pipe)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    t = obj.scheduler.timesteps[[250]]  # (1,)
    noisy, target = obj.noised(x0, noise, t)
    torch.testing.assert_close(noisy, sched.scale_noise(x0, t, noise))
    # One step from s to 0 (shift 1: `set_timesteps` would shift the given sigma again).
    step = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0, use_dynamic_shifting=False)
    step.set_timesteps(sigmas=[float(t / 1000)])
    torch.testing.assert_close(step.sigmas, torch.tensor([float(t / 1000), 0.0]))
    back = step.step(target, step.timesteps[0], noisy).prev_sample
    torch.testing.assert_close(back, x0, atol=1e-5, rtol=1e-5)


def test_timestep_densities_match_the_diffusers_scripts(pipes):
    """SD3: logit-normal u through the base's static shift 3 (median s = 3 * 0.5 / (1 + 2 * 0.5)
    = 0.75); FLUX: uniform u, unshifted (median 0.5); FLUX with `resolution_shift` moves it up."""
    g = torch.Generator().manual_seed(0)
    sd3 = objective_for(pipes["sd3"]).draw_timesteps(4000, g)
    flux = objective_for(pipes["flux"]).draw_timesteps(4000, g)
    shifted = objective_for(pipes["flux"], resolution_shift=True).draw_timesteps(4000, g, (1, 16, 128, 128))
    assert abs(sd3.median().item() - 750) < 20
    assert abs(flux.median().item() - 500) < 30 and flux.min() >= 1 and flux.max() <= 1000
    assert shifted.median().item() > flux.median().item() + 50
    assert abs(objective_for(pipes["sd3"], density="uniform").draw_timesteps(4000, g).median().item() - 750) < 30


@pytest.mark.parametrize("arch", ARCHS)
def test_the_one_loop_lowers_a_fixed_batch_loss_on_every_arch(pipes, arch):
    """The denoiser's attention layers train through `train` (the objective plugged in
    by arch); the loss on fixed draws (same noise and timesteps before and after) goes down."""
    pipe = pipes[arch]
    net = denoiser(pipe)
    obj = objective_for(pipe)
    data = build_train_data(pipe, _pixels(2, seed=1), PROMPTS[0], flip=False)
    g = torch.Generator().manual_seed(7)
    b = len(data)
    noise, t = torch.randn(data.latents.shape, generator=g), obj.draw_timesteps(b, g, data.latents.shape)
    emb, pooled = data.text_emb.expand(b, -1, -1), None if data.pooled is None else data.pooled.expand(b, -1)

    def fixed() -> float:
        with torch.no_grad():
            return obj.loss(net, data.latents, emb, None, pooled=pooled, timesteps=t, noise=noise).item()

    params = [p for n, p in net.named_parameters() if ".attn" in n or "attn1" in n or "attn2" in n]
    before_w = [p.detach().clone() for p in params]
    before = fixed()
    res = train(pipe, params, data, TrainConfig(steps=8, lr=1e-2, batch_size=2, flip=False, log_every=0))
    after = fixed()
    with torch.no_grad():
        for p, w in zip(params, before_w, strict=True):
            p.copy_(w)  # leave the module's pipeline as it was
    assert len(res.losses) == 8 and all(torch.isfinite(torch.tensor(res.losses)))
    assert after < 0.95 * before, (before, after)  # measured: 0.87 (sd15) to 0.93 (flux)


@pytest.mark.parametrize("arch, ptype", [("sd15", "epsilon"), ("sd15", "v_prediction"), ("sd15", "sample"),
                                         ("sdxl", "epsilon"), ("sd3", None), ("flux", None)])
def test_one_step_x0_estimate_is_the_samplers(pipes, arch, ptype):
    """`denoise_x0` is what the stock samplers call the predicted original sample: DDPMScheduler's
    `pred_original_sample` for epsilon / v / sample models, x_t - s v on the flow-matching path
    (so an exact velocity gives x0 back)."""
    from diffusers import DDPMScheduler

    pipe = pipes[arch]
    obj = objective_for(pipe)
    net = denoiser(pipe)
    if ptype is not None and ptype != obj.scheduler.config.prediction_type:
        obj.scheduler = DDPMScheduler.from_config(obj.scheduler.config, prediction_type=ptype)
    g = torch.Generator().manual_seed(0)
    c = 16 if arch in ("sd3", "flux") else 4
    lat, noise = torch.randn(2, c, 8, 8, generator=g), torch.randn(2, c, 8, 8, generator=g)
    emb, pooled = obj.encode_prompts(pipe, PROMPTS)
    with torch.no_grad():
        if obj.flow_matching:
            t = obj.scheduler.timesteps[[100, 100]]  # (2,)
            x0 = obj.denoise_x0(net, lat, noise, t, emb, pooled)
            noisy, target = obj.noised(lat, noise, t)
            out = obj.predict(net, noisy, t, emb, pooled)
            s = float(t[0]) / 1000
            torch.testing.assert_close(x0, lat + s * (target - out), atol=1e-5, rtol=1e-5)  # exact v -> x0
        else:
            t = torch.tensor([600, 600])
            x0 = obj.denoise_x0(net, lat, noise, t, emb, pooled)
            noisy = obj.scheduler.add_noise(lat, noise, t)
            out = obj.predict(net, noisy, t, emb, pooled)
            ref = DDPMScheduler.from_config(obj.scheduler.config, clip_sample=False, thresholding=False)
            ref.set_timesteps(1000)
            want = ref.step(out, 600, noisy).pred_original_sample
            torch.testing.assert_close(x0, want, atol=1e-4, rtol=1e-4)
    assert x0.shape == lat.shape and x0.dtype == torch.float32

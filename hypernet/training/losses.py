"""The DDPM-family denoising loss (SD 1.x/2.x, SDXL), per the base's own noise schedule.

Flow-matching bases (SD3, FLUX) and the per-arch conditioning live in `hypernet.training.objectives`,
whose SD 1.x/SDXL objectives call `diffusion_loss` itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from hypernet.errors import InvalidInputError


def make_noise_scheduler(pipe) -> DDPMScheduler:
    """A DDPM scheduler with the base's training schedule and prediction type.

    The pipe's own scheduler may be an inference one (DPM-Solver, DDIM); the forward process
    (betas, prediction type) lives in its config, which every diffusers scheduler shares.
    """
    return DDPMScheduler.from_config(pipe.scheduler.config)


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep, (B,) float32."""
    ac = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return ac / (1.0 - ac)


def diffusion_loss(
    unet,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    text_emb: torch.Tensor,
    generator: torch.Generator,
    min_snr_gamma: float | None = None,
    *,
    reduction: str = "mean",
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    added_cond_kwargs: dict | None = None,
) -> torch.Tensor:
    """MSE between the UNet's prediction and its target on randomly noised latents.

    Noise and timesteps are drawn on the CPU from `generator` (then moved), so a seed gives the
    same draws on every device. The target follows `scheduler.config.prediction_type`: the noise
    (epsilon), the velocity (v_prediction, SD 2.x 768) or the clean latents (sample).

    Args:
        latents: (B, 4, h, w) clean latents (already scaled).
        text_emb: (B, 77, D) conditioning.
        min_snr_gamma: weight each sample by min(SNR, gamma) / SNR (epsilon) or
            min(SNR, gamma) / (SNR + 1) (v) - Hang et al. 2023, faster convergence.
        reduction: "mean" -> scalar; "none" -> (B,) per-sample losses.
        added_cond_kwargs: passed to the UNet (SDXL's pooled text and time ids; see
            `hypernet.training.objectives`).

    Returns:
        The loss (fp32).
    """
    b = latents.shape[0]
    if text_emb.shape[0] != b:
        raise InvalidInputError(f"`text_emb` must have {b} rows like `latents`, got {text_emb.shape[0]}")
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if timesteps is None:
        n_train = scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, n_train, (b,), generator=generator)
    noise = noise.to(latents.device, latents.dtype)
    timesteps = timesteps.to(latents.device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)  # (B, 4, h, w)
    ptype = scheduler.config.prediction_type
    if ptype == "epsilon":
        target = noise
    elif ptype == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    elif ptype == "sample":
        target = latents
    else:
        raise InvalidInputError(f"`prediction_type` must be epsilon, v_prediction or sample, got {ptype!r}")
    p = next(unet.parameters())
    pred = unet(noisy.to(p.dtype), timesteps, encoder_hidden_states=text_emb.to(p.dtype),
                added_cond_kwargs=added_cond_kwargs).sample
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if min_snr_gamma is not None:
        s = snr(scheduler, timesteps)
        clipped = torch.clamp(s, max=min_snr_gamma)
        weight = clipped / (s + 1.0) if ptype == "v_prediction" else clipped / s
        if ptype == "sample":
            weight = clipped  # x0-MSE: the weight is min(SNR, gamma) itself
        per_sample = per_sample * weight
    if reduction == "none":
        return per_sample
    if reduction != "mean":
        raise InvalidInputError(f"`reduction` must be 'mean' or 'none', got {reduction!r}")
    return per_sample.mean()

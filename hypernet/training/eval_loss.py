"""A deterministic diffusion loss for comparing models on the same photos.

Training losses draw random timesteps and noise, so two runs' last losses differ by noise alone.
Here timesteps are evenly spaced over the schedule (draw j of D at (j + 1/2) / D of it) and the
noise of draw j is seeded by (seed, j): every model scored with the same arguments sees exactly
the same noisy inputs, so differences are the models', not the dice's.
"""

from __future__ import annotations

import torch

from hypernet.training.losses import diffusion_loss, make_noise_scheduler


@torch.no_grad()
def paired_diffusion_loss(pipe, latents: torch.Tensor, text_emb: torch.Tensor, draws: int = 32, seed: int = 0) -> float:
    """Mean diffusion loss of `pipe.unet` (with whatever adapters are active) over fixed draws.

    Args:
        latents: (N, C, h, w) clean latents of the photos.
        text_emb: (N or 1, 77, D) conditioning.
    """
    scheduler = make_noise_scheduler(pipe)
    T = scheduler.config.num_train_timesteps
    n = latents.shape[0]
    emb = text_emb.expand(n, -1, -1) if text_emb.shape[0] == 1 else text_emb
    total = 0.0
    for j in range(draws):
        ts = torch.full((n,), int((j + 0.5) / draws * T), dtype=torch.long)  # (N,)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed * 100_003 + j))
        total += float(diffusion_loss(pipe.unet, scheduler, latents, emb, None, timesteps=ts, noise=noise))
    return total / draws

"""Many identities' LiDBs fitted together, one denoiser call per step, each fit as if it ran alone.

Pretraining's stage 1 fits thousands of independent LiDBs. At face-world scale one identity's
micro-batch (4 latents of 32x16x16) leaves the CPU idle between tiny kernels, so K identities share
each UNet call through the per-sample adapter weights the library already has (`LiDB.use` with
(K, L, r, a)/(K, L, b, r) weights; the layer reuses row k for samples k, K + k, 2K + k, ...).

What keeps every fit independent of the others in its chunk:
- the loss is the *sum* over identities of each one's mean over its own samples, so identity k's
  gradient is exactly the gradient of its own loss;
- every identity draws its photos, flips, noise and timesteps from its own generator, in the order
  `hypernet.training.train` draws them, so a chunk of one reproduces `train_lidb`'s draws;
- gradients are clipped per identity (its own global norm); AdamW is elementwise, so one optimizer
  over the packed tensors keeps each identity's own moments; the LR schedule is the same for all
  (every identity runs the same steps).
What is left is float round-off: the UNet's kernels block a batch of 4K differently from one of 4.
The base family's objective (`hypernet.training.objectives`: conditioning, timestep density,
target, denoiser call) is the one `train` uses, so this works on SDXL, SD3 and FLUX too.

    fits = train_lidb_batch(pipe, handle, [LiDBFitData(lat, flipped, seed=7), ...], text_emb, cfg)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from diffusers.optimization import get_scheduler

from hypernet.adapters.lidb.model import LiDB, LiDBWeights
from hypernet.base.arch import denoiser
from hypernet.errors import InvalidInputError
from hypernet.training.config import TrainConfig
from hypernet.training.objectives import objective_for


@dataclass
class LiDBFitData:
    """One identity's cached data and the seed of its draws.

    latents: (n, C, h, w) VAE latents of its photos; flipped: the mirrored photos' (same shape) or
    None (no flip augmentation); seed: seeds its batches, flips, noise and timesteps.
    """

    latents: torch.Tensor
    flipped: torch.Tensor | None
    seed: int

    def __post_init__(self) -> None:
        if self.latents.dim() != 4 or self.latents.shape[0] < 1:
            raise InvalidInputError(f"`latents` must have shape (n>=1, C, h, w), got {tuple(self.latents.shape)}")
        if self.flipped is not None and self.flipped.shape != self.latents.shape:
            raise InvalidInputError(
                f"`flipped` must match `latents` {tuple(self.latents.shape)}, got {tuple(self.flipped.shape)}"
            )


def train_lidb_batch(
    pipe,
    handle: LiDB,
    items: list[LiDBFitData],
    text_emb: torch.Tensor,
    cfg: TrainConfig,
    *,
    init: LiDBWeights | None = None,
    pooled: torch.Tensor | None = None,
) -> list[tuple[LiDBWeights, float]]:
    """Fit one LiDB per item, all K of them through each denoiser call.

    Args:
        handle: an attached LiDB; its own parameters stay untouched (the fit routes packed
            weights through `handle.use`, and goes back to the parameters afterwards).
        items: the identities; every latent must have the same (C, h, w).
        text_emb: (1, L, D) the training prompt's embedding, shared by every sample.
        pooled: (1, P) its pooled embedding (SDXL, SD3, FLUX; None on SD 1.x).
        cfg: the schedule each identity gets (steps, lr, batch_size, grad_accum, clipping, ...).
            `checkpoint_every` is not used: a chunk is short and is redone whole when interrupted.
        init: packed weights (L, r, a)/(L, b, r) every identity starts from, or (K, L, r, a)/
            (K, L, b, r), one start per item (stage 2 fine-tuning each identity from its own
            prediction); the rank r may differ from the handle's. None: the handle's current
            parameters (right after attaching: the fresh init, zero delta).

    Returns:
        Per item, in order: (packed weights {"A_train": (L, r, a), "B_train": (L, b, r)} on CPU in
        fp32, final loss = the mean of its last tenth of step losses, as `train_lidb` reports).

    Raises:
        InvalidInputError: no items, mismatched latent shapes, a text_emb with several rows, or
            per-item init weights whose leading dimension is not the number of items.
        FloatingPointError: a non-finite loss (naming the item).
    """
    if not items:
        raise InvalidInputError("`items` must hold at least one identity, got none")
    shapes = {tuple(it.latents.shape[1:]) for it in items}
    if len(shapes) != 1:
        raise InvalidInputError(f"every item's latents must have one (C, h, w), got {sorted(shapes)}")
    if text_emb.dim() != 3 or text_emb.shape[0] != 1:
        raise InvalidInputError(f"`text_emb` must have shape (1, L, D), got {tuple(text_emb.shape)}")
    if pooled is not None and (pooled.dim() != 2 or pooled.shape[0] != 1):
        raise InvalidInputError(f"`pooled` must have shape (1, P), got {tuple(pooled.shape)}")
    unet = denoiser(pipe)
    device = next(unet.parameters()).device
    start = handle.state_dict() if init is None else init
    K = len(items)
    # 1. Packed leaves: (K, L, r, a) and (K, L, b, r), fp32 (AdamW state stays fp32 on GPU too).
    A, B = (_packed(start[k], K, k).to(device, torch.float32).requires_grad_(True) for k in ("A_train", "B_train"))
    opt = torch.optim.AdamW([A, B], lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay)
    sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    run = _ChunkRun(pipe, items, text_emb.to(device), None if pooled is None else pooled.to(device), cfg, device)
    saved = [(p, p.requires_grad) for p in unet.parameters()]
    gc_before = bool(getattr(unet, "is_gradient_checkpointing", False))
    losses = torch.zeros(cfg.steps, K, dtype=torch.float64)  # (steps, K)
    try:
        unet.requires_grad_(False)  # only the packed leaves train; the graph skips the UNet's weights
        _set_checkpointing(unet, cfg.gradient_checkpointing)
        handle.use({"A_train": A, "B_train": B})
        # 2. Steps: forward/backward of every micro-batch, per-identity clip, AdamW, schedule.
        for step in range(cfg.steps):
            opt.zero_grad(set_to_none=True)
            for _ in range(cfg.grad_accum):
                per_id = run.micro_batch_loss()  # (K,) each identity's own mean loss
                bad = (~torch.isfinite(per_id)).nonzero().flatten().tolist()
                if bad:
                    raise FloatingPointError(f"loss must be finite, got {per_id[bad[0]].item()} for item {bad[0]} "
                                             f"at step {step}")
                run.scaler.scale(per_id.sum() / cfg.grad_accum).backward()
                losses[step] += per_id.detach().double().cpu() / cfg.grad_accum
            run.scaler.unscale_(opt)
            if cfg.max_grad_norm is not None:
                clip_per_identity(A.grad, B.grad, cfg.max_grad_norm)
            run.scaler.step(opt)
            run.scaler.update()
            sched.step()
    finally:
        handle.use(None)
        _set_checkpointing(unet, gc_before)
        for p, flag in saved:
            p.requires_grad_(flag)
    tail = losses[-max(1, cfg.steps // 10):].mean(0)  # (K,)
    A, B = A.detach().to("cpu", torch.float32), B.detach().to("cpu", torch.float32)
    return [({"A_train": A[k].clone(), "B_train": B[k].clone()}, float(tail[k])) for k in range(K)]


def _packed(w: torch.Tensor, K: int, name: str) -> torch.Tensor:
    """(L, ...) shared -> (K, L, ...) copies; (K, L, ...) per item -> a copy (never the caller's tensor)."""
    if w.dim() == 3:
        return w.detach().unsqueeze(0).repeat(K, 1, 1, 1)
    if w.dim() != 4 or w.shape[0] != K:
        raise InvalidInputError(
            f"`init[{name!r}]` must have shape (L, ., .) or ({K}, L, ., .) for {K} items, got {tuple(w.shape)}"
        )
    return w.detach().clone()


def clip_per_identity(gA: torch.Tensor | None, gB: torch.Tensor | None, max_norm: float) -> None:
    """Scale each identity's gradient (row k of gA (K, ...) and gB (K, ...)) to norm <= max_norm.

    `torch.nn.utils.clip_grad_norm_` over the packed tensors would clip by the norm of all K
    identities together, coupling them; this is its rule (coef = max_norm / (norm + 1e-6), capped
    at 1) applied to each identity's own global norm.
    """
    grads = [g for g in (gA, gB) if g is not None]
    if not grads:
        return
    K = grads[0].shape[0]
    sq = sum(g.detach().float().reshape(K, -1).pow(2).sum(1) for g in grads)  # (K,)
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)  # (K,)
    for g in grads:
        g.mul_(coef.to(g.dtype).view(K, *([1] * (g.dim() - 1))))


class _ChunkRun:
    """The chunk's generators and the one-denoiser-call loss of a micro-batch."""

    def __init__(self, pipe, items: list[LiDBFitData], text_emb: torch.Tensor, pooled: torch.Tensor | None,
                 cfg: TrainConfig, device):
        self.pipe, self.items, self.text_emb, self.cfg, self.device = pipe, items, text_emb, cfg, device
        self.pooled, self.net = pooled, denoiser(pipe)
        self.objective = objective_for(pipe)
        self.gens = [torch.Generator(device="cpu").manual_seed(it.seed) for it in items]
        use_amp = device.type == "cuda" and cfg.mixed_precision != "no"
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
        self.use_amp = use_amp
        # fp16 only: one identity's overflow skips the step for the whole chunk (bf16 needs no scaler).
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_amp and cfg.mixed_precision == "fp16")

    def _draw(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Item k's (latents (B, C, h, w), noise (B, C, h, w), timesteps (B,)), drawn in the order
        `hypernet.training` draws them (photo rows, flips, then noise, then timesteps)."""
        it, g, bs = self.items[k], self.gens[k], self.cfg.batch_size
        idx = torch.randint(it.latents.shape[0], (bs,), generator=g)  # (B,)
        lat = it.latents[idx.to(it.latents.device)]
        if self.cfg.flip and it.flipped is not None:
            mirror = torch.rand(bs, generator=g) < 0.5  # (B,)
            lat = torch.where(mirror.to(lat.device)[:, None, None, None], it.flipped[idx.to(lat.device)], lat)
        noise = torch.randn(lat.shape, generator=g, dtype=torch.float32)
        t = self.objective.draw_timesteps(bs, g, lat.shape)  # (B,)
        return lat, noise, t

    def micro_batch_loss(self) -> torch.Tensor:
        """(K,) per-identity mean losses of one micro-batch, all K * B samples in one denoiser call."""
        K, bs = len(self.items), self.cfg.batch_size
        lat, noise, t = zip(*(self._draw(k) for k in range(K)), strict=True)
        # Sample j * K + k is identity k's j-th: the order `LiDB.use`'s per-sample rows repeat in.
        lat = torch.stack(lat, 1).reshape(bs * K, *lat[0].shape[1:]).to(self.device)  # (B*K, C, h, w)
        noise = torch.stack(noise, 1).reshape(bs * K, *noise[0].shape[1:])  # (B*K, C, h, w)
        t = torch.stack(t, 1).reshape(bs * K)  # (B*K,)
        emb = self.text_emb.expand(bs * K, -1, -1)  # (B*K, L, D)
        pooled = None if self.pooled is None else self.pooled.expand(bs * K, -1)  # (B*K, P)
        ctx = torch.autocast("cuda", dtype=self.amp_dtype) if self.use_amp else contextlib.nullcontext()
        with ctx:
            per = self.objective.loss(self.net, lat, emb, None, self.cfg.min_snr_gamma, pooled=pooled,
                                      reduction="none", timesteps=t, noise=noise)  # (B*K,)
        return per.float().view(bs, K).mean(0)  # (K,)


def _set_checkpointing(unet, on: bool) -> None:
    if hasattr(unet, "enable_gradient_checkpointing") and bool(unet.is_gradient_checkpointing) != on:
        (unet.enable_gradient_checkpointing if on else unet.disable_gradient_checkpointing)()


__all__ = ["LiDBFitData", "clip_per_identity", "train_lidb_batch"]

"""Stage 2 trained through the fine-tune that follows it (`stage2.finetune_steps`), and the
validation read-out that scores a hypernetwork the way `hdb eval` does (`stage2.val_finetune_steps`).

Why: at personalisation the prediction is only the start of a short fine-tune (40 steps at lr 1e-2,
relaxed to rank 4 inside the LiDB subspace). The evaluation measured that this fine-tune erases
most of what a prediction trained by regression onto stage-1 targets carries: scaling the
prediction up made the hypernetwork alone clearly about the person, and HyperDreamBooth no better
(benchmarks/results/eval_v2/DIAGNOSIS.md sections 10 and 11). Regression trains for the start;
this objective scores the prediction by the loss where the fine-tune *ends*.

First-order, as in first-order MAML (Finn et al. 2017) and Reptile (Nichol et al. 2018): the
fine-tune runs on detached copies of the predictions (every sample's its own, all through one
denoiser call per step: `train_lidb_batch` with per-item starts), the loss after it is taken on
fresh noise, and its gradient at the fine-tuned weights stands in for its gradient at the
prediction (the Jacobian of the fine-tune's steps is taken as the identity). No second-order
graph is kept, so the term costs finetune_steps + 1 denoiser passes per sample.

The relaxed start is exactly `personalize`'s (`subspace_init`: the prediction's r components,
then rank - r extra ones with A random from the fine-tune's seed and B = 0), so the prediction's
gradient is the fine-tuned weights' gradient on its own r components.
"""

from __future__ import annotations

import torch

from hypernet.methods.lidb.batched import LiDBFitData, train_lidb_batch
from hypernet.personalize import finetune_train_config, subspace_init
from hypernet.personalize_config import PersonalizeConfig
from hypernet.training.config import TrainConfig

Weights = dict[str, torch.Tensor]


def relaxed_starts(pred: Weights, rank: int, seed: int) -> Weights:
    """Per-sample `subspace_init`: {"A_train": (n, L, r, a), "B_train": (n, L, b, r)} ->
    (n, L, rank, a) / (n, L, b, rank) on CPU, detached, each with exactly its prediction's delta_W."""
    n = pred["A_train"].shape[0]
    per = [subspace_init({k: v[i].detach() for k, v in pred.items()}, rank, seed) for i in range(n)]
    return {k: torch.stack([p[k] for p in per]) for k in ("A_train", "B_train")}


def finetune_config(steps: int, lr: float, rank: int) -> tuple[PersonalizeConfig, TrainConfig]:
    """`personalize`'s fine-tune settings at these steps, lr and rank (everything else its
    defaults: one photo and its mirror per step, AdamW, clipping) and the training loop's config."""
    pcfg = PersonalizeConfig(steps=steps, lr=lr, rank=rank)
    return pcfg, finetune_train_config(pcfg, 1)


def finetune_batch(recipe, starts: Weights, latents: torch.Tensor, mirrored: torch.Tensor, seeds: list[int],
                   steps: int) -> Weights:
    """Fine-tune every sample's relaxed weights on its own photo, as `personalize` would.

    Args:
        recipe: the stage-2 recipe (its pipe, LiDB handle, prompt conditioning and settings).
        starts: (n, L, R, a) / (n, L, b, R), e.g. from `relaxed_starts`.
        latents: (n, C, h, w) each sample's photo as the hypernetwork saw it; mirrored: its mirror.
        seeds: n seeds of each fine-tune's draws (photo or mirror, noise, timesteps).

    Returns:
        (n, L, R, a) / (n, L, b, R) on CPU, fp32: the weights after `steps` steps.
    """
    c = recipe.cfg
    _, tcfg = finetune_config(steps, c.finetune_lr, c.finetune_rank)
    items = [LiDBFitData(latents[i : i + 1], mirrored[i : i + 1], seed=s) for i, s in enumerate(seeds)]
    with torch.enable_grad():  # validation calls this under no_grad
        fits = train_lidb_batch(recipe.pipe, recipe.lidb, items, recipe.text_emb, tcfg, init=starts,
                                pooled=recipe.pooled)
    return {k: torch.stack([w[k] for w, _ in fits]) for k in ("A_train", "B_train")}


def photo_latents(recipe, rows: list, flips: list[bool], split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """-> (latents (n, C, h, w) of each row as conditioned (mirrored where flipped), their mirrors)."""
    plain, mirror = recipe.data.latents(rows), recipe.data.latents(rows, flip=True)  # (n, C, h, w) each
    f = torch.tensor(flips, dtype=torch.bool)[:, None, None, None]
    return torch.where(f, mirror, plain), torch.where(f, plain, mirror)


def finetuned_weights(recipe, pred: Weights, rows: list, flips: list[bool], seeds: list[int]) -> Weights:
    """Every sample's weights after the fine-tune from its (detached) relaxed prediction, on the
    recipe's device as leaves that require grad: (n, L, R, a) / (n, L, b, R).

    Args:
        rows, flips: each sample's photo and whether it was mirrored (the fine-tune's data).
        seeds: each fine-tune's draws.
    """
    c = recipe.cfg
    dev = pred["A_train"].device
    starts = relaxed_starts(pred, c.finetune_rank, PersonalizeConfig().seed)  # (n, L, R, a) / (n, L, b, R)
    lat, mirror = photo_latents(recipe, rows, flips)
    tuned = finetune_batch(recipe, starts, lat.to(dev), mirror.to(dev), seeds, c.finetune_steps)
    return {k: v.to(dev).requires_grad_(True) for k, v in tuned.items()}


def first_order(pred: Weights, theta: Weights, loss: torch.Tensor) -> torch.Tensor:
    """A scalar equal to `loss` whose gradient with respect to `pred` is `loss`'s gradient at the
    fine-tuned `theta` (from `finetuned_weights`) on the prediction's r components (the
    first-order approximation: the fine-tune's Jacobian taken as the identity)."""
    r = pred["A_train"].shape[-2]
    gA, gB = torch.autograd.grad(loss, [theta["A_train"], theta["B_train"]])  # (n, L, R, a), (n, L, b, R)
    # The prediction is components [0, r) of the relaxed start: its gradient is theirs.
    inner = (pred["A_train"] * gA[:, :, :r].to(pred["A_train"].dtype)).sum() + \
        (pred["B_train"] * gB[..., :r].to(pred["B_train"].dtype)).sum()
    return inner - inner.detach() + loss.detach()


def loss_after(recipe, theta: Weights, outer_latents: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The diffusion loss (scalar, with its graph to `theta`) of the fine-tuned weights on
    `outer_latents` (n, C, h, w): the photo itself, or with `stage2.cross_photo` another photo of the
    person; noise and timesteps from `gen`."""
    emb, pooled = recipe.cond(outer_latents.shape[0])  # (n, T, D), (n, P) or None
    recipe.lidb.use(theta)
    try:
        with recipe.ctx.autocast():
            return recipe.objective.loss(recipe.net, outer_latents, emb, gen, recipe.cfg.min_snr_gamma, pooled=pooled)
    finally:
        recipe.lidb.use(None)


def post_finetune_term(recipe, pred: Weights, rows: list, flips: list[bool], outer_latents: torch.Tensor,
                       gen: torch.Generator, seeds: list[int]) -> tuple[torch.Tensor, float]:
    """The first-order objective after the fine-tune, for a batch of predictions.

    Args:
        pred: the hypernetwork's output, (n, L, r, a) / (n, L, b, r), carrying its graph.
        rows, flips: each sample's photo and whether it was mirrored (the fine-tune's data).
        outer_latents: (n, C, h, w) what the loss after the fine-tune is taken on.
        gen: draws that loss's noise and timesteps; seeds: each fine-tune's draws.

    Returns:
        (a scalar whose value is the mean loss after the fine-tune and whose gradient with
        respect to `pred` is that loss's gradient at the fine-tuned weights, that loss as a float).
    """
    theta = finetuned_weights(recipe, pred, rows, flips, seeds)
    after = loss_after(recipe, theta, outer_latents, gen)
    return first_order(pred, theta, after), after.item()


__all__ = ["finetune_batch", "finetune_config", "finetuned_weights", "first_order", "loss_after", "photo_latents",
           "post_finetune_term", "relaxed_starts"]

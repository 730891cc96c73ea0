"""Stage-2 validation on held-out identities (never trained on), sharded over ranks.

For every held-out photo, four adapters are scored on identical noise and timesteps (paired, so
the comparison is not swamped by noise variance): the hypernetwork's prediction, the zero
adapter (the base alone), the training identities' mean stage-1 LiDB (one adapter for everyone:
what a hypernetwork that ignores its input reaches) and the identity's stage-1 LiDB (what perfect
prediction would reach).
Timesteps are evenly spaced over the schedule (draw j of D at (j + 1/2) / D), noise is seeded
per photo, so the numbers do not depend on the batch size or the number of ranks.
"""

from __future__ import annotations

import torch

from hypernet.errors import InvalidInputError
from hypernet.hypernetwork.losses import weight_mse, zeros_like_weights
from pretrain.distributed import all_reduce_sum
from pretrain.stream import step_seed

_VAL_STREAM = 7  # separates validation noise seeds from training ones


@torch.no_grad()
def validate_hypernet(recipe, model, per_photo: dict | None = None) -> dict[str, float]:
    """-> {"val/weight_mse", "val/weight_mse_zero", "val/weight_mse_mean", "val/diffusion",
    "val/diffusion_zero", "val/diffusion_mean", "val/diffusion_stage1"}, plus the scores after a
    fine-tune with `stage2.val_finetune_steps` (`_after_finetune`); empty when there are no
    held-out samples.

    `per_photo`, when given, receives every held-out photo's scores after the fine-tune,
    {"shard:row": [from the prediction, from zero]} (each averaged over the draws), so that two
    runs on the same prepared data can be compared photo by photo (`paired_difference`)."""
    samples, d = recipe.samples["val"], recipe.dist
    if not samples:
        return {}
    draws, seed = recipe.cfg.val_noise_draws, recipe.cfg.seed
    T = recipe.num_train_timesteps
    flow = recipe.objective.flow_matching  # float timesteps in (0, T] rather than integer ones
    sums = torch.zeros(7, dtype=torch.float64)  # wmse, wmse_zero, dl, dl_zero, dl_stage1, wmse_mean, dl_mean
    id_sums = torch.zeros(2, dtype=torch.float64)  # identity term: from the prediction, the base
    mine = list(range(d.rank, len(samples), d.world_size))
    was_training = model.training
    model.eval()
    for start in range(0, len(mine), recipe.cfg.batch_size):
        idx = mine[start : start + recipe.cfg.batch_size]
        pix, lat, tgt, ident = recipe._batch([(i, False) for i in idx], split="val")
        with recipe.ctx.autocast():
            pred = recipe.predict(model, pix, ident)  # {"A_train": (n, L, r, a), "B_train": (n, L, b, r)}
        sums[0] += weight_mse(pred, tgt, reduction="none").sum().item()
        sums[1] += weight_mse(zeros_like_weights(tgt), tgt, reduction="none").sum().item()
        mean = {k: recipe.mean_target[k].to(v).expand_as(v) for k, v in tgt.items()}  # the same adapter for all
        sums[5] += weight_mse(mean, tgt, reduction="none").sum().item()
        for ts, noise in _draws(idx, tuple(lat.shape[1:]), draws, T, flow, seed):
            sums[2] += _dl(recipe, lat, ts, noise, pred)
            sums[3] += _dl(recipe, lat, ts, noise, None)
            sums[4] += _dl(recipe, lat, ts, noise, tgt)
            sums[6] += _dl(recipe, lat, ts, noise, mean)
        if recipe.identity is not None:
            ids, draws_id = _identity_ids(recipe, idx), _identity_draws(recipe, idx, tuple(lat.shape[1:]))
            for k, w in enumerate((pred, None)):
                id_sums[k] += recipe.identity.loss(recipe, w, lat, ids, None, "val", draws_id).double().sum().cpu()
    out = {}
    if recipe.cfg.val_finetune_steps > 0:
        out, photos = _after_finetune(recipe, model, mine, draws, flow)
        if per_photo is not None:
            per_photo.update({f"{s[1][0]}:{s[1][1]}": [float(a), float(b)]
                              for s, (a, b) in zip(samples, photos.tolist(), strict=True)})
    model.train(was_training)
    n = len(samples)
    tot = all_reduce_sum(sums.to(d.device)).cpu()  # NCCL needs the rank's device
    if recipe.identity is not None:
        id_tot = all_reduce_sum(id_sums.to(d.device)).cpu()
        out.update({"val/identity": float(id_tot[0] / n), "val/identity_zero": float(id_tot[1] / n)})
    return {**out,
        "val/weight_mse": float(tot[0] / n), "val/weight_mse_zero": float(tot[1] / n),
        "val/diffusion": float(tot[2] / (n * draws)), "val/diffusion_zero": float(tot[3] / (n * draws)),
        "val/diffusion_stage1": float(tot[4] / (n * draws)),
        "val/weight_mse_mean": float(tot[5] / n), "val/diffusion_mean": float(tot[6] / (n * draws)),
    }


def _after_finetune(recipe, model, mine: list[int], draws: int, flow: bool) -> tuple[dict[str, float], torch.Tensor]:
    """HyperDreamBooth against the fine-tune from zero, in loss space: each held-out photo is
    fine-tuned `val_finetune_steps` steps as `personalize` would (relaxed in the LiDB subspace,
    on the photo and its mirror) from the prediction and from zero, and both results are scored
    on another photo of the person (the same photo for people with one), on the same noise and
    timesteps. -> {"val/diffusion_finetuned", "val/diffusion_finetuned_zero",
    "val/diffusion_finetuned_gap", "val/diffusion_finetuned_gap_se"}, and (n_val, 2) float64:
    every held-out photo's loss from the prediction and from zero, averaged over the draws.

    The gap is the paired mean of (from the prediction - from zero) over held-out photos (each
    photo's loss averaged over the draws; below 0: the prediction helps), and its standard error
    across photos, so that a run's gap can be told from noise: it treats photos as independent,
    so with several photos of one person it is somewhat too small."""
    from hypernet.personalize_config import PersonalizeConfig
    from pretrain.through_finetune import finetune_batch, photo_latents, relaxed_starts

    samples, d, c, T = recipe.samples["val"], recipe.dist, recipe.cfg, recipe.num_train_timesteps
    sums = torch.zeros(4, dtype=torch.float64)  # from the prediction, from zero, sum of gaps, sum of gaps^2
    id_sums = torch.zeros(4, dtype=torch.float64)  # the same for the identity term, when it is on
    photos = torch.zeros(len(samples), 2, dtype=torch.float64)  # this rank's photos filled, the rest 0
    for start in range(0, len(mine), c.batch_size):
        idx = mine[start : start + c.batch_size]
        pix, _, _, ident = recipe._batch([(i, False) for i in idx], split="val")
        with recipe.ctx.autocast():
            pred = recipe.predict(model, pix, ident)  # (n, L, r, a) / (n, L, b, r)
        rows = [samples[i][1] for i in idx]
        other = recipe.data.latents([_other_row(recipe, samples[i]) for i in idx]).to(d.device)  # (n, C, h, w)
        lat, mirror = photo_latents(recipe, rows, [False] * len(idx))
        seeds = [step_seed(c.seed, _VAL_STREAM + 1, i) for i in idx]
        seed = PersonalizeConfig().seed
        per = torch.zeros(2, len(idx), dtype=torch.float64)  # (start, n): each photo's loss summed over draws
        id_per = torch.zeros(2, len(idx), dtype=torch.float64)  # (start, n): the identity term, one draw
        for s, init in enumerate((pred, zeros_like_weights(pred))):
            starts = relaxed_starts(init, c.finetune_rank, seed)
            tuned = finetune_batch(recipe, starts, lat.to(d.device), mirror.to(d.device), seeds, c.val_finetune_steps)
            tuned = {k: v.to(d.device) for k, v in tuned.items()}
            for ts, noise in _draws(idx, tuple(other.shape[1:]), draws, T, flow, c.seed):
                per[s] += _dl_per(recipe, other, ts, noise, tuned)
            if recipe.identity is not None:
                ids, draws_id = _identity_ids(recipe, idx), _identity_draws(recipe, idx, tuple(other.shape[1:]))
                id_per[s] = recipe.identity.loss(recipe, tuned, other, ids, None, "val", draws_id).double().cpu()
        id_gap = id_per[0] - id_per[1]  # (n,)
        id_sums += torch.stack([id_per[0].sum(), id_per[1].sum(), id_gap.sum(), (id_gap * id_gap).sum()])
        gap = (per[0] - per[1]) / draws  # (n,)
        photos[idx] = (per / draws).T
        sums += torch.stack([per[0].sum(), per[1].sum(), gap.sum(), (gap * gap).sum()])
    n = len(samples)
    tot = all_reduce_sum(sums.to(d.device)).cpu()
    photos = all_reduce_sum(photos.to(d.device)).cpu()  # every rank's photos: (n_val, 2)
    mean = float(tot[2] / n)
    var = max(float(tot[3] - n * mean * mean), 0.0) / max(n - 1, 1)  # sample variance of the gaps
    out = {"val/diffusion_finetuned": float(tot[0] / (n * draws)),
           "val/diffusion_finetuned_zero": float(tot[1] / (n * draws)),
           "val/diffusion_finetuned_gap": mean, "val/diffusion_finetuned_gap_se": (var / n) ** 0.5}
    if recipe.identity is not None:
        it = all_reduce_sum(id_sums.to(d.device)).cpu()
        m = float(it[2] / n)
        v = max(float(it[3] - n * m * m), 0.0) / max(n - 1, 1)
        out.update({"val/identity_finetuned": float(it[0] / n), "val/identity_finetuned_zero": float(it[1] / n),
                    "val/identity_finetuned_gap": m, "val/identity_finetuned_gap_se": (v / n) ** 0.5})
    return out, photos


def _identity_ids(recipe, idx: list[int]) -> torch.Tensor:
    """(n,) the identity index of each held-out sample in `idx`."""
    return torch.tensor([recipe.samples["val"][i][0] for i in idx])


def _identity_draws(recipe, idx: list[int], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The identity term's (timesteps (n,), noise (n, *shape)) for held-out samples `idx`, one draw
    each, seeded by the sample: the same for every adapter scored, batch size and rank count."""
    flow = recipe.objective.flow_matching
    got = [recipe.identity.draw(torch.Size((1, *shape)),
                                torch.Generator().manual_seed(step_seed(recipe.cfg.seed, _VAL_STREAM + 2, i)), flow)
           for i in idx]
    return torch.cat([t for t, _ in got]), torch.cat([n for _, n in got])


def _draws(idx: list[int], shape: tuple[int, ...], draws: int, T: int, flow: bool, seed: int):
    """Yield the validation's `draws` (timesteps (n,), noise (n, *shape)) pairs for samples `idx`:
    timestep j of D at (j + 1/2) / D of the schedule, noise seeded by (sample, draw), so every
    adapter scored on a sample sees the same noise whatever the batch size or number of ranks."""
    for j in range(draws):
        t = (j + 0.5) / draws * T
        ts = torch.full((len(idx),), t, dtype=torch.float32) if flow else \
            torch.full((len(idx),), int(t), dtype=torch.long)  # (n,)
        noise = torch.stack([
            torch.randn(shape, generator=torch.Generator().manual_seed(step_seed(seed, _VAL_STREAM, i, j)))
            for i in idx
        ])  # (n, *shape)
        yield ts, noise


def paired_difference(a: dict[str, list[float]], b: dict[str, list[float]],
                      people: dict[str, str] | None = None) -> dict[str, float]:
    """Run `a` against run `b`, photo by photo, after the validation fine-tune from each run's
    prediction: -> {"mean", "se", "n"} of (a's loss - b's loss) over the photos both scored
    (below 0: `a`'s prediction ends the fine-tune better). Both runs score a photo on the same
    noise and timesteps, so the pairing removes the photo-to-photo spread that swamps the
    difference of two runs' means; "se" treats photos as independent.

    Args:
        a, b: `validate_hypernet`'s `per_photo` of two runs on the same prepared data.
        people: photo key -> person; adds "se_person" (clustered by person: two photos of one
            person are not two independent draws) and "people".

    Raises:
        InvalidInputError: the runs share fewer than 2 photos.
    """
    keys = sorted(set(a) & set(b))
    return paired_stats({k: a[k][0] - b[k][0] for k in keys}, people)


def prediction_gap(a: dict[str, list[float]], people: dict[str, str] | None = None) -> dict[str, float]:
    """One run's own read-out: (from its prediction - from zero) per photo, as `paired_difference`
    reports it (below 0: the prediction ends the fine-tune better than starting from nothing)."""
    return paired_stats({k: v[0] - v[1] for k, v in a.items()}, people)


def paired_stats(diffs: dict[str, float], people: dict[str, str] | None = None) -> dict[str, float]:
    """{"mean", "se", "n"} of per-photo differences, plus {"se_person", "people"} when `people`
    maps every photo to its person: the cluster-robust standard error of the mean, sum over
    people g of (sum of g's centred differences)^2, scaled by G / (G - 1), over n^2."""
    if len(diffs) < 2:
        raise InvalidInputError(f"the runs must share at least 2 validation photos, got {len(diffs)}")
    keys = sorted(diffs)
    d = torch.tensor([diffs[k] for k in keys], dtype=torch.float64)  # (n,)
    n = len(keys)
    out: dict[str, float] = {"mean": float(d.mean()), "se": float(d.std(correction=1) / n ** 0.5), "n": n}
    if people is not None:
        missing = [k for k in keys if k not in people]
        if missing:
            raise InvalidInputError(f"`people` must name every photo's person, got none for {missing[:3]}")
        groups = sorted({people[k] for k in keys})
        g_of = {g: i for i, g in enumerate(groups)}
        sums = torch.zeros(len(groups), dtype=torch.float64).index_add_(
            0, torch.tensor([g_of[people[k]] for k in keys]), d - d.mean())  # (G,)
        G = len(groups)
        var = float((sums * sums).sum()) * G / max(G - 1, 1) / (n * n)
        out.update({"se_person": var ** 0.5, "people": G})
    return out


def _other_row(recipe, sample) -> list:
    """Another photo of the sample's person (the first other one), or the photo itself if it is their only one."""
    j, row = sample
    others = [r for r in recipe.rows_of["val"][j] if tuple(r) != tuple(row)]
    return others[0] if others else row


def _dl(recipe, lat, ts, noise, weights) -> float:
    """Summed per-sample diffusion loss with `weights` routed through the LiDB (None: zero adapter)."""
    return float(_dl_per(recipe, lat, ts, noise, weights).sum())


def _dl_per(recipe, lat, ts, noise, weights) -> torch.Tensor:
    """(n,) float64 per-sample diffusion loss with `weights` routed through the LiDB (None: zero adapter)."""
    emb, pooled = recipe.cond(lat.shape[0])  # (n, T, D), (n, P) or None
    kw = dict(pooled=pooled, reduction="none", timesteps=ts, noise=noise)
    with recipe.ctx.autocast():
        if weights is None:
            with recipe.lidb.disabled():
                per = recipe.objective.loss(recipe.net, lat, emb, None, **kw)
        else:
            recipe.lidb.use(weights)
            per = recipe.objective.loss(recipe.net, lat, emb, None, **kw)
            recipe.lidb.use(None)
    return per.detach().double().cpu()  # (n,)


__all__ = ["paired_difference", "paired_stats", "prediction_gap", "validate_hypernet"]

"""Stage 2's identity term (`stage2.identity_weight`): the frozen face encoder's 1 - cosine between
the decoded one-step x0 estimate that an adapter makes of a photo and the person's mean embedding
(`hypernet.training.identity_loss` holds the math; this module wires it to the recipe).

    term = IdentityTerm(recipe)                        # at setup: encoder, decoder, alignment, targets
    per = term.loss(recipe, weights, latents, ids, gen, split="train")    # (B,) with grad to weights

Targets are the person's photos' cached embeddings (prepare's face_embeddings, computed once),
averaged and normalised: "the person", not the one photo. The alignment is one similarity
transform from the mean MTCNN landmarks of up to 32 training crops (they are aligned photos);
when MTCNN finds too few (tiny test crops), the whole square is resized instead.

The encoder here is the one that conditions the identity hypernetwork (MobileFaceNet). `hdb eval`
scores with dlib and FaceNet, so the term cannot game the metric it is judged by.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from hypernet.face_alignment import pixels_to_images

log = logging.getLogger(__name__)

Weights = dict[str, torch.Tensor]
#: training crops whose mean landmarks align the decoded images
_ALIGN_SAMPLES = 32


def person_targets(emb, rows_of: list[list]) -> torch.Tensor:
    """(n_ids, 512): each identity's unit mean embedding over its photos (unflipped)."""
    return torch.stack([F.normalize(emb.get(rows).mean(0), dim=-1) for rows in rows_of]) if rows_of else \
        torch.zeros(0, 512)


class IdentityTerm:
    """The identity term of one stage-2 recipe (built in setup, after data and base)."""

    def __init__(self, recipe):
        from hypernet.face_encoder import FaceEncoder
        from hypernet.training.identity_loss import face_identity_loss
        from pretrain.face_embeddings import FaceEmbeddings, embeddings_key

        c, dev = recipe.cfg, recipe.dist.device
        emb = recipe.emb or FaceEmbeddings(recipe.ctx.prepared_dir, embeddings_key(recipe.ctx))
        self.targets = {split: person_targets(emb, recipe.rows_of[split]) for split in ("train", "val")}
        rows = [row for _, row in recipe.samples["train"][:_ALIGN_SAMPLES]]
        crops = pixels_to_images(recipe.data.pixels(rows))
        self.scorer = face_identity_loss(recipe.pipe.vae, FaceEncoder.load(), crops).to(dev)
        self.num_train_timesteps = recipe.num_train_timesteps
        self.t_share = (c.identity_t_min, c.identity_t_max)
        if recipe.dist.is_main:
            log.info("stage2: identity term (weight %g, at the %s), timesteps [%d, %d)", c.identity_weight,
                     c.identity_at, *(s * self.num_train_timesteps for s in self.t_share))

    def draw(self, shape: torch.Size, gen: torch.Generator, flow: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps (B,), noise (B, C, h, w)) for latents of `shape`, from `gen` (CPU)."""
        from hypernet.training.identity_loss import identity_draws

        return identity_draws(shape, gen, self.t_share, self.num_train_timesteps, flow)

    def loss(self, recipe, weights: Weights | None, latents: torch.Tensor, ids: torch.Tensor,
             gen: torch.Generator, split: str = "train",
             draws: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """(B,) 1 - cos of the x0 estimate under `weights` (None: the base) to each person's target.

        Args:
            latents: (B, C, h, w) the photos that are noised and denoised once.
            ids: (B,) identity index of each row in `split`.
            draws: explicit (timesteps, noise); else drawn from `gen`.
        """
        t, noise = draws if draws is not None else self.draw(latents.shape, gen, recipe.objective.flow_matching)
        emb, pooled = recipe.cond(latents.shape[0])  # (B, T, D), (B, P) or None
        recipe.lidb.use(weights)
        try:
            with recipe.ctx.autocast():
                x0 = recipe.objective.denoise_x0(recipe.net, latents, noise, t, emb, pooled)  # (B, C, h, w)
        finally:
            recipe.lidb.use(None)
        target = self.targets[split][ids.cpu()].to(latents.device)  # (B, 512)
        return self.scorer(x0, target)


__all__ = ["IdentityTerm", "person_targets"]

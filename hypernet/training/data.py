"""Training data as cached tensors: VAE latents and text embeddings are computed once per run.

At SD scale the VAE encoder costs about as much as a UNet step and the photos never change, so
encoding them every step (as the diffusers example scripts do) wastes a third of the time. The
mirrored photos are encoded too, so flip augmentation stays free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hypernet.errors import InvalidInputError


@torch.no_grad()
def encode_images(pipe, pixels: torch.Tensor, flip: bool = False, batch_size: int = 8) -> torch.Tensor:
    """VAE-encode photos to the latents the denoiser trains on.

    Uses the posterior mean (not a sample) so cached latents are deterministic, minus the VAE's
    shift factor (SD3, FLUX; 0 elsewhere) times its scaling factor (0.18215 for SD 1.x) - the
    scale the denoiser was trained at.

    Args:
        pixels: (N, 3, H, W) in [-1, 1], as `hypernet.photos.load_photos` returns.
        flip: encode the horizontally mirrored photos instead.

    Returns:
        (N, C, H/8, W/8) float32 on the VAE's device (C = 4; 16 on SD3/FLUX).
    """
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise InvalidInputError(f"`pixels` must have shape (N, 3, H, W), got {tuple(pixels.shape)}")
    vae = pipe.vae
    p = next(vae.parameters())
    if flip:
        pixels = pixels.flip(-1)  # (N, 3, H, W) mirrored left-right
    cfg = vae.config
    shift = getattr(cfg, "shift_factor", None) or 0.0
    out = []
    for chunk in pixels.split(batch_size):
        dist = vae.encode(chunk.to(p.device, p.dtype)).latent_dist
        out.append(((dist.mean - shift) * cfg.scaling_factor).float())  # (n, 4, h, w)
    return torch.cat(out)


def tokenize(pipe, prompts: str | list[str]) -> torch.Tensor:
    """Prompt(s) -> token ids for text-side training: (N, 77) on SD 1.x, (N, 2, 77) on SDXL (one row
    per tokenizer); see `hypernet.training.objectives`."""
    from hypernet.training.objectives import objective_for

    return objective_for(pipe).tokenize(pipe, prompts)


def embed_ids(text_encoder, input_ids: torch.Tensor) -> torch.Tensor:
    """(N, 77) ids -> (N, 77, D) last hidden states (what SD 1.x's UNet cross-attends to)."""
    p = next(text_encoder.parameters())
    return text_encoder(input_ids.to(p.device))[0]


@torch.no_grad()
def encode_conditioning(pipe, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt(s) -> (text_emb (N, L, D), pooled (N, P) or None) float32, no grad: the base
    family's conditioning (`hypernet.training.objectives`); pooled is None on SD 1.x."""
    from hypernet.training.objectives import objective_for

    return objective_for(pipe).encode_prompts(pipe, prompts)


@torch.no_grad()
def encode_prompts(pipe, prompts: str | list[str]) -> torch.Tensor:
    """Prompt(s) -> (N, L, D) float32 text embeddings, no grad (cached for the whole run).

    The sequence part of `encode_conditioning`; SDXL/SD3/FLUX denoisers also need its pooled part.
    """
    return encode_conditioning(pipe, prompts)[0]


@dataclass
class TrainData:
    """What the loop draws batches from. Rows of each tensor are aligned per example.

    latents: (N, 4, h, w) VAE latents of the photos.
    flipped: (N, 4, h, w) latents of the mirrored photos, or None (no flip augmentation).
    text_emb: (N or 1, L, D) cached prompt embeddings (1 row: shared by every photo);
        used when the text encoder does not train.
    pooled: (N or 1, P) cached pooled text embeddings (SDXL, SD3, FLUX; None on SD 1.x),
        rows aligned with `text_emb`.
    input_ids: (N or 1, 77) prompt token ids ((N or 1, 2, 77) on SDXL); needed when the text
        encoder (or a token embedding) trains, so embeddings must be recomputed every step.
    prior / prior_loss_weight: DreamBooth's class-prior set, drawn alongside every batch
        (same batch size) and weighted into the loss.
    """

    latents: torch.Tensor
    flipped: torch.Tensor | None = None
    text_emb: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    prior: TrainData | None = None
    prior_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        n = self.latents.shape[0]
        if self.latents.dim() != 4 or n < 1:
            raise InvalidInputError(f"`latents` must have shape (N>=1, C, h, w), got {tuple(self.latents.shape)}")
        if self.flipped is not None and self.flipped.shape != self.latents.shape:
            raise InvalidInputError(
                f"`flipped` must match `latents` {tuple(self.latents.shape)}, got {tuple(self.flipped.shape)}"
            )
        if self.text_emb is None and self.input_ids is None:
            raise InvalidInputError("TrainData must have `text_emb` or `input_ids`, got neither")
        for k in ("text_emb", "pooled", "input_ids"):
            t = getattr(self, k)
            if t is not None and t.shape[0] not in (1, n):
                raise InvalidInputError(f"`{k}` must have 1 or {n} rows, got {t.shape[0]}")
        if not self.prior_loss_weight >= 0:
            raise InvalidInputError(f"`prior_loss_weight` must be >= 0, got {self.prior_loss_weight!r}")

    def __len__(self) -> int:
        return self.latents.shape[0]

    def sample(self, batch_size: int, generator: torch.Generator, flip: bool):
        """Draw a batch with replacement: (latents (B, 4, h, w), rows (B,) for text lookups)."""
        idx = torch.randint(len(self), (batch_size,), generator=generator)  # (B,)
        lat = self.latents[idx.to(self.latents.device)]
        if flip and self.flipped is not None:
            mirror = torch.rand(batch_size, generator=generator) < 0.5  # (B,)
            lat = torch.where(mirror.to(lat.device)[:, None, None, None], self.flipped[idx.to(lat.device)], lat)
        return lat, idx

    def text_rows(self, key: str, idx: torch.Tensor) -> torch.Tensor:
        t = getattr(self, key)
        if t.shape[0] == 1:
            return t.expand(len(idx), *t.shape[1:])
        return t[idx.to(t.device)]


def build_train_data(
    pipe,
    pixels: torch.Tensor,
    prompt: str | list[str],
    *,
    flip: bool = True,
    keep_ids: bool = False,
) -> TrainData:
    """Encode photos (and their mirrors) and the prompt(s) once.

    Args:
        pixels: (N, 3, H, W) in [-1, 1].
        prompt: one prompt for every photo, or one per photo.
        keep_ids: also keep token ids (when a text-side parameter trains).
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if len(prompts) not in (1, pixels.shape[0]):
        raise InvalidInputError(f"`prompt` must be one string or {pixels.shape[0]}, got {len(prompts)}")
    text_emb, pooled = encode_conditioning(pipe, prompts)
    return TrainData(
        latents=encode_images(pipe, pixels),
        flipped=encode_images(pipe, pixels, flip=True) if flip else None,
        text_emb=text_emb,
        pooled=pooled,
        input_ids=tokenize(pipe, prompts) if keep_ids else None,
    )

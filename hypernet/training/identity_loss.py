"""A loss that scores the *person* in what an adapted model makes: the frozen face encoder's
cosine between the decoded one-step estimate of a photo and the person's embedding.

    scorer = FaceIdentityLoss(pipe.vae, FaceEncoder.load(), grid_theta(M, (R, R)))
    t, noise = identity_draws(latents.shape, gen, DEFAULT_T_RANGE, 1000, flow=False)
    x0 = objective.denoise_x0(net, latents, noise, t, text_emb)     # with the adapter in use
    per = scorer(x0, target)                                        # (B,) 1 - cos, in [0, 2]

    extra = photo_identity_term(pipe, pixels, data, weight=1.0, seed=0)   # the fine-tune's term
    train(pipe, params, data, cfg, extra_loss=extra)

Two users: pretraining's stage 2 (`stage2.identity_weight`: the person in what the hypernetwork's
prediction makes, pretrain/identity_term.py) and the fast fine-tune (`PersonalizeConfig.identity_weight`:
the input photo's identity, as an extra loss of the one training loop).

Why: the diffusion loss scores every pixel alike, and the evaluation measured that a stage 2 that
closes the loss-space gap to the fine-tune from zero leaves both face metrics unmoved
(benchmarks/results/eval_v2/DIAGNOSIS.md section 12). Identity lives in a few features
(eyes, nose, mouth, face shape) that a face-recognition network is trained to read, so this term
rewards exactly those. It is the identity loss of ID-preserving generators (e.g. the ArcFace loss
of PhotoMaker/InstantID-style training), taken on the one-step x0 estimate so that it costs one
denoiser, decoder and encoder pass rather than a whole sampling chain.

The encoder that takes this loss must not be the one that scores the result: `hdb eval` scores
with dlib's ResNet and FaceNet, never the MobileFaceNet used here.

Alignment: the decoded image is warped to the encoder's 112 x 112 ArcFace template by one fixed
similarity transform (`mean_face_transform`: from the mean 5 landmarks of the training crops,
which are aligned photos, so faces sit in about the same place in all of them), with grid_sample
so the warp is differentiable.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from hypernet.errors import InvalidInputError
from hypernet.face_alignment import ARCFACE_TEMPLATE, FACE_SIZE, grid_theta, similarity_transform, warp_faces

log = logging.getLogger(__name__)

#: Timesteps of the one-step estimate, as shares of the schedule. Measured on the face world
#: (DIAGNOSIS section 14): the base's x0 estimate still tells people apart up to ~0.6 of the
#: schedule and not at all from 0.7, so below 0.3 the noised photo gives identity away and above
#: 0.7 there is nothing for an adapter to add that the encoder can see.
DEFAULT_T_RANGE = (0.3, 0.7)


def identity_draws(shape: torch.Size | tuple, gen: torch.Generator | None, t_range: tuple[float, float],
                   num_train_timesteps: int, flow: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps (B,), noise `shape`) for the one-step estimate, drawn on the CPU from `gen`:
    uniform in t_range of the schedule, integers for DDPM-family bases, floats for flow matching."""
    lo, hi = t_range[0] * num_train_timesteps, t_range[1] * num_train_timesteps
    t = lo + (hi - lo) * torch.rand(shape[0], generator=gen)  # (B,)
    return (t if flow else t.long()), torch.randn(tuple(shape), generator=gen)


def landmark_transform(found: Sequence[np.ndarray], n: int, min_found: int = 3) -> np.ndarray | None:
    """(2, 3) image pixels -> ArcFace template pixels from the mean of the landmarks `found` ((5, 2)
    each) in `n` images of one size, or None when too few were found to trust: fewer than
    min(`min_found`, max(1, n // 2)). So one photo with a face is enough when there are up to 3
    (the fast fine-tune's photos), and larger sets (stage 2's crops) need half of them, up to 3."""
    if len(found) < min(min_found, max(1, n // 2)):
        return None
    return similarity_transform(np.mean(found, axis=0), ARCFACE_TEMPLATE)  # (2, 3)


def mean_face_transform(images: Sequence[Image.Image], min_found: int = 3) -> np.ndarray | None:
    """`landmark_transform` of the MTCNN landmarks of `images` (all of one size), or None when too
    few have a face, or MTCNN is unavailable (the caller then uses the whole square:
    `square_transform`)."""
    from hypernet.photos import _get_detector, detect_landmarks

    if not images:
        raise InvalidInputError("`images` must hold at least one image, got none")
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise InvalidInputError(f"`images` must all have one size, got {sorted(sizes)}")
    if _get_detector() is None:
        return None
    found = [p for p in (detect_landmarks(im.convert("RGB")) for im in images) if p is not None]
    return landmark_transform(found, len(images), min_found)


def square_transform(size: int) -> np.ndarray:
    """(2, 3): the whole `size` x `size` image resized to the template (the centre-crop fallback)."""
    s = FACE_SIZE / size
    return np.array([[s, 0.0, 0.5 * s - 0.5], [0.0, s, 0.5 * s - 0.5]])


class FaceIdentityLoss(nn.Module):
    """Latents -> decoded images -> aligned faces -> frozen embeddings -> 1 - cos to a target.

    Nothing in it trains (the VAE and the encoder are frozen); gradients flow through it to
    whatever produced the latents.
    """

    def __init__(self, vae: nn.Module, encoder: nn.Module, theta: torch.Tensor):
        super().__init__()
        if tuple(theta.shape) != (2, 3):
            raise InvalidInputError(f"`theta` must have shape (2, 3), got {tuple(theta.shape)}")
        self.vae, self.encoder = vae, encoder
        self.register_buffer("theta", theta.float(), persistent=False)
        for m in (vae, encoder):
            m.requires_grad_(False)
        cfg = vae.config
        self.scaling = float(cfg.scaling_factor)
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)

    def faces(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) normalised latents -> (B, 3, 112, 112) decoded faces on the encoder's template,
        in [-1, 1] (differentiable: the decoder, then the warp)."""
        z = latents / self.scaling + self.shift  # undo `encode_images`' normalisation
        img = self.vae.decode(z.to(next(self.vae.parameters()).dtype)).sample.float()  # (B, 3, H, W) in [-1, 1]
        return warp_faces(img, self.theta)  # (B, 3, 112, 112)

    def embed(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) normalised latents -> (B, 512) unit embeddings of their decoded faces."""
        return self.encoder(self.faces(latents))  # (B, 512)

    def forward(self, latents: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """-> (B,) 1 - cos(embedding of the decoded `latents`, `target` (B, 512)): 0 = the same person."""
        if target.dim() != 2 or target.shape[0] != latents.shape[0]:
            raise InvalidInputError(
                f"`target` must have shape ({latents.shape[0]}, D) like `latents`' batch, got {tuple(target.shape)}")
        emb = self.embed(latents)
        return 1.0 - (emb * F.normalize(target.to(emb), dim=-1)).sum(-1)


def face_identity_loss(vae: nn.Module, encoder: nn.Module, images: Sequence[Image.Image],
                       M: np.ndarray | None = None) -> FaceIdentityLoss:
    """The loss aligned for images like `images` (e.g. training crops): by `M` when given (e.g. a
    `landmark_transform` of landmarks already detected), else by their mean landmarks when MTCNN
    finds enough faces, else the whole square (logged)."""
    w, h = images[0].size
    M = mean_face_transform(images) if M is None else M
    if M is None:
        log.info("identity loss: too few faces found in %d crops to align by landmarks; aligning the whole "
                 "%dx%d square", len(images), w, h)
        M = square_transform(w)
    return FaceIdentityLoss(vae, encoder, grid_theta(M, (h, w)))


_ENCODERS: dict[str, nn.Module] = {}


def _face_encoder(device: torch.device) -> nn.Module:
    """The frozen face encoder, converted once per process and device (onnx2torch takes ~1 s)."""
    from hypernet.face_encoder import FaceEncoder

    key = str(device)
    if key not in _ENCODERS:
        _ENCODERS[key] = FaceEncoder.load().to(device)
    return _ENCODERS[key]


def photo_identity_term(pipe, pixels: torch.Tensor, data, *, weight: float, seed: int,
                        t_range: tuple[float, float] = DEFAULT_T_RANGE, objective=None,
                        others: torch.Tensor | None = None):
    """The fine-tune's identity term, as the one training loop's `extra_loss(step)`.

    Each step draws one of the photos (or its mirror, when the data has them), noises its latents
    to a timestep in `t_range`, and returns `weight` x (1 - cos) between the face encoder's
    embedding of the decoded one-step estimate (under whatever adapter is trained on the pipe)
    and the mean embedding of the input photos (`pixels` and `others`). Its draws come from their
    own generator seeded by (seed, step), so the diffusion loss's draws are those of a run without
    the term.

    It costs one more denoiser, decoder and face-encoder pass per step (~3x a diffusion step on
    the face world, most of it the decoder). Taking it less often does not work: on every 4th or
    8th step at weight x 4 or x 8, or with its gradient reused on the steps between, it lost most
    or all of its gain (DIAGNOSIS.md section 15): fresh draws on every step are what helps.

    Args:
        pixels: (K, 3, H, W) in [-1, 1], the photos the fine-tune trains on (preprocessed crops).
        data: their `TrainData` (latents, mirrored latents, prompt embeddings).
        others: (K2, 3, H, W), more photos of the person that the fine-tune does not train on
            (`PersonalizeConfig.finetune_photos`): they join the target embedding only, so it is
            about the person rather than the one photo; the warp stays that of `pixels`.

    Raises:
        InvalidInputError: weight <= 0, or pixels that are not a batch of RGB images.
        ModelNotFoundError: no face encoder file (`make setup` fetches it).
    """
    from hypernet.base.arch import denoiser
    from hypernet.face_alignment import align_face_with_landmarks, pixels_to_images
    from hypernet.training.objectives import objective_for

    if not weight > 0:
        raise InvalidInputError(f"`weight` must be > 0, got {weight!r}")
    for name, x in (("pixels", pixels), ("others", others)):
        if x is not None and (x.dim() != 4 or x.shape[1] != 3):
            raise InvalidInputError(f"`{name}` must have shape (K, 3, H, W), got {tuple(x.shape)}")
    dev = data.latents.device
    encoder = _face_encoder(dev)
    images = pixels_to_images(pixels)
    every = images + (pixels_to_images(others) if others is not None else [])
    aligned = [align_face_with_landmarks(im, source=f"photo #{i}") for i, im in enumerate(every)]  # MTCNN once each
    faces = torch.stack([a.face for a, _ in aligned]).to(dev)  # (K + K2, 3, 112, 112): the target is the person
    with torch.no_grad():
        target = F.normalize(encoder(faces).mean(0, keepdim=True), dim=-1)  # (1, 512)
    # the warp is that of the photos the fine-tune trains on
    M = landmark_transform([p for _, p in aligned[: len(images)] if p is not None], len(images))
    if M is None:
        log.info("identity term: no face found in the %d photo(s); aligning the whole square", len(images))
        M = square_transform(images[0].size[0])
    scorer = face_identity_loss(pipe.vae, encoder, images, M).to(dev)
    obj = objective if objective is not None else objective_for(pipe)
    net = denoiser(pipe)
    n_train = int(pipe.scheduler.config.num_train_timesteps)
    sources = [data.latents] + ([data.flipped] if data.flipped is not None else [])

    def extra_loss(step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        src = sources[int(torch.randint(len(sources), (1,), generator=gen))]
        k = int(torch.randint(src.shape[0], (1,), generator=gen))
        lat = src[k : k + 1]  # (1, C, h, w)
        t, noise = identity_draws(lat.shape, gen, t_range, n_train, obj.flow_matching)
        emb = data.text_emb[:1].to(dev)
        pooled = data.pooled[:1].to(dev) if data.pooled is not None else None
        x0 = obj.denoise_x0(net, lat, noise, t, emb, pooled)  # (1, C, h, w)
        return weight * scorer(x0, target).mean()

    return extra_loss


__all__ = ["DEFAULT_T_RANGE", "FaceIdentityLoss", "face_identity_loss", "identity_draws", "landmark_transform",
           "mean_face_transform", "photo_identity_term", "square_transform"]

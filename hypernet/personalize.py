"""Fast personalisation (HyperDreamBooth phase 2): 1 to K photos of one person -> Identity in seconds.

    1. decode + face-crop + resize each photo (`hypernet.photos`, the code path pretraining used);
    2. the hypernetwork predicts the LiDB weights of every adapted layer; with several photos the
       predictions are combined (`combine`): the mean of the predicted LiDB weights ("weights"), or
       the mean of the encoder's image tokens decoded once ("embedding"); or kept one per photo
       ("each-norm", for step 3's one fine-tune per photo);
    3. rank-relaxed fast fine-tune on all the photos with "a photo of {token} {class}" for ~40 steps,
       relaxing the rank in one of two ways (`relax`):
       - "lora": the prediction stays a frozen forward-time adapter and a LoRA of rank R over the
         full layer dimensions trains beside it (the shared base weights are never touched);
       - "subspace" (the default: measured at least as good at half the time): the LiDB core itself
         trains at rank R inside the frozen aux bases,
         A_train (R, a), B_train (b, R), starting from the prediction in its first r components and
         extra components with small random A and zero B (so they get gradient). 13% of the size
         at SD 1.5 scale (410 KB against 3.2 MiB at R = 4).

`steps=0` is "hypernetwork only". Every call records a timing breakdown in `Identity.timings`.
Step 3 alone is `finetune` (from a prediction, or from zero without any hypernetwork); it trains
through the one training loop with the base's own objective, so it runs on every base arch
(SD 1.x, SDXL, SD3, FLUX).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from hypernet.adapters.inject import delete_adapter
from hypernet.adapters.lidb.config import LiDBSpec
from hypernet.adapters.lidb.model import LiDB
from hypernet.adapters.lora.model import LoRA
from hypernet.errors import Cancelled, InvalidInputError
from hypernet.hypernetwork.runtime import HypernetRuntime
from hypernet.identity import Identity, cached_fingerprint, layer_shapes
from hypernet.personalize_config import (  # noqa: F401  (re-exported: callers import them from here)
    COMBINE_MODES,
    MAX_PHOTOS,
    RELAX_MODES,
    PersonalizeConfig,
)
from hypernet.photos import decode_image, face_crop, preprocess
from hypernet.training import ProgressEvent, TrainConfig, TrainingCancelled, build_train_data, train

log = logging.getLogger(__name__)

PRED_ADAPTER = "hdb_predicted"
RELAXED_ADAPTER = "hdb_relaxed"

Photo = Image.Image | bytes | str | Path


@functools.lru_cache(maxsize=4)
def load_runtime(path: str, backend: str = "auto", device: str | None = None) -> HypernetRuntime:
    """A cached `HypernetRuntime` per (path, backend, device): loading is paid once per process."""
    return HypernetRuntime.load(path, backend=backend, device=device)


def personalize(
    pipe,
    photos: Photo | Sequence[Photo],
    *,
    hypernet: HypernetRuntime | str | Path,
    config: PersonalizeConfig | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    **overrides,
) -> Identity:
    """Personalise `pipe`'s base to the face in `photos`; returns an Identity (pipe left clean).

    Args:
        photos: one photo, or a list/tuple of 1 to `MAX_PHOTOS` photos of the same person; each a
            decoded image, the encoded bytes (JPEG/PNG/WebP) or a path. One photo in a list gives
            exactly the single-photo result.
        hypernet: a runtime or a path to an export (the app's `hdb.defaults.default_hypernet_path()`
            gives the embedded tiny one).
        config: fine-tune settings; keyword `overrides` (steps=, rank=, combine=, relax=...) win.
        progress: receives ProgressEvents (stages "preprocess", "hypernetwork", "finetune", "done").
        should_stop: polled at every step; True -> `Cancelled`, nothing is kept.

    Raises:
        InvalidInputError (ImageDecodeError, ImageTooLargeError naming `photos[i]` at fault,
        IncompatibleAdapterError), ModelNotFoundError (combine="embedding" on an ONNX-only
        export), Cancelled.
    """
    cfg = config or PersonalizeConfig()
    if overrides:
        cfg = PersonalizeConfig(**{**cfg.__dict__, **overrides})
    many = _as_photo_list(photos)  # None: one photo given bare (error messages as before)
    timings: dict[str, float] = {}
    report = progress or (lambda _e: None)
    t = time.perf_counter()

    # 1. Decode and preprocess, exactly as pretraining did.
    report(ProgressEvent("preprocess", 0, 1))
    items = [(photos, None)] if many is None else [(p, f"`photos[{i}]`") for i, p in enumerate(many)]
    imgs = [_decode(p, source, cfg.max_pixels) for p, source in items]
    timings["decode"] = time.perf_counter() - t
    t = time.perf_counter()
    runtime = _resolve_runtime(hypernet, pipe)
    resolution = runtime.resolution
    pixels = torch.stack([
        preprocess(face_crop(img.convert("RGB"), detector=cfg.detector), resolution, detector="center")
        for img in imgs
    ])  # (K, 3, R, R) in [-1, 1]
    # An identity-conditioned hypernetwork gets faces aligned on the full-resolution photos, as
    # pretraining's embedding cache aligned them (None for a pixel-conditioned one).
    faces = runtime.faces_for(imgs)  # (K, 3, 112, 112) | None
    timings["preprocess"] = time.perf_counter() - t
    _check_stop(should_stop)

    # 2. Hypernetwork prediction, combined over the photos.
    t = time.perf_counter()
    report(ProgressEvent("hypernetwork", 0, 1))
    each = cfg.combine == "each-norm" and len(pixels) > 1
    if each:
        _check_each(cfg, runtime.spec, len(pixels))
    preds = _predict(runtime, pixels, faces, cfg.combine)  # 1 (K for "each-norm") x {(L, r, a), (L, b, r)}
    if cfg.init == "zero":
        preds = [{k: torch.zeros_like(v) for k, v in p.items()} for p in preds]
    else:
        scale = runtime.prediction_scale if cfg.prediction_scale is None else cfg.prediction_scale
        if scale != 1:
            preds = [scale_prediction(p, scale) for p in preds]
    timings["hypernetwork"] = time.perf_counter() - t
    _check_stop(should_stop)

    # 3. Rank-relaxed fast fine-tune on all the photos, from the prediction (one per photo for "each-norm").
    t = time.perf_counter()
    layers = list(runtime.layers)
    if each:
        identity, losses = _finetune_each(pipe, pixels, runtime.spec, layers, preds, cfg, progress, should_stop)
    else:
        identity, losses = _finetune(pipe, pixels, runtime.spec, layers, preds[0], cfg, progress, should_stop)
    timings["finetune"] = time.perf_counter() - t
    identity.timings = timings
    identity.combine = cfg.combine if len(pixels) > 1 else None
    total = cfg.steps * (len(pixels) if each else 1)
    report(ProgressEvent("done", total, total, losses[-1] if losses else None))
    log.info("personalised from %d photo(s) in %.2fs (%s)", len(pixels), sum(timings.values()),
             ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items()))
    return identity


def _as_photo_list(photos) -> list | None:
    """A list/tuple of photos -> the list (1..MAX_PHOTOS, else an error); one bare photo -> None."""
    if isinstance(photos, (Image.Image, bytes, bytearray, memoryview, str, Path)):
        return None
    if not isinstance(photos, Sequence):
        raise InvalidInputError(
            f"`photos` must be a photo (image, bytes or path) or a list of them, got {type(photos).__name__}"
        )
    if not 1 <= len(photos) <= MAX_PHOTOS:
        raise InvalidInputError(f"`photos` must hold 1 to {MAX_PHOTOS} photos of one person, got {len(photos)}")
    return list(photos)


def _decode(photo, source: str | None, max_pixels: int) -> Image.Image:
    """One photo -> an RGB image; `source` ("`photos[2]`") names it in errors (plus its path)."""
    if isinstance(photo, Image.Image):
        return photo
    if source is not None and isinstance(photo, (str, Path)):
        source = f"{source} ({photo})"
    return decode_image(photo, max_pixels=max_pixels, source=source)


def _predict(runtime: HypernetRuntime, pixels: torch.Tensor, faces: torch.Tensor | None,
             combine: str) -> list[dict[str, torch.Tensor]]:
    """pixels (K, 3, R, R) (+ aligned faces (K, 3, 112, 112) for an identity-conditioned
    hypernetwork, else None) -> the LiDB weights (L, r, a), (L, b, r) the fine-tune starts from:
    one for the identity, or K (one per photo) for "each-norm".

    K = 1 is the plain prediction whatever `combine` says, so one photo in a list equals one photo.
    "weights" averages the K packed predictions: rank-1 factors have a sign ambiguity ((A, B) and
    (-A, -B) give the same delta), but one hypernetwork maps photos of one face to nearby outputs,
    so their signs agree. "embedding" averages the encoder's tokens and decodes once. "each-norm" keeps
    every photo's own prediction (`_finetune_each` averages after fine-tuning).
    """
    if len(pixels) == 1 or combine in ("weights", "each-norm"):
        by_photo = runtime.predict(pixels, faces=faces)  # (K, L, r, a), (K, L, b, r)
        if combine != "weights" or len(pixels) == 1:
            return [{k: v[i] for k, v in by_photo.items()} for i in range(len(pixels))]
        return [{k: v.mean(0) for k, v in by_photo.items()}]
    tokens = runtime.encode(pixels, faces=faces)  # (K, T, d)
    return [{k: v[0] for k, v in runtime.decode(tokens.mean(0, keepdim=True)).items()}]


def scale_prediction(pred: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """LiDB weights whose delta_W is `scale` times `pred`'s: delta_W is bilinear in A_train and
    B_train, so both factors take sqrt(scale), which keeps them balanced for the fine-tune."""
    if scale < 0:
        raise InvalidInputError(f"`scale` must be >= 0, got {scale!r}")
    f = float(scale) ** 0.5
    return {k: v * f for k, v in pred.items()}


def finetune(
    pipe,
    pixels: torch.Tensor,
    spec: LiDBSpec,
    pred: dict[str, torch.Tensor] | None = None,
    *,
    layers: list[str] | None = None,
    config: PersonalizeConfig | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[Identity, list[float]]:
    """The rank-relaxed fast fine-tune (step 3 of `personalize`) on its own, on any base arch.

    Args:
        pixels: (K, 3, H, W) preprocessed photos in [-1, 1] at a size the base accepts.
        spec: the LiDB parameterisation of the prediction (`default_spec_for(pipe)` without a
            hypernetwork).
        pred: predicted LiDB weights {"A_train": (L, r, a), "B_train": (L, b, r)}; None starts from
            zero, the fine-tune-only ablation, which needs no hypernetwork at all.
        layers: the adapted layers (default: `lidb_layers(pipe, spec)`).
        config: steps, rank, lr, relax, seed, token... (`init` is taken from `pred`).

    Returns:
        (the Identity, one loss per step); the pipeline is left clean.

    Raises:
        InvalidInputError: bad shapes or settings; Cancelled.
    """
    from hypernet.adapters import lidb_layers

    cfg = config or PersonalizeConfig()
    layers = lidb_layers(pipe, spec) if layers is None else list(layers)
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise InvalidInputError(f"`pixels` must have shape (K, 3, H, W), got {tuple(pixels.shape)}")
    if pred is None:
        n = len(layers)
        pred = {"A_train": torch.zeros(n, spec.r, spec.a), "B_train": torch.zeros(n, spec.b, spec.r)}
        cfg = dataclasses.replace(cfg, init="zero")
    want = {"A_train": (len(layers), spec.r, spec.a), "B_train": (len(layers), spec.b, spec.r)}
    for k, shape in want.items():
        if k not in pred or tuple(pred[k].shape) != shape:
            raise InvalidInputError(f"`pred[{k!r}]` must have shape {shape}, got "
                                    f"{tuple(pred[k].shape) if k in pred else None}")
    return _finetune(pipe, pixels, spec, layers, pred, cfg, progress, should_stop)


def _finetune(pipe, pixels, spec, layers, pred, cfg, progress, should_stop) -> tuple[Identity, list[float]]:
    lidb, relaxed, losses = pred, {}, []
    if cfg.steps > 0 and cfg.relax == "lora":
        relaxed, losses = _fast_finetune(pipe, spec, layers, pred, pixels, cfg, progress, should_stop)
    elif cfg.steps > 0:
        spec, lidb, losses = _subspace_finetune(pipe, spec, layers, pred, pixels, cfg, progress, should_stop)
    identity = Identity(
        spec=spec, layers=list(layers), shapes=layer_shapes(pipe, layers),
        base_fingerprint=cached_fingerprint(pipe), lidb={k: v.cpu().float() for k, v in lidb.items()},
        relaxed=relaxed, token=cfg.token, class_noun=cfg.class_noun,
        method=_method_name(cfg), timings={}, relax=cfg.relax if cfg.steps > 0 else None,
        num_photos=len(pixels), combine=None,
    )
    return identity, losses


def _check_each(cfg: PersonalizeConfig, spec: LiDBSpec, num_photos: int) -> None:
    """combine="each-norm" merges K fine-tuned LiDB cores into one of rank K * R: that needs the subspace
    relaxation (a LiDB core to merge) and K * R within the aux bases' dimensions."""
    if cfg.relax != "subspace":
        raise InvalidInputError(f"`relax` must be 'subspace' with combine={cfg.combine!r} (the fine-tuned LiDB "
                                f"cores are what is averaged), got {cfg.relax!r}")
    rank = cfg.rank if cfg.steps > 0 else spec.r
    if num_photos * rank > min(spec.a, spec.b):
        raise InvalidInputError(
            f"`photos` must number at most {min(spec.a, spec.b) // rank} with combine={cfg.combine!r} at rank "
            f"{rank} (the merged core has rank photos x rank, at most min(a, b) = {min(spec.a, spec.b)}), "
            f"got {num_photos}")


def _finetune_each(pipe, pixels, spec, layers, preds, cfg, progress, should_stop) -> tuple[Identity, list[float]]:
    """combine="each-norm": one fine-tune per photo, from that photo's own prediction, on that photo
    alone (the others still join the identity term's target), then the K fine-tuned deltas averaged
    with each layer's norm kept (`mean_lidb(keep_norm=True)`). Costs K fine-tunes.

    Why: forty steps spread over K photos fit none of them as well as forty on one, and an averaged
    prediction carries less than each photo's own (DIAGNOSIS.md sections 9 and 16). Here every photo
    gets the one-photo treatment; the mean keeps what the K fits share and averages down what belongs
    to one photo (pose, light). The plain mean is shorter than any one fit (~0.7 at K = 3) and scored
    below one photo; with the norm kept it is the first use of several photos that scores above one
    (section 17), though one photo fitted three times with other seeds gets about half of that gain.
    """
    K, steps = len(pixels), cfg.steps
    fits, losses = [], []
    for i in range(K):
        mine = torch.cat([pixels[i : i + 1], pixels[:i], pixels[i + 1 :]])  # (K, 3, H, W): photo i first
        cfg_i = dataclasses.replace(cfg, finetune_photos=1, seed=cfg.seed + i)
        report = None if progress is None else functools.partial(_shifted, progress, i * steps, K * steps)
        identity, li = _finetune(pipe, mine, spec, layers, preds[i], cfg_i, report, should_stop)
        fits.append(identity)
        losses += li
    identity = fits[0]
    identity.spec = dataclasses.replace(identity.spec, r=K * identity.spec.r)
    identity.lidb = mean_lidb([f.lidb for f in fits], keep_norm=True)
    identity.num_photos = K
    return identity, losses


def _shifted(progress, offset: int, total: int, e: ProgressEvent) -> None:
    """One of K fine-tunes' progress as part of the whole: step `offset + e.step` of `total`."""
    progress(dataclasses.replace(e, step=offset + e.step, total=total))


def mean_lidb(cores: Sequence[dict[str, torch.Tensor]], keep_norm: bool = False) -> dict[str, torch.Tensor]:
    """K LiDB cores in the same aux bases -> one of rank sum(r_k) whose delta is exactly the mean of theirs.

    delta_W = B_aux B_train A_train A_aux is linear in the product B_train A_train, and
    [B_1 .. B_K] [A_1; ..; A_K] = sum_k B_k A_k, so stacking the factors along the rank, each scaled
    by 1/sqrt(K), averages the deltas (averaging the factors themselves would not: the product of
    means is not the mean of products).

    `keep_norm` then rescales each layer's mean delta to the mean Frobenius norm of the K deltas:
    deltas that only partly agree (fits of different photos of one person: cosine ~0.2) average
    to a shorter one, ~0.7 of each at K = 3 on the face world, so the mean moves the model less far
    than any one fit did; rescaled, it goes as far, in the direction the fits share.

    Args:
        cores: K >= 1 dicts {"A_train": (L, r_k, a), "B_train": (L, b, r_k)}.
    """
    if not cores:
        raise InvalidInputError("`cores` must hold at least one LiDB core, got none")
    f = 1.0 / len(cores) ** 0.5
    A = torch.cat([c["A_train"] * f for c in cores], dim=1)  # (L, sum r_k, a)
    B = torch.cat([c["B_train"] * f for c in cores], dim=2)  # (L, b, sum r_k)
    if keep_norm:
        # the aux bases are orthonormal, so the core's product has delta_W's Frobenius norm
        each = torch.stack([(c["B_train"] @ c["A_train"]).flatten(1).norm(dim=1) for c in cores])  # (K, L)
        mean = (B @ A).flatten(1).norm(dim=1)  # (L,)
        s = (each.mean(0) / mean.clamp_min(1e-12)).sqrt()  # (L,): both factors take the square root
        A, B = A * s[:, None, None], B * s[:, None, None]
    return {"A_train": A, "B_train": B}


def _train(pipe, params, pixels, cfg, progress, should_stop):
    others = pixels[cfg.finetune_photos or len(pixels):]  # (K - K', 3, H, W): seen by the prediction only
    pixels = pixels[: cfg.finetune_photos or len(pixels)]  # (K', 3, H, W): the photos the fine-tune sees
    data = build_train_data(pipe, pixels.to(pipe.vae.device, pipe.vae.dtype), cfg.prompt, flip=cfg.flip)
    tcfg = finetune_train_config(cfg, len(pixels))
    extra = None
    if cfg.identity_weight > 0:  # the person as a face-recognition network sees them, beside the pixels
        from hypernet.training.identity_loss import photo_identity_term

        # the term's target is the person over every photo, also those the diffusion loss leaves out
        extra = photo_identity_term(pipe, pixels, data, weight=cfg.identity_weight, seed=cfg.seed,
                                    others=others if len(others) else None)
    try:
        return train(pipe, params, data, tcfg, progress=progress, should_stop=should_stop, stage="finetune",
                     extra_loss=extra)
    except TrainingCancelled as e:
        raise Cancelled(str(e)) from e


def finetune_train_config(cfg: PersonalizeConfig, num_photos: int) -> TrainConfig:
    """The one training loop's settings for the fast fine-tune on `num_photos` photos; pretraining's
    stage 2 trains through the same fine-tune (`stage2.finetune_steps`), so both read them here."""
    return TrainConfig(steps=cfg.steps, lr=cfg.lr, seed=cfg.seed, flip=cfg.flip, log_every=0,
                       batch_size=cfg.batch_size or num_photos, mixed_precision=cfg.mixed_precision)


def _fast_finetune(pipe, spec, layers, pred, pixels, cfg, progress, should_stop):
    """relax="lora": train the relaxed LoRA beside the frozen prediction; returns its weights
    (scale folded: alpha = rank) and the losses."""
    lidb = LiDB(pipe, spec, name=PRED_ADAPTER, layers=list(layers))
    try:
        dev, dt = lidb.modules()[0].A_aux.device, lidb.modules()[0].A_aux.dtype
        lidb.use({k: v.to(dev, dt) for k, v in pred.items()})  # frozen: plain tensors, no grad
        lora = LoRA(pipe, list(layers), r=cfg.rank, alpha=cfg.rank, name=RELAXED_ADAPTER, seed=cfg.seed)
        result = _train(pipe, list(lora.parameters()), pixels, cfg, progress, should_stop)
        return {k: v.cpu().float() for k, v in lora.state_dict().items()}, result.losses
    finally:
        delete_adapter(pipe, PRED_ADAPTER)
        delete_adapter(pipe, RELAXED_ADAPTER)


def _subspace_finetune(pipe, spec, layers, pred, pixels, cfg, progress, should_stop):
    """relax="subspace": train the LiDB core at rank R = `cfg.rank` inside the same frozen aux bases,
    from the prediction; returns (the rank-R spec, the trained core (L, R, a)/(L, b, R), losses)."""
    if not spec.r <= cfg.rank <= min(spec.a, spec.b):
        raise InvalidInputError(
            f"`rank` must be in [{spec.r}, {min(spec.a, spec.b)}] for relax='subspace' (at least the "
            f"hypernetwork's LiDB rank, at most a and b), got {cfg.rank}"
        )
    spec_r = dataclasses.replace(spec, r=cfg.rank)  # same seed, a, b: the same aux bases
    core = LiDB(pipe, spec_r, name=RELAXED_ADAPTER, layers=list(layers))
    try:
        core.load_state_dict(subspace_init(pred, cfg.rank, cfg.seed))
        result = _train(pipe, list(core.parameters()), pixels, cfg, progress, should_stop)
        return spec_r, {k: v.cpu().float() for k, v in core.state_dict().items()}, result.losses
    finally:
        delete_adapter(pipe, RELAXED_ADAPTER)


def subspace_init(pred: dict[str, torch.Tensor], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """The start of a subspace-relaxed fine-tune: A (L, R, a), B (L, b, R), whose delta is exactly
    the prediction's.

    Components [0, r) are the prediction; components [r, R) have A ~ N(0, 1/a) (LiDB's own init)
    and B = 0, so B of the extra components gets gradient at once (A's follows once B moves). A
    predicted component that is all zero (the fine-tune-only ablation's zero prediction) starts
    like an extra one: with A = B = 0 it would never train.
    """
    A0, B0 = pred["A_train"].float().cpu(), pred["B_train"].float().cpu()  # (L, r, a), (L, b, r)
    L, r, a = A0.shape
    b = B0.shape[1]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    A = torch.randn(L, rank, a, generator=gen) / a**0.5  # (L, R, a)
    B = torch.zeros(L, b, rank)  # (L, b, R)
    live = (A0.abs().amax(-1) > 0) | (B0.abs().amax(-2) > 0)  # (L, r)
    A[:, :r] = torch.where(live[..., None], A0, A[:, :r])
    B[:, :, :r] = B0
    return {"A_train": A, "B_train": B}


def _resolve_runtime(hypernet, pipe) -> HypernetRuntime:
    if isinstance(hypernet, HypernetRuntime):
        runtime = hypernet
    else:
        if hypernet is None:
            raise InvalidInputError("`hypernet` must be a HypernetRuntime or the path of an export, got None")
        runtime = load_runtime(str(hypernet))
    runtime.check_base(pipe)
    return runtime


def _method_name(cfg: PersonalizeConfig) -> str:
    if cfg.init == "zero":
        return "finetune-only"
    return "hyperdreambooth" if cfg.steps > 0 else "hypernetwork"


def _check_stop(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise Cancelled("personalisation was cancelled")

"""Fast personalisation (HyperDreamBooth phase 2): one photo -> Identity in seconds.

    1. decode + face-crop + resize the photo (`hypernet.photos`, the code path pretraining used);
    2. the hypernetwork predicts the LiDB weights of every adapted layer;
    3. rank-relaxed fast fine-tune: with the prediction attached as a frozen forward-time adapter
       (the shared base weights are never touched, so other requests are unaffected), a LoRA of
       rank r > 1 trains on the photo with "a photo of {token} {class}" for ~40 steps.

`steps=0` is "hypernetwork only". Every call records a timing breakdown in `Identity.timings`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from hypernet.adapters.inject import delete_adapter
from hypernet.adapters.lidb.model import LiDB
from hypernet.adapters.lora.model import LoRA
from hypernet.errors import Cancelled, InvalidInputError
from hypernet.hypernetwork.runtime import HypernetRuntime
from hypernet.identity import Identity, cached_fingerprint, layer_shapes
from hypernet.photos import DEFAULT_MAX_PIXELS, decode_image, face_crop, preprocess
from hypernet.training import ProgressEvent, TrainConfig, TrainingCancelled, build_train_data, train

log = logging.getLogger(__name__)

PRED_ADAPTER = "hdb_predicted"
RELAXED_ADAPTER = "hdb_relaxed"


@dataclass
class PersonalizeConfig:
    """The fast fine-tune's knobs; defaults follow the paper (40 steps, rank > 1)."""

    steps: int = field(default=40, metadata={"help": "fine-tune steps; 0 = hypernetwork only (paper: 40)"})
    rank: int = field(default=4, metadata={"help": "rank of the relaxed LoRA (must be > 1 to relax rank-1 LiDB)"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the relaxed LoRA"})
    token: str = field(default="ohwx", metadata={"help": "the rare identifier token"})
    class_noun: str = field(default="person", metadata={"help": "the class the subject belongs to"})
    seed: int = field(default=0, metadata={"help": "seeds noise, timesteps, flips and the LoRA init"})
    detector: str = field(default="auto", metadata={"help": "face detector: auto, mtcnn or center"})
    flip: bool = field(default=True, metadata={"help": "horizontal-flip augmentation of the one photo"})
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={"help": "reject larger photos"})
    mixed_precision: str = field(default="no", metadata={"help": "autocast on CUDA: no, fp16, bf16"})
    init: str = field(default="hypernetwork", metadata={
        "help": "start of the fine-tune: 'hypernetwork' (HyperDreamBooth) or 'zero' (the fine-tune-only "
                "ablation: same steps, no prediction)"})

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or not 0 <= self.steps <= 10_000:
            raise InvalidInputError(f"`steps` must be an integer in [0, 10000], got {self.steps!r}")
        if not isinstance(self.rank, int) or not 1 <= self.rank <= 256:
            raise InvalidInputError(f"`rank` must be an integer in [1, 256], got {self.rank!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise InvalidInputError(f"`lr` must be a number in (0, 1), got {self.lr!r}")
        if self.init not in ("hypernetwork", "zero"):
            raise InvalidInputError(f"`init` must be 'hypernetwork' or 'zero', got {self.init!r}")
        for k in ("token", "class_noun"):
            v = getattr(self, k)
            if not isinstance(v, str) or not v.strip() or len(v) > 64:
                raise InvalidInputError(f"`{k}` must be a non-empty string of at most 64 characters, got {v!r}")

    @property
    def prompt(self) -> str:
        return f"a photo of {self.token} {self.class_noun}"


@functools.lru_cache(maxsize=4)
def load_runtime(path: str, backend: str = "auto", device: str | None = None) -> HypernetRuntime:
    """A cached `HypernetRuntime` per (path, backend, device): loading is paid once per process."""
    return HypernetRuntime.load(path, backend=backend, device=device)


def personalize(
    pipe,
    photo: Image.Image | bytes | str | Path,
    *,
    hypernet: HypernetRuntime | str | Path,
    config: PersonalizeConfig | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    **overrides,
) -> Identity:
    """Personalise `pipe`'s base to the face in `photo`; returns an Identity (pipe left clean).

    Args:
        photo: a decoded image, the encoded bytes (JPEG/PNG/WebP) or a path.
        hypernet: a runtime or a path to an export (the app's `hdb.defaults.default_hypernet_path()`
            gives the embedded tiny one).
        config: fine-tune settings; keyword `overrides` (steps=, rank=, lr=, token=...) win.
        progress: receives ProgressEvents (stages "preprocess", "hypernetwork", "finetune", "done").
        should_stop: polled at every step; True -> `Cancelled`, nothing is kept.

    Raises:
        InvalidInputError (ImageDecodeError, ImageTooLargeError, IncompatibleAdapterError), Cancelled.
    """
    cfg = config or PersonalizeConfig()
    if overrides:
        cfg = PersonalizeConfig(**{**cfg.__dict__, **overrides})
    timings: dict[str, float] = {}
    report = progress or (lambda _e: None)
    t = time.perf_counter()

    # 1. Decode and preprocess, exactly as pretraining did.
    report(ProgressEvent("preprocess", 0, 1))
    img = photo if isinstance(photo, Image.Image) else decode_image(photo, max_pixels=cfg.max_pixels)
    timings["decode"] = time.perf_counter() - t
    t = time.perf_counter()
    runtime = _resolve_runtime(hypernet, pipe)
    resolution = runtime.resolution
    pixels = preprocess(face_crop(img.convert("RGB"), detector=cfg.detector), resolution, detector="center")
    pixels = pixels.unsqueeze(0)  # (1, 3, R, R) in [-1, 1]
    timings["preprocess"] = time.perf_counter() - t
    _check_stop(should_stop)

    # 2. Hypernetwork prediction.
    t = time.perf_counter()
    report(ProgressEvent("hypernetwork", 0, 1))
    pred = {k: v[0].detach() for k, v in runtime.predict(pixels).items()}  # (L, r, a), (L, b, r)
    if cfg.init == "zero":
        pred = {k: torch.zeros_like(v) for k, v in pred.items()}
    timings["hypernetwork"] = time.perf_counter() - t
    _check_stop(should_stop)

    # 3. Rank-relaxed fast fine-tune on top of the frozen prediction.
    t = time.perf_counter()
    relaxed: dict[str, torch.Tensor] = {}
    losses: list[float] = []
    if cfg.steps > 0:
        relaxed, losses = _fast_finetune(pipe, runtime, pred, pixels, cfg, progress, should_stop)
    timings["finetune"] = time.perf_counter() - t

    identity = Identity(
        spec=runtime.spec, layers=list(runtime.layers), shapes=layer_shapes(pipe, runtime.layers),
        base_fingerprint=cached_fingerprint(pipe), lidb={k: v.cpu().float() for k, v in pred.items()},
        relaxed=relaxed, token=cfg.token, class_noun=cfg.class_noun,
        method=_method_name(cfg), timings=timings,
    )
    report(ProgressEvent("done", cfg.steps, cfg.steps, losses[-1] if losses else None))
    log.info("personalised in %.2fs (%s)", sum(timings.values()),
             ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items()))
    return identity


def _fast_finetune(pipe, runtime, pred, pixels, cfg, progress, should_stop):
    """Train the relaxed LoRA; returns its weights (scale folded: alpha = rank) and the losses."""
    lidb = LiDB(pipe, runtime.spec, name=PRED_ADAPTER, layers=list(runtime.layers))
    try:
        dev, dt = lidb.modules()[0].A_aux.device, lidb.modules()[0].A_aux.dtype
        lidb.use({k: v.to(dev, dt) for k, v in pred.items()})  # frozen: plain tensors, no grad
        lora = LoRA(pipe, list(runtime.layers), r=cfg.rank, alpha=cfg.rank, name=RELAXED_ADAPTER, seed=cfg.seed)
        data = build_train_data(pipe, pixels.to(pipe.vae.device, pipe.vae.dtype), cfg.prompt, flip=cfg.flip)
        tcfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, seed=cfg.seed, flip=cfg.flip, log_every=0,
                           mixed_precision=cfg.mixed_precision)
        try:
            result = train(pipe, list(lora.parameters()), data, tcfg, progress=progress,
                           should_stop=should_stop, stage="finetune")
        except TrainingCancelled as e:
            raise Cancelled(str(e)) from e
        return {k: v.cpu().float() for k, v in lora.state_dict().items()}, result.losses
    finally:
        delete_adapter(pipe, PRED_ADAPTER)
        delete_adapter(pipe, RELAXED_ADAPTER)


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

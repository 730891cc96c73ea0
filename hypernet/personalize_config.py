"""The fast fine-tune's settings (`PersonalizeConfig`), in a module light enough for CLI parsers.

`hdb personalize --help` shows these defaults; importing `hypernet.personalize` (torch, diffusers)
to read them cost seconds of start-up, so they live here and `hypernet.personalize` re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypernet.errors import InvalidInputError

#: Most photos one call takes: the fine-tune draws from all of them, and K preprocessed photos plus
#: their VAE latents stay in memory for the call (a service bounds its queue by this).
MAX_PHOTOS = 8
COMBINE_MODES = ("weights", "embedding", "each-norm")
RELAX_MODES = ("lora", "subspace")
#: 40 MP: above any phone camera (~12-50 MP photos are downscaled by the apps that send them).
DEFAULT_MAX_PIXELS = 40_000_000

__all__ = ["COMBINE_MODES", "DEFAULT_MAX_PIXELS", "MAX_PHOTOS", "RELAX_MODES", "PersonalizeConfig",
           "check_prediction_scale"]


def check_prediction_scale(scale) -> float:
    """Raises InvalidInputError unless `scale` is a finite number in [0, 100]."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= 100:
        raise InvalidInputError(f"`prediction_scale` must be a number in [0, 100], got {scale!r}")
    return float(scale)

#: Upper bound of `PersonalizeConfig.identity_weight` (the service takes the same range).
MAX_IDENTITY_WEIGHT = 100


@dataclass
class PersonalizeConfig:
    """The fast fine-tune's knobs; defaults follow the paper (40 steps, rank > 1)."""

    steps: int = field(default=40, metadata={"help": "fine-tune steps; 0 = hypernetwork only (paper: 40)"})
    rank: int = field(default=4, metadata={
        "help": "rank of the relaxed LoRA (relax='lora'), or of the trained LiDB core (relax='subspace'; "
                "equal to the prediction's rank, the core trains without extra components)"})
    finetune_photos: int = field(default=0, metadata={
        "help": "how many of the photos the fine-tune trains on, the first ones; 0 = all of them. The "
                "prediction combines all the photos either way"})
    lr: float = field(default=1e-2, metadata={
        "help": "AdamW learning rate of the fine-tune. 1e-2 scored best of 1e-3, 3e-3, 1e-2 and 3e-2 for "
                "HyperDreamBooth on 24 held-out people on the face world, on both face metrics "
                "(benchmarks/results/eval_v2/DIAGNOSIS.md section 9); unmeasured on SD-scale bases"})
    prediction_scale: float | None = field(default=None, metadata={
        "help": "multiplies the hypernetwork's predicted delta_W before the fine-tune (both LiDB factors by "
                "its square root). A prediction trained by regression onto per-photo targets is shrunk "
                "towards their mean; > 1 undoes some of that. None = the hypernetwork's own, calibrated "
                "on held-out people and stored in its file at export (1 for files without one)"})
    batch_size: int = field(default=1, metadata={
        "help": "photos per fine-tune step, drawn with replacement from the photos given (and their "
                "mirrors); 0 = as many as photos given. Costs that many UNet passes per step"})
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
    combine: str = field(default="weights", metadata={
        "help": "how predictions from several photos combine: 'weights' (mean of the predicted LiDB "
                "weights; works on every runtime backend, ONNX included) or 'embedding' (mean of the "
                "encoder's image tokens, decoded once; runs the torch model) or 'each-norm' (every photo fine-tuned "
                "on its own from its own prediction, `steps` each, and the fine-tuned deltas averaged, each "
                "layer's mean rescaled to the deltas' mean norm: K times the time, a rank K x `rank` core; "
                "relax='subspace' only; eval_v2/DIAGNOSIS.md section 17). Unused with one photo"})
    identity_weight: float = field(default=0.0, metadata={
        "help": "weight of an identity term added to the fine-tune's diffusion loss: 1 - cosine between "
                "the frozen face encoder's embedding of the decoded one-step x0 estimate of a noised input "
                "photo and the input photos' own embedding (hypernet.training.identity_loss). It rewards "
                "the features a face-recognition network reads rather than every pixel alike. Costs one "
                "more denoiser, decoder and face-encoder pass per step (3-4x the fine-tune's time on the "
                "face world); 0 = off. 0.15 measured best for HyperDreamBooth's lead over the same "
                "fine-tune from zero, with the fewest lost detections (eval_v2/DIAGNOSIS.md section 15)"})
    relax: str = field(default="subspace", metadata={
        "help": "how the fine-tune relaxes rank 1: 'subspace' (the LiDB core itself at rank `rank` inside "
                "the aux bases, from the prediction; 410 KB at SD 1.5) or 'lora' (a rank-`rank` LoRA over "
                "the full layer dims beside the frozen prediction; 3.2 MiB). The default since the "
                "evaluation measured subspace at least as good on both face metrics, at half the time "
                "(benchmarks/results/eval_v2/REPORT.md)"})

    def __post_init__(self) -> None:
        _check_int(self, "steps", 0, 10_000)
        _check_int(self, "rank", 1, 256)
        _check_int(self, "batch_size", 0, MAX_PHOTOS)
        _check_int(self, "finetune_photos", 0, MAX_PHOTOS)
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise InvalidInputError(f"`lr` must be a number in (0, 1), got {self.lr!r}")
        if isinstance(self.identity_weight, bool) or not isinstance(self.identity_weight, (int, float)) or \
                not 0 <= self.identity_weight <= MAX_IDENTITY_WEIGHT:
            raise InvalidInputError(f"`identity_weight` must be a number in [0, {MAX_IDENTITY_WEIGHT}], "
                                    f"got {self.identity_weight!r}")
        if self.prediction_scale is not None:
            check_prediction_scale(self.prediction_scale)
        if self.init not in ("hypernetwork", "zero"):
            raise InvalidInputError(f"`init` must be 'hypernetwork' or 'zero', got {self.init!r}")
        if self.combine not in COMBINE_MODES:
            raise InvalidInputError(f"`combine` must be one of {list(COMBINE_MODES)}, got {self.combine!r}")
        if self.relax not in RELAX_MODES:
            raise InvalidInputError(f"`relax` must be one of {list(RELAX_MODES)}, got {self.relax!r}")
        for k in ("token", "class_noun"):
            v = getattr(self, k)
            if not isinstance(v, str) or not v.strip() or len(v) > 64:
                raise InvalidInputError(f"`{k}` must be a non-empty string of at most 64 characters, got {v!r}")

    @property
    def prompt(self) -> str:
        return f"a photo of {self.token} {self.class_noun}"


def _check_int(cfg: PersonalizeConfig, name: str, lo: int, hi: int) -> None:
    """`cfg.name` must be an int (not a bool) in [lo, hi]."""
    v = getattr(cfg, name)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise InvalidInputError(f"`{name}` must be an integer in [{lo}, {hi}], got {v!r}")

"""Pretraining config: one dataclass per stage, loaded from YAML/TOML plus dotted overrides.

    cfg = load_config("pretrain/configs/tiny-cpu.yaml", ["stage2.steps=50", "data.max_identities=8"])

Values only; no code in configs. Unknown keys are errors (a typo must not silently train with a
default). The stage-1 trainer reuses `hypernet.training.TrainConfig` and the stage-2 model reuses
`HypernetConfig`, so their knobs are documented (and validated) in one place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hypernet.errors import InvalidInputError
from hypernet.hypernetwork.config import HypernetConfig
from hypernet.training.config import TrainConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
LFW = "skimage:lfw_subset"
#: Data settings that do not change what `prepare` writes (they pick what later stages use).
PREPARE_FREE_FIELDS = ("data.max_identities",)


@dataclass
class DataConfig:
    """Corpus, split and the latent cache (stage `prepare`)."""

    corpus: list[str] = field(
        default_factory=lambda: ["../shared/data/faces/caltech/identities.csv", LFW],
        metadata={"help": "candidates, first existing wins: a folder per identity, a CSV/JSONL "
                          f"manifest (file,identity), or {LFW!r} (scikit-image's real 25x25 faces, "
                          "one identity per image). Relative paths: cwd, then the project root"},
    )
    lfw_count: int = field(default=100, metadata={"help": f"images taken from {LFW} (its first 100 are faces)"})
    max_identities: int | None = field(
        default=None,
        metadata={"help": "how many identities stage 1 fits (and so stage 2 trains on): a seeded sample "
                          "(split_seed) of the prepared ones, nested - raising it keeps those already fitted. "
                          "prepare always prepares the whole corpus, so changing this re-prepares nothing. "
                          "None: all"},
    )
    max_images_per_identity: int | None = field(default=None, metadata={"help": "cap per identity"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of identities held out"})
    min_val_identities: int = field(default=1, metadata={"help": "hold out at least this many"})
    split_seed: int = field(default=0, metadata={"help": "seed of the identity split"})
    detector: Literal["auto", "mtcnn", "center"] = field(
        default="auto", metadata={"help": "face crop (hypernet.photos.face_crop)"}
    )
    resolution: int | None = field(default=None, metadata={"help": "None: the base's native size"})
    prompt: str = field(
        default="a photo of ohwx person",
        metadata={"help": "identity prompt; the same one hypernet.personalize fine-tunes with"},
    )
    flip: bool = field(default=True, metadata={"help": "flip augmentation in stage 2 (both are cached)"})
    shard_size: int = field(default=256, metadata={"help": "images per cache shard"})
    encode_batch: int = field(default=16, metadata={"help": "images per VAE call"})

    def __post_init__(self) -> None:
        if not self.corpus or not all(isinstance(c, str) for c in self.corpus):
            raise InvalidInputError(f"`data.corpus` must be a non-empty list of paths, got {self.corpus!r}")
        if not 0 < self.val_fraction < 1:
            raise InvalidInputError(f"`data.val_fraction` must be in (0, 1), got {self.val_fraction!r}")
        _positive(self, "data", "lfw_count", "shard_size", "encode_batch", "min_val_identities")
        _positive(self, "data", "max_identities", "max_images_per_identity", "resolution", optional=True)


@dataclass
class Stage1Config:
    """Pre-optimised LiDB per identity (the paper's targets)."""

    a: int | None = field(default=None, metadata={"help": "LiDB a; None: min(100, narrowest layer)"})
    b: int | None = field(default=None, metadata={"help": "LiDB b; None: min(100, narrowest layer)"})
    r: int = field(default=1, metadata={"help": "LiDB rank (the paper: 1)"})
    spec_seed: int = field(default=0, metadata={"help": "seed of the frozen aux bases"})
    identities_per_call: int = field(
        default=32,
        metadata={"help": "K: identities fitted together, all K through one UNet call per step (per-sample "
                          "LiDB weights). Each keeps its own loss, gradient clipping and AdamW state, so a "
                          "result matches a fit alone up to float round-off. Measured at face-world scale, 1 thread "
                          "per rank: K=16/32/64 fit 1.71x/1.87x/1.67x the identities per CPU-second of K=1 "
                          "(benchmarks/results/stage1_batching.json), so 32; ~2 GB per rank at K=32. On a "
                          "GPU raise it while memory allows"},
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=100, lr=1e-3),
        metadata={"help": "the per-identity trainer (hypernet.training.TrainConfig)"},
    )

    def __post_init__(self) -> None:
        _positive(self, "stage1", "r", "identities_per_call")
        _positive(self, "stage1", "a", "b", optional=True)


@dataclass
class Stage2Config:
    """Hypernetwork training (DDP)."""

    model: HypernetConfig = field(
        default_factory=HypernetConfig,
        metadata={"help": "architecture; num_layers/a/b/r are taken from stage 1's spec"},
    )
    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "samples per rank per micro-step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    lr: float = field(default=3e-4, metadata={"help": "peak AdamW learning rate"})
    encoder_lr_scale: float = field(default=1.0, metadata={"help": "encoder lr = lr * this"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warm-up, then cosine decay"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine floor as a share of lr"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "clip; None: off"})
    alpha: float = field(default=1.0, metadata={"help": "weight of the diffusion loss"})
    beta: float = field(default=1.0, metadata={"help": "weight of the L2 to stage-1 targets"})
    cross_photo: bool = field(default=False, metadata={
        "help": "take the diffusion loss on another photo of the person than the one the hypernetwork is "
                "conditioned on (a random other one each step; the same photo for people with one): it "
                "rewards what the photos share, the person, not pose, light and background"})
    init: str | None = field(default=None, metadata={
        "help": "start from this hypernetwork's weights (a stage-2 final.safetensors or an export's "
                "hypernet.safetensors of the same architecture and LiDB geometry) instead of a fresh init, "
                "e.g. to train a regression-trained hypernetwork on through the fine-tune; None = fresh"})
    finetune_steps: int = field(default=0, metadata={
        "help": "train through the fine-tune that follows the hypernetwork at personalisation: each step "
                "also runs that fine-tune (relaxed in the LiDB subspace, as `personalize`) for this many "
                "steps from every sample's prediction, on its photo and mirror, and adds the diffusion loss "
                "after it (on another photo of the person with cross_photo) to the objective, first-order: "
                "its gradient at the fine-tuned weights is applied to the prediction. Costs about "
                "finetune_steps + 1 extra denoiser passes per step; 0 = off"})
    finetune_weight: float = field(default=1.0, metadata={"help": "weight of the loss after the fine-tune"})
    finetune_lr: float = field(default=1e-2, metadata={"help": "the fine-tune's AdamW lr (personalize's default)"})
    finetune_rank: int = field(default=4, metadata={
        "help": "the fine-tune's rank in the LiDB subspace (personalize's default); >= stage 1's rank"})
    val_finetune_steps: int = field(default=0, metadata={
        "help": "validation also fine-tunes each held-out photo this many steps from the prediction and "
                "from zero, and scores both on another photo of the person: `val/diffusion_finetuned` and "
                "`val/diffusion_finetuned_zero`, the loss-space version of `hdb eval`'s HyperDreamBooth "
                "minus the fine-tune from zero. Costs 2 x this many denoiser passes per val batch; 0 = off"})
    identity_weight: float = field(default=0.0, metadata={
        "help": "weight of the identity term: 1 - cosine between the frozen face encoder's embedding of the "
                "decoded one-step x0 estimate (the photo's latents noised to a timestep in [identity_t_min, "
                "identity_t_max) of the schedule, denoised once with the adapter) and the person's mean "
                "embedding; it scores the person rather than every pixel (hypernet.training.identity_loss). "
                "Costs one denoiser, decoder and encoder pass per sample; 0 = off"})
    identity_at: str = field(default="prediction", metadata={
        "help": "where the identity term is taken: 'prediction' (the predicted LiDB, exact gradient) or "
                "'finetuned' (the weights after stage2.finetune_steps of the fine-tune, first-order as the "
                "loss after it)"})
    identity_t_min: float = field(default=0.3, metadata={"help": "identity term: lowest timestep, as a share"})
    identity_t_max: float = field(default=0.7, metadata={"help": "identity term: top timestep (share of the schedule)"})
    min_snr_gamma: float | None = field(default=None, metadata={"help": "min-SNR weighting; None: off"})
    ema_decay: float = field(default=0.0, metadata={"help": "EMA of weights (0: off); export uses EMA"})
    val_every: int = field(default=100, metadata={"help": "validate every N steps (and at the end)"})
    val_noise_draws: int = field(default=4, metadata={"help": "noise/timestep draws per val photo"})
    ckpt_every: int = field(default=100, metadata={"help": "checkpoint every N steps (and at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept"})
    log_every: int = field(default=10, metadata={"help": "metrics every N steps"})
    seed: int = field(default=0, metadata={"help": "data order, noise, init"})

    def __post_init__(self) -> None:
        _positive(self, "stage2", "steps", "batch_size", "grad_accum", "val_every", "ckpt_every",
                  "keep_checkpoints", "log_every", "val_noise_draws")
        if not self.lr > 0:
            raise InvalidInputError(f"`stage2.lr` must be > 0, got {self.lr!r}")
        if not 0 <= self.ema_decay < 1:
            raise InvalidInputError(f"`stage2.ema_decay` must be in [0, 1), got {self.ema_decay!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise InvalidInputError(f"`stage2.min_lr_ratio` must be in [0, 1], got {self.min_lr_ratio!r}")
        for k, lo, hi in (("finetune_steps", 0, 1000), ("val_finetune_steps", 0, 1000), ("finetune_rank", 1, 256)):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise InvalidInputError(f"`stage2.{k}` must be an integer in [{lo}, {hi}], got {v!r}")
        if not 0 < self.finetune_lr < 1:
            raise InvalidInputError(f"`stage2.finetune_lr` must be in (0, 1), got {self.finetune_lr!r}")
        if self.finetune_weight < 0:
            raise InvalidInputError(f"`stage2.finetune_weight` must be >= 0, got {self.finetune_weight!r}")
        if self.identity_weight < 0:
            raise InvalidInputError(f"`stage2.identity_weight` must be >= 0, got {self.identity_weight!r}")
        if self.identity_at not in ("prediction", "finetuned"):
            raise InvalidInputError(
                f"`stage2.identity_at` must be 'prediction' or 'finetuned', got {self.identity_at!r}")
        if self.identity_weight > 0 and self.identity_at == "finetuned" and self.finetune_steps == 0:
            raise InvalidInputError("`stage2.finetune_steps` must be > 0 with stage2.identity_at 'finetuned' (the "
                                    "term is taken after that fine-tune), got 0")
        if not 0 <= self.identity_t_min < self.identity_t_max <= 1:
            raise InvalidInputError(f"`stage2.identity_t_min`/`identity_t_max` must satisfy 0 <= min < max <= 1, got "
                                    f"{self.identity_t_min}, {self.identity_t_max}")
        # Both 0 is allowed only when another term (after the fine-tune, or the identity) is the objective.
        through = (self.finetune_steps > 0 and self.finetune_weight > 0) or self.identity_weight > 0
        if self.alpha < 0 or self.beta < 0 or (self.alpha + self.beta == 0 and not through):
            raise InvalidInputError(
                f"`stage2.alpha`/`stage2.beta` must be >= 0 and not both 0 (unless stage2.finetune_steps and "
                f"stage2.finetune_weight, or stage2.identity_weight, are > 0), got {self.alpha}, {self.beta}"
            )


@dataclass
class ExportConfig:
    """Export: safetensors + config, and ONNX checked against torch."""

    onnx: bool = field(default=True, metadata={"help": "also write hypernet.onnx"})
    exporter: Literal["torchscript", "dynamo"] = field(
        default="torchscript", metadata={"help": "torch.onnx exporter (torchscript: ~30x faster here)"}
    )
    opset: int = field(default=18, metadata={"help": "ONNX opset"})
    max_abs_diff: float = field(default=1e-4, metadata={"help": "fail if ONNX and torch differ more"})
    check_batch: int = field(default=3, metadata={"help": "batch used for the ONNX-vs-torch check"})
    prediction_scale: float = field(default=1.0, metadata={
        "help": "written into both files: what `personalize` multiplies the predicted delta_W by unless "
                "told otherwise (the prediction is shrunk towards the mean target; calibrate it on held-out "
                "people with `hdb eval --override hypernetwork.prediction_scale=S`)"})


@dataclass
class ProbeConfig:
    """`probe`: how predictable stage 1's targets are (pretrain.probe); changes no other stage."""

    against: str | None = field(
        default=None,
        metadata={"help": "another stage-1 folder fitting the same identities (another seed or other photos): "
                          "reports how well the two fits of one identity agree; None: skip"},
    )


@dataclass
class CompareConfig:
    """`compare`: this run's stage-2 validation after the fine-tune against another run's, photo by
    photo (pretrain.compare); changes no other stage."""

    against: str | None = field(
        default=None,
        metadata={"help": "another run folder (its stage2/val_finetuned/) validated on the same prepared data; "
                          "None: report this run's own gap only"},
    )
    step: int | None = field(
        default=None,
        metadata={"help": "the validation step to read in both runs (None: each run's last)"},
    )


@dataclass
class PretrainConfig:
    """The whole pipeline: prepare -> stage1 -> stage2 -> export."""

    base: str | None = field(default=None, metadata={"help": "diffusers dir; None: the embedded tiny base"})
    arch: Literal["sd15", "sdxl", "sd3", "flux"] | None = field(
        default=None,
        metadata={"help": "the base family this config is for; the run refuses a base of another family "
                          "(None: any). Not part of any stage's cache key: the base itself is"},
    )
    device: str = field(default="auto", metadata={"help": "auto: cuda:LOCAL_RANK when present, else cpu"})
    dist_timeout_min: float = field(default=120.0, metadata={"help": "collective timeout (stage 1 is uneven)"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads per rank (None: torch's)"})
    data: DataConfig = field(default_factory=DataConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    export: ExportConfig = field(default_factory=ExportConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def section_key(self, *sections: str, exclude: tuple[str, ...] = ()) -> str:
        """A short hash of the named sections (+ base): outputs built under another key are stale.

        `exclude`: dotted `section.key` fields left out (settings that do not change the output).
        """
        d = self.to_dict()
        payload = {"base": d["base"], **{s: dict(d[s]) for s in sections}}
        for dotted in exclude:
            sec, _, name = dotted.partition(".")
            if sec not in payload or name not in payload[sec]:
                raise InvalidInputError(f"`exclude` must name fields of {list(sections)}, got {dotted!r}")
            del payload[sec][name]
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_config_path(name_or_path: str | Path) -> Path:
    """`tiny-cpu` -> the shipped pretrain/configs/tiny-cpu.yaml; anything else is a path."""
    p = Path(name_or_path)
    if not p.suffix and (CONFIG_DIR / f"{p}.yaml").is_file():
        return CONFIG_DIR / f"{p}.yaml"
    if not p.is_file():
        shipped = sorted(f.stem for f in CONFIG_DIR.glob("*.yaml"))
        raise InvalidInputError(f"`--config` must be a YAML/TOML file or one of {shipped}, got {str(p)!r}")
    return p


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> PretrainConfig:
    """Read YAML/TOML (or defaults when `path` is None) and apply `key.sub=value` overrides.

    Raises:
        InvalidInputError: unreadable file, unknown key, a badly formed override, bad value.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = resolve_config_path(path)
        text = p.read_text()
        try:
            raw = tomllib.loads(text) if p.suffix == ".toml" else (yaml.safe_load(text) or {})
        except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
            raise InvalidInputError(f"`--config` must be valid YAML/TOML, got {p}: {e}") from e
        if not isinstance(raw, dict):
            raise InvalidInputError(f"`--config` must hold a mapping, got {type(raw).__name__} in {p}")
    for item in overrides or []:
        apply_override(raw, item)
    return from_dict(PretrainConfig, raw, "")


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (1e-4, null, [x, y])."""
    key, sep, value = item.partition("=")
    if not sep or not key or any(not k for k in key.split(".")):
        raise InvalidInputError(f"override must look like `section.key=value`, got {item!r}")
    node = raw
    *parents, leaf = key.split(".")
    for k in parents:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise InvalidInputError(f"override `{key}` must name a section path, got a value at `{k}`")
    node[leaf] = yaml.safe_load(value) if value else ""


def from_dict(cls: type, data: dict[str, Any], where: str):
    """Build dataclass `cls` from `data`, recursing into dataclass-typed fields."""
    if not isinstance(data, dict):
        raise InvalidInputError(f"`{where or 'config'}` must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InvalidInputError(
            f"`{where or 'config'}` must only have keys {sorted(names)}, got unknown {unknown}"
        )
    kwargs = {}
    for k, v in data.items():
        t = hints[k]
        sub = f"{where}.{k}" if where else k
        kwargs[k] = from_dict(t, v, sub) if dataclasses.is_dataclass(t) else _coerce(t, v)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise InvalidInputError(f"`{where or 'config'}` must be valid, got {e}") from e


def _coerce(t, v):
    """YAML 1.1 reads `1e-4` as a string: turn numeric strings into the field's number type."""
    if not isinstance(v, str):
        return v
    args = typing.get_args(t) or (t,)
    for num in (int, float):
        if num in args:
            try:
                return num(v)
            except ValueError:
                continue
    return v


def dump_config(cfg: PretrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _positive(obj, section: str, *names: str, optional: bool = False) -> None:
    for k in names:
        v = getattr(obj, k)
        if optional and v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InvalidInputError(f"`{section}.{k}` must be a positive integer, got {v!r}")


__all__ = ["PREPARE_FREE_FIELDS", "CompareConfig", "DataConfig", "ExportConfig", "PretrainConfig", "Stage1Config",
           "Stage2Config", "apply_override", "dump_config", "from_dict", "load_config", "resolve_config_path"]

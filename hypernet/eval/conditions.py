"""The conditions the evaluation compares: each turns one input photo into an applied artifact.

    hyperdreambooth    hypernetwork prediction + 40-step rank-relaxed fast fine-tune (the paper)
    hypernetwork       the prediction alone (fine-tune steps = 0)
    fast-finetune      the same fast fine-tune from a zero prediction (what the hypernet adds)
    lidb               LiDB trained from scratch on the photo
    lora               LoRA
    dreambooth         full UNet fine-tune with prior preservation
    textual-inversion  one new token embedding
    base               no personalisation

Opt-in variants (`VARIANTS`, run only when named in `--conditions`) vary one setting of a hypernet
condition: 3 input photos instead of 1, combined in weight or embedding space, or each fine-tuned
on its own and the deltas averaged ("eachnorm"); the relaxed
fine-tune as a LoRA over full layer dims or inside the LiDB subspace; the fine-tune with its identity
term (`*-identity`, weight 0.15: hypernet.training.identity_loss). A variant with 3 inputs takes
the identity's first 3 photos; the runner then scores every condition against the photos after them.

Opt-in controls (`CONTROLS`) run `hypernetwork` and `hyperdreambooth` with the control
hypernetwork (one adapter for everyone) in place of the trained one.

Every method runs at its library defaults unless `overrides` says otherwise; LiDB's training
prompt (the paper's "a {token} face") is set to the evaluation prompt so that every method is
asked for what it was trained on (the face world only ever saw "a photo of a person").
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from hypernet.errors import InvalidInputError

#: The pseudo-condition scoring the real input photo itself (the ceiling of every metric).
REAL_PHOTO = "real-photo"

__all__ = [
    "ALL_CONDITIONS", "CONDITIONS", "CONTROLS", "EVAL_PROMPT_TEMPLATE", "REAL_PHOTO", "SLOW_CONDITIONS", "VARIANTS",
    "Personalised", "finetune_of", "input_photos", "needs_control", "needs_hypernet", "parse_overrides", "personalise",
    "uses_prediction",
]

CONDITIONS = (
    "hyperdreambooth", "hypernetwork", "fast-finetune", "lidb", "lora", "dreambooth", "textual-inversion", "base",
)
_HYPERNET_CONDITIONS = ("hyperdreambooth", "hypernetwork", "fast-finetune")
#: Conditions that take minutes per person on CPU: `hdb eval --slow-methods-people N` runs them on a subset.
SLOW_CONDITIONS = ("dreambooth", "lora", "textual-inversion")
#: name -> (the condition it varies, PersonalizeConfig settings it fixes, input photos it takes).
VARIANTS: dict[str, tuple[str, dict[str, Any], int]] = {
    "hypernetwork-3photos": ("hypernetwork", {"combine": "weights"}, 3),
    "hypernetwork-3photos-embedding": ("hypernetwork", {"combine": "embedding"}, 3),
    "hyperdreambooth-3photos": ("hyperdreambooth", {"combine": "weights"}, 3),
    "hyperdreambooth-3photos-embedding": ("hyperdreambooth", {"combine": "embedding"}, 3),
    "hyperdreambooth-3photos-batch3": ("hyperdreambooth", {"combine": "weights", "batch_size": 3}, 3),
    "hyperdreambooth-3photos-ft1": ("hyperdreambooth", {"combine": "weights", "finetune_photos": 1}, 3),
    "hyperdreambooth-3photos-eachnorm": ("hyperdreambooth", {"combine": "each-norm"}, 3),
    # its control: the one input photo three times (three fine-tunes differing only in their noise seeds),
    # so that what averaging several fits does is told apart from what several photos do
    "hyperdreambooth-1photo-x3-eachnorm": ("hyperdreambooth", {"combine": "each-norm", "copies": 3}, 1),
    "hyperdreambooth-relax-lora": ("hyperdreambooth", {"relax": "lora"}, 1),
    "hyperdreambooth-relax-subspace": ("hyperdreambooth", {"relax": "subspace"}, 1),
    "fast-finetune-relax-subspace": ("fast-finetune", {"relax": "subspace"}, 1),
    "fast-finetune-relax-lora": ("fast-finetune", {"relax": "lora"}, 1),
    # the fine-tune with its identity term at the weight measured best for target 2 of 0.15, 0.3, 0.5 and 1
    # (DIAGNOSIS.md section 15)
    "hyperdreambooth-identity": ("hyperdreambooth", {"identity_weight": 0.15}, 1),
    "fast-finetune-identity": ("fast-finetune", {"identity_weight": 0.15}, 1),
    # 3 photos with the term: the fine-tune on all 3, or on the first only; the term's target is all 3 either way
    "hyperdreambooth-3photos-identity": ("hyperdreambooth", {"combine": "weights", "identity_weight": 0.15}, 3),
    "hyperdreambooth-3photos-ft1-identity": (
        "hyperdreambooth", {"combine": "weights", "finetune_photos": 1, "identity_weight": 0.15}, 3),
    "hyperdreambooth-3photos-eachnorm-identity": (
        "hyperdreambooth", {"combine": "each-norm", "identity_weight": 0.15}, 3),
}
#: Controls: name -> the hypernetwork condition they run with the *control* hypernetwork
#: (`EvalConfig.mean_adapter`, from `hdb pretrain mean-adapter`: one adapter for everyone, the mean
#: stage-1 target) in place of the trained one. Paired with their trained counterparts they say what
#: the hypernetwork knows about the person rather than about faces in general.
CONTROLS: dict[str, str] = {
    "mean-adapter": "hypernetwork",
    "hyperdreambooth-mean-adapter": "hyperdreambooth",
}
ALL_CONDITIONS = CONDITIONS + tuple(VARIANTS) + tuple(CONTROLS)
EVAL_PROMPT_TEMPLATE = "a photo of {token} {class_noun}"


@dataclass
class Personalised:
    """An artifact (None for the base), the seconds its training took and its size on disk."""

    artifact: Any
    seconds: float
    nbytes: int


def needs_hypernet(conditions) -> bool:
    """Whether any of `conditions` runs the trained hypernetwork (`EvalConfig.hypernet`)."""
    return any(VARIANTS.get(c, (c,))[0] in _HYPERNET_CONDITIONS for c in conditions)


def uses_prediction(condition: str) -> bool:
    """Whether `condition` uses the hypernetwork's *prediction*, not only its geometry (LiDB spec,
    layers, input resolution): the fine-tunes from zero start at a zero prediction, so their cells
    survive a retrained or re-exported hypernetwork of the same geometry."""
    return needs_hypernet((condition,)) and VARIANTS.get(condition, (condition,))[0] != "fast-finetune"


def needs_control(conditions) -> bool:
    """Whether any of `conditions` runs the control hypernetwork (`EvalConfig.mean_adapter`)."""
    return any(c in CONTROLS for c in conditions)


def finetune_of(condition: str, overrides: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The training `condition` runs (None: it trains nothing): its learning rate, and for the
    hypernetwork's fine-tunes its relaxation, after its variant's settings and `overrides`; the
    library defaults otherwise. Part of a cell's key, so that a changed default reruns the cells
    computed under the old one instead of reusing them."""
    base, settings, _ = VARIANTS.get(condition, (CONTROLS.get(condition, condition), {}, 1))
    eff = {**settings, **(overrides or {})}
    if base in ("hyperdreambooth", "fast-finetune"):
        from hypernet.personalize import PersonalizeConfig

        d = PersonalizeConfig()
        key = {"relax": eff.get("relax", d.relax), "lr": eff.get("lr", d.lr)}
        if eff.get("identity_weight", d.identity_weight):  # off keeps the cells computed before it existed
            key["identity_weight"] = float(eff.get("identity_weight", d.identity_weight))
        return key
    if base in ("hypernetwork", "base"):
        return None
    from hypernet.methods import get_method

    return {"lr": eff.get("lr", get_method(base).config_cls().train.lr)}


def input_photos(condition: str) -> int:
    """How many of an identity's photos `condition` personalises from (the first ones)."""
    return VARIANTS[condition][2] if condition in VARIANTS else 1


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """["lora.steps=100", "dreambooth.num_class_images=10"] -> {"lora": {"steps": 100}, ...}.

    Values are parsed as int, float, true/false, else kept as strings.

    Raises:
        InvalidInputError: not CONDITION.KEY=VALUE, or an unknown condition.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        cond, dot, field_name = key.partition(".")
        if not sep or not dot or not field_name:
            raise InvalidInputError(f"`override` must be CONDITION.KEY=VALUE, got {item!r}")
        if cond not in ALL_CONDITIONS:
            raise InvalidInputError(f"`override` condition must be one of {list(ALL_CONDITIONS)}, got {cond!r}")
        out.setdefault(cond, {})[field_name] = _parse_value(raw)
    return out


def _parse_value(raw: str) -> Any:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def personalise(
    pipe, condition: str, photo: Path | Sequence[Path], *, runtime=None, token: str = "ohwx",
    class_noun: str = "person", overrides: dict[str, Any] | None = None, seed: int = 0, detector: str = "auto",
) -> Personalised:
    """Train `condition` on `photo` (one path, or a list whose first `input_photos(condition)` it
    takes); the pipeline is left clean (apply happens later).

    Raises:
        InvalidInputError: unknown condition or override; fewer photos than the condition takes;
            a hypernet condition without `runtime`.
    """
    overrides = dict(overrides or {})
    if condition not in ALL_CONDITIONS:
        raise InvalidInputError(f"`condition` must be one of {list(ALL_CONDITIONS)}, got {condition!r}")
    photos = [photo] if isinstance(photo, (str, Path)) else list(photo)
    n = input_photos(condition)
    if len(photos) < n:
        raise InvalidInputError(f"condition {condition!r} must be given {n} photos, got {len(photos)}")
    photo = photos[0] if n == 1 else photos[:n]
    if condition in VARIANTS:
        condition, settings, _ = VARIANTS[condition]
        overrides = {**settings, **overrides}
    copies = overrides.pop("copies", 1)  # the evaluation's own setting: the input photo given this many times
    if copies > 1:
        photo = [photo] * copies
    condition = CONTROLS.get(condition, condition)  # the caller passes the control's runtime
    if condition == "base":
        return Personalised(None, 0.0, 0)
    t0 = time.perf_counter()
    if condition in _HYPERNET_CONDITIONS:
        overrides.setdefault("detector", detector)
        artifact = _personalise_hypernet(pipe, condition, photo, runtime, token, class_noun, overrides, seed)
    else:
        artifact = _train_method(pipe, condition, photo, token, class_noun, overrides, seed, detector)
    seconds = time.perf_counter() - t0
    return Personalised(artifact, seconds, artifact_bytes(artifact))


def _personalise_hypernet(pipe, condition, photo, runtime, token, class_noun, overrides, seed):
    from hypernet.personalize import PersonalizeConfig
    from hypernet.personalize import personalize as fast_personalize

    if runtime is None:
        raise InvalidInputError(f"condition {condition!r} must be given a hypernetwork, got none")
    kw = {"token": token, "class_noun": class_noun, "seed": seed, **overrides}
    if condition == "hypernetwork":
        kw["steps"] = 0
    _check_fields(PersonalizeConfig, kw, condition)
    if condition == "fast-finetune":
        runtime = _zero_prediction(runtime)
    return fast_personalize(pipe, photo, hypernet=runtime, config=PersonalizeConfig(**kw))


def _zero_prediction(runtime):
    """The runtime with its prediction replaced by zeros: LiDB's delta is then exactly 0."""
    import torch

    zero = copy.copy(runtime)

    def predict(pixels, faces=None):
        return {k: torch.zeros_like(v) for k, v in runtime.predict(pixels, faces=faces).items()}

    def decode(tokens):  # several photos combined in embedding space
        return {k: torch.zeros_like(v) for k, v in runtime.decode(tokens).items()}

    zero.predict, zero.decode = predict, decode
    return zero


def _train_method(pipe, condition, photo, token, class_noun, overrides, seed, detector):
    from hypernet.methods import get_method

    method = get_method(condition)
    kw = dict(overrides)
    names = {f.name for f in fields(method.config_cls)}
    if condition == "lidb" and "prompt" not in kw:
        kw["prompt"] = EVAL_PROMPT_TEMPLATE
    if "seed" in names and "seed" not in kw:
        kw["seed"] = seed
    _check_fields(method.config_cls, kw, condition)
    return method.train(pipe, [photo], token=token, class_noun=class_noun, config=method.config_cls(**kw),
                        detector=detector)


def _check_fields(cls, kw: dict, condition: str) -> None:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(kw) - names)
    if unknown:
        raise InvalidInputError(f"overrides of {condition!r} must be among {sorted(names)}, got {unknown}")


def artifact_bytes(artifact) -> int:
    """Bytes a user must store for the artifact: its file; for DreamBooth (a whole pipeline
    directory) only the fine-tuned models (UNet, plus the text encoder when it trained), since the
    VAE, tokenizer and scheduler it copies are the base's."""
    tmp = Path(tempfile.mkdtemp(prefix="hdb-eval-size-"))
    try:
        path = tmp / "artifact.safetensors"
        total = int(artifact.save(path))
        if path.is_dir():
            parts = ["unet"] + (["text_encoder"] if getattr(artifact, "text_encoder", None) is not None else [])
            total = sum(f.stat().st_size for part in parts for f in (path / part).rglob("*") if f.is_file())
        return total
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

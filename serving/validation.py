"""Request validation: protobuf requests -> checked domain values, or INVALID_ARGUMENT.

Every check happens before any work is queued, and every message says which field is wrong,
what is allowed and what was received ("`options.steps` must be 1..150, got 0").
"""

from __future__ import annotations

import dataclasses
import math
import re
import secrets
from dataclasses import dataclass

from hypernet.errors import InvalidInputError
from hypernet.personalize_config import MAX_IDENTITY_WEIGHT
from serving.config import ServeConfig
from serving.engine import METHODS, PersonalizeOptions
from serving.stubs import pb

METHOD_NAMES = {
    pb.METHOD_UNSPECIFIED: "hyperdreambooth",
    pb.METHOD_HYPERDREAMBOOTH: "hyperdreambooth",
    pb.METHOD_LIDB: "lidb",
    pb.METHOD_LORA: "lora",
    pb.METHOD_TEXTUAL_INVERSION: "textual_inversion",
    pb.METHOD_DREAMBOOTH: "dreambooth",
}
METHOD_ENUMS = {name: value for value, name in METHOD_NAMES.items() if value}
IMAGE_FORMATS = {pb.IMAGE_FORMAT_UNSPECIFIED: "PNG", pb.IMAGE_FORMAT_PNG: "PNG", pb.IMAGE_FORMAT_JPEG: "JPEG",
                 pb.IMAGE_FORMAT_WEBP: "WEBP"}
#: ExportFormat -> the engine's format name ("" = the identity's method's default).
EXPORT_FORMATS = {pb.EXPORT_FORMAT_UNSPECIFIED: "",
                  pb.EXPORT_FORMAT_LORA_DIFFUSERS: "lora_diffusers",
                  pb.EXPORT_FORMAT_LORA_KOHYA: "lora_kohya",
                  pb.EXPORT_FORMAT_TEXTUAL_INVERSION: "textual_inversion"}
EXPORT_ENUMS = {name: value for value, name in EXPORT_FORMATS.items() if value}
_TOKEN = re.compile(r"^[a-z0-9]{1,32}$")
_NOUN = re.compile(r"^[A-Za-z][A-Za-z -]{0,31}$")
MAX_SEED = 2**62  # seed + i must stay a valid 64-bit seed
MAX_RANK = 64
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 500


def _bad(field: str, what: str, got) -> InvalidInputError:
    return InvalidInputError(f"`{field}` must be {what}, got {got!r}")


@dataclass(frozen=True)
class GenerateSpec:
    prompt: str
    negative_prompt: str
    n: int
    steps: int
    guidance: float
    seed: int
    width: int
    height: int
    format: str


@dataclass(frozen=True)
class PersonalizeSpec:
    photos: tuple[bytes, ...]  # 1..MAX_PHOTOS encoded photos of one person
    method: str
    options: PersonalizeOptions
    background: bool
    legacy: bool = False  # the photo came in the old single `photo` field (messages name it so)

    def photo_name(self, k: int) -> str:
        """How messages name photo `k`: `photo` (an old client's one photo), else `photos[k]`."""
        return "photo" if self.legacy else f"photos[{k}]"


def method_name(value: int, field: str = "method") -> str:
    if value not in METHOD_NAMES:
        raise _bad(field, f"one of {sorted(pb.Method.keys())}", value)
    return METHOD_NAMES[value]


def prompt(text: str, field: str, cfg: ServeConfig, required: bool) -> str:
    if required and not text.strip():
        raise _bad(field, "a non-empty text prompt", text)
    if len(text) > cfg.max_prompt_chars:
        raise InvalidInputError(f"`{field}` must be at most {cfg.max_prompt_chars} characters, "
                                f"got {len(text)}")
    if "\x00" in text:
        raise InvalidInputError(f"`{field}` must not contain NUL characters, got one")
    return text


def _int_range(value: int, field: str, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise _bad(field, f"{lo}..{hi}", value)
    return value


@dataclass(frozen=True)
class BaseLimits:
    """What the loaded base allows a generation: its default size, the multiple sizes must be
    (8; 16 on SD3/FLUX) and its family (FLUX takes no negative prompt)."""

    native_size: int
    size_multiple: int = 8
    arch: str = "sd15"


def generation(req_prompt: str, o, cfg: ServeConfig, base: BaseLimits,
               prefix: str = "options", prompt_field: str = "prompt") -> GenerateSpec:
    """Validate one prompt plus `GenerationOptions` (zero fields take the defaults) against the
    server's limits and the base's (`base`); `prompt_field` names the prompt in messages (e.g.
    "prompts[2]")."""
    p = prompt(req_prompt, prompt_field, cfg, required=True)
    neg = prompt(o.negative_prompt, f"{prefix}.negative_prompt", cfg, required=False)
    if neg and base.arch == "flux":
        raise _bad(f"{prefix}.negative_prompt", "empty on a FLUX base (guidance-distilled: no classifier-free "
                   "guidance uses it)", neg)
    n = _int_range(o.n or 1, f"{prefix}.n", 1, cfg.max_images)
    steps = _int_range(o.steps or cfg.default_generate_steps, f"{prefix}.steps", 1,
                       cfg.max_generate_steps)
    guidance = o.guidance if o.HasField("guidance") else 7.5
    if not (math.isfinite(guidance) and cfg.min_guidance <= guidance <= cfg.max_guidance):
        raise _bad(f"{prefix}.guidance", f"a finite number in {cfg.min_guidance}..{cfg.max_guidance}",
                   guidance)
    seed = o.seed if o.HasField("seed") else secrets.randbelow(2**31)
    _int_range(seed, f"{prefix}.seed", 0, MAX_SEED)
    size = {}
    m = base.size_multiple
    for name in ("width", "height"):
        v = getattr(o, name) or base.native_size
        if not (cfg.min_size <= v <= cfg.max_size and v % m == 0):
            raise _bad(f"{prefix}.{name}", f"a multiple of {m} for {base.arch} in {cfg.min_size}..{cfg.max_size} "
                       f"(0: the base's {base.native_size})", v)
        size[name] = v
    if o.format not in IMAGE_FORMATS:
        raise _bad(f"{prefix}.format", f"one of {sorted(pb.ImageFormat.keys())}", o.format)
    return GenerateSpec(p, neg, n, steps, float(guidance), seed, size["width"], size["height"],
                        IMAGE_FORMATS[o.format])


def photo_list(photo: bytes, photos) -> tuple[bytes, ...]:
    """An old client's one `photo` or a new one's `photos` (1..MAX_PHOTOS) -> the photos. Every
    method trains on all of them (`hypernet.methods` and `hypernet.personalize` take a list).
    Empty photos are refused by name here, undecodable ones when decoded
    (`PersonalizeSpec.photo_name`)."""
    from hypernet.personalize import MAX_PHOTOS  # lazily: the client CLI imports this module

    if photo and photos:
        raise InvalidInputError(f"`photo` and `photos` must not both be set (use `photos` only), got "
                                f"`photo` and {len(photos)} `photos`")
    if photo:
        return (photo,)
    if not photos:
        raise InvalidInputError(f"`photos` must hold 1 to {MAX_PHOTOS} JPEG, PNG or WebP photos of one "
                                "person, got none (and no `photo`)")
    if len(photos) > MAX_PHOTOS:
        raise _bad("photos", f"1 to {MAX_PHOTOS} photos of one person", f"{len(photos)} photos")
    for k, p in enumerate(photos):
        if not p:
            raise InvalidInputError(f"`photos[{k}]` must be the bytes of one JPEG, PNG or WebP image, "
                                    "got 0 bytes")
    return tuple(photos)


def personalization(photo: bytes, photos, method: int, o, cfg: ServeConfig) -> PersonalizeSpec:
    """Validate the photos (`photo` or `photos`) + method + `PersonalizeOptions` (the photos are
    decoded later, each named in its errors)."""
    all_photos = photo_list(photo, photos)


    name = method_name(method)
    opts = PersonalizeOptions()
    if o.HasField("steps"):  # HYPERDREAMBOOTH: 0 = the hypernetwork's prediction only
        opts.steps = _int_range(o.steps, "options.steps", 0 if name == "hyperdreambooth" else 1,
                                cfg.max_personalize_steps)
    if o.HasField("rank"):
        opts.rank = _int_range(o.rank, "options.rank", 1, MAX_RANK)
    if o.HasField("learning_rate"):
        lr = o.learning_rate
        if not (math.isfinite(lr) and 0 < lr < 1):
            raise _bad("options.learning_rate", "a finite number in (0, 1)", lr)
        opts.lr = float(lr)
    if o.HasField("seed"):
        opts.seed = _int_range(o.seed, "options.seed", 0, MAX_SEED)
    if o.HasField("identity_weight") and name != "hyperdreambooth":
        raise _bad("options.identity_weight", "unset for any method but METHOD_HYPERDREAMBOOTH (the term is "
                   "part of its fast fine-tune)", o.identity_weight)
    if o.HasField("identity_weight"):
        w = o.identity_weight
        if not (math.isfinite(w) and 0 <= w <= MAX_IDENTITY_WEIGHT):
            raise _bad("options.identity_weight", f"a finite number in [0, {MAX_IDENTITY_WEIGHT:g}] (0 = off)", w)
        opts.identity_weight = float(w)
    if o.token:
        if not _TOKEN.match(o.token):
            raise _bad("options.token", "1-32 characters of [a-z0-9] (a rare word, e.g. ohwx)",
                       o.token)
        opts.token = o.token
    if o.class_noun:
        if not _NOUN.match(o.class_noun):
            raise _bad("options.class_noun", "1-32 letters, spaces or hyphens (e.g. person)",
                       o.class_noun)
        opts.class_noun = o.class_noun
    background = o.background or METHODS[name].background
    return PersonalizeSpec(all_photos, name, opts, background, legacy=bool(photo))


def fast_method(spec: PersonalizeSpec) -> PersonalizeSpec:
    """PersonalizeAndGenerate's personalisation: a method that runs in the call (not a
    background one), and never as a background job."""
    if METHODS[spec.method].background:
        fast = [pb.Method.Name(METHOD_ENUMS[n]) for n, m in METHODS.items() if not m.background]
        raise _bad("method", f"a fast method for PersonalizeAndGenerate ({', '.join(fast)}; use "
                   "Personalize then Generate for the others)", pb.Method.Name(METHOD_ENUMS[spec.method]))
    return dataclasses.replace(spec, background=False)


def page_size(value: int) -> int:
    if value == 0:
        return DEFAULT_PAGE_SIZE
    return _int_range(value, "page_size", 1, MAX_PAGE_SIZE)

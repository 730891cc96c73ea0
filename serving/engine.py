"""The one place the service calls the model library (`hypernet`).

Everything the servicer needs from models goes through `Engine`: load + warm up, decode a photo,
personalise, load a stored identity, generate a batch of images, export a LoRA. The servicer
stays a translator between protobuf and these calls, and a change in the library's API touches
only this file. All methods except `decode_photo`, `load_identity` and `export` must run on the
model worker thread (they use the pipeline).

Library imports are lazy: `serving` imports (and reports methods as unavailable in
GetServerInfo) even where part of the library is absent.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import logging
import platform
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from hypernet.errors import Cancelled, InvalidInputError, ModelNotFoundError
from serving.batching import BatchKey, GenWork
from serving.errors import FailedPrecondition

log = logging.getLogger(__name__)


#: The LoRA exports (what a LiDB, a HyperDreamBooth identity or a LoRA is, as a standard file).
LORA_EXPORTS = ("lora_diffusers", "lora_kohya")


@dataclass(frozen=True)
class MethodSpec:
    name: str  # the library's method name
    background: bool  # always a background job (minutes of work); False: PersonalizeAndGenerate too
    module: str  # where its implementation lives
    export_formats: tuple[str, ...] = ()  # ExportIdentity formats, the default first


#: HYPERDREAMBOOTH goes through `hypernet.personalize`; the others through the
#: `hypernet.methods` registry (`get_method(name)`). DreamBooth exports nothing: its artifact is a
#: whole pipeline (GBs at SD scale), far over any message size.
METHODS: dict[str, MethodSpec] = {
    "hyperdreambooth": MethodSpec("hyperdreambooth", False, "hypernet.personalize", LORA_EXPORTS),
    "lidb": MethodSpec("lidb", False, "hypernet.methods.lidb", LORA_EXPORTS),
    "lora": MethodSpec("lora", True, "hypernet.methods.lora", LORA_EXPORTS),
    "textual_inversion": MethodSpec("textual_inversion", True, "hypernet.methods.textual_inversion",
                                    ("textual_inversion",)),
    "dreambooth": MethodSpec("dreambooth", True, "hypernet.methods.dreambooth"),
}
#: Longest side a decoded photo keeps while it waits in the queue (see `decode_photo`).
MAX_QUEUED_PHOTO_SIDE = 2048
#: Smallest short side and most elongated aspect of a photo: slivers such as 1x100000 (or any
#: side under ~20 px once scaled for detection) crash the face detector's image pyramid (an
#: INTERNAL error before this check); no face photo looks like that (found by the reliability fuzz).
MIN_PHOTO_SIDE = 32
MAX_PHOTO_ASPECT = 8.0
#: Warm-up personalisation: a flat grey photo, one fine-tune step.
_WARMUP_STEPS = 1


@dataclass
class PersonalizeOptions:
    """Caller overrides; None keeps the library's default for the method."""

    steps: int | None = None
    rank: int | None = None
    lr: float | None = None
    seed: int | None = None
    identity_weight: float | None = None  # HYPERDREAMBOOTH's fine-tune identity term
    token: str = "ohwx"
    class_noun: str = "person"


@dataclass
class Loaded:
    """A personalisation ready to generate with."""

    method: str
    obj: Any  # hypernet.identity.Identity, or a method's Artifact
    batchable: bool  # True: per-sample weights, shares UNet calls with other identities


@dataclass
class Personalized:
    loaded: Loaded
    blob: bytes  # what the store keeps
    timings: dict[str, float] = field(default_factory=dict)


ProgressFn = Callable[[str, int, int, float | None], None]


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


class Engine:
    """The loaded base pipeline (and hypernetwork) plus the operations the service runs on it."""

    def __init__(self, base: str = "", hypernet: str = "", device: str = "", dtype: str = "",
                 base_config_dir: str = "", default_hypernet: Callable[[], str | Path] | None = None):
        """`default_hypernet` gives the hypernetwork folder when `hypernet` is empty (the app,
        `hdb serve`, passes the embedded one's builder); with neither, HYPERDREAMBOOTH is
        unavailable and the other methods still work."""
        self.base_spec = base
        self.base_config_dir = base_config_dir or None
        self.hypernet_spec = hypernet
        self.default_hypernet = default_hypernet
        self.device_spec = device or None
        self.dtype_spec = dtype or None
        self.pipe = None
        self.guard = None  # serving.pipeline_guard.PipelineGuard of the loaded base
        self.fingerprint = ""
        self.base_name = ""
        self.native_size = 0
        self.arch = ""  # the base's family (hypernet.base.arch.Arch) once loaded
        self.size_multiple = 8  # width/height must be multiples of this (SIZE_MULTIPLE[arch])
        self._hypernet = None
        self._hypernet_error = "models not loaded yet"
        self._layer_shapes: dict[str, tuple[int, int]] = {}
        #: Where method artifacts are serialised on their way to and from the store: the store's
        #: own hidden temp area when it has a disk (set by the server), so personalisation writes
        #: nothing outside it; None (an S3 store) means the system temp dir.
        self.scratch_dir: Path | None = None

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        """Load the base (default: the embedded tiny base, built on first use). Idempotent."""
        if self.pipe is not None:
            return
        from hypernet.adapters.inject import linear_layers
        from hypernet.base import base_fingerprint, load_pipeline
        from serving.pipeline_guard import PipelineGuard

        if self.base_spec:
            path = Path(self.base_spec)
        else:
            from hypernet.defaults import default_base_dir

            path = default_base_dir()
        self.base_name = str(path) if self.base_spec else "embedded tiny base"
        self._base_path = path
        from hypernet.base.arch import SIZE_MULTIPLE, default_size, pipeline_arch

        self.pipe = load_pipeline(path, device=self.device_spec, dtype=self.dtype_spec,
                                  config_dir=self.base_config_dir)
        _freeze(self.pipe)
        self.fingerprint = base_fingerprint(self.pipe)
        self.arch = pipeline_arch(self.pipe)
        self.size_multiple = SIZE_MULTIPLE[self.arch]
        self.native_size = default_size(self.pipe)
        self.guard = PipelineGuard(self.pipe)
        # (n_in, n_out) of every linear layer: a LiDB export regenerates its aux bases from them
        self._layer_shapes = {n: (m.in_features, m.out_features)
                              for n, m in linear_layers(self.pipe)}
        self._hypernet = self._load_hypernet()

    def restore_base(self) -> tuple[list[str], str]:
        """Check that the shared pipeline is the base again (after a job); repair it in place,
        or reload the base from disk when repairing is not enough. Model worker thread only.

        Returns:
            (what was wrong, the action: "" when nothing was, else "repaired" or "reloaded").
        """
        problems = self.guard.repair()
        if not problems:
            return [], ""
        if not self.guard.check():
            return problems, "repaired"
        from hypernet.base import base_fingerprint, load_pipeline
        from serving.pipeline_guard import PipelineGuard

        pipe = load_pipeline(self._base_path, device=self.device_spec, dtype=self.dtype_spec,
                             config_dir=self.base_config_dir)
        _freeze(pipe)
        if base_fingerprint(pipe) != self.fingerprint:
            raise RuntimeError(f"the reloaded base must have fingerprint {self.fingerprint}, got "
                               f"{base_fingerprint(pipe)} (the base on disk changed)")
        self.pipe, self.guard = pipe, PipelineGuard(pipe)
        return problems, "reloaded"

    def _load_hypernet(self):
        """The hypernetwork runtime (default: `default_hypernet()`, e.g. the embedded tiny one).

        A failure is not fatal: the other methods still work, HYPERDREAMBOOTH is reported
        unavailable (with the reason) in GetServerInfo and fails with FAILED_PRECONDITION.
        """
        try:
            from hypernet.personalize import load_runtime

            if self.hypernet_spec:
                path = self.hypernet_spec
            elif self.default_hypernet is not None and self.arch != "sd15":
                # the embedded default is the tiny SD 1.x base's: building it (minutes) could only
                # end in a family mismatch
                raise ModelNotFoundError(
                    f"no hypernetwork for this {self.arch} base: `hypernet` must be an export pretrained on "
                    f"it (--hypernet; `hdb pretrain` with a {self.arch} config), got none; the other methods "
                    f"listed need none")
            elif self.default_hypernet is not None:
                path = self.default_hypernet()
            else:
                raise ModelNotFoundError("no hypernetwork configured: `hypernet` must be a path (--hypernet / "
                                         "HDB_HYPERNET), got none")
            runtime = load_runtime(str(path), device=str(self.pipe.device))
            runtime.check_base(self.pipe)
            self._hypernet_error = ""
            return runtime
        except Exception as e:  # noqa: BLE001 - reported, see docstring
            self._hypernet_error = f"the hypernetwork failed to load: {type(e).__name__}: {e}"
            log.error(self._hypernet_error)
            return None

    def warmup(self) -> None:
        """A short generation and personalisation, so the first request pays no lazy init."""
        self.generate([GenWork("warm up", "", 0, 2, 7.5, self.native_size, self.native_size)],
                      lambda: False)
        if self._hypernet is not None:
            from PIL import Image

            photo = Image.new("RGB", (self.native_size, self.native_size), (128, 128, 128))
            self.personalize(photo, "hyperdreambooth", PersonalizeOptions(steps=_WARMUP_STEPS),
                             lambda *a: None, lambda: False)

    @property
    def device(self) -> str:
        return str(self.pipe.device) if self.pipe is not None else ""

    def gpu_memory(self) -> dict[str, float]:
        """Allocated/reserved bytes on the pipeline's CUDA device; {} on CPU."""
        import torch

        if self.pipe is None or self.pipe.device.type != "cuda":
            return {}
        dev = self.pipe.device
        return {"allocated": float(torch.cuda.memory_allocated(dev)),
                "reserved": float(torch.cuda.memory_reserved(dev))}

    @staticmethod
    def default_steps(method: str) -> int:
        """The library's default optimisation steps of `method` (0 when unknown)."""
        try:
            if method == "hyperdreambooth":
                from hypernet.personalize import PersonalizeConfig

                return int(PersonalizeConfig().steps)
            from hypernet.methods import get_method

            cfg = get_method(method).config_cls()
            train = getattr(cfg, "train", None)
            return int(getattr(train, "steps", None) or getattr(cfg, "steps", 0) or 0)
        except Exception:  # noqa: BLE001 - informational only
            return 0

    def supported_methods(self) -> tuple[str, ...]:
        """The methods the base's family supports (GetServerInfo lists only these): all of them on
        SD 1.x/2.x; per family what the methods registry says (`methods_for`: no DreamBooth or
        Textual Inversion on SD3/FLUX). HYPERDREAMBOOTH is on every family; whether it is
        available depends on the hypernetwork (`methods`)."""
        from hypernet.methods import methods_for

        family = {m.replace("-", "_") for m in methods_for(self.arch or "sd15")}  # registry: "textual-inversion"
        return tuple(n for n in METHODS if n == "hyperdreambooth" or n in family)

    def check_supported(self, method: str) -> None:
        """Raise FailedPrecondition unless the base's family supports `method` (a valid request
        this server cannot run: the caller picks another method or server)."""
        if self.pipe is not None and method not in self.supported_methods():
            raise FailedPrecondition(f"`method` {method} is not supported on this {self.arch} base; "
                                     f"GetServerInfo lists the methods it runs")

    def methods(self) -> dict[str, tuple[bool, str]]:
        """Per method the base supports: (available, why not)."""
        out = {}
        supported = self.supported_methods()
        for name, spec in METHODS.items():
            if name not in supported:
                continue
            ok = _has_module(spec.module)
            why = "" if ok else f"{spec.module} is not installed in this build"
            if ok and name == "hyperdreambooth" and self._hypernet is None:
                ok, why = False, self._hypernet_error
            out[name] = (ok, why)
        return out

    def identity_term(self) -> tuple[bool, str]:
        """Whether HYPERDREAMBOOTH's fine-tune can take its identity term here (it needs the
        hypernetwork and the face encoder's file): (available, why not)."""
        ok, why = self.methods().get("hyperdreambooth", (False, "HYPERDREAMBOOTH is not supported on this base"))
        if not ok:
            return False, why
        from hypernet.face_encoder import find_face_encoder

        try:
            find_face_encoder()
        except ModelNotFoundError as e:
            return False, str(e)
        if not _has_module("onnx2torch"):
            return False, "onnx2torch is not installed in this build"
        return True, ""

    def check_identity_term(self) -> None:
        """Raise FailedPrecondition unless `identity_term()` is available (GetServerInfo says so)."""
        ok, why = self.identity_term()
        if not ok:
            raise FailedPrecondition(f"`options.identity_weight` needs the face encoder, which this server "
                                     f"lacks: {why}; leave it unset or 0")

    @staticmethod
    def versions() -> dict[str, str]:
        from importlib.metadata import PackageNotFoundError, version

        out = {"python": platform.python_version()}
        for pkg in ("hyperdreambooth", "torch", "diffusers", "grpcio", "protobuf"):
            try:
                out[pkg] = version(pkg)
            except PackageNotFoundError:
                pass
        return out

    # ------------------------------------------------------------------ photos
    @staticmethod
    def decode_photo(data: bytes, max_pixels: int, field: str = "photo"):
        """JPEG/PNG/WebP bytes -> RGB PIL image, in memory only (photos never touch disk);
        `field` names the photo in errors ("photos[2]").

        Raises:
            ImageDecodeError, ImageTooLargeError (InvalidInputError subclasses).
        """
        from hypernet.photos import decode_image

        img = decode_image(data, max_pixels=max_pixels, source=f"`{field}`")
        w, h = img.size
        if min(w, h) < MIN_PHOTO_SIDE or max(w, h) > MAX_PHOTO_ASPECT * min(w, h):
            raise InvalidInputError(
                f"`{field}` must be at least {MIN_PHOTO_SIDE} px on its short side and at most "
                f"{MAX_PHOTO_ASPECT:g}:1, got {w}x{h}")
        if max(img.size) > MAX_QUEUED_PHOTO_SIDE:
            # A queued photo waits in memory: bound it (queue_size x 12 MB at most). The model
            # sees at most 512 px of it anyway (face crop, then resize to the base's size).
            img.thumbnail((MAX_QUEUED_PHOTO_SIDE, MAX_QUEUED_PHOTO_SIDE), Image.Resampling.LANCZOS)
        return img

    # ------------------------------------------------------------------ personalise
    def personalize(
        self,
        photos,
        method: str,
        opts: PersonalizeOptions,
        progress: ProgressFn,
        should_stop: Callable[[], bool],
    ) -> Personalized:
        """Personalise to `photos` (a list of 1..MAX_PHOTOS decoded images of one person; one
        bare image is taken as a list of one). `progress` may raise to stop the work."""
        if method not in METHODS:
            raise InvalidInputError(f"`method` must be one of {sorted(METHODS)}, got {method!r}")
        self.check_supported(method)
        photos = [photos] if isinstance(photos, Image.Image) else list(photos)
        if method == "hyperdreambooth":
            return self._personalize_hdb(photos, opts, progress, should_stop)
        return self._train_method(photos, method, opts, progress, should_stop)

    def _personalize_hdb(self, photos: list, opts, progress, should_stop) -> Personalized:
        from hypernet.personalize import personalize

        if self._hypernet is None:
            raise FailedPrecondition(f"HYPERDREAMBOOTH is unavailable on this server: "
                                     f"{self._hypernet_error}; use another method")
        kw: dict[str, Any] = {"token": opts.token, "class_noun": opts.class_noun}
        for key, value in (("steps", opts.steps), ("rank", opts.rank), ("lr", opts.lr),
                           ("seed", opts.seed), ("identity_weight", opts.identity_weight)):
            if value is not None:
                kw[key] = value
        if kw.get("identity_weight"):
            self.check_identity_term()

        def on_progress(ev) -> None:
            progress(ev.stage, int(ev.step), int(ev.total), ev.loss)

        identity = personalize(self.pipe, photos, hypernet=self._hypernet, progress=on_progress,
                               should_stop=should_stop, **kw)
        t0 = time.perf_counter()
        blob = identity.to_bytes()
        timings = dict(identity.timings)
        timings["serialize"] = time.perf_counter() - t0
        return Personalized(Loaded("hyperdreambooth", identity, True), blob, timings)

    def _train_method(self, photos: list, method: str, opts, progress, should_stop) -> Personalized:
        from hypernet.methods import get_method

        m = get_method(method)
        names = {"steps": opts.steps, "rank": opts.rank, "lr": opts.lr, "seed": opts.seed}
        known = getattr(m.config_cls, "__dataclass_fields__", {})
        config = m.config_cls(**{k: v for k, v in names.items() if v is not None and k in known})

        def on_progress(ev) -> None:
            progress(getattr(ev, "stage", method), int(ev.step), int(ev.total),
                     getattr(ev, "loss", None))

        from hypernet.adapters import wrappers_detached

        t0 = time.perf_counter()
        with wrappers_detached(self.pipe):  # peft needs plain layers; DreamBooth saves a plain UNet
            artifact = m.train(self.pipe, photos, token=opts.token, class_noun=opts.class_noun,
                               config=config, progress=on_progress, should_stop=should_stop)
        t1 = time.perf_counter()
        blob = _artifact_to_bytes(artifact, self.scratch_dir)
        timings = {"train": t1 - t0, "serialize": time.perf_counter() - t1}
        return Personalized(Loaded(method, artifact, False), blob, timings)

    # ------------------------------------------------------------------ identities
    def load_identity(self, blob: bytes, method: str) -> Loaded:
        """A stored blob back into a generate-ready personalisation (no pipeline needed)."""
        if method == "hyperdreambooth":
            from hypernet.identity import Identity

            return Loaded(method, Identity.from_bytes(blob), True)
        if method not in METHODS:
            raise InvalidInputError(f"stored identity method must be one of {sorted(METHODS)}, "
                                    f"got {method!r}")
        from hypernet.methods import load_artifact

        return Loaded(method, _artifact_from_bytes(blob, load_artifact, self.scratch_dir), False)

    def export(self, loaded: Loaded, fmt: str) -> tuple[bytes, str]:
        """An identity as a file other tools load, in `fmt` (one of its method's
        `export_formats`; "" = the method's default). Returns (the `.safetensors` bytes, fmt).

        Raises:
            FailedPrecondition: the method exports nothing (DreamBooth).
            InvalidInputError: `fmt` is not one its method allows.
        """
        allowed = METHODS[loaded.method].export_formats
        if not allowed:
            raise FailedPrecondition(
                f"a {loaded.method} identity cannot be exported: it is a whole pipeline, far over "
                f"the message size; use it through Generate")
        fmt = fmt or allowed[0]
        if fmt not in allowed:
            raise InvalidInputError(f"`format` must be one of {list(allowed)} for a "
                                    f"{loaded.method} identity, got {fmt!r}")
        obj = loaded.obj
        if loaded.method == "hyperdreambooth":
            return obj.export_lora(fmt.removeprefix("lora_")), fmt
        if loaded.method == "lidb":
            return obj.export_lora(fmt.removeprefix("lora_"), self._layer_shapes), fmt
        if loaded.method == "lora":
            return obj.export(fmt.removeprefix("lora_")), fmt
        return obj.export(), fmt  # textual inversion: its embedding file

    # ------------------------------------------------------------------ generate
    @staticmethod
    def batch_key(work: GenWork, loaded: Loaded | None) -> BatchKey:
        """(shape, layout) of a work: the library's `GenRequest.batch_key()` is (steps,
        guidance, height, width, spec, layers); the bare base (layout None) fits any layout;
        adapters without per-sample weights only batch with themselves."""
        plain = loaded is None or not loaded.batchable
        key = _gen_request(dataclasses.replace(work, identity=None) if plain else work).batch_key()
        shape = key[:4]
        if loaded is None:
            return shape, None
        if not loaded.batchable:
            return shape, ("solo", id(loaded.obj))
        return shape, key[4:]

    def generate(self, works: list[GenWork], should_stop: Callable[[], bool]) -> list:
        """Images for `works` (equal batch_key), one per work, in order: PIL RGB images.

        Raises:
            hypernet.errors.Cancelled: `should_stop()` turned True at a step boundary.
        """
        if all(w.identity is None or w.identity.batchable for w in works):
            from hypernet.batch_generate import generate_batch

            per_request = generate_batch(self.pipe, [_gen_request(w) for w in works],
                                         should_stop=should_stop)
            return [images[0] for images in per_request]
        from hypernet.adapters import wrappers_detached
        from hypernet.generate import generate

        with wrappers_detached(self.pipe):  # stock loaders (peft) need plain layers
            return self._generate_unbatched(works, should_stop, generate)

    def _generate_unbatched(self, works: list[GenWork], should_stop, generate) -> list:
        # Adapters without per-sample weights: one call per run of consecutive seeds of the same
        # prompt (image i of a call uses seed + i, so this equals one call per image).
        images: list = []
        i = 0
        while i < len(works):
            w, j = works[i], i + 1
            while (j < len(works) and works[j].identity is w.identity
                   and (works[j].prompt, works[j].negative_prompt) == (w.prompt, w.negative_prompt)
                   and works[j].seed == w.seed + (j - i)):
                j += 1
            if should_stop():
                raise Cancelled("generation was cancelled")
            images += generate(self.pipe, w.prompt, artifact=w.identity.obj if w.identity else None,
                               negative_prompt=w.negative_prompt, steps=w.steps,
                               guidance=w.guidance, seed=w.seed, height=w.height, width=w.width,
                               num_images=j - i)
            i = j
        return images


def _freeze(pipe) -> None:
    """Inference only: training loops unfreeze what they train, then restore this."""
    from serving.pipeline_guard import MODEL_COMPONENTS

    for name in MODEL_COMPONENTS:
        model = getattr(pipe, name, None)
        if model is not None:
            model.requires_grad_(False)


def _gen_request(w: GenWork):
    from hypernet.batch_generate import GenRequest

    return GenRequest(prompt=w.prompt, identity=w.identity.obj if w.identity is not None else None,
                      negative_prompt=w.negative_prompt, seed=w.seed, steps=w.steps,
                      guidance=w.guidance, height=w.height, width=w.width, num_images=1)


def _scratch(scratch_dir: Path | None) -> tempfile.TemporaryDirectory:
    """A private temp dir in `scratch_dir` (a dot name: stores never list it), else the system's."""
    if scratch_dir is not None:
        scratch_dir.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=".hdb-artifact-", suffix=".tmp", dir=scratch_dir)


def _artifact_to_bytes(artifact, scratch_dir: Path | None = None) -> bytes:
    """An Artifact as bytes: its `save` writes a file (or, DreamBooth, a folder: tarred).

    This writes model output (never the uploaded photo) to a private temp dir in `scratch_dir`.
    """
    with _scratch(scratch_dir) as d:
        path = Path(d) / "artifact.safetensors"
        artifact.save(path)
        if path.is_file():
            return path.read_bytes()
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(path, arcname="artifact")
        return buf.getvalue()


def _artifact_from_bytes(blob: bytes, load_artifact, scratch_dir: Path | None = None) -> Any:
    """Undo `_artifact_to_bytes` and load with the library's content-sniffing loader."""
    with _scratch(scratch_dir) as d:
        if blob[:8] and tarfile.is_tarfile(io.BytesIO(blob)):
            with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
                tar.extractall(d, filter="data")
            path = Path(d) / "artifact"
        else:
            path = Path(d) / "artifact.safetensors"
            path.write_bytes(blob)
        return load_artifact(path)

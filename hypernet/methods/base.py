"""What every personalisation method shares: the Artifact and Personaliser protocols, the
registry of methods, and `load_artifact`, which recognises any saved artifact by its content.

    from hypernet.methods import get_method, load_artifact
    artifact = get_method("lora").train(pipe, photos_dir, token="ohwx", class_noun="person")
    artifact.save("me.safetensors")
    art = load_artifact("me.safetensors")   # -> LoRAArtifact
    art.apply(pipe); ...; art.remove(pipe)  # base output restored exactly
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from hypernet.errors import InvalidInputError, ModelNotFoundError


@runtime_checkable
class Artifact(Protocol):
    """A trained personalisation: saved, loaded, applied to a pipeline and removed again.

    `remove(pipe)` must restore the pipeline's output bit-exactly (same seed -> same image as
    before `apply`).
    """

    kind: str

    def save(self, path: str | Path) -> int:
        """Write the artifact; returns its size in bytes."""
        ...

    @classmethod
    def load(cls, path: str | Path) -> Artifact: ...

    def apply(self, pipe) -> None: ...

    def remove(self, pipe) -> None: ...


class Personaliser(Protocol):
    """A method's entry point: photos in, artifact out."""

    def __call__(
        self,
        pipe,
        photos,
        token: str = "ohwx",
        class_noun: str = "person",
        config: Any = None,
        progress: Callable | None = None,
    ) -> Artifact: ...


@dataclass(frozen=True)
class Method:
    """A registered method: its name, config class, `train` function and artifact class."""

    name: str
    config_cls: type
    train: Personaliser
    artifact_cls: type

    @property
    def archs(self) -> tuple[str, ...]:
        """The base archs this method trains on (`METHOD_ARCHS`)."""
        return METHOD_ARCHS[self.name]


#: name -> module exporting METHOD (a `Method`); imported on first use (diffusers is slow to import).
_REGISTRY = {
    "dreambooth": "hypernet.methods.dreambooth",
    "textual-inversion": "hypernet.methods.textual_inversion",
    "lora": "hypernet.methods.lora",
    "lidb": "hypernet.methods.lidb",
}
METHOD_NAMES = tuple(_REGISTRY)

_ALL_ARCHS = ("sd15", "sdxl", "sd3", "flux")  # hypernet.base.arch.ARCHS (not imported: no torch here)
#: method -> the base archs (`hypernet.base.arch.pipeline_arch`) it trains on.
METHOD_ARCHS: dict[str, tuple[str, ...]] = {
    "dreambooth": ("sd15", "sdxl"),
    "textual-inversion": ("sd15", "sdxl"),
    "lora": _ALL_ARCHS,
    "lidb": _ALL_ARCHS,
}
#: Why a method is refused on the archs it lacks (the error says it).
_REFUSED_BECAUSE = {
    "dreambooth": "full DreamBooth of a 12B transformer is not a product here (a copy of every denoiser weight "
                  "per person); use lidb or lora",
    "textual-inversion": "their prompts go mostly through T5, which a CLIP token embedding does not reach; "
                         "use lidb or lora",
}


def methods_for(arch: str) -> tuple[str, ...]:
    """The methods that train on base `arch` ("sd15", "sdxl", "sd3", "flux"), in registry order.

    Raises:
        InvalidInputError: unknown arch.
    """
    if arch not in _ALL_ARCHS:
        raise InvalidInputError(f"`arch` must be one of {list(_ALL_ARCHS)}, got {arch!r}")
    return tuple(m for m in METHOD_NAMES if arch in METHOD_ARCHS[m])


def check_method_arch(name: str, pipe) -> str:
    """The pipeline's arch if method `name` trains on it.

    Raises:
        InvalidInputError: the method does not support that base, saying why.
    """
    from hypernet.base.arch import pipeline_arch

    arch = pipeline_arch(pipe)
    if arch not in METHOD_ARCHS[name]:
        raise InvalidInputError(
            f"`method` {name!r} must run on a {' or '.join(METHOD_ARCHS[name])} base, got a {arch} base: "
            f"{_REFUSED_BECAUSE[name]}"
        )
    return arch


def get_method(name: str) -> Method:
    """The method registered under `name` ("dreambooth", "textual-inversion", "lora", "lidb").

    Raises:
        InvalidInputError: unknown name.
    """
    key = name.replace("_", "-").lower()
    if key not in _REGISTRY:
        raise InvalidInputError(f"`method` must be one of {list(_REGISTRY)}, got {name!r}")
    return importlib.import_module(_REGISTRY[key]).METHOD


# ---------------------------------------------------------------------------- detection

HDB_META_FILE = "hdb_artifact.json"


def detect_kind(path: str | Path) -> str:
    """Which kind of artifact `path` holds, from its content (never its name).

    A directory with model_index.json -> "dreambooth"; a .safetensors whose metadata "format" is
    "hdb.lidb" -> "lidb", "hdb.identity" -> "identity"; tensors with LoRA keys (lora_A/lora_B,
    lora_down/lora_up, lora.down/lora.up) -> "lora"; a file of one or a few embedding vectors
    (diffusers {token: (k, D)} or A1111 {"emb_params": ...}) -> "textual-inversion".

    Raises:
        ModelNotFoundError: no such path. InvalidInputError: none of the above.
    """
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"`identity` must be an existing artifact file or directory, got {str(p)!r}")
    if p.is_dir():
        if (p / "model_index.json").is_file():
            return "dreambooth"
        raise InvalidInputError(
            f"`identity` must be a diffusers pipeline directory (with model_index.json) or a "
            f".safetensors file, got the directory {str(p)!r}"
        )
    meta, shapes = _safetensors_header(p)
    fmt = meta.get("format", "")
    if fmt == "hdb.lidb":
        return "lidb"
    if fmt == "hdb.identity":
        return "identity"
    if any("lora" in k for k in shapes):
        return "lora"
    if shapes and len(shapes) <= 2 and all(len(s) in (1, 2) for s in shapes.values()):
        return "textual-inversion"
    raise InvalidInputError(
        f"`identity` must be a LiDB, identity, LoRA or textual-inversion file, got {str(p)!r} "
        f"(format {fmt!r}, {len(shapes)} tensors)"
    )


def load_artifact(path: str | Path) -> Artifact:
    """Load any artifact, detecting its kind (see `detect_kind`).

    Raises:
        ModelNotFoundError, InvalidInputError, IncompatibleAdapterError, EnvironmentProblem.
    """
    kind = detect_kind(path)
    if kind == "identity":
        from hypernet.identity import Identity  # torch + adapters: only for identity files

        return Identity.load(path)
    return get_method(kind).artifact_cls.load(path)


def _safetensors_header(p: Path) -> tuple[dict[str, str], dict[str, list[int]]]:
    """(metadata, {tensor name: shape}) from a safetensors header, without reading tensors."""
    try:
        with p.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100_000_000:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"`identity` must be a .safetensors file, got unreadable {str(p)!r} ({e})") from e
    if not isinstance(header, dict):
        raise InvalidInputError(f"`identity` must be a .safetensors file, got {str(p)!r}")
    meta = header.pop("__metadata__", None) or {}
    shapes = {k: v.get("shape", []) for k, v in header.items() if isinstance(v, dict)}
    return dict(meta), shapes

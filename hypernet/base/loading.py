"""Loading bases strictly offline, from a diffusers dir or one file: SD 1.x/2.x, SDXL, SD3, FLUX.

The family comes from `model_index.json` (of the directory, or of `config_dir` for a single file),
never from the hub; `hypernet.base.arch.pipeline_arch(pipe)` tells it back from a loaded pipeline.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import threading
from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline

from hypernet.base.arch import Arch, arch_from_model_index, denoiser
from hypernet.device import resolve_device, resolve_dtype
from hypernet.errors import InvalidInputError, ModelNotFoundError

log = logging.getLogger(__name__)

# Never reach a hub: every load below also passes local_files_only=True.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

#: Serialises model loads in this process. diffusers builds each model under accelerate's
#: `init_empty_weights`, which swaps `torch.nn.Module.register_parameter` for the whole process,
#: not per thread. Two loads at once (the service loads its base in a background thread; tests
#: and the CLI load in the main one) can each restore the other's patch and leave it installed:
#: from then on every module built anywhere in the process gets meta-device parameters
#: ("Cannot copy out of meta tensor"). Every `from_pretrained` of a model holds this lock.
MODEL_LOAD_LOCK = threading.RLock()

_NO_SAFETY = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


#: This project's own diffusers components that a pipeline directory may name (the face world's
#: TAEF2 VAE). Diffusers only loads a class whose module is already imported; these are ours,
#: so importing them is safe, unlike arbitrary modules a downloaded model_index.json might name.
OWN_COMPONENT_MODULES = ("hypernet.base.taef2",)


def _read_model_index(path: Path) -> dict:
    try:
        return json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"`base` must hold a readable model_index.json, got {str(path)!r}: {e}") from e


def _import_own_components(index: dict) -> None:
    """Import the modules of `OWN_COMPONENT_MODULES` that a model_index.json names."""
    for entry in index.values():
        if isinstance(entry, list) and entry and entry[0] in OWN_COMPONENT_MODULES:
            importlib.import_module(entry[0])


def _pipeline_class(arch: Arch) -> tuple[type[DiffusionPipeline], dict]:
    """The stock diffusers pipeline class of `arch` and the keyword arguments it loads with."""
    from hypernet.base.arch import ARCH_PIPELINE_CLASS

    cls = getattr(diffusers, ARCH_PIPELINE_CLASS[arch])
    if arch == "sd15":
        return cls, dict(_NO_SAFETY)
    if arch == "sdxl":
        # The invisible watermark is an optional extra package; personalisation never wants it.
        return cls, {"add_watermarker": False}
    return cls, {}


def load_pipeline(
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    config_dir: str | Path | None = None,
) -> DiffusionPipeline:
    """Load a base from a local diffusers directory or `.safetensors` file, as its stock pipeline.

    The class follows `model_index.json`: `StableDiffusionPipeline` (SD 1.x/2.x),
    `StableDiffusionXLPipeline`, `StableDiffusion3Pipeline` or `FluxPipeline`.

    Args:
        path: a diffusers pipeline directory (with `model_index.json`) or a single-file
            `.safetensors` checkpoint in the original layout of its family.
        device: "cpu", "cuda", "cuda:1" ...; default CUDA when present, else CPU.
        dtype: "fp32", "fp16", "bf16" or a torch dtype; default half precision on CUDA, fp32 on CPU.
        config_dir: for a single file, a local diffusers directory holding the component configs
            and tokenizer of that architecture (required: nothing is fetched from a hub); its
            model_index.json also says which family the file is.

    Raises:
        ModelNotFoundError: `path` (or `config_dir`) does not exist or is not a model.
        InvalidInputError: a single file without `config_dir`, an unknown file type, or a
            pipeline of another family.
    """
    path = Path(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if not path.exists():
        raise ModelNotFoundError(
            f"`base` must be an existing diffusers directory or .safetensors file, got {str(path)!r} (no such path)"
        )
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"`base` must be a diffusers pipeline directory containing model_index.json, got {str(path)!r}"
            )
        index = _read_model_index(path)
        _import_own_components(index)
        cls, extra = _pipeline_class(arch_from_model_index(index, source=str(path / "model_index.json")))
        with MODEL_LOAD_LOCK:
            pipe = cls.from_pretrained(str(path), dtype=dt, local_files_only=True, **extra)
    elif path.suffix == ".safetensors":
        if config_dir is None or not Path(config_dir).is_dir():
            raise InvalidInputError(
                "`config_dir` must be a local diffusers directory with the architecture's configs "
                f"when loading the single file {str(path)!r}, got {config_dir!r}"
            )
        index = _read_model_index(Path(config_dir))
        cls, extra = _pipeline_class(arch_from_model_index(index, source=str(Path(config_dir) / "model_index.json")))
        with MODEL_LOAD_LOCK:
            pipe = cls.from_single_file(str(path), config=str(config_dir), dtype=dt, local_files_only=True,
                                        **extra)
    else:
        raise InvalidInputError(f"`base` must be a directory or a .safetensors file, got {str(path)!r}")
    pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    log.info("loaded base %s on %s (%s)", path, dev, str(dt).removeprefix("torch."))
    return pipe


def base_fingerprint(pipe) -> str:
    """A short stable id of the base model an adapter was trained on.

    Hashes the denoiser's (UNet's or transformer's) architecture config and a sample of its
    weights (first/last values of every attention projection), so it is cheap at SD scale yet
    differs between any two bases
    that differ in architecture or in weights of the layers adapters touch. Dtype-independent:
    values are hashed in fp32 after rounding to bf16 precision.
    """
    h = hashlib.sha256()
    net = denoiser(pipe)
    cfg = {k: v for k, v in dict(net.config).items() if not k.startswith("_")}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in _base_named_parameters(net):
        if "attn" not in name or not name.endswith("weight"):
            continue
        flat = p.detach().reshape(-1)
        sample = torch.cat([flat[:16], flat[-16:]]).to("cpu", torch.bfloat16).float()
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _base_named_parameters(module: torch.nn.Module):
    """Named parameters with adapter wrappers' names mapped back to the plain base names."""
    for name, p in module.named_parameters():
        if ".adapters." in name:
            continue
        yield name.replace(".base_layer.", "."), p

"""LoRA via peft on the denoiser's attention projections (optionally the text encoders').

The artifact is the file stock `pipe.load_lora_weights()` reads, with alpha = rank so no alpha
needs storing: on SD 1.x/SDXL diffusers-format keys ("unet.<module>.lora.down.weight" /
".lora.up.weight", "text_encoder.<module>...", SDXL's "text_encoder_2.<module>..."); on SD3/FLUX
the peft keys the diffusers SD3/FLUX scripts save ("transformer.<module>.lora_A.weight" /
".lora_B.weight", joint-attention context projections included).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save

from hypernet.base import base_fingerprint
from hypernet.errors import IncompatibleAdapterError, InvalidInputError
from hypernet.files import atomic_write_bytes, read_safetensors
from hypernet.methods._common import TrainCall, personaliser, remove_peft_adapter
from hypernet.methods.lora.config import TEXT_TARGETS, TRANSFORMER_TARGETS, UNET_TARGETS, LoRAMethodConfig
from hypernet.training import build_train_data

KIND = "lora"
_TRAIN_ADAPTER = "hdb_train"


def _components(pipe, text: bool) -> list[tuple[str, torch.nn.Module, tuple[str, ...]]]:
    """(file prefix, model, peft targets) of what trains: the denoiser, plus the CLIP text
    encoder(s) when `text` (both on SDXL)."""
    from hypernet.base.arch import denoiser, pipeline_arch

    arch = pipeline_arch(pipe)
    if arch in ("sd3", "flux"):
        if text:
            raise InvalidInputError(f"`train_text_encoder` must be False on a {arch} base (its LoRA is the "
                                    "transformer's), got True")
        return [("transformer", denoiser(pipe), TRANSFORMER_TARGETS)]
    comps = [("unet", pipe.unet, UNET_TARGETS)]
    if text:
        comps.append(("text_encoder", pipe.text_encoder, TEXT_TARGETS))
        if arch == "sdxl":
            comps.append(("text_encoder_2", pipe.text_encoder_2, TEXT_TARGETS))
    return comps


def _attach(pipe, config: LoRAMethodConfig) -> list[torch.nn.Parameter]:
    """Add a fresh, seeded peft LoRA to the denoiser (and text encoders); return its parameters."""
    params = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed)
        for _, model, targets in _components(pipe, config.train_text_encoder):
            lc = LoraConfig(
                r=config.rank, lora_alpha=config.rank, init_lora_weights="gaussian", target_modules=list(targets)
            )
            model.add_adapter(lc, adapter_name=_TRAIN_ADAPTER)
            params += [p for n, p in model.named_parameters() if "lora_" in n and _TRAIN_ADAPTER in n]
    return params


def _export(pipe, train_text_encoder: bool) -> dict[str, torch.Tensor]:
    """The trained adapter as the tensors stock `load_lora_weights` reads, prefixed per component."""
    out = {}
    for prefix, model, _ in _components(pipe, train_text_encoder):
        sd = get_peft_model_state_dict(model, adapter_name=_TRAIN_ADAPTER)
        if prefix != "transformer":  # SD3/FLUX loaders read peft keys, as their training scripts save
            sd = convert_state_dict_to_diffusers(sd)
        out.update({f"{prefix}.{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()})
    return out


def _remove_all(pipe, name: str) -> None:
    """Drop adapter `name` from the denoiser and every text encoder (absent ones are skipped)."""
    from hypernet.base.arch import denoiser

    for model in (denoiser(pipe), *(getattr(pipe, a, None) for a in ("text_encoder", "text_encoder_2"))):
        if model is not None:
            remove_peft_adapter(model, name)


def _fit(pipe, call: TrainCall, config: LoRAMethodConfig) -> LoRAArtifact:
    """Train a LoRA on photos of one person; the pipeline is left as it was."""
    _components(pipe, config.train_text_encoder)  # refuses a text-encoder LoRA on SD3/FLUX up front
    pixels = call.pixels(pipe)  # (N, 3, R, R)
    prompt = call.prompt(config.prompt)
    data = build_train_data(pipe, pixels, prompt, flip=config.train.flip, keep_ids=config.train_text_encoder)
    try:
        params = _attach(pipe, config)
        result = call.fit(pipe, params, data, config.train, text_encoder_trains=config.train_text_encoder, stage="lora")
        tensors = _export(pipe, config.train_text_encoder)
    finally:
        _remove_all(pipe, _TRAIN_ADAPTER)
    meta = call.metadata(
        KIND, prompt, result.losses[-1], config, hdb_rank=str(config.rank), hdb_base_fingerprint=base_fingerprint(pipe)
    )
    return LoRAArtifact(tensors, meta)


train = personaliser(LoRAMethodConfig, _fit, KIND)


class LoRAArtifact:
    """diffusers-format LoRA tensors + metadata; applied through stock `load_lora_weights`."""

    kind = KIND

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
        self.tensors = tensors
        self.metadata = dict(metadata or {})
        self._applied: dict[int, str] = {}

    @property
    def token(self) -> str | None:
        return self.metadata.get("hdb_token")

    def save(self, path: str | Path) -> int:
        data = save(self.tensors, metadata={"format": "pt", **self.metadata})
        atomic_write_bytes(path, data)
        return len(data)

    def export(self, fmt: str) -> bytes:
        """The LoRA as safetensors bytes: "diffusers" (the file itself, what
        `load_lora_weights` reads) or "kohya" ("lora_unet_<path>.lora_down.weight", ".alpha").

        Raises:
            InvalidInputError: an unknown `fmt`.
        """
        if fmt == "diffusers":
            return save(self.tensors, metadata={"format": "pt", **self.metadata})
        if fmt != "kohya":
            raise InvalidInputError(f"`fmt` must be 'diffusers' or 'kohya', got {fmt!r}")
        comps = {k.partition(".")[0] for k in self.tensors}
        if "transformer" in comps:
            raise InvalidInputError("`fmt` must be 'diffusers' for an SD3/FLUX LoRA (kohya names UNet layers), "
                                    "got 'kohya'")
        prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
        if "text_encoder_2" in comps:  # SDXL: kohya numbers the two CLIPs
            prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
        out: dict[str, torch.Tensor] = {}
        for key, value in self.tensors.items():
            comp, _, rest = key.partition(".")
            for ours, theirs in ((".lora.down.weight", ".lora_down.weight"),
                                 (".lora.up.weight", ".lora_up.weight"),
                                 (".lora_A.weight", ".lora_down.weight"),
                                 (".lora_B.weight", ".lora_up.weight")):
                if rest.endswith(ours) and comp in prefixes:
                    name = prefixes[comp] + rest[: -len(ours)].replace(".", "_")
                    out[name + theirs] = value.contiguous()
                    if theirs == ".lora_down.weight":  # alpha = rank: scale 1, as trained
                        out[name + ".alpha"] = torch.tensor(float(value.shape[0]))
                    break
            else:
                raise InvalidInputError(f"LoRA tensor names must be diffusers LoRA keys, got {key!r}")
        return save(out, metadata={"format": "pt", **self.metadata})

    @classmethod
    def load(cls, path: str | Path) -> LoRAArtifact:
        path = Path(path)
        tensors, meta = read_safetensors(path, "a LoRA .safetensors file")
        if not any("lora" in k for k in tensors):
            raise InvalidInputError(f"{path} must hold LoRA tensors (lora_A/lora_B or lora.down/up), got none")
        return cls(tensors, meta)

    def apply(self, pipe) -> None:
        """Load through the stock diffusers loader under a unique adapter name."""
        if id(pipe) in self._applied:
            raise InvalidInputError("artifact must not be applied twice to the same pipeline, got a second apply")
        name = f"hdb_lora_{id(self):x}"
        try:
            with _quiet_diffusers():  # it warns when a LoRA has no text-encoder part
                pipe.load_lora_weights({k: v.clone() for k, v in self.tensors.items()}, adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as e:
            _remove_all(pipe, name)
            raise IncompatibleAdapterError(f"LoRA must match the base's layers and widths, got: {e}") from e
        self._applied[id(pipe)] = name

    def remove(self, pipe) -> None:
        name = self._applied.pop(id(pipe), None)
        if name is not None:
            _remove_all(pipe, name)


@contextlib.contextmanager
def _quiet_diffusers():
    from diffusers.utils import logging as dlog

    before = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(before)

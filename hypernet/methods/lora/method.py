"""LoRA via peft on the UNet attention projections (optionally the text encoder's).

The artifact is the file stock `pipe.load_lora_weights()` reads: diffusers-format keys
("unet.<module>.lora.down.weight" / ".lora.up.weight", "text_encoder.<module>....") in a
.safetensors file, with alpha = rank so no alpha needs storing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save

from hypernet.base import base_fingerprint
from hypernet.errors import IncompatibleAdapterError, InvalidInputError
from hypernet.files import atomic_write_bytes
from hypernet.methods._common import TrainCall, personaliser, remove_peft_adapter
from hypernet.methods.lora.config import TEXT_TARGETS, UNET_TARGETS, LoRAMethodConfig
from hypernet.training import build_train_data

KIND = "lora"
_TRAIN_ADAPTER = "hdb_train"


def _attach(pipe, config: LoRAMethodConfig) -> list[torch.nn.Parameter]:
    """Add a fresh, seeded peft LoRA to the UNet (and text encoder); return its parameters."""
    models = [(pipe.unet, UNET_TARGETS)]
    if config.train_text_encoder:
        models.append((pipe.text_encoder, TEXT_TARGETS))
    params = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed)
        for model, targets in models:
            lc = LoraConfig(
                r=config.rank, lora_alpha=config.rank, init_lora_weights="gaussian", target_modules=list(targets)
            )
            model.add_adapter(lc, adapter_name=_TRAIN_ADAPTER)
            params += [p for n, p in model.named_parameters() if "lora_" in n and _TRAIN_ADAPTER in n]
    return params


def _export(pipe, train_text_encoder: bool) -> dict[str, torch.Tensor]:
    """The trained adapter as diffusers-format tensors, prefixed per component."""
    out = {}
    comps = [("unet", pipe.unet)] + ([("text_encoder", pipe.text_encoder)] if train_text_encoder else [])
    for prefix, model in comps:
        sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name=_TRAIN_ADAPTER))
        out.update({f"{prefix}.{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()})
    return out


def _fit(pipe, call: TrainCall, config: LoRAMethodConfig) -> LoRAArtifact:
    """Train a LoRA on photos of one person; the pipeline is left as it was."""
    pixels = call.pixels(pipe)  # (N, 3, R, R)
    prompt = call.prompt(config.prompt)
    data = build_train_data(pipe, pixels, prompt, flip=config.train.flip, keep_ids=config.train_text_encoder)
    try:
        params = _attach(pipe, config)
        result = call.fit(pipe, params, data, config.train, text_encoder_trains=config.train_text_encoder, stage="lora")
        tensors = _export(pipe, config.train_text_encoder)
    finally:
        remove_peft_adapter(pipe.unet, _TRAIN_ADAPTER)
        remove_peft_adapter(pipe.text_encoder, _TRAIN_ADAPTER)
    meta = call.metadata(
        KIND, prompt, result.losses[-1], config, hdb_rank=str(config.rank), hdb_base_fingerprint=base_fingerprint(pipe)
    )
    return LoRAArtifact(tensors, meta)


train = personaliser(LoRAMethodConfig, _fit)


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
        prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
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
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                meta = dict(f.metadata() or {})
        except Exception as e:  # safetensors raises its own error types
            raise InvalidInputError(f"{path} must be a LoRA .safetensors file, got unreadable data ({e})") from e
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
            remove_peft_adapter(pipe.unet, name)
            remove_peft_adapter(pipe.text_encoder, name)
            raise IncompatibleAdapterError(f"LoRA must match the base's layers and widths, got: {e}") from e
        self._applied[id(pipe)] = name

    def remove(self, pipe) -> None:
        name = self._applied.pop(id(pipe), None)
        if name is not None:
            remove_peft_adapter(pipe.unet, name)
            remove_peft_adapter(pipe.text_encoder, name)


@contextlib.contextmanager
def _quiet_diffusers():
    from diffusers.utils import logging as dlog

    before = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(before)

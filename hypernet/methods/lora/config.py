"""LoRA (peft) settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypernet.errors import InvalidInputError
from hypernet.methods.config import MethodConfig
from hypernet.training import TrainConfig

#: The UNet attention projections (attn1/attn2 q, k, v, out) - diffusers' DreamBooth-LoRA default.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: SD3/FLUX transformer attention: image-stream q, k, v, out and the joint-attention context
#: projections (diffusers' SD3/FLUX DreamBooth-LoRA attention targets; FLUX's single-stream blocks
#: match by their to_q/to_k/to_v).
TRANSFORMER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
#: The CLIP text encoder's attention projections.
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _default_train() -> TrainConfig:
    # diffusers' train_dreambooth_lora example: lr 1e-4, 500 steps, constant schedule.
    return TrainConfig(steps=500, lr=1e-4)


@dataclass
class LoRAMethodConfig(MethodConfig):
    rank: int = field(default=4, metadata={"help": "LoRA rank (alpha = rank, so the scale is 1)"})
    train_text_encoder: bool = field(default=False, metadata={
        "help": "also LoRA the text encoder (both CLIPs on SDXL; refused on SD3/FLUX)"})
    prompt: str = field(default="a photo of {token} {class_noun}", metadata={"help": "training prompt"})
    init_seed: int = field(default=0, metadata={"help": "seed of the LoRA A matrices' init"})
    train: TrainConfig = field(default_factory=_default_train, metadata={"help": "optimisation"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise InvalidInputError(f"`rank` must be a positive integer, got {self.rank!r}")

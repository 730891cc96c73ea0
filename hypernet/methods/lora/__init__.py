"""LoRA via peft: the standard low-rank fine-tune, saved for stock `load_lora_weights`."""

from hypernet.methods.base import Method
from hypernet.methods.lora.config import LoRAMethodConfig
from hypernet.methods.lora.method import LoRAArtifact, train

METHOD = Method("lora", LoRAMethodConfig, train, LoRAArtifact)

__all__ = ["METHOD", "LoRAArtifact", "LoRAMethodConfig", "train"]

"""`HypernetConfig`: the architecture of the hypernetwork, and the LiDB geometry it predicts.

Everything needed to rebuild the module from scratch (the exported `.safetensors` carries this
as JSON in its metadata, so loading needs no other file).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from hypernet.errors import InvalidInputError


@dataclass
class HypernetConfig:
    """Image encoder + refinement decoder -> packed LiDB weights (N, L, r, a) / (N, L, b, r).

    Defaults are the tiny CPU model (a ViT-tiny trunk cut to 4 blocks at 64 px, patch 8 -> 64
    tokens): small enough to train in minutes on 2 cores. The paper's scale is a ViT-H encoder;
    see pretrain/configs/sd15-gpu.yaml.
    """

    num_layers: int = field(default=16, metadata={"help": "L: adapted layers (LiDB layers of the base)"})
    a: int = field(default=32, metadata={"help": "LiDB a (rows of A_aux) of the target spec"})
    b: int = field(default=32, metadata={"help": "LiDB b (columns of B_aux) of the target spec"})
    r: int = field(default=1, metadata={"help": "LiDB rank r of the target spec"})
    encoder: str = field(
        default="vit_tiny_patch16_224",
        metadata={"help": "timm model name of the image encoder (built with pretrained=False)"},
    )
    encoder_weights: str | None = field(
        default=None,
        metadata={"help": "local .safetensors/.pth of the encoder's weights; None = random init "
                          "(nothing is ever fetched from a hub)"},
    )
    encoder_kwargs: dict[str, Any] = field(
        default_factory=lambda: {"patch_size": 8, "depth": 4},
        metadata={"help": "extra timm.create_model kwargs (e.g. depth, patch_size) - must match "
                          "encoder_weights when those are given"},
    )
    image_size: int = field(default=64, metadata={"help": "encoder input side; inputs are resized to it"})
    freeze_encoder: bool = field(default=False, metadata={"help": "keep the encoder's weights fixed"})
    dim: int = field(default=128, metadata={"help": "decoder width"})
    depth: int = field(default=2, metadata={"help": "decoder transformer blocks"})
    heads: int = field(default=4, metadata={"help": "decoder attention heads (must divide dim)"})
    mlp_ratio: float = field(default=2.0, metadata={"help": "decoder MLP hidden width / dim"})
    iterations: int = field(
        default=4,
        metadata={"help": "s: refinement steps theta_k = theta_{k-1} + T(f, theta_{k-1}) "
                          "(4 in community code; the paper's ablation shows 1 is worse)"},
    )
    head_init_std: float = field(
        default=1e-3, metadata={"help": "std of the output heads' init (near zero: start at ~no adapter)"}
    )

    def __post_init__(self) -> None:
        for k in ("num_layers", "a", "b", "r", "image_size", "dim", "depth", "heads", "iterations"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidInputError(f"`{k}` must be a positive integer, got {v!r}")
        if self.dim % self.heads:
            raise InvalidInputError(f"`dim` must be divisible by `heads` ({self.heads}), got {self.dim}")
        if not self.encoder or not isinstance(self.encoder, str):
            raise InvalidInputError(f"`encoder` must be a timm model name, got {self.encoder!r}")
        if not isinstance(self.encoder_kwargs, dict):
            raise InvalidInputError(f"`encoder_kwargs` must be a mapping, got {self.encoder_kwargs!r}")
        if not self.mlp_ratio > 0:
            raise InvalidInputError(f"`mlp_ratio` must be > 0, got {self.mlp_ratio!r}")
        if not self.head_init_std >= 0:
            raise InvalidInputError(f"`head_init_std` must be >= 0, got {self.head_init_std!r}")

    @property
    def params_per_layer(self) -> int:
        """P = r*a + b*r: one layer's (A_train, B_train) flattened."""
        return self.r * self.a + self.b * self.r

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HypernetConfig:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(f"hypernetwork config must only have known keys, got unknown {unknown}")
        return cls(**data)


__all__ = ["HypernetConfig"]

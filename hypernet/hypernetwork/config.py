"""`HypernetConfig`: the architecture of the hypernetwork, and the LiDB geometry it predicts.

Everything needed to rebuild the module from scratch (the exported `.safetensors` carries this
as JSON in its metadata, so loading needs no other file).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from hypernet.errors import InvalidInputError

#: What the decoder is conditioned on (see `HypernetConfig.condition`).
CONDITIONS = ("pixels", "identity", "both")
Condition = Literal["pixels", "identity", "both"]
#: Face encoders the identity condition can name (hypernet.face_encoder).
FACE_ENCODERS = ("mobilefacenet_faceplugin_112",)


@dataclass
class HypernetConfig:
    """Image encoder + refinement decoder -> packed LiDB weights (N, L, r, a) / (N, L, b, r).

    The decoder's condition tokens are the timm ViT's pixel tokens ("pixels", the default and what
    every hypernetwork exported before this field existed used), `identity_tokens` tokens
    projected from a frozen pretrained face encoder's 512-d identity embedding ("identity"), or
    both, concatenated ("both"). The face encoder conditions only: it must never be the network
    that scores the result (`hdb eval` uses dlib/FaceNet).

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
    condition: Condition = field(
        default="pixels",
        metadata={"help": "decoder condition: 'pixels' (timm ViT tokens of the photo), 'identity' "
                          "(frozen face encoder's embedding -> identity_tokens tokens) or 'both'"},
    )
    identity_tokens: int = field(
        default=4, metadata={"help": "k: decoder tokens the identity embedding is projected to"}
    )
    face_encoder: str = field(
        default="mobilefacenet_faceplugin_112",
        metadata={"help": f"frozen face encoder of the identity condition, one of {FACE_ENCODERS} "
                          "(hypernet.face_encoder; 112x112 ArcFace-aligned faces -> 512-d)"},
    )
    identity_dim: int = field(default=512, metadata={"help": "size of the face encoder's embedding"})
    head_init_std: float = field(
        default=1e-3, metadata={"help": "std of the output heads' init (near zero: start at ~no adapter)"}
    )

    def __post_init__(self) -> None:
        for k in ("num_layers", "a", "b", "r", "image_size", "dim", "depth", "heads", "iterations",
                  "identity_tokens", "identity_dim"):
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
        if self.condition not in CONDITIONS:
            raise InvalidInputError(f"`condition` must be one of {CONDITIONS}, got {self.condition!r}")
        if self.face_encoder not in FACE_ENCODERS:
            raise InvalidInputError(f"`face_encoder` must be one of {FACE_ENCODERS}, got {self.face_encoder!r}")
        if not self.head_init_std >= 0:
            raise InvalidInputError(f"`head_init_std` must be >= 0, got {self.head_init_std!r}")

    @property
    def uses_pixels(self) -> bool:
        """Does the decoder see the timm ViT's pixel tokens?"""
        return self.condition in ("pixels", "both")

    @property
    def uses_identity(self) -> bool:
        """Does the decoder see the face encoder's identity tokens?"""
        return self.condition in ("identity", "both")

    @property
    def params_per_layer(self) -> int:
        """P = r*a + b*r: one layer's (A_train, B_train) flattened."""
        return self.r * self.a + self.b * self.r

    @property
    def output_size(self) -> int:
        """Values predicted per identity, L * P: exactly a trained LiDB's A_train + B_train."""
        return self.num_layers * self.params_per_layer

    def for_lidb(self, num_layers: int, a: int, b: int, r: int) -> HypernetConfig:
        """This architecture with output heads sized for a LiDB of `num_layers` layers x (r, a, b).

        The heads are never configured by hand: they follow the base's LiDB spec
        (`hypernet.hypernetwork.heads.sized_for_base`), so the hypernetwork outputs exactly the
        weights a trained LiDB of that base saves.
        """
        return replace(self, num_layers=num_layers, a=a, b=b, r=r)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HypernetConfig:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(f"hypernetwork config must only have known keys, got unknown {unknown}")
        # Files written before `condition` existed lack the new keys: the defaults are their model.
        return cls(**data)


__all__ = ["CONDITIONS", "FACE_ENCODERS", "HypernetConfig"]

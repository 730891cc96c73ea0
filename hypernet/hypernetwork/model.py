"""The hypernetwork H(photo) -> LiDB weights of every adapted layer (paper section 3.2).

    pixels (N, 3, H, W) in [-1, 1]                         identity (N, 512) unit embedding of the
      -> timm ViT (by name; local weights or random init)    aligned face (frozen face encoder,
      -> linear projection -> pixel tokens (N, T, d)          hypernet.face_encoder; cached offline)
                                                             -> linear -> identity tokens (N, k, d)
      f = pixel tokens | identity tokens | both, by `cfg.condition`            (N, T', d)
      theta_0 = 0
      for k in 1..s:                     theta_k = theta_{k-1} + T(f, theta_{k-1})
          layer tokens = pos_l + embed(theta_{k-1}[l])                  (N, L, d)
          transformer over [f ; layer tokens] -> per-layer linear heads -> delta (N, L, P)
      -> {"A_train": (N, L, r, a), "B_train": (N, L, b, r)}   the packed LiDB weight format

The same decoder T runs every iteration (weights shared), as in the paper; the heads start near
zero, so an untrained hypernetwork predicts almost no adapter. The face encoder is not part of this
module: training reads its embeddings from a cache (the encoder never runs per step), and the
runtime / ONNX export put it in front (`hypernet.hypernetwork.export`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from hypernet.errors import InvalidInputError, ModelNotFoundError
from hypernet.hypernetwork.config import HypernetConfig

log = logging.getLogger(__name__)


def build_encoder(cfg: HypernetConfig) -> nn.Module:
    """A timm model by name with no classifier head; weights from a local file or random.

    Raises:
        InvalidInputError: unknown timm name or kwargs it rejects.
        ModelNotFoundError: `encoder_weights` given but not a file.
    """
    kwargs = dict(cfg.encoder_kwargs)
    kwargs.setdefault("img_size", cfg.image_size)
    try:
        enc = timm.create_model(cfg.encoder, pretrained=False, num_classes=0, **kwargs)
    except (RuntimeError, TypeError, ValueError) as e:  # timm: RuntimeError for unknown names
        raise InvalidInputError(f"`encoder` must be a timm model name accepting {kwargs}, got "
                                f"{cfg.encoder!r} ({e})") from e
    if cfg.encoder_weights:
        _load_encoder_weights(enc, Path(cfg.encoder_weights))
    return enc


def _load_encoder_weights(enc: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ModelNotFoundError(f"`encoder_weights` must be an existing local file, got {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    # Classifier weights do not belong to a num_classes=0 trunk: drop them, keep everything else strict.
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc.", "classifier."))}
    missing, unexpected = enc.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InvalidInputError(
            f"`encoder_weights` must match the encoder architecture, got {len(missing)} missing "
            f"(e.g. {missing[:3]}) and {len(unexpected)} unexpected (e.g. {unexpected[:3]}) keys"
        )
    log.info("loaded encoder weights from %s", path)


class HyperNetwork(nn.Module):
    """Photo -> packed LiDB weights; see the module docstring for the architecture."""

    def __init__(self, cfg: HypernetConfig):
        super().__init__()
        self.cfg = cfg
        L, P, d = cfg.num_layers, cfg.params_per_layer, cfg.dim
        # Parameter names of the "pixels" model are unchanged, so old exports load strictly.
        self.encoder: nn.Module | None = None
        if cfg.uses_pixels:
            self.encoder = build_encoder(cfg)
            if cfg.freeze_encoder:
                self.encoder.requires_grad_(False)
            pcfg = getattr(self.encoder, "pretrained_cfg", None) or {}
            mean = torch.tensor(pcfg.get("mean", (0.5, 0.5, 0.5)), dtype=torch.float32)
            std = torch.tensor(pcfg.get("std", (0.5, 0.5, 0.5)), dtype=torch.float32)
            self.register_buffer("pixel_mean", mean.view(1, 3, 1, 1), persistent=False)
            self.register_buffer("pixel_std", std.view(1, 3, 1, 1), persistent=False)
            self.proj = nn.Linear(self.encoder.num_features, d)
        if cfg.uses_identity:
            # The embedding has unit norm; the projection sees it scaled to unit-variance entries.
            self.identity_proj = nn.Linear(cfg.identity_dim, cfg.identity_tokens * d)
            self.identity_pos = nn.Parameter(torch.randn(cfg.identity_tokens, d) * 0.02)  # (k, d)
        # Layer tokens start from a learned positional code; theta_{k-1} is added through embed.
        self.layer_pos = nn.Parameter(torch.randn(L, d) * 0.02)  # (L, d)
        self.theta_embed = nn.Linear(P, d)
        self.blocks = nn.ModuleList(
            Block(d, cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(d)
        # One linear head per layer, as a batched weight: (L, d, P) and bias (L, P).
        self.head_weight = nn.Parameter(torch.randn(L, d, P) * cfg.head_init_std)
        self.head_bias = nn.Parameter(torch.zeros(L, P))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, 3, H, W) in [-1, 1] -> image tokens (N, T, d)."""
        if self.encoder is None:
            raise InvalidInputError(f"`encode` needs a pixel condition, got condition {self.cfg.condition!r}")
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise InvalidInputError(f"`pixels` must have shape (N, 3, H, W), got {tuple(pixels.shape)}")
        s = self.cfg.image_size
        if pixels.shape[-2:] != (s, s):
            pixels = F.interpolate(pixels, size=(s, s), mode="bilinear", align_corners=False)
        x = ((pixels + 1) * 0.5 - self.pixel_mean) / self.pixel_std  # [-1,1] -> encoder's normalisation
        f = self.encoder.forward_features(x)  # (N, T, D_enc)
        return self.proj(f)  # (N, T, d)

    def encode_identity(self, identity: torch.Tensor) -> torch.Tensor:
        """identity (N, D_id) unit embeddings -> identity tokens (N, k, d)."""
        cfg = self.cfg
        if identity.dim() != 2 or identity.shape[1] != cfg.identity_dim:
            raise InvalidInputError(
                f"`identity` must have shape (N, {cfg.identity_dim}), got {tuple(identity.shape)}"
            )
        x = self.identity_proj(identity * cfg.identity_dim**0.5)  # (N, k * d)
        return x.view(x.shape[0], cfg.identity_tokens, cfg.dim) + self.identity_pos  # (N, k, d)

    def condition_tokens(self, pixels: torch.Tensor | None, identity: torch.Tensor | None) -> torch.Tensor:
        """The decoder's condition f (N, T', d) for `cfg.condition`.

        Raises:
            InvalidInputError: an input the condition needs is missing.
        """
        cfg = self.cfg
        parts = []
        if cfg.uses_pixels:
            if pixels is None:
                raise InvalidInputError(f"`pixels` must be given for condition {cfg.condition!r}, got None")
            parts.append(self.encode(pixels))  # (N, T, d)
        if cfg.uses_identity:
            if identity is None:
                raise InvalidInputError(
                    f"`identity` (face-encoder embeddings) must be given for condition {cfg.condition!r}, got None"
                )
            parts.append(self.encode_identity(identity))  # (N, k, d)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (N, T + k, d)

    def refine(self, f: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """T(f, theta): one decoder pass giving the update (N, L, P) of the estimate (N, L, P)."""
        n_img = f.shape[1]
        tokens = self.layer_pos + self.theta_embed(theta)  # (N, L, d)
        x = torch.cat([f, tokens], dim=1)  # (N, T + L, d)
        for blk in self.blocks:
            x = blk(x)
        y = self.norm(x[:, n_img:])  # (N, L, d)
        return torch.einsum("nld,ldp->nlp", y, self.head_weight) + self.head_bias  # (N, L, P)

    def forward(self, pixels: torch.Tensor | None, identity: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """pixels (N, 3, H, W) in [-1, 1] and/or identity (N, D_id) (by `cfg.condition`; the other
        may be None) -> {"A_train": (N, L, r, a), "B_train": (N, L, b, r)}."""
        return self.decode(self.condition_tokens(pixels, identity))

    def decode(self, f: torch.Tensor) -> dict[str, torch.Tensor]:
        """Condition tokens f (N, T', d) -> packed LiDB weights: the s refinement iterations from
        theta_0 = 0. Separate from `condition_tokens` so that the tokens of several photos can be
        averaged before decoding.
        """
        cfg = self.cfg
        theta = f.new_zeros(f.shape[0], cfg.num_layers, cfg.params_per_layer)  # theta_0 = 0
        for _ in range(cfg.iterations):
            theta = theta + self.refine(f, theta)
        return unpack_theta(theta, cfg)


@torch.no_grad()
def make_constant(model: HyperNetwork, weights: dict[str, torch.Tensor]) -> HyperNetwork:
    """Make `model` ignore its input and predict `weights` ({"A_train": (L, r, a), "B_train":
    (L, b, r)}) for every photo; returns `model`.

    The heads' weights are zeroed and their bias set to weights / iterations, so every refinement
    adds the same step and the s steps sum to `weights`. Why: "one adapter for everyone" (the
    training mean of the stage-1 targets) is the control a trained hypernetwork has to beat, and in
    this form it is a hypernetwork file like any other, so it runs through the same runtime, ONNX
    export, `hdb personalize`, service and evaluation as the real one.

    Raises:
        InvalidInputError: `weights` do not have the model's (L, r, a) / (L, b, r) shapes.
    """
    cfg = model.cfg
    want = {"A_train": (cfg.num_layers, cfg.r, cfg.a), "B_train": (cfg.num_layers, cfg.b, cfg.r)}
    got = {k: tuple(weights[k].shape) if k in weights else None for k in want}
    if got != want:
        raise InvalidInputError(f"`weights` must have shapes {want}, got {got}")
    theta = pack_theta({k: v[None].float() for k, v in weights.items()})[0]  # (L, P)
    model.head_weight.zero_()
    model.head_bias.copy_(theta / cfg.iterations)
    return model


def unpack_theta(theta: torch.Tensor, cfg: HypernetConfig) -> dict[str, torch.Tensor]:
    """(N, L, P) -> packed LiDB weights; inverse of `pack_theta`."""
    n, L = theta.shape[0], cfg.num_layers
    ra = cfg.r * cfg.a
    A = theta[..., :ra].reshape(n, L, cfg.r, cfg.a)  # (N, L, r, a)
    B = theta[..., ra:].reshape(n, L, cfg.b, cfg.r)  # (N, L, b, r)
    return {"A_train": A, "B_train": B}


def pack_theta(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """Packed LiDB weights (N, L, r, a)/(N, L, b, r) -> (N, L, P), the flat per-layer vector."""
    A, B = weights["A_train"], weights["B_train"]
    n, L = A.shape[:2]
    return torch.cat([A.reshape(n, L, -1), B.reshape(n, L, -1)], dim=-1)  # (N, L, r*a + b*r)


__all__ = ["HyperNetwork", "build_encoder", "make_constant", "pack_theta", "unpack_theta"]

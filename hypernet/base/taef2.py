"""TAEF2: a tiny pretrained image autoencoder, wrapped as a diffusers VAE.

Written from ../shared/data/models/taef2/ARCHITECTURE.md (the public `madebyollin/taesd`
design): two plain `nn.Sequential`s of 1.34M parameters each that map RGB at full resolution to a
32-channel latent at 1/8 resolution and back. It is the only real pretrained image autoencoder
available offline, so the face world (a small latent-diffusion model trained here) lives in its
latent space.

`TAEF2` has the interface diffusers pipelines expect of a VAE (`encode(x).latent_dist`,
`decode(z).sample`, `config.scaling_factor`, four `block_out_channels` so `vae_scale_factor` is
8, `save_pretrained`/`from_pretrained`), so `StableDiffusionPipeline` runs on it unchanged.

Loading a pipeline directory whose `model_index.json` names `["hypernet.base.taef2", "TAEF2"]`
requires this module to be imported first: diffusers 0.42 resolves a component library outside
its own list only from `sys.modules`, never by importing it (`_get_library_or_raise`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin  # ModelMixin must be an attribute here: see below
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from torch import nn

from hypernet.errors import InvalidInputError, ModelNotFoundError

__all__ = ["TAEF2", "TAEF2_LATENT_CHANNELS", "TAEF2_SCALING_FACTOR", "load_taef2"]

#: Channels of the TAEF2 latent.
TAEF2_LATENT_CHANNELS = 32
#: 1 / std of raw TAEF2 latents of the Caltech face photos at 128 px (measured: std 0.995,
#: mean 0.017), so latents already have ~unit std as the noise schedule assumes.
TAEF2_SCALING_FACTOR = 1.0
_WIDTH = 64


def _conv(n_in: int, n_out: int, **kw) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)


class _Clamp(nn.Module):
    """Soft clamp of decoder input latents to (-3, 3); parameter-free (index 0 of the decoder)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class _Block(nn.Module):
    """Residual block: ReLU(conv3(x) + skip(x)); "midblock" ones first add a pooled 1x1 branch."""

    def __init__(self, n_in: int, n_out: int, midblock: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool: nn.Sequential | None = None
        if midblock:
            n_gn = 4 * n_in
            self.pool = nn.Sequential(
                nn.Conv2d(n_in, n_gn, 1, bias=False),
                nn.GroupNorm(4, n_gn),
                nn.ReLU(),
                nn.Conv2d(n_gn, n_in, 1, bias=False),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def _encoder(latent_channels: int) -> nn.Sequential:
    """(B, 3, H, W) in [0, 1] -> (B, 32, H/8, W/8); indices match taef2_encoder.pth."""
    w = _WIDTH
    layers: list[nn.Module] = [_conv(3, w), _Block(w, w)]
    for level in range(3):
        layers.append(_conv(w, w, stride=2, bias=False))
        layers += [_Block(w, w, midblock=level == 2) for _ in range(3)]
    layers.append(_conv(w, latent_channels))
    return nn.Sequential(*layers)


def _decoder(latent_channels: int) -> nn.Sequential:
    """(B, 32, h, w) -> (B, 3, 8h, 8w), unclamped; indices match taef2_decoder.pth."""
    w = _WIDTH
    layers: list[nn.Module] = [_Clamp(), _conv(latent_channels, w), nn.ReLU()]
    layers += [_Block(w, w, midblock=True) for _ in range(3)]
    for n_blocks in (3, 3, 1):
        layers += [nn.Upsample(scale_factor=2), _conv(w, w, bias=False)]
        layers += [_Block(w, w) for _ in range(n_blocks)]
    layers.append(_conv(w, 3))
    return nn.Sequential(*layers)


class TAEF2(ModelMixin, ConfigMixin):
    """TAEF2 as a diffusers VAE: [-1, 1] images <-> raw 32-channel latents at 1/8 resolution.

    Like `AutoencoderKL`, `encode` returns unscaled latents and callers multiply by
    `config.scaling_factor`; `decode` takes unscaled latents. The posterior is deterministic
    (a TAE has no variance): `.sample()` and `.mode()` both return the mean.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_channels: int = TAEF2_LATENT_CHANNELS,
        block_out_channels: tuple[int, ...] = (_WIDTH,) * 4,
        scaling_factor: float = TAEF2_SCALING_FACTOR,
        shift_factor: float | None = None,
        sample_size: int = 128,
        force_upcast: bool = False,
    ) -> None:
        super().__init__()
        if in_channels != 3 or out_channels != 3:
            raise InvalidInputError(f"`in_channels`/`out_channels` must be 3, got {in_channels}/{out_channels}")
        if len(block_out_channels) != 4:
            # diffusers derives vae_scale_factor = 2 ** (len(block_out_channels) - 1) = 8.
            raise InvalidInputError(f"`block_out_channels` must have 4 entries, got {block_out_channels}")
        self.encoder = _encoder(latent_channels)
        self.decoder = _decoder(latent_channels)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """(B, 3, H, W) in [-1, 1], H and W multiples of 8 -> posterior over (B, 32, H/8, W/8)."""
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-1] % 8 or x.shape[-2] % 8:
            raise InvalidInputError(f"`x` must be (B, 3, H, W) with H, W multiples of 8, got {tuple(x.shape)}")
        mean = self.encoder((x.to(self.dtype) + 1) / 2)  # (B, 32, H/8, W/8)
        # zero log-variance, deterministic=True -> std 0: sample() == mode() == mean
        dist = DiagonalGaussianDistribution(torch.cat([mean, torch.zeros_like(mean)], 1), deterministic=True)
        if not return_dict:
            return (dist,)
        return AutoencoderKLOutput(latent_dist=dist)

    def decode(
        self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> DecoderOutput | tuple:
        """(B, 32, h, w) unscaled latents -> (B, 3, 8h, 8w) images in [-1, 1]; `generator` unused."""
        x = self.decoder(z.to(self.dtype)).clamp(0, 1) * 2 - 1  # (B, 3, 8h, 8w)
        if not return_dict:
            return (x,)
        return DecoderOutput(sample=x)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Round trip: encode then decode."""
        return self.decode(self.encode(sample).latent_dist.mode(), return_dict=return_dict)


def load_taef2(weights_dir: str | Path, **config) -> TAEF2:
    """Build `TAEF2` and load `taef2_encoder.pth` / `taef2_decoder.pth` from `weights_dir` strictly.

    Raises:
        ModelNotFoundError: a weight file is missing.
    """
    weights_dir = Path(weights_dir)
    vae = TAEF2(**config)
    for part, module in (("encoder", vae.encoder), ("decoder", vae.decoder)):
        path = weights_dir / f"taef2_{part}.pth"
        if not path.is_file():
            raise ModelNotFoundError(f"`weights_dir` must hold taef2_{part}.pth, got {str(weights_dir)!r}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return vae.eval()

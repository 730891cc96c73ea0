"""The training objective of each base family, behind one interface the training loop calls.

Everything that differs between SD 1.x/2.x, SDXL, SD3 and FLUX when training lives here, so the
one loop (`hypernet.training.loop`), LiDB (single and batched), fast personalisation and
pretraining never branch on the arch:

- **conditioning** - how prompts become what the denoiser attends to:
    sd15: CLIP last hidden states `text_emb` (N, 77, D); no pooled vector.
    sdxl: both CLIPs' penultimate hidden states concatenated, (N, 77, D1 + D2), plus the second
          CLIP's projected pooled output `pooled` (N, P); the six "time ids" (original size, crop
          top-left, target size) are derived from the latent size at the denoiser call, as
          diffusers' SDXL pipeline does for an uncropped image.
    sd3:  CLIP-L + CLIP-G penultimate states (padded to T5's width) joined with T5 states along
          the sequence, (N, 77 + 256, D_t5), plus both CLIPs' pooled outputs concatenated (N, P);
          computed by the stock pipeline's `encode_prompt`.
    flux: T5 states (N, 512, D_t5) plus CLIP's pooled output (N, P); the text/image position ids
          (zeros / latent grid) are built at the call, latents are packed 2x2 into tokens, and a
          guidance embedding (3.5, the diffusers FLUX training script's value) is passed when the
          transformer has one (FLUX.1-dev; not schnell).
  Conditioning is always the pair `(text_emb, pooled)` with `pooled` None for sd15.
- **latent normalisation** - `(mean - shift_factor) * scaling_factor` of the VAE posterior mean
  (`hypernet.training.data.encode_images`; shift is 0 for SD 1.x/SDXL).
- **noise, timesteps, target** - DDPM family (sd15, sdxl): integer timesteps uniform in
  [0, num_train_timesteps), `scheduler.add_noise`, target by `prediction_type` (epsilon, v or
  sample), optional min-SNR weighting: exactly `hypernet.training.losses.diffusion_loss`.
  Flow matching (sd3, flux): x_t = (1 - s) x0 + s noise, target noise - x0 (the velocity,
  unpreconditioned), s = t / num_train_timesteps where t is drawn as diffusers' SD3/FLUX
  DreamBooth scripts do: u from a density (`logit_normal` (SD3 script's default), `uniform`
  (FLUX script's default "none") or `mode`), t = scheduler.timesteps[int(u * N)] of a
  `FlowMatchEulerDiscreteScheduler` built from the base's scheduler config - so SD3's static
  shift (3.0) applies; FLUX's resolution-dependent shift applies too when `resolution_shift` is
  True (the scripts leave it off, the default here).
- **the denoiser call** - `Objective.predict(net, noisy, timesteps, text_emb, pooled)` returns
  the prediction in the latents' own (B, C, h, w) layout for every arch.

API (all tensors batch-first; draws happen on the CPU from the given generator, so a seed gives
the same draws on every device):

    obj = objective_for(pipe)                       # per pipeline_arch(pipe)
    text_emb, pooled = obj.encode_prompts(pipe, ["a photo of ohwx person"])   # no grad, fp32
    ids = obj.tokenize(pipe, prompts)               # sd15 (N, 77); sdxl (N, 2, 77) - text training
    text_emb, pooled = obj.embed_ids(ids, obj.text_encoders(pipe))            # with grad
    loss = obj.loss(denoiser(pipe), latents, text_emb, generator, pooled=pooled)    # scalar fp32
    per = obj.loss(net, latents, text_emb, None, pooled=pooled, reduction="none",
                   timesteps=t, noise=n)            # (B,) with explicit draws
    t = obj.draw_timesteps(b, generator, latents.shape)   # what `loss` draws when not given
    x0 = obj.denoise_x0(net, latents, noise, t, text_emb, pooled)   # (B, C, h, w) one-step estimate

`timesteps` are in the denoiser's training units: integers in [0, 1000) for the DDPM family,
floats in (0, 1000] for flow matching (s = t / 1000). SD3/FLUX refuse `min_snr_gamma` (it is a
weighting of epsilon/v objectives) and text-side training (`tokenize`/`embed_ids`): their text
encoders stay frozen here.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from hypernet.base.arch import Arch, pipeline_arch
from hypernet.errors import InvalidInputError
from hypernet.training.losses import diffusion_loss, make_noise_scheduler

TimestepDensity = Literal["logit_normal", "uniform", "mode"]
TIMESTEP_DENSITIES: tuple[str, ...] = ("logit_normal", "uniform", "mode")
#: The density diffusers' DreamBooth-LoRA scripts default to: SD3 logit-normal, FLUX uniform ("none").
DEFAULT_DENSITY: dict[Arch, TimestepDensity] = {"sd3": "logit_normal", "flux": "uniform"}
#: The guidance value diffusers' FLUX training script feeds a guidance-distilled transformer.
FLUX_TRAIN_GUIDANCE = 3.5

Cond = tuple[torch.Tensor, torch.Tensor | None]  # (text_emb (N, L, D), pooled (N, P) or None)


def _check_rows(latents: torch.Tensor, text_emb: torch.Tensor, pooled: torch.Tensor | None, needs_pooled: bool):
    b = latents.shape[0]
    if text_emb.shape[0] != b:
        raise InvalidInputError(f"`text_emb` must have {b} rows like `latents`, got {text_emb.shape[0]}")
    if needs_pooled and pooled is None:
        raise InvalidInputError("`pooled` must be given for this base (its denoiser takes pooled text), got None")
    if pooled is not None and pooled.shape[0] != b:
        raise InvalidInputError(f"`pooled` must have {b} rows like `latents`, got {pooled.shape[0]}")


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_sample
    if reduction != "mean":
        raise InvalidInputError(f"`reduction` must be 'mean' or 'none', got {reduction!r}")
    return per_sample.mean()


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class Objective:
    """The base-family-specific parts of training; see the module docstring for the contract."""

    arch: Arch
    flow_matching: bool = False
    #: Whether the denoiser needs a pooled text vector (sdxl, sd3, flux).
    needs_pooled: bool = True

    def __init__(self, pipe):
        # 8 for every family. Training from cached latents needs no VAE: a pipeline-like namespace
        # of the denoiser and text encoders only (benchmarks at real shape) gets the families' 8.
        vae = getattr(pipe, "vae", None)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8

    # Text ------------------------------------------------------------------------------------
    def text_encoders(self, pipe) -> list[nn.Module]:
        """The text encoders whose outputs condition the denoiser, in `tokenize` order."""
        raise NotImplementedError

    def tokenize(self, pipe, prompts: str | list[str]) -> torch.Tensor:
        """Token ids for text-side training (TI, DreamBooth with its text encoder)."""
        raise InvalidInputError(f"text-side training (`tokenize`) must use an sd15 or sdxl base, got {self.arch}")

    def embed_ids(self, ids: torch.Tensor, text_encoders: list[nn.Module]) -> Cond:
        """Ids from `tokenize` -> (text_emb, pooled), with grad through the encoders."""
        raise InvalidInputError(f"text-side training (`embed_ids`) must use an sd15 or sdxl base, got {self.arch}")

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts: str | list[str]) -> Cond:
        """Prompt(s) -> (text_emb (N, L, D), pooled (N, P) or None), float32, no grad."""
        emb, pooled = self.embed_ids(self.tokenize(pipe, prompts), self.text_encoders(pipe))
        return emb.float(), None if pooled is None else pooled.float()

    # Denoiser --------------------------------------------------------------------------------
    def predict(self, net: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, text_emb: torch.Tensor,
                pooled: torch.Tensor | None) -> torch.Tensor:
        """The denoiser's output for (B, C, h, w) `noisy` latents, in the same layout."""
        raise NotImplementedError

    def draw_timesteps(self, b: int, generator: torch.Generator | None, shape: torch.Size | None = None
                       ) -> torch.Tensor:
        """(b,) timesteps as `loss` draws them (CPU)."""
        raise NotImplementedError

    def denoise_x0(self, net: nn.Module, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   text_emb: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """The denoiser's one-step estimate of the clean latents from `latents` noised to `timesteps`.

        What a loss on the *image* the adapted model would make (e.g. a face-identity loss on the
        decoded estimate) differentiates through; with grad when the caller has it on.

        Args:
            latents: (B, C, h, w) clean normalised latents; noise: their shape; timesteps: (B,).

        Returns:
            (B, C, h, w) fp32 estimate of `latents`.
        """
        raise NotImplementedError

    def loss(
        self,
        net: nn.Module,
        latents: torch.Tensor,
        text_emb: torch.Tensor,
        generator: torch.Generator | None,
        min_snr_gamma: float | None = None,
        *,
        pooled: torch.Tensor | None = None,
        reduction: str = "mean",
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MSE between the denoiser's prediction and the family's target on noised `latents`.

        Args:
            latents: (B, C, h, w) normalised latents (`encode_images`).
            text_emb / pooled: the conditioning rows, one per latent.
            generator: CPU generator for the draws not given explicitly.
            reduction: "mean" -> scalar; "none" -> (B,) per-sample losses.

        Returns:
            The loss (fp32).
        """
        raise NotImplementedError


class EpsilonObjective(Objective):
    """SD 1.x/2.x: `diffusion_loss` itself (same draws, same numbers), CLIP hidden states."""

    arch: Arch = "sd15"
    needs_pooled = False

    def __init__(self, pipe):
        super().__init__(pipe)
        self.scheduler = make_noise_scheduler(pipe)

    def text_encoders(self, pipe) -> list[nn.Module]:
        return [pipe.text_encoder]

    def tokenize(self, pipe, prompts: str | list[str]) -> torch.Tensor:
        """(N, 77) ids, padded and truncated to the encoder's context length."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tok = pipe.tokenizer
        return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    def embed_ids(self, ids: torch.Tensor, text_encoders: list[nn.Module]) -> Cond:
        (te,) = text_encoders
        return te(ids.to(_device(te)))[0], None  # (N, 77, D) last hidden states

    def _added_cond(self, latents: torch.Tensor, pooled: torch.Tensor | None, dtype: torch.dtype) -> dict | None:
        return None

    def predict(self, net, noisy, timesteps, text_emb, pooled):
        p = next(net.parameters())
        added = self._added_cond(noisy, pooled, p.dtype)
        return net(noisy.to(p.dtype), timesteps, encoder_hidden_states=text_emb.to(p.dtype),
                   added_cond_kwargs=added).sample

    def draw_timesteps(self, b, generator, shape=None):
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator)

    def denoise_x0(self, net, latents, noise, timesteps, text_emb, pooled=None):
        _check_rows(latents, text_emb, pooled, self.needs_pooled)
        t = timesteps.to(latents.device).long()
        noisy = self.scheduler.add_noise(latents, noise.to(latents.device, latents.dtype), t)  # (B, C, h, w)
        out = self.predict(net, noisy, t, text_emb, pooled).float()
        ab = self.scheduler.alphas_cumprod.to(latents.device)[t].float()[:, None, None, None]  # (B, 1, 1, 1)
        ptype = self.scheduler.config.prediction_type
        if ptype == "epsilon":  # x_t = sqrt(ab) x0 + sqrt(1 - ab) eps
            return (noisy.float() - (1 - ab).sqrt() * out) / ab.sqrt()
        if ptype == "v_prediction":  # v = sqrt(ab) eps - sqrt(1 - ab) x0
            return ab.sqrt() * noisy.float() - (1 - ab).sqrt() * out
        if ptype == "sample":
            return out
        raise InvalidInputError(f"`prediction_type` must be epsilon, v_prediction or sample, got {ptype!r}")

    def loss(self, net, latents, text_emb, generator, min_snr_gamma=None, *, pooled=None, reduction="mean",
             timesteps=None, noise=None):
        _check_rows(latents, text_emb, pooled, self.needs_pooled)
        return diffusion_loss(net, self.scheduler, latents, text_emb, generator, min_snr_gamma, reduction=reduction,
                              timesteps=timesteps, noise=noise,
                              added_cond_kwargs=self._added_cond(latents, pooled, next(net.parameters()).dtype))


class SDXLObjective(EpsilonObjective):
    """SDXL: the DDPM loss of SD 1.x with two CLIPs (penultimate states), pooled text and time ids."""

    arch: Arch = "sdxl"
    needs_pooled = True

    def text_encoders(self, pipe) -> list[nn.Module]:
        return [pipe.text_encoder, pipe.text_encoder_2]

    def tokenize(self, pipe, prompts: str | list[str]) -> torch.Tensor:
        """(N, 2, 77): ids of `tokenizer` and `tokenizer_2` (they differ in the padding token)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out = []
        for tok in (pipe.tokenizer, pipe.tokenizer_2):
            out.append(tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                           return_tensors="pt").input_ids)  # (N, 77)
        return torch.stack(out, dim=1)

    def embed_ids(self, ids: torch.Tensor, text_encoders: list[nn.Module]) -> Cond:
        """As `StableDiffusionXLPipeline.encode_prompt` (clip_skip None): hidden_states[-2] of each
        encoder concatenated on features; the pooled vector is the projecting encoder's output."""
        if ids.dim() != 3 or ids.shape[1] != len(text_encoders):
            raise InvalidInputError(f"`ids` must have shape (N, {len(text_encoders)}, L), got {tuple(ids.shape)}")
        embs, pooled = [], None
        for i, te in enumerate(text_encoders):
            out = te(ids[:, i].to(_device(te)), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]  # (N, P) CLIPTextModelWithProjection.text_embeds
            embs.append(out.hidden_states[-2])  # (N, 77, D_i)
        return torch.cat(embs, dim=-1), pooled  # (N, 77, D1 + D2), (N, P)

    def time_ids(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 6): original size, crop top-left (0, 0), target size - the pixel size of `latents`."""
        h, w = latents.shape[-2] * self.vae_scale_factor, latents.shape[-1] * self.vae_scale_factor
        return torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32).expand(latents.shape[0], 6)

    def _added_cond(self, latents, pooled, dtype):
        if pooled is None:
            raise InvalidInputError("`pooled` must be given for an sdxl base (text_embeds), got None")
        return {"text_embeds": pooled.to(latents.device, dtype), "time_ids": self.time_ids(latents).to(
            latents.device, dtype)}


class FlowMatchingObjective(Objective):
    """SD3 / FLUX: rectified-flow velocity target with the SD3 paper's timestep densities."""

    flow_matching = True

    def __init__(self, pipe, density: TimestepDensity | None = None, *, logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29, resolution_shift: bool = False):
        from diffusers import FlowMatchEulerDiscreteScheduler

        super().__init__(pipe)
        density = DEFAULT_DENSITY[self.arch] if density is None else density
        if density not in TIMESTEP_DENSITIES:
            raise InvalidInputError(f"`density` must be one of {TIMESTEP_DENSITIES}, got {density!r}")
        if not logit_std > 0:
            raise InvalidInputError(f"`logit_std` must be > 0, got {logit_std!r}")
        self.density, self.logit_mean, self.logit_std, self.mode_scale = density, logit_mean, logit_std, mode_scale
        # The base's forward process (static shift included); its `timesteps` are what the scripts index.
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.n_train = int(self.scheduler.config.num_train_timesteps)
        self.resolution_shift = resolution_shift
        if resolution_shift and not self.scheduler.config.get("use_dynamic_shifting", False):
            raise InvalidInputError("`resolution_shift` must be False for a base without dynamic shifting, got True")

    def draw_timesteps(self, b, generator, shape=None):
        """As the SD3/FLUX DreamBooth scripts: u ~ density, t = scheduler.timesteps[int(u * N)]."""
        if self.density == "logit_normal":
            u = torch.sigmoid(torch.normal(self.logit_mean, self.logit_std, (b,), generator=generator))
        else:
            u = torch.rand((b,), generator=generator)
            if self.density == "mode":
                u = 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        idx = (u * self.n_train).long().clamp(0, self.n_train - 1)  # (b,) sigmoid may round to 1.0
        t = self.scheduler.timesteps[idx].float()  # (b,) in (0, N]
        if self.resolution_shift:
            if shape is None:
                raise InvalidInputError("`shape` must be given when `resolution_shift` is on, got None")
            t = self._shift(t, shape)
        return t

    def _shift(self, t: torch.Tensor, shape) -> torch.Tensor:
        """FLUX's resolution-dependent exponential shift, mu from the packed image length."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = self.scheduler.config
        seq = (shape[-2] // 2) * (shape[-1] // 2)
        mu = calculate_shift(seq, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        return self.scheduler.time_shift(mu, 1.0, t / self.n_train) * self.n_train

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, target): the straight path x_t = (1 - s) x0 + s noise at s = t / N, and its
        velocity noise - x0 (what the stock Euler sampler integrates from s to 0)."""
        noise = noise.to(latents.device, latents.dtype)
        s = (timesteps.to(latents.device).float() / self.n_train).to(latents.dtype)[:, None, None, None]  # (B,1,1,1)
        return (1.0 - s) * latents + s * noise, noise - latents  # (B, C, h, w) each

    def denoise_x0(self, net, latents, noise, timesteps, text_emb, pooled=None):
        _check_rows(latents, text_emb, pooled, self.needs_pooled)
        t = timesteps.to(latents.device).float()  # (B,)
        noisy, _ = self.noised(latents, noise, t)
        s = (t / self.n_train)[:, None, None, None]  # (B, 1, 1, 1)
        return noisy.float() - s * self.predict(net, noisy, t, text_emb, pooled).float()  # x0 = x_t - s v

    def loss(self, net, latents, text_emb, generator, min_snr_gamma=None, *, pooled=None, reduction="mean",
             timesteps=None, noise=None):
        _check_rows(latents, text_emb, pooled, self.needs_pooled)
        if min_snr_gamma is not None:
            raise InvalidInputError(
                f"`min_snr_gamma` must be None on a flow-matching base ({self.arch}): it weights epsilon/v "
                f"objectives, got {min_snr_gamma!r}")
        b = latents.shape[0]
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        if timesteps is None:
            timesteps = self.draw_timesteps(b, generator, latents.shape)
        t = timesteps.to(latents.device).float()  # (B,)
        noisy, target = self.noised(latents, noise, t)
        pred = self.predict(net, noisy, t, text_emb, pooled)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
        return _reduce(per_sample, reduction)


class SD3Objective(FlowMatchingObjective):
    """SD3: MMDiT on (B, 16, h, w) latents; joint CLIP-L/CLIP-G/T5 states and pooled CLIPs."""

    arch: Arch = "sd3"

    def text_encoders(self, pipe) -> list[nn.Module]:
        return [m for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if m is not None]

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        emb, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                               device=_device(pipe.text_encoder), do_classifier_free_guidance=False)
        return emb.float(), pooled.float()  # (N, 77 + 256, D_t5), (N, P1 + P2)

    def predict(self, net, noisy, timesteps, text_emb, pooled):
        p = next(net.parameters())
        return net(hidden_states=noisy.to(p.dtype), timestep=timesteps.to(p.dtype),
                   encoder_hidden_states=text_emb.to(p.dtype), pooled_projections=pooled.to(p.dtype),
                   return_dict=False)[0]  # (B, 16, h, w)


class FluxObjective(FlowMatchingObjective):
    """FLUX: latents packed 2x2 into tokens with RoPE ids; T5 states + CLIP pooled; guidance."""

    arch: Arch = "flux"

    def __init__(self, pipe, density: TimestepDensity | None = None, *, guidance: float = FLUX_TRAIN_GUIDANCE,
                 **kw):
        super().__init__(pipe, density, **kw)
        self.guidance = guidance

    def text_encoders(self, pipe) -> list[nn.Module]:
        return [pipe.text_encoder, pipe.text_encoder_2]

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        emb, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=_device(pipe.text_encoder))
        return emb.float(), pooled.float()  # (N, 512, D_t5), (N, P)

    def predict(self, net, noisy, timesteps, text_emb, pooled):
        from diffusers import FluxPipeline

        p = next(net.parameters())
        b, c, h, w = noisy.shape
        if h % 2 or w % 2:
            raise InvalidInputError(f"FLUX latents must have even height and width, got {h}x{w}")
        packed = FluxPipeline._pack_latents(noisy.to(p.dtype), b, c, h, w)  # (B, h/2 * w/2, 4C)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, p.device, p.dtype)  # (h/2 * w/2, 3)
        txt_ids = torch.zeros(text_emb.shape[1], 3, device=p.device, dtype=p.dtype)  # (L, 3)
        guidance = None
        if net.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance, device=p.device, dtype=torch.float32)
        out = net(hidden_states=packed, timestep=(timesteps / 1000).to(p.dtype), guidance=guidance,
                  pooled_projections=pooled.to(p.dtype), encoder_hidden_states=text_emb.to(p.dtype),
                  txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]  # (B, h/2 * w/2, 4C)
        return FluxPipeline._unpack_latents(out, h * self.vae_scale_factor, w * self.vae_scale_factor,
                                            self.vae_scale_factor)  # (B, C, h, w)


_OBJECTIVES: dict[Arch, type[Objective]] = {
    "sd15": EpsilonObjective, "sdxl": SDXLObjective, "sd3": SD3Objective, "flux": FluxObjective,
}


def objective_for(pipe, **options) -> Objective:
    """The objective of the pipeline's base family (`pipeline_arch(pipe)`).

    Args:
        options: flow-matching bases only - `density` ("logit_normal", "uniform", "mode"),
            `logit_mean`, `logit_std`, `mode_scale`, `resolution_shift` (FLUX), `guidance` (FLUX).

    Raises:
        InvalidInputError: options given for a DDPM-family base, or invalid option values.
    """
    arch = pipeline_arch(pipe)
    cls = _OBJECTIVES[arch]
    if options and not cls.flow_matching:
        raise InvalidInputError(f"objective options must be empty for a {arch} base, got {sorted(options)}")
    return cls(pipe, **options)


__all__ = ["Cond", "DEFAULT_DENSITY", "EpsilonObjective", "FLUX_TRAIN_GUIDANCE", "FlowMatchingObjective",
           "FluxObjective", "Objective", "SD3Objective", "SDXLObjective", "TIMESTEP_DENSITIES", "objective_for"]

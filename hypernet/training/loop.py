"""The one training loop: every method (and pretraining, and fast personalisation) uses it.

Methods differ only in which parameters train and what data they bring; the base family's
objective (conditioning, noise, timesteps, target and denoiser call: `hypernet.training.objectives`)
is plugged in per pipeline; this loop owns the rest:
AdamW, the LR schedule, gradient accumulation, gradient checkpointing, autocast on CUDA, seeded
draws (bit-reproducible on CPU), progress reporting, cancellation and exact resume.

    data = build_train_data(pipe, photos, "a photo of ohwx person")
    result = train(pipe, [p for p in lora_params], data, TrainConfig(steps=500, lr=1e-4))
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.optimization import get_scheduler
from torch import nn
from tqdm.auto import tqdm

from hypernet.base.arch import denoiser
from hypernet.errors import HdbError, IncompatibleAdapterError, InvalidInputError
from hypernet.training.checkpoint import load_checkpoint, remove_checkpoint, save_checkpoint
from hypernet.training.config import TrainConfig
from hypernet.training.data import TrainData
from hypernet.training.objectives import Objective, objective_for

log = logging.getLogger(__name__)


class TrainingCancelled(HdbError):
    """`should_stop` asked the run to stop; a checkpoint was saved when a directory was given."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(
            f"training cancelled after step {step}" + (f"; resumable from {checkpoint}" if checkpoint else "")
        )
        self.step = step
        self.checkpoint = checkpoint


@dataclass
class ProgressEvent:
    """One report per optimizer step (and one at the start with step = first step)."""

    stage: str
    step: int
    total: int
    loss: float | None = None
    lr: float | None = None
    elapsed: float = 0.0


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per optimizer step, from step 0
    steps: int = 0
    seconds: float = 0.0
    resumed_from: int = 0


ProgressFn = Callable[[ProgressEvent], None]


def train(
    pipe,
    params: Iterable[nn.Parameter],
    data: TrainData,
    cfg: TrainConfig,
    *,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint_dir: str | Path | None = None,
    text_encoder_trains: bool = False,
    extra_loss: Callable[[int], torch.Tensor] | None = None,
    after_step: Callable[[int], None] | None = None,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    stage: str = "train",
    objective: Objective | None = None,
) -> TrainResult:
    """Optimise `params` with the base family's diffusion loss on `data`.

    Args:
        params: what trains; every other parameter of the UNet / text encoder is frozen for the
            run (and its requires_grad flag restored afterwards).
        progress: called after every step; it may raise to abort (a checkpoint is saved first).
        should_stop: polled before every step; True -> save a checkpoint, raise TrainingCancelled.
        checkpoint_dir: where checkpoints go; a checkpoint already there is resumed from (it must
            come from the same config), and is deleted when the run completes.
        text_encoder_trains: recompute text embeddings from `data.input_ids` every step (text
            encoder or token-embedding training) instead of using the cached ones.
        extra_loss: added to each micro-batch's loss, called with the step (regularisers).
        after_step: called after each optimizer step (e.g. re-projecting parameters).
        unet / text_encoder: the models to run, when not the pipe's own (DreamBooth trains a copy):
            `unet` is the denoiser (a UNet or an SD3/FLUX transformer), `text_encoder` replaces
            the first text encoder.
        stage: the name reported in progress events.
        objective: the loss and conditioning to use; default `objective_for(pipe)`.

    Returns:
        TrainResult with one loss per step (the mean over its micro-batches).

    Raises:
        TrainingCancelled, InvalidInputError, IncompatibleAdapterError (checkpoint of another run).
    """
    objective = objective_for(pipe) if objective is None else objective
    unet = denoiser(pipe) if unet is None else unet
    text_encoders = [m for m in objective.text_encoders(pipe) if m is not None]
    if text_encoder is not None:
        text_encoders[0] = text_encoder
    run = _Run(pipe, list(params), data, cfg, unet, text_encoders, text_encoder_trains, extra_loss, checkpoint_dir,
               objective)
    return run.train(progress=progress, should_stop=should_stop, after_step=after_step, stage=stage)


class _Run:
    """One run's state; `train` drives setup -> steps -> cleanup."""

    def __init__(self, pipe, params, data, cfg, unet, text_encoders, text_encoder_trains, extra_loss, checkpoint_dir,
                 objective):
        if not params:
            raise InvalidInputError("`params` must hold at least one parameter to train, got none")
        if text_encoder_trains and data.input_ids is None:
            raise InvalidInputError("`data.input_ids` must be set when the text encoder trains, got None")
        if not text_encoder_trains and data.text_emb is None:
            raise InvalidInputError("`data.text_emb` must be set when the text encoder is frozen, got None")
        self.pipe, self.params, self.data, self.cfg = pipe, params, data, cfg
        self.unet, self.text_encoders, self.objective = unet, text_encoders, objective
        self.text_encoder_trains, self.extra_loss = text_encoder_trains, extra_loss
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.device = next(unet.parameters()).device
        self.models = [unet, *text_encoders]

    # 1. Setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self._saved_flags = [(p, p.requires_grad) for m in self.models for p in m.parameters()]
        self._saved_modes = [(m, m.training) for m in self.models]
        trainable = {id(p) for p in self.params}
        for m in self.models:
            for p in m.parameters():
                p.requires_grad_(id(p) in trainable)
        for p in self.params:
            p.requires_grad_(True)
            if p.dtype in (torch.float16, torch.bfloat16):
                # AdamW in half precision loses small updates (eps 1e-8 underflows in fp16): keep
                # trained weights and optimizer state in fp32; layers cast at their boundaries.
                p.data = p.data.float()
        self._gc_before = self._set_checkpointing(cfg.gradient_checkpointing)
        for m in self.models:
            if any(p.requires_grad for p in m.parameters()):
                m.train()
        self.opt = torch.optim.AdamW(
            self.params,
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
        self.sched = get_scheduler(
            cfg.lr_scheduler, self.opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps
        )
        self.gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        use_amp = self.device.type == "cuda" and cfg.mixed_precision != "no"
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
        self.use_amp = use_amp
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_amp and cfg.mixed_precision == "fp16")
        self.step, self.losses, self.resumed_from = 0, [], 0
        if self.checkpoint_dir is not None:
            self._resume()

    def _set_checkpointing(self, on: bool) -> list[tuple[nn.Module, bool]]:
        """Switch activation checkpointing on the models that train; return what was there."""
        before = []
        for m in self.models:
            if not any(p.requires_grad for p in m.parameters()):
                continue  # frozen models run without a graph of their own anyway
            before.append((m, _checkpointing(m)))
            _set_model_checkpointing(m, on)
        return before

    def cleanup(self) -> None:
        """Undo `setup`'s changes to the models (safe after a partial setup)."""
        for m, was in getattr(self, "_gc_before", []):
            _set_model_checkpointing(m, was)
        for m, mode in getattr(self, "_saved_modes", []):
            m.train(mode)
        for p, flag in getattr(self, "_saved_flags", []):
            p.requires_grad_(flag)
        for p in self.params:
            p.grad = None

    # 2. Checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, gen_state: torch.Tensor, rng_state: torch.Tensor) -> Path:
        state = {
            "step": self.step,
            "losses": list(self.losses),
            "params": [p.detach().to("cpu").clone() for p in self.params],
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": gen_state,
            "torch_rng": rng_state,
            "resume_key": self.cfg.resume_key(),
        }
        path = save_checkpoint(self.checkpoint_dir, state)
        log.info("saved checkpoint at step %d to %s", self.step, path)
        return path

    def _resume(self) -> None:
        state = load_checkpoint(self.checkpoint_dir, self.cfg.resume_key())
        if state is None:
            return
        saved = state["params"]
        if len(saved) != len(self.params) or any(s.shape != p.shape for s, p in zip(saved, self.params, strict=True)):
            raise IncompatibleAdapterError(
                f"checkpoint in {self.checkpoint_dir} must hold the same parameters to resume, got "
                f"{len(saved)} tensors for {len(self.params)} parameters"
            )
        with torch.no_grad():
            for p, s in zip(self.params, saved, strict=True):
                p.copy_(s)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step = self.resumed_from = int(state["step"])
        self.losses = list(state["losses"])
        log.info("resumed from step %d of %d", self.step, self.cfg.steps)

    # 3. Steps ------------------------------------------------------------------------------
    def _autocast(self):
        if self.use_amp:
            return torch.autocast("cuda", dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def _loss(self) -> torch.Tensor:
        """One micro-batch: instance (+ prior) examples in one denoiser call."""
        cfg, data = self.cfg, self.data
        lat, idx = data.sample(cfg.batch_size, self.gen, cfg.flip)  # (B, 4, h, w), (B,)
        parts = [(lat, idx, data)]
        if data.prior is not None:
            plat, pidx = data.prior.sample(cfg.batch_size, self.gen, cfg.flip)
            parts.append((plat, pidx, data.prior))
        with self._autocast():
            conds = [self._text(d, i) for _, i, d in parts]
            latents = torch.cat([p[0] for p in parts]).to(self.device)  # (B or 2B, C, h, w)
            pooled = None if conds[0][1] is None else torch.cat([c[1] for c in conds])  # (B or 2B, P)
            per = self.objective.loss(
                self.unet, latents, torch.cat([c[0] for c in conds]), self.gen, cfg.min_snr_gamma, pooled=pooled,
                reduction="none",
            )  # (B or 2B,)
        loss = per[: cfg.batch_size].mean()
        if data.prior is not None:
            loss = loss + data.prior_loss_weight * per[cfg.batch_size :].mean()
        return loss

    def _text(self, data: TrainData, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(text_emb (B, L, D), pooled (B, P) or None) of the drawn rows."""
        if self.text_encoder_trains:
            return self.objective.embed_ids(data.text_rows("input_ids", idx), self.text_encoders)
        pooled = None if data.pooled is None else data.text_rows("pooled", idx).to(self.device)
        return data.text_rows("text_emb", idx).to(self.device), pooled

    def accumulate(self) -> float:
        """grad_accum micro-batches of forward + backward; parameters are not touched yet."""
        cfg = self.cfg
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(cfg.grad_accum):
            loss = self._loss()
            if self.extra_loss is not None:
                loss = loss + self.extra_loss(self.step)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss must be finite, got {loss.item()} at step {self.step}")
            self.scaler.scale(loss / cfg.grad_accum).backward()
            total += loss.item()
        return total / cfg.grad_accum

    def update(self) -> None:
        """Clip, AdamW step, LR schedule step."""
        self.scaler.unscale_(self.opt)
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()

    def train(self, *, progress, should_stop, after_step, stage) -> TrainResult:
        cfg = self.cfg
        try:
            self.setup()
        except BaseException:
            self.cleanup()  # e.g. a checkpoint of another run: leave the models as they were
            raise
        t0 = time.perf_counter()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress_bar, desc=stage, leave=False)
        # The RNG states at the start of the current step: with the parameters as they are until
        # `update` runs, they are exactly what a resumed run needs.
        snap = (self.gen.get_state(), torch.get_rng_state())
        updating = False
        try:
            if progress is not None:
                progress(ProgressEvent(stage, self.step, cfg.steps, None, self.sched.get_last_lr()[0], 0.0))
            while self.step < cfg.steps:
                if should_stop is not None and should_stop():
                    path = self.save_checkpoint(*snap) if self.checkpoint_dir else None
                    raise TrainingCancelled(self.step, path)
                loss = self.accumulate()
                updating = True
                self.update()
                self.step += 1
                self.losses.append(loss)
                if after_step is not None:
                    after_step(self.step)
                snap = (self.gen.get_state(), torch.get_rng_state())
                updating = False
                if self.checkpoint_dir and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint(*snap)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if cfg.log_every and self.step % cfg.log_every == 0:
                    log.info("%s step %d/%d loss %.5f", stage, self.step, cfg.steps, loss)
                if progress is not None:
                    progress(
                        ProgressEvent(
                            stage, self.step, cfg.steps, loss, self.sched.get_last_lr()[0], time.perf_counter() - t0
                        )
                    )
        except TrainingCancelled:
            raise
        except BaseException:
            # Interrupted (Ctrl-C, a progress callback raising): keep the last complete step.
            if self.checkpoint_dir is not None and not updating and self.step > self.resumed_from:
                self.save_checkpoint(*snap)
            raise
        finally:
            bar.close()
            self.cleanup()
        if self.checkpoint_dir is not None:
            remove_checkpoint(self.checkpoint_dir)
        return TrainResult(self.losses, self.step, time.perf_counter() - t0, self.resumed_from)


def _checkpointing(m: nn.Module) -> bool:
    if hasattr(m, "enable_gradient_checkpointing"):  # diffusers
        return bool(m.is_gradient_checkpointing)
    if hasattr(m, "is_activation_checkpointing"):  # transformers 5
        return bool(m.is_activation_checkpointing)
    return False


def _set_model_checkpointing(m: nn.Module, on: bool) -> None:
    if hasattr(m, "enable_gradient_checkpointing"):
        if m.is_gradient_checkpointing != on:
            (m.enable_gradient_checkpointing if on else m.disable_gradient_checkpointing)()
    elif hasattr(m, "activation_checkpointing_enable") and getattr(m, "supports_gradient_checkpointing", False):
        if bool(m.is_activation_checkpointing) != on:
            (m.activation_checkpointing_enable if on else m.activation_checkpointing_disable)()

"""Stage `stage2`: train the hypernetwork on (photo, stage-1 LiDB) pairs under DDP.

    loss = alpha * diffusion loss of the base with the *predicted* LiDB on the same photo
           (the base family's objective, `hypernet.training.objectives`: epsilon/v on SD 1.x and
           SDXL, flow matching on SD3 and FLUX)
         + beta  * mean squared error to the stage-1 LiDB of that identity

With an identity-conditioned model (`stage2.model.condition` "identity"/"both") the condition
is the face encoder's embedding of each photo, read from prepare's cache (pretrain.face_embeddings,
computed once before training): the frozen encoder never runs per step.

The recipe has fixed verbs (setup, train, validate, save_checkpoint, cleanup). Exact resume:
checkpoints hold model, optimizer, scheduler, EMA and every rank's RNG; the data position and
the diffusion noise are pure functions of (seed, step, micro-step, rank) (see stream.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from hypernet.adapters.lidb.model import LiDB
from hypernet.base.arch import denoiser
from hypernet.errors import InvalidInputError
from hypernet.files import atomic_write_bytes
from hypernet.hypernetwork.config import HypernetConfig
from hypernet.hypernetwork.export import HypernetInfo, save_hypernet
from hypernet.hypernetwork.losses import hypernet_loss, weight_mse
from hypernet.hypernetwork.model import HyperNetwork
from hypernet.training.objectives import objective_for
from pretrain.cache import PreparedData
from pretrain.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from pretrain.context import RunContext
from pretrain.distributed import all_reduce_sum
from pretrain.metrics import MetricsWriter
from pretrain.optim import EMA, cosine_with_warmup
from pretrain.stage1 import load_stage1
from pretrain.stream import SampleStream, step_seed

log = logging.getLogger(__name__)

FINAL = "final.safetensors"
VAL_FINETUNED = "val_finetuned"  # per-photo scores after the validation fine-tune, one JSON per validation
#: stage-2 settings that do not change the trained weights (free to differ on resume).
_FREE = ("val_every", "val_noise_draws", "val_finetune_steps", "ckpt_every", "keep_checkpoints", "log_every")
_CONDITION_FIELDS = ("condition", "identity_tokens", "face_encoder", "identity_dim")
#: Stage-2 settings added after runs were finished: at their defaults they leave the key as it was.
_LATER_FIELDS = {"cross_photo": False, "finetune_steps": 0, "init": None, "identity_weight": 0.0}
#: What shapes the identity term: only in the key when it is on.
_IDENTITY_FIELDS = ("identity_at", "identity_t_min", "identity_t_max")
#: What shapes the fine-tune stage 2 trains through: only in the key when that fine-tune runs.
_FINETUNE_FIELDS = ("finetune_weight", "finetune_lr", "finetune_rank")


def stage2_key(ctx: RunContext) -> str:
    d = dataclasses.asdict(ctx.cfg)
    for k in _FREE:
        d["stage2"].pop(k)
    if d["stage2"]["finetune_steps"] == 0:
        for k in _FINETUNE_FIELDS:
            d["stage2"].pop(k)
    if d["stage2"]["identity_weight"] == 0:
        for k in _IDENTITY_FIELDS:
            d["stage2"].pop(k)
    for k, default in _LATER_FIELDS.items():
        if d["stage2"][k] == default:
            d["stage2"].pop(k)
    # Condition fields at their defaults (the pixel model) leave the key as it was before they
    # existed, so finished pixel-conditioned runs are not redone.
    defaults = dataclasses.asdict(HypernetConfig())
    for k in _CONDITION_FIELDS:
        if d["stage2"]["model"][k] == defaults[k]:
            d["stage2"]["model"].pop(k)
    payload = {k: d[k] for k in ("base", "data", "stage1", "stage2")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_stage2(ctx: RunContext) -> None:
    final = ctx.stage2_dir / FINAL
    if final.is_file() and _final_key(final) == stage2_key(ctx):
        if ctx.dist.is_main:
            log.info("stage2: already done for these settings (%s), skipping", final)
        return
    from pretrain.face_embeddings import ensure_face_embeddings

    ensure_face_embeddings(ctx)  # once per corpus; skipped when cached (and for the pixel condition)
    recipe = Stage2Recipe(ctx)
    recipe.setup()
    try:
        recipe.train()
    finally:
        recipe.cleanup()


def _final_key(path) -> str | None:
    from hypernet.hypernetwork.export import read_info

    return read_info(path).metadata.get("stage2_key")


class Stage2Recipe:
    def __init__(self, ctx: RunContext):
        self.ctx, self.cfg, self.dist = ctx, ctx.cfg.stage2, ctx.dist
        self.key = stage2_key(ctx)

    # 1. Setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        self._setup_data()
        self._setup_base()
        self.identity = None
        if self.cfg.identity_weight > 0:
            from pretrain.identity_term import IdentityTerm

            self.identity = IdentityTerm(self)
        self._setup_model()
        self.step = 0
        ckpt = latest_checkpoint(self.ctx.stage2_dir / "checkpoints")
        if ckpt is not None:
            self._resume(ckpt)
        self.metrics = MetricsWriter(self.ctx.stage2_dir, self.step, enabled=self.dist.is_main)

    def _setup_data(self) -> None:
        self.data = PreparedData(self.ctx.prepared_dir)
        s1 = load_stage1(self.ctx.stage1_dir)
        self.s1 = s1
        self.samples: dict[str, list] = {}
        self.rows_of: dict[str, list[list]] = {}
        self.targets: dict[str, dict[str, torch.Tensor]] = {}
        for split in ("train", "val"):
            ids = s1.fitted(self.data.identities(split))
            self.targets[split] = s1.targets(ids)  # (n_ids, L, r, a) / (n_ids, L, b, r)
            self.samples[split] = [(j, row) for j, ident in enumerate(ids) for row in self.data.rows(ident)]
            self.rows_of[split] = [self.data.rows(ident) for ident in ids]  # identity index -> its rows
        # One adapter for everyone (A (L, r, a), B (L, b, r)): validation's bar for a hypernetwork that
        # has learned something about the person, rather than the mean target any input gets.
        self.mean_target = {k: v.mean(0) for k, v in self.targets["train"].items()}
        if not self.samples["train"]:
            raise InvalidInputError(
                f"stage2 must have training identities with stage-1 targets, got none in "
                f"{self.ctx.stage1_dir}: run `stage1` first"
            )
        self.emb = None
        if self.cfg.model.uses_identity:
            from pretrain.face_embeddings import FaceEmbeddings, embeddings_key

            self.emb = FaceEmbeddings(self.ctx.prepared_dir, embeddings_key(self.ctx))
        self.stream = SampleStream(len(self.samples["train"]), self.cfg.seed, self.ctx.cfg.data.flip)
        self.text_emb = self.data.text_emb().to(self.dist.device)  # (1, T, D)
        pooled = self.data.pooled()  # (1, P) or None (SD 1.x)
        self.pooled = pooled.to(self.dist.device) if pooled is not None else None
        if self.dist.is_main:
            log.info("stage2: %d train samples (%d identities), %d val samples (%d identities)",
                     len(self.samples["train"]), self.targets["train"]["A_train"].shape[0],
                     len(self.samples["val"]), self.targets["val"]["A_train"].shape[0])

    def _setup_base(self) -> None:
        pipe = self.ctx.pipe()
        self.pipe = pipe
        self.lidb = LiDB(pipe, self.s1.spec, name="hypernet", layers=self.s1.layers)
        for p in self.lidb.parameters():
            p.requires_grad_(False)  # the prediction is routed in through `use`; these never train
        self.net = denoiser(pipe)  # the UNet (SD 1.x, SDXL) or the transformer (SD3, FLUX)
        self.objective = objective_for(pipe)  # the family's noise, timesteps, target and conditioning
        self.num_train_timesteps = int(pipe.scheduler.config.num_train_timesteps)

    def _setup_model(self) -> None:
        c, spec = self.cfg, self.s1.spec
        mcfg = c.model.for_lidb(len(self.s1.layers), spec.a, spec.b, spec.r)  # heads from stage 1's spec
        self.model_cfg = mcfg
        torch.manual_seed(c.seed)  # same init on every rank (DDP also broadcasts rank 0's)
        self.model = HyperNetwork(mcfg).to(self.dist.device)
        if c.init is not None:
            self._load_init(c.init)
        dev = self.dist.device
        self.ddp = DDP(self.model, device_ids=[dev] if dev.type == "cuda" else None) if self.dist.distributed \
            else self.model
        encoder = self.model.encoder
        enc = [p for p in encoder.parameters() if p.requires_grad] if encoder is not None else []
        enc_ids = {id(p) for p in enc}
        rest = [p for p in self.model.parameters() if p.requires_grad and id(p) not in enc_ids]
        groups = [{"params": rest, "lr": c.lr}]
        if enc:
            groups.append({"params": enc, "lr": c.lr * c.encoder_lr_scale})
        self.opt = torch.optim.AdamW(groups, lr=c.lr, weight_decay=c.weight_decay)
        self.sched = cosine_with_warmup(self.opt, c.warmup_steps, c.steps, c.min_lr_ratio)
        self.ema = EMA(self.model, c.ema_decay) if c.ema_decay > 0 else None
        if self.dist.is_main:
            n = sum(p.numel() for p in self.model.parameters())
            enc_name = mcfg.encoder if mcfg.condition == "pixels" else (
                mcfg.face_encoder if mcfg.condition == "identity" else f"{mcfg.encoder} + {mcfg.face_encoder}")
            log.info("stage2: hypernetwork conditioned on %s (%s), %.2fM parameters, %d layers x (r=%d, a=%d, "
                     "b=%d)", mcfg.condition, enc_name, n / 1e6, mcfg.num_layers, mcfg.r, mcfg.a, mcfg.b)

    def _load_init(self, path: str) -> None:
        """`stage2.init`: another run's weights as the start (before the EMA copies them; a checkpoint
        of this run, when there is one, still wins)."""
        from hypernet.hypernetwork.export import load_hypernet

        other, info = load_hypernet(path)
        got = (dataclasses.asdict(other.cfg), info.spec, list(info.layers))
        want = (dataclasses.asdict(self.model_cfg), self.s1.spec, list(self.s1.layers))
        if {k: v for k, v in got[0].items() if k != "encoder_weights"} != \
                {k: v for k, v in want[0].items() if k != "encoder_weights"} or got[1:] != want[1:]:
            raise InvalidInputError(
                f"`stage2.init` must be a hypernetwork with this run's architecture and LiDB geometry "
                f"({self.model_cfg.condition}, {len(self.s1.layers)} layers x r={self.s1.spec.r}), got {path} "
                f"({other.cfg.condition}, {len(info.layers)} layers x r={info.spec.r}, other settings may differ)"
            )
        self.model.load_state_dict(other.state_dict())
        if self.dist.is_main:
            log.info("stage2: starting from the weights of %s", path)

    def _resume(self, ckpt) -> None:
        state = load_checkpoint(ckpt, self.key, self.dist)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])
        if self.dist.is_main:
            log.info("stage2: resumed from %s (step %d of %d)", ckpt, self.step, self.cfg.steps)

    def cleanup(self) -> None:
        self.lidb.remove()
        self.metrics.close()

    # 2. Checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        state = {
            "key": self.key, "step": self.step, "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "data_position": self.step * self._global_batch(),
        }
        save_checkpoint(self.ctx.stage2_dir / "checkpoints", self.step, state, self.dist,
                        self.cfg.keep_checkpoints)

    def _global_batch(self) -> int:
        return self.cfg.batch_size * self.dist.world_size * self.cfg.grad_accum

    # 3. Training ---------------------------------------------------------------------------
    def cond(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt's conditioning for n samples: text_emb (n, T, D), pooled (n, P) or None."""
        pooled = self.pooled.expand(n, -1) if self.pooled is not None else None
        return self.text_emb.expand(n, -1, -1), pooled

    def _batch(self, pairs: list[tuple[int, bool]], split: str = "train", gen: torch.Generator | None = None):
        """-> pixels (B, 3, R, R), latents (B, C, h, w), targets {A (B, L, r, a), B (B, L, b, r)},
        identity embeddings (B, 512) of the (mirrored where flipped) photos, or None (pixel condition).

        With `gen` (`stage2.cross_photo`) the latents are of another photo of the same person, drawn
        from `gen`, where the person has one; the condition is still the sampled photo."""
        picked = [(self.samples[split][i], f) for i, f in pairs]
        rows = [row for (_, row), _ in picked]
        flips = torch.tensor([f for _, f in picked])  # (B,)
        pix = self.data.pixels(rows)  # (B, 3, R, R)
        pix = torch.where(flips[:, None, None, None], pix.flip(-1), pix)
        lat_rows = rows if gen is None else [self._other_photo(split, j, row, gen) for (j, row), _ in picked]
        lat = torch.where(flips[:, None, None, None], self.data.latents(lat_rows, flip=True),
                          self.data.latents(lat_rows))  # (B, C, h, w)
        tidx = torch.tensor([j for (j, _), _ in picked])
        tgt = {k: v[tidx] for k, v in self.targets[split].items()}
        dev = self.dist.device
        ident = self.emb.get(rows, flips).to(dev) if self.emb is not None else None  # (B, 512)
        return pix.to(dev), lat.to(dev), {k: v.to(dev) for k, v in tgt.items()}, ident

    def _other_photo(self, split: str, j: int, row, gen: torch.Generator):
        """A row of identity j other than `row`, uniformly from `gen`; `row` itself when it is the only one."""
        others = [r for r in self.rows_of[split][j] if tuple(r) != tuple(row)]
        if not others:
            return row
        return others[int(torch.randint(len(others), (1,), generator=gen))]

    def predict(self, model, pix: torch.Tensor, ident: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The model's prediction for a batch: pixels only where the condition uses them."""
        return model(pix if self.cfg.model.uses_pixels else None, ident)

    def _loss_step(self, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        c, d = self.cfg, self.dist
        pairs = self.stream.micro_batch(self.step, micro, d.rank, d.world_size, c.grad_accum, c.batch_size)
        gen = torch.Generator().manual_seed(step_seed(c.seed, self.step, micro, d.rank))
        # The other photos are drawn first from the step's generator, so the run stays a pure
        # function of (seed, step, micro-step, rank) and resumes exactly.
        pix, lat, tgt, ident = self._batch(pairs, gen=gen if c.cross_photo else None)
        with self.ctx.autocast():
            pred = self.predict(self.ddp, pix, ident)  # {"A_train": (B, L, r, a), "B_train": (B, L, b, r)}
            dl = None
            if c.alpha > 0:
                self.lidb.use(pred)
                emb, pooled = self.cond(lat.shape[0])  # (B, T, D), (B, P) or None
                dl = self.objective.loss(self.net, lat, emb, gen, c.min_snr_gamma, pooled=pooled)
                self.lidb.use(None)
        l2 = weight_mse(pred, tgt)
        loss = hypernet_loss(dl, l2, c.alpha, c.beta)
        parts = {"l2": l2.item(), "diffusion": dl.item() if dl is not None else 0.0}
        ids = torch.tensor([self.samples["train"][i][0] for i, _ in pairs])  # (B,) identity of each sample
        at_pred = c.identity_weight > 0 and c.identity_at == "prediction"
        at_tuned = c.identity_weight > 0 and c.identity_at == "finetuned"
        if at_pred:  # the person in what the prediction makes (identity_term.py)
            idl = self.identity.loss(self, pred, lat, ids, gen).mean()
            loss = loss + c.identity_weight * idl
            parts["identity"] = idl.item()
        if c.finetune_steps > 0 and (c.finetune_weight > 0 or at_tuned):
            # through the fine-tune that follows at personalisation (through_finetune.py)
            from pretrain.through_finetune import finetuned_weights, first_order, loss_after

            rows = [self.samples["train"][i][1] for i, _ in pairs]
            seeds = [step_seed(c.seed, self.step, micro, d.rank, k) for k in range(len(rows))]
            theta = finetuned_weights(self, pred, rows, [f for _, f in pairs], seeds)
            after = torch.zeros((), device=lat.device)
            if c.finetune_weight > 0:
                dl_after = loss_after(self, theta, lat, gen)
                after = after + c.finetune_weight * dl_after
                parts["finetuned"] = dl_after.item()
            if at_tuned:
                id_after = self.identity.loss(self, theta, lat, ids, gen).mean()
                after = after + c.identity_weight * id_after
                parts["identity_finetuned"] = id_after.item()
            loss = loss + first_order(pred, theta, after)
        parts["loss"] = loss.item()
        return loss, parts

    def train_step(self) -> dict[str, float]:
        """grad_accum micro-steps (gradients synced on the last only), clip, AdamW, schedule."""
        c = self.cfg
        self.ddp.train()
        self.opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for micro in range(c.grad_accum):
            sync = micro == c.grad_accum - 1 or not self.dist.distributed
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                loss, parts = self._loss_step(micro)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"stage2: loss must be finite, got {loss.item()} at step {self.step}")
                (loss / c.grad_accum).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v / c.grad_accum
        params = [p for p in self.model.parameters() if p.requires_grad]
        gn = torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm or float("inf"))
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return {**sums, "grad_norm": float(gn), "lr": self.sched.get_last_lr()[0]}

    def train(self) -> None:
        c, d = self.cfg, self.dist
        if d.is_main:
            log.info("stage2: steps %d -> %d, global batch %d (%d x %d ranks x %d accum)", self.step,
                     c.steps, self._global_batch(), c.batch_size, d.world_size, c.grad_accum)
        bar = tqdm(total=c.steps, initial=self.step, desc="stage2", unit="step", disable=not d.is_main)
        t0, start = time.monotonic(), self.step
        while self.step < c.steps:
            m = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}")
            last = self.step == c.steps
            if self.step % c.log_every == 0 or last:
                m = self._mean_over_ranks(m)
                self.metrics.write(self.step, {f"train/{k}": v for k, v in m.items()})
                if d.is_main:
                    el = time.monotonic() - t0
                    left = el / (self.step - start) * (c.steps - self.step)
                    log.info("stage2: step %d/%d loss %.4f (diffusion %.4f, l2 %.5f) lr %.2e, ~%.0f s left",
                             self.step, c.steps, m["loss"], m["diffusion"], m["l2"], m["lr"], left)
            if self.step % c.val_every == 0 or last:
                self.metrics.write(self.step, self.validate())
            if self.step % c.ckpt_every == 0 or last:
                self.save_checkpoint()
        bar.close()
        self._write_final()

    def _mean_over_ranks(self, m: dict[str, float]) -> dict[str, float]:
        keys = sorted(m)
        t = torch.tensor([m[k] for k in keys], dtype=torch.float64, device=self.dist.device)
        all_reduce_sum(t)
        return {k: float(v) / self.dist.world_size for k, v in zip(keys, t.tolist(), strict=True)}

    # 4. Validation ---------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Held-out identities: weight-space error and diffusion loss of the predicted LiDB versus
        the zero adapter (the base) and the stage-1 LiDB, on the same noise and timesteps."""
        from pretrain.validation import validate_hypernet

        model = self.model
        if self.ema is not None:  # validate what will be exported
            model = HyperNetwork(self.model_cfg).to(self.dist.device)
            model.load_state_dict(self.model.state_dict())
            self.ema.copy_to(model)
        per_photo: dict[str, list[float]] = {}
        res = validate_hypernet(self, model, per_photo)
        if self.dist.is_main and per_photo:  # for `paired_difference` between runs
            path = self.ctx.stage2_dir / VAL_FINETUNED / f"step-{self.step:06d}.json"
            atomic_write_bytes(path, (json.dumps(per_photo, indent=1, sort_keys=True) + "\n").encode())
        if self.dist.is_main and res:
            log.info("stage2: val at step %d: weight mse %.5f (zero adapter %.5f, mean target %.5f), diffusion "
                     "loss %.5f (zero adapter %.5f, mean target %.5f, stage-1 %.5f)", self.step,
                     res["val/weight_mse"], res["val/weight_mse_zero"], res["val/weight_mse_mean"],
                     res["val/diffusion"], res["val/diffusion_zero"], res["val/diffusion_mean"],
                     res["val/diffusion_stage1"])
            if "val/diffusion_finetuned" in res:
                log.info("stage2: val at step %d after %d fine-tune steps, on another photo: diffusion loss %.5f "
                         "from the prediction, %.5f from zero (paired gap %+.5f +- %.5f s.e.)", self.step,
                         self.cfg.val_finetune_steps, res["val/diffusion_finetuned"],
                         res["val/diffusion_finetuned_zero"], res["val/diffusion_finetuned_gap"],
                         res["val/diffusion_finetuned_gap_se"])
            if "val/identity" in res:
                log.info("stage2: val at step %d, identity term (1 - cos, lower is the person): %.4f from the "
                         "prediction, %.4f from the base", self.step, res["val/identity"], res["val/identity_zero"])
            if "val/identity_finetuned" in res:
                log.info("stage2: val at step %d, identity term after the fine-tune: %.4f from the prediction, %.4f "
                         "from zero (paired gap %+.4f +- %.4f s.e.)", self.step, res["val/identity_finetuned"],
                         res["val/identity_finetuned_zero"], res["val/identity_finetuned_gap"],
                         res["val/identity_finetuned_gap_se"])
        return res

    # 5. Output -----------------------------------------------------------------------------
    def _write_final(self) -> None:
        if not self.dist.is_main:
            return
        model = self.model
        if self.ema is not None:
            self.ema.copy_to(model)
        info = HypernetInfo(self.model_cfg, self.s1.spec, self.s1.layers, self.s1.base_fingerprint,
                            self.data.resolution, arch=self.ctx.arch())
        save_hypernet(self.ctx.stage2_dir / FINAL, model, info, extra_meta={"stage2_key": self.key})
        from pretrain.metrics import read_metrics

        last = {k: v[-1][1] for k, v in read_metrics(self.metrics.csv_path).items() if k.startswith("val/")}
        atomic_write_bytes(self.ctx.stage2_dir / "summary.json",
                           json.dumps({"step": self.step, "key": self.key, **last}, indent=1).encode())
        log.info("stage2: wrote %s", self.ctx.stage2_dir / FINAL)


__all__ = ["FINAL", "Stage2Recipe", "run_stage2", "stage2_key"]

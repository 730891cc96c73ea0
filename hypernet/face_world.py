"""The face world: a small text-to-image latent-diffusion model trained here, on CPU, on real faces.

Random tiny bases generate noise, so nothing measured on them says whether personalisation
captures a face. This trains a real (small) one: a UNet2DConditionModel of ~16M parameters over
the latents of TAEF2 (a real pretrained autoencoder, `hypernet.base.taef2`), 128 px images ->
32x16x16 latents, conditioned on "a photo of a person" through the real CLIP tokenizer and a small
frozen CLIP text tower, on the *training* identities' photos only (the held-out ones are written to
`split.json` for evaluation). The output is a diffusers pipeline directory usable as `--base`.

Choices, from a probe on these machines: v-prediction (epsilon diverged at sampling after the
same training), min-SNR loss weighting (Hang et al. 2023: ~3x faster convergence), EMA weights
exported, caption dropout 10% so classifier-free guidance works, photos preprocessed exactly like
user photos (`hypernet.photos.face_crop`) plus flips and crop-margin jitter, all encoded once.

    nice -n 19 hdb base train-face-world --corpus ../shared/data/faces/caltech/identities.csv \
        --out runs/face_world --steps 1500 --threads 2  # resumable: rerun with --resume
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from hypernet.base.taef2 import TAEF2, load_taef2  # noqa: F401  (registers TAEF2 for loading)
from hypernet.base.tiny import clip_text_config
from hypernet.base.tokenizer import MODEL_MAX_LENGTH, load_clip_tokenizer, write_clip_tokenizer
from hypernet.errors import EnvironmentProblem, InvalidInputError, ModelNotFoundError
from hypernet.eval.corpus import IdentitySplit, read_manifest, split_identities
from hypernet.face_world_config import FaceWorldConfig
from hypernet.files import atomic_write_bytes
from hypernet.photos import _get_detector, _to_rgb, decode_image, detect_face, square_crop
from hypernet.training.losses import diffusion_loss

log = logging.getLogger(__name__)

__all__ = [
    "FACE_WORLD_RESOLUTION",
    "FaceWorldConfig",
    "FaceWorldTrainer",
    "default_taef2_dir",
    "face_world_scheduler_config",
    "face_world_text_config",
    "face_detection_rate",
    "face_world_unet_config",
    "sample_images",
    "tile",
    "train_face_world",
]

#: Image size of the face world (16x16 latents).
FACE_WORLD_RESOLUTION = 128
CAPTION = "a photo of a person"
#: First seed of the samples dlib scores at each export (the grid uses 0..grid_samples-1).
DETECT_SEED = 1000
#: Photos per on-disk latent shard (the unit of resumable encoding).
SHARD = 256


def default_taef2_dir() -> Path:
    """TAEF2 weights: $HDB_TAEF2_DIR, else ../shared/data/models/taef2 beside the checkout."""
    import os

    env = os.environ.get("HDB_TAEF2_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "models" / "taef2"


def face_world_unet_config(width: int = 64) -> dict:
    """Three levels (16, 8, 4), one layer per block, attention at 8x8 and 4x4 plus the mid block.

    width 64 -> blocks 64/128/256, 16.5M parameters. Attention and width at 16x16 cost the most on
    CPU: blocks 96/192/256 with attention at 16x16 (17.3M) took 1.6x the time per step.
    """
    return dict(
        sample_size=FACE_WORLD_RESOLUTION // 8,
        in_channels=32,
        out_channels=32,
        layers_per_block=1,
        block_out_channels=(width, 2 * width, 4 * width),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=4,  # diffusers' name for the number of heads
        norm_num_groups=32,
    )


def face_world_text_config() -> CLIPTextConfig:
    """A 2-layer, 128-wide CLIP text tower with the real 49,408-token vocabulary (kept frozen).

    Frozen random: the world sees only two captions, so training it would only move the
    embeddings of those tokens and leave every other token (e.g. "ohwx") off-distribution.
    """
    return clip_text_config(128, mlp_width=512)


def face_world_scheduler_config() -> dict:
    """SD's noise schedule with v-prediction; DDIM with trailing spacing samples from t=999."""
    return dict(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="trailing",
    )


def _load_crops(path: Path, margins: tuple[float, ...], detector: str) -> torch.Tensor:
    """One photo -> (len(margins), 3, 128, 128) in [-1, 1]; margin 0.5 equals `photos.preprocess`.

    The face is detected once per photo (MTCNN is the slow part), then cropped at each margin.
    """
    img = _to_rgb(decode_image(path))
    box = None
    if detector == "mtcnn" or (detector == "auto" and _get_detector() is not None):
        box = detect_face(img)
    out = []
    for m in margins:
        crop = square_crop(img, box, m).resize((FACE_WORLD_RESOLUTION,) * 2, Image.Resampling.LANCZOS)
        arr = np.asarray(crop, dtype=np.uint8).copy()  # (H, W, 3)
        out.append(torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0)
    return torch.stack(out)


def face_world_lr(step: int, cfg: FaceWorldConfig) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warm-up to `cfg.lr`, constant,
    then (with `cfg.decay_start`) a cosine from `cfg.lr` at `decay_start` to 0 at `cfg.steps`.

    A pure function of the step, so a run resumed with a later `steps` and a `decay_start` at the
    checkpoint's step anneals from where the constant phase left off."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
    if cfg.decay_start and step >= cfg.decay_start:
        progress = (step - cfg.decay_start) / (cfg.steps - cfg.decay_start)  # [0, 1)
        lr *= 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr


class FaceWorldTrainer:
    """setup -> train -> (save_checkpoint / export) -> cleanup; resumable from `out/checkpoint/`."""

    def __init__(self, corpus: str | Path, out: str | Path, cfg: FaceWorldConfig, taef2_dir: Path,
                 split: str | Path | None = None) -> None:
        self.corpus_path, self.out, self.cfg, self.taef2_dir = Path(corpus), Path(out), cfg, Path(taef2_dir)
        self.split_path = Path(split) if split else None
        self.ckpt = self.out / "checkpoint"
        self.step = 0
        self.history: list[dict] = []
        self.detections: list[dict] = []  # dlib face-detection rate of each export's samples

    # 1. Setup ----------------------------------------------------------------------------------
    def setup(self, resume: bool) -> None:
        cfg = self.cfg
        torch.set_num_threads(cfg.num_threads)
        self.out.mkdir(parents=True, exist_ok=True)
        if (self.ckpt / "state.json").is_file() and not resume:
            raise InvalidInputError(
                f"`out` must be empty or resumed with --resume, got a checkpoint in {str(self.out)!r}"
            )
        self._setup_split()
        self._setup_models()
        self._setup_data()
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=cfg.lr, weight_decay=0.01)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        if resume and (self.ckpt / "state.json").is_file():
            self._load_checkpoint()

    def _setup_split(self) -> None:
        corpus = read_manifest(self.corpus_path)
        split_file = self.out / "split.json"
        if self.split_path is not None:
            given = IdentitySplit.load(self.split_path)
            if split_file.is_file() and IdentitySplit.load(split_file) != given:
                raise InvalidInputError(
                    f"`split` must equal the split {str(self.out)!r} was trained with, got {str(self.split_path)!r}"
                )
            unknown = [i for i in given.train + given.holdout if i not in corpus.photos]
            if unknown:
                raise InvalidInputError(f"`split` must name identities of the corpus, got unknown {unknown[:5]}")
            self.split = given
            self.split.save(split_file)
        elif split_file.is_file():
            self.split = IdentitySplit.load(split_file)
        else:
            self.split = split_identities(corpus, self.cfg.holdout_identities, self.cfg.split_seed)
            self.split.save(split_file)
        # at most `max_photos` per person: many people matter more than many photos of a few
        self.files = [p for i in self.split.train for p in corpus.photos[i][: self.cfg.max_photos]]
        # the training identities' own manifest: what pretraining on this world may read
        rows = [f"{p},{i}" for i in self.split.train for p in corpus.photos[i]]
        atomic_write_bytes(self.out / "train_identities.csv", ("file,identity\n" + "\n".join(rows) + "\n").encode())
        log.info("face world: %d training photos of %d identities; %d held out",
                 len(self.files), len(self.split.train), len(self.split.holdout))

    def _setup_models(self) -> None:
        torch.manual_seed(self.cfg.seed)
        self.unet = UNet2DConditionModel(**face_world_unet_config(self.cfg.width))
        torch.manual_seed(self.cfg.seed + 2)
        self.text_encoder = CLIPTextModel(face_world_text_config()).eval().requires_grad_(False)
        self.vae = load_taef2(self.taef2_dir).requires_grad_(False)
        write_clip_tokenizer(self.out / "tokenizer")
        self.tokenizer = load_clip_tokenizer(self.out / "tokenizer")
        self.scheduler = DDIMScheduler(**face_world_scheduler_config())
        self.ema = {k: v.detach().clone() for k, v in self.unet.state_dict().items()}
        log.info("face world UNet: %.2fM parameters", sum(p.numel() for p in self.unet.parameters()) / 1e6)

    @torch.no_grad()
    def _setup_data(self) -> None:
        """Encode every training photo at every margin (and mirrored, with `mirror`) once.

        Encoding is the slow part on a CPU (TAEF2 costs ~0.1-1 s a crop): it is cached on disk in
        shards of `SHARD` photos, each keyed by its files and the crop settings, so a run killed
        while encoding resumes at the first missing shard.
        """
        cfg, shard_dir = self.cfg, self.out / "latents"
        shard_dir.mkdir(parents=True, exist_ok=True)
        settings = [repr(cfg.margins), cfg.detector, f"mirror={cfg.mirror}"]
        chunks = []
        for start in range(0, len(self.files), SHARD):
            files = self.files[start:start + SHARD]
            key = [str(p) for p in files] + settings
            path = shard_dir / f"shard{start // SHARD:05d}.pt"
            if path.is_file():
                saved = torch.load(path, weights_only=True)
                if saved.get("key") == key:
                    chunks.append(saved["latents"])
                    continue
            chunks.append(self._encode(files))
            torch.save({"key": key, "latents": chunks[-1]}, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
            log.info("encoded %d/%d photos", min(start + SHARD, len(self.files)), len(self.files))
        self.latents = torch.cat(chunks)  # (N * M * (1 + mirror), 32, 16, 16)
        ids = self.tokenizer(
            [CAPTION, ""], padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        self.cond, self.uncond = self.text_encoder(ids)[0]  # 2 x (77, 128)
        log.info("face world data: %d latents, std %.3f", len(self.latents), self.latents.std().item())

    @torch.no_grad()
    def _encode(self, files: list[Path]) -> torch.Tensor:
        """Photos -> scaled TAEF2 latents (len(files) * M * (1 + mirror), 32, 16, 16)."""
        out, group = [], 16  # photos per encoder call: fewer, larger calls on a CPU
        for i in range(0, len(files), group):
            pix = torch.cat([_load_crops(p, self.cfg.margins, self.cfg.detector)
                             for p in files[i:i + group]])  # (G*M, 3, 128, 128)
            if self.cfg.mirror:
                pix = torch.cat([pix, pix.flip(-1)])  # (2*G*M, 3, 128, 128): mirrored copies
            out.append(self.vae.encode(pix).latent_dist.mode() * self.vae.config.scaling_factor)
        return torch.cat(out)

    # 2. Train ----------------------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.cfg
        t0, losses = time.time(), []
        while self.step < cfg.steps:
            loss = self._loss_step()
            losses.append(loss)
            self.step += 1
            if self.step % 25 == 0:
                rate = (time.time() - t0) / len(losses)
                log.info("step %d/%d loss %.4f (%.2f s/step)", self.step, cfg.steps, np.mean(losses[-25:]), rate)
            checkpoint = self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps
            if checkpoint:
                rate = (time.time() - t0) / len(losses)
                self.history.append(dict(step=self.step, loss=float(np.mean(losses)), s_per_step=rate))
            if self.step % cfg.export_every == 0 or self.step == cfg.steps:
                self.export()
            if checkpoint:  # after the export, so that a resumed run keeps its detection rate
                self.save_checkpoint()
                t0, losses = time.time(), []

    def _loss_step(self) -> float:
        cfg = self.cfg
        idx = torch.randint(0, len(self.latents), (cfg.batch_size,), generator=self.gen)
        latents = self.latents[idx]  # (B, 32, 16, 16)
        drop = torch.rand(cfg.batch_size, generator=self.gen) < cfg.caption_dropout
        emb = torch.where(drop[:, None, None], self.uncond, self.cond)  # (B, 77, 128)
        for g in self.opt.param_groups:
            g["lr"] = face_world_lr(self.step, cfg)
        loss = diffusion_loss(self.unet, self.scheduler, latents, emb, self.gen, cfg.min_snr_gamma)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.opt.step()
        self._update_ema()
        return float(loss.detach())

    @torch.no_grad()
    def _update_ema(self) -> None:
        # warm-up: early averages would otherwise be dominated by the random initialisation
        d = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        for k, v in self.unet.state_dict().items():
            if v.dtype.is_floating_point:
                self.ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.ema[k].copy_(v)

    # 3. Checkpoint / export --------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Raw + EMA weights, optimizer and RNG state; state.json written last (atomic)."""
        self.ckpt.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.unet.state_dict().items()}, str(self.ckpt / "unet.safetensors"))
        save_file({k: v.contiguous() for k, v in self.ema.items()}, str(self.ckpt / "ema.safetensors"))
        torch.save({"opt": self.opt.state_dict(), "gen": self.gen.get_state()}, self.ckpt / "optim.pt")
        state = dict(step=self.step, config=asdict(self.cfg), history=self.history, detections=self.detections)
        atomic_write_bytes(self.ckpt / "state.json", json.dumps(state, indent=1).encode())

    def _load_checkpoint(self) -> None:
        state = json.loads((self.ckpt / "state.json").read_text())
        self.unet.load_state_dict(load_file(str(self.ckpt / "unet.safetensors")))
        self.ema = load_file(str(self.ckpt / "ema.safetensors"))
        extra = torch.load(self.ckpt / "optim.pt", weights_only=False)
        self.opt.load_state_dict(extra["opt"])
        self.gen.set_state(extra["gen"])
        self.step, self.history = int(state["step"]), list(state["history"])
        self.detections = list(state.get("detections", []))
        log.info("resumed face world at step %d", self.step)

    def pipeline(self) -> StableDiffusionPipeline:
        """The current model as a pipeline with the EMA UNet (a copy: training continues)."""
        unet = UNet2DConditionModel(**face_world_unet_config(self.cfg.width))
        unet.load_state_dict(self.ema)
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=unet.eval(),
            scheduler=self.scheduler, safety_checker=None, feature_extractor=None,
            image_encoder=None, requires_safety_checker=False,
        )

    def export(self) -> Path:
        """Write the diffusers pipeline (EMA UNet) + a 4x4 sample grid + face_world.json to `out`."""
        pipe = self.pipeline()
        pipe.save_pretrained(str(self.out), safe_serialization=True)
        pipe.set_progress_bar_config(disable=True)
        images, first = [], 0
        if self.cfg.grid_samples:
            images = sample_images(pipe, n=self.cfg.grid_samples, seed=0, steps=self.cfg.grid_steps)
            (self.out / "samples").mkdir(exist_ok=True)
            tile(images).save(self.out / "samples" / f"step{self.step:06d}.png")
        if self.cfg.detect_samples:  # other seeds than the grid's, and more of them
            first = DETECT_SEED
            images = sample_images(pipe, n=self.cfg.detect_samples, seed=first, steps=self.cfg.grid_steps)
        rate = face_detection_rate(images) if images else None
        if rate is not None:
            self.detections.append(dict(step=self.step, detected=rate, samples=len(images),
                                        seeds=f"{first}..{first + len(images) - 1}"))
            log.info("dlib found a face in %.0f%% of %d samples at step %d", 100 * rate, len(images), self.step)
        info = dict(step=self.step, config=asdict(self.cfg), split=asdict(self.split), history=self.history,
                    detections=self.detections,
                    unet_parameters=sum(p.numel() for p in pipe.unet.parameters()))
        atomic_write_bytes(self.out / "face_world.json", json.dumps(info, indent=1).encode())
        log.info("exported face world at step %d to %s", self.step, self.out)
        return self.out

    def cleanup(self) -> None:
        self.latents = torch.empty(0)


@torch.no_grad()
def sample_images(
    pipe: StableDiffusionPipeline, *, n: int = 16, seed: int = 0, prompt: str = CAPTION,
    steps: int = 25, guidance_scale: float = 3.0,
) -> list[Image.Image]:
    """`n` samples with seeds seed..seed+n-1 (batches of 8)."""
    images: list[Image.Image] = []
    for i in range(0, n, 8):
        k = min(8, n - i)
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(k)]
        images += pipe([prompt] * k, num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=gens, height=FACE_WORLD_RESOLUTION, width=FACE_WORLD_RESOLUTION).images
    return images


def face_detection_rate(images: list[Image.Image]) -> float | None:
    """Share of `images` where dlib finds a face; None without the `eval` extra (dlib)."""
    try:
        from hypernet.eval.faces import FaceEmbedder

        embedder = FaceEmbedder()
    except EnvironmentProblem:
        return None
    return float(np.mean([embedder.detect(im) for im in images]))


def tile(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile equally sized images row by row (`cols` default: ceil(sqrt(n)))."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def train_face_world(
    corpus: str | Path, out: str | Path, cfg: FaceWorldConfig | None = None, *,
    taef2_dir: str | Path | None = None, resume: bool = False, split: str | Path | None = None,
) -> Path:
    """Train (or resume) the face world; returns `out`, a pipeline directory usable as `--base`.

    Raises:
        ModelNotFoundError: the manifest or the TAEF2 weights are missing.
        InvalidInputError: bad settings, or `out` holds a checkpoint and `resume` is False.
    """
    cfg = cfg or FaceWorldConfig()
    taef2_dir = Path(taef2_dir) if taef2_dir else default_taef2_dir()
    if not (taef2_dir / "taef2_encoder.pth").is_file():
        raise ModelNotFoundError(f"`taef2_dir` must hold taef2_encoder.pth, got {str(taef2_dir)!r}")
    trainer = FaceWorldTrainer(corpus, out, cfg, taef2_dir, split=split)
    trainer.setup(resume)
    trainer.train()
    if not (trainer.out / "model_index.json").is_file():
        trainer.export()
    trainer.cleanup()
    return trainer.out


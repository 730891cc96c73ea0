"""SD 1.5 scale on CPU: adapter sizes per method, and time per training step at 256 px.

Sizes: the real SD 1.5 UNet architecture (sd15-architecture.md) built on the meta device (no
memory), each method's adapter attached by the library (LiDB, peft LoRA rank 4), and the artifact
saved with the method's own writer from zero tensors of the real shapes and key names - so the
byte counts are real files. DreamBooth's is computed (parameter count x bytes per parameter): its
artifact is the whole fine-tuned UNet, 3.4 GB in fp32.

Step times: the same UNet with random weights, one optimizer step of the library's training loop
(`hypernet.training.train`: AdamW, clipping, the diffusion loss) on a 256 px example (32x32
latents), for LiDB, LoRA and the full UNet (DreamBooth's trainable set). The first step is a
warm-up; the median of the rest is reported. Tiny mode uses the same code on a narrow UNet.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from benchmarks.harness import BenchContext, Outcome, peak_rss, ratio, reset_peak_rss, rss_bytes, summarize

log = logging.getLogger(__name__)

NAME = "sd15_scale"
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    norm_num_groups=32, act_fn="silu",
)
#: Same block layout (16 transformer blocks, 128 attention projections), narrow: the smoke-test UNet.
TINY_UNET = {**SD15_UNET, "block_out_channels": (32, 64, 64, 64), "sample_size": 8}
TEXT_DIM = 768  # CLIP ViT-L/14 text width: the UNet's cross-attention input
LORA_RANK = 4
RELAXED_RANK = 4  # PersonalizeConfig().rank: the relaxed LoRA of an Identity
FINGERPRINT = "0" * 16


# ---------------------------------------------------------------------------- sizes
def _meta_unet(cfg: dict):
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**cfg)


def sizes(work: Path) -> dict[str, Any]:
    """Parameter counts and saved-file bytes of each method's artifact at SD 1.5 shapes."""
    import torch

    from hypernet.adapters import LiDB, LiDBSpec, save_lidb, uninject
    from hypernet.identity import Identity
    from hypernet.methods.textual_inversion.method import TIArtifact

    work.mkdir(parents=True, exist_ok=True)
    unet = _meta_unet(SD15_UNET)
    unet_params = sum(p.numel() for p in unet.parameters())
    ns = SimpleNamespace(unet=unet)
    rows: dict[str, Any] = {}

    for label, spec in (("lidb", LiDBSpec(a=100, b=100, r=1)), ("lidb_a160_b80", LiDBSpec(a=160, b=80, r=1))):
        handle = LiDB(ns, spec)
        layers, n = list(handle.layer_names), handle.num_parameters()
        shapes = [(m.base_layer.in_features, m.base_layer.out_features) for m in handle.layers.values()]
        uninject(ns)
        weights = {"A_train": torch.zeros(len(layers), spec.r, spec.a),  # (L, r, a)
                   "B_train": torch.zeros(len(layers), spec.b, spec.r)}  # (L, b, r)
        nbytes = save_lidb(work / f"{label}.safetensors", weights, spec, layers, FINGERPRINT)
        rows[label] = {"params": n, "bytes": nbytes, "layers": len(layers), "how": "saved file (save_lidb)"}
        if label == "lidb":
            lidb_spec, lidb_layers, lidb_shapes, lidb_weights = spec, layers, shapes, weights

    relaxed = {}
    for i, (n_in, n_out) in enumerate(lidb_shapes):
        relaxed[f"{i}.A"] = torch.zeros(RELAXED_RANK, n_in)  # (R, n_in)
        relaxed[f"{i}.B"] = torch.zeros(n_out, RELAXED_RANK)  # (n_out, R)
    # relax="subspace": the LiDB core itself at rank R inside the aux bases, no LoRA beside it
    sub_spec = dataclasses.replace(lidb_spec, r=RELAXED_RANK)
    sub_weights = {"A_train": torch.zeros(len(lidb_layers), RELAXED_RANK, sub_spec.a),  # (L, R, a)
                   "B_train": torch.zeros(len(lidb_layers), sub_spec.b, RELAXED_RANK)}  # (L, b, R)
    for label, spec, core, rel in (("hyperdreambooth_identity", lidb_spec, lidb_weights, relaxed),
                                   ("hyperdreambooth_identity_subspace", sub_spec, sub_weights, {}),
                                   ("hypernetwork_only_identity", lidb_spec, lidb_weights, {})):
        ident = Identity(spec=spec, layers=lidb_layers, shapes=lidb_shapes, base_fingerprint=FINGERPRINT,
                         lidb=core, relaxed=rel)
        path = work / f"{label}.safetensors"
        rows[label] = {"params": sum(v.numel() for v in [*core.values(), *rel.values()]),
                       "bytes": ident.save(path), "how": "saved file (Identity.save)"}

    rows["lora_r4"] = _lora_size(work)
    ti = TIArtifact("ohwx", torch.zeros(1, TEXT_DIM))
    rows["textual_inversion"] = {"params": TEXT_DIM, "bytes": ti.save(work / "ti.safetensors"),
                                 "how": "saved file (TIArtifact.save)"}
    rows["dreambooth_unet_fp32"] = {"params": unet_params, "bytes": unet_params * 4,
                                    "how": "computed: UNet parameters x 4 bytes (not saved)"}
    rows["dreambooth_unet_fp16"] = {"params": unet_params, "bytes": unet_params * 2,
                                    "how": "computed: UNet parameters x 2 bytes (not saved)"}
    db = rows["dreambooth_unet_fp32"]["bytes"]
    ratios = {f"dreambooth_fp32_over_{k}": ratio(db, rows[k]["bytes"])
              for k in ("lidb", "lidb_a160_b80", "hyperdreambooth_identity", "hyperdreambooth_identity_subspace",
                        "hypernetwork_only_identity", "lora_r4", "textual_inversion")}
    ratios["dreambooth_fp16_over_lidb"] = ratio(rows["dreambooth_unet_fp16"]["bytes"], rows["lidb"]["bytes"])
    ratios["dreambooth_fp16_over_hyperdreambooth_identity"] = ratio(
        rows["dreambooth_unet_fp16"]["bytes"], rows["hyperdreambooth_identity"]["bytes"])
    return {"unet_params": unet_params, "artifacts": rows, "ratios": ratios}


def _lora_size(work: Path) -> dict[str, Any]:
    """peft LoRA rank 4 on the UNet attention projections, saved as the LoRA method saves it."""
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from hypernet.methods.lora.config import UNET_TARGETS
    from hypernet.methods.lora.method import LoRAArtifact

    unet = _meta_unet(SD15_UNET)
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=list(UNET_TARGETS)),
                     adapter_name="bench")
    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name="bench"))
    tensors = {f"unet.{k}": torch.zeros(v.shape) for k, v in sd.items()}  # real names and shapes
    art = LoRAArtifact(tensors, {"hdb_method": "lora", "hdb_rank": str(LORA_RANK)})
    return {"params": sum(t.numel() for t in tensors.values()), "bytes": art.save(work / "lora_r4.safetensors"),
            "layers": len(tensors) // 2, "how": "saved file (LoRAArtifact.save, peft state dict)"}


# ---------------------------------------------------------------------------- step times
def step_times(ctx: BenchContext) -> dict[str, Any]:
    """Seconds per training step of LiDB, LoRA and the full UNet at 256 px (tiny: narrow UNet)."""
    import psutil
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from hypernet.base.tiny import SD_SCHEDULER

    cfg = ctx.pick(SD15_UNET, TINY_UNET)
    px = ctx.pick(256, 64)
    steps = ctx.pick(3, 2)  # the first is a warm-up (~7 s per 256 px fwd+bwd on 2 cores: few repeats)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg)
    build_s = time.perf_counter() - t0
    log.info("sd15_scale: built the %s UNet in %.1f s", "SD 1.5" if not ctx.tiny else "narrow", build_s)
    n_params = sum(p.numel() for p in unet.parameters())
    pipe = SimpleNamespace(unet=unet, text_encoder=None, scheduler=DDPMScheduler(**SD_SCHEDULER))
    gen = torch.Generator().manual_seed(0)
    from hypernet.training import TrainData

    data = TrainData(latents=torch.randn(1, 4, px // 8, px // 8, generator=gen),  # (1, 4, h, w)
                     text_emb=torch.randn(1, 77, TEXT_DIM, generator=gen))  # (1, 77, 768)
    out: dict[str, Any] = {"resolution": px, "unet_params": n_params, "build_s": build_s, "steps_per_variant": steps}
    # Full UNet first, while the model is clean; then LiDB (removed after), then peft LoRA.
    # weights + grads + 2 AdamW moments (fp32) + activations, and 4 GiB left for whoever else runs here:
    # on a shared machine an out-of-memory kill could hit another process.
    need = n_params * 4 * 4 + (3 << 30) + (4 << 30)
    avail = psutil.virtual_memory().available
    if avail >= need:
        out["full_unet"] = _train_steps(pipe, list(unet.parameters()), data, steps)
        out["full_unet"]["what"] = "library training step (AdamW over every UNet parameter)"
    else:
        out["full_unet"] = _fwd_bwd_steps(pipe, data, steps)
        out["full_unet"]["what"] = (f"forward+backward only: AdamW state would need {need / 2**30:.1f} GiB, "
                                    f"{avail / 2**30:.1f} GiB were free")
    log.info("sd15_scale: full UNet %s", out["full_unet"]["step_s"])
    out["lidb"] = _lidb_steps(pipe, data, steps)
    log.info("sd15_scale: LiDB %s", out["lidb"]["step_s"])
    out["lora_r4"] = _lora_steps(pipe, data, steps)
    log.info("sd15_scale: LoRA %s", out["lora_r4"]["step_s"])
    full = out["full_unet"]["step_s"]["median"]
    out["ratios"] = {"full_over_lidb": ratio(full, out["lidb"]["step_s"]["median"]),
                     "full_over_lora": ratio(full, out["lora_r4"]["step_s"]["median"])}
    return out


def _train_steps(pipe, params, data, steps: int) -> dict[str, Any]:
    from hypernet.training import TrainConfig, train

    elapsed: list[float] = []
    reset_peak_rss()
    before = rss_bytes() or 0
    train(pipe, params, data, TrainConfig(steps=steps, flip=False, log_every=0),
          progress=lambda ev: elapsed.append(ev.elapsed) if ev.loss is not None else None, stage="bench")
    per_step = [b - a for a, b in zip([0.0, *elapsed[:-1]], elapsed, strict=True)][1:]  # drop the warm-up step
    return {"step_s": summarize(per_step), "trainable_params": sum(p.numel() for p in params),
            "peak_rss_above_start_bytes": max(0, (peak_rss() or 0) - before)}


def _fwd_bwd_steps(pipe, data, steps: int) -> dict[str, Any]:
    """The full UNet's forward + backward through the library loss, without an optimizer."""
    import torch

    from hypernet.training import diffusion_loss, make_noise_scheduler

    sched, gen, times = make_noise_scheduler(pipe), torch.Generator().manual_seed(0), []
    reset_peak_rss()
    before = rss_bytes() or 0
    pipe.unet.train()
    for _ in range(steps):
        t0 = time.perf_counter()
        diffusion_loss(pipe.unet, sched, data.latents, data.text_emb, gen).backward()
        times.append(time.perf_counter() - t0)
        pipe.unet.zero_grad(set_to_none=True)
    return {"step_s": summarize(times[1:]), "trainable_params": sum(p.numel() for p in pipe.unet.parameters()),
            "peak_rss_above_start_bytes": max(0, (peak_rss() or 0) - before)}


def _lidb_steps(pipe, data, steps: int) -> dict[str, Any]:
    from hypernet.adapters import LiDB, default_spec_for, uninject

    spec = default_spec_for(pipe)
    handle = LiDB(pipe, spec)
    try:
        out = _train_steps(pipe, list(handle.parameters()), data, steps)
    finally:
        uninject(pipe)
    out["spec"] = {"a": spec.a, "b": spec.b, "r": spec.r, "layers": len(handle.layer_names)}
    return out


def _lora_steps(pipe, data, steps: int) -> dict[str, Any]:
    from peft import LoraConfig

    from hypernet.methods.lora.config import UNET_TARGETS

    pipe.unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                     target_modules=list(UNET_TARGETS)), adapter_name="bench")
    params = [p for n, p in pipe.unet.named_parameters() if "lora_" in n]
    out = _train_steps(pipe, params, data, steps)
    out["rank"] = LORA_RANK
    return out


# ---------------------------------------------------------------------------- the benchmark
def run(ctx: BenchContext) -> Outcome:
    results = {"sizes": sizes(ctx.work_dir / "sd15-sizes"), "step_times": step_times(ctx)}
    settings = {
        "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in SD15_UNET.items()},
        "step_unet": "SD 1.5 (random weights)" if not ctx.tiny else "narrow SD-layout UNet (tiny mode)",
        "lora_rank": LORA_RANK, "relaxed_rank": RELAXED_RANK, "lidb": "a = b = 100, r = 1 (paper)",
        "optimizer": "AdamW via hypernet.training.train (batch 1, no gradient checkpointing, fp32)",
    }
    notes = [
        "Sizes at SD 1.5 shapes are real saved files except DreamBooth's, which is the UNet's parameter count x "
        "bytes per parameter (4 fp32, 2 fp16); the paper's '10,000x smaller' compares LiDB to DreamBooth.",
        "hyperdreambooth_identity_subspace is the default relax='subspace': the fine-tune relaxes the rank "
        "inside the LiDB subspace (A_train R x a, B_train b x R, R = 4), so only the rank-4 core is stored.",
        "hyperdreambooth_identity is relax='lora': the LiDB prediction plus a rank-4 LoRA over the full layer "
        "dimensions, so it is the larger; the hypernetwork-only identity is LiDB alone.",
    ]
    if ctx.tiny:
        notes.append("Tiny mode: step times are for a narrow UNet with SD 1.5's block layout, not SD 1.5.")
    return Outcome(settings, results, notes)

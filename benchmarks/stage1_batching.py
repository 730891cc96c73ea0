"""Stage-1 batching: LiDB fits per hour with K identities per UNet call vs one at a time.

Pretraining's stage 1 fits one LiDB per identity (`hypernet.methods.lidb.train_lidb_batch`).
One identity's micro-batch at face-world scale (4 latents of 32x16x16) keeps 2 CPU cores mostly
waiting on kernel overheads; K identities share every UNet call through per-sample adapter
weights. Every variant runs the same steps per identity with the same code (K = 1 is a chunk of
one), alternating run by run, so the ratios are the batching alone. Speed does not depend on the
weights, so the base is a face-world-shaped pipeline with random weights
(`face_world_unet_config()`, the face world's text tower and scheduler); latents are random.
Also checked: an identity's weights fitted alone and in a chunk agree to float round-off.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.harness import BenchContext, Outcome, measure_interleaved, ratio

NAME = "stage1_batching"
#: Steps per identity of the production config (pretrain/configs/face-world-cpu.yaml).
PRODUCTION_STEPS = 100
BATCH_SIZE = 4
PHOTOS_PER_IDENTITY = 2


def face_world_shaped_pipe(seed: int = 0):
    """A face-world pipeline (UNet, text tower, scheduler, tokenizer) with random weights."""
    import tempfile
    from pathlib import Path

    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from hypernet.base.face_world import face_world_scheduler_config, face_world_text_config, face_world_unet_config
    from hypernet.base.taef2 import TAEF2
    from hypernet.base.tokenizer import load_clip_tokenizer, write_clip_tokenizer

    torch.manual_seed(seed)
    tok_dir = Path(tempfile.mkdtemp(prefix="hdb-fw-tok-"))
    write_clip_tokenizer(tok_dir)
    pipe = StableDiffusionPipeline(
        vae=TAEF2().eval(), text_encoder=CLIPTextModel(face_world_text_config()).eval(),
        tokenizer=load_clip_tokenizer(tok_dir), unet=UNet2DConditionModel(**face_world_unet_config()).eval(),
        scheduler=DDIMScheduler(**face_world_scheduler_config()), safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False,
    )
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    return pipe


def _tiny_pipe():
    import tempfile
    from pathlib import Path

    from hypernet.base import load_pipeline
    from hypernet.base.tiny import make_tiny_pipeline

    pipe = load_pipeline(make_tiny_pipeline(Path(tempfile.mkdtemp(prefix="hdb-tiny-")), seed=0), device="cpu",
                         dtype="fp32")
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    return pipe


def run(ctx: BenchContext) -> Outcome:
    from hypernet.adapters import LiDB, default_spec_for, lidb_layers
    from hypernet.methods.lidb import LiDBFitData, train_lidb_batch
    from hypernet.training import TrainConfig, encode_prompts

    pipe = _tiny_pipe() if ctx.tiny else face_world_shaped_pipe()
    spec = default_spec_for(pipe)
    layers = lidb_layers(pipe, spec)
    handle = LiDB(pipe, spec, name="bench-stage1", layers=layers)
    init = handle.state_dict()
    text_emb = encode_prompts(pipe, ["a photo of ohwx person"])  # (1, 77, D)
    c, s = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    ks = ctx.pick([1, 16, 32, 64], [1, 4])
    steps = ctx.pick(3, 1)
    cfg = TrainConfig(steps=steps, lr=0.01, batch_size=BATCH_SIZE, weight_decay=0.0, seed=0)
    g = torch.Generator().manual_seed(0)
    items = [LiDBFitData(torch.randn(PHOTOS_PER_IDENTITY, c, s, s, generator=g),
                         torch.randn(PHOTOS_PER_IDENTITY, c, s, s, generator=g), seed=i) for i in range(max(ks))]
    try:
        # Same identity, alone vs first of a chunk of max(ks): only float round-off may differ.
        alone = train_lidb_batch(pipe, handle, items[:1], text_emb, cfg, init=init)[0][0]
        chunk = train_lidb_batch(pipe, handle, items, text_emb, cfg, init=init)[0][0]
        diff = max(float((alone[k] - chunk[k]).abs().max()) for k in alone)
        scale = max(float(alone[k].abs().max()) for k in alone)
        t = measure_interleaved(
            {f"K={k}": (lambda k=k: train_lidb_batch(pipe, handle, items[:k], text_emb, cfg, init=init)) for k in ks},
            warmup=1, repeats=ctx.pick(3, 1))
    finally:
        handle.remove()
    base = t["K=1"]["median"] / steps  # seconds per identity-step at K = 1
    results: dict[str, Any] = {}
    for k in ks:
        per_step = t[f"K={k}"]["median"] / steps  # one step of K identities
        results[f"K={k}"] = {
            "run_s": t[f"K={k}"], "seconds_per_step": per_step,
            "identity_steps_per_s": k / per_step,
            "identities_per_hour_at_production_steps": 3600 * k / (per_step * PRODUCTION_STEPS),
            "speedup_vs_K1": ratio(base, per_step / k),
        }
    results["alone_vs_chunk_max_abs_diff"] = diff
    results["weights_max_abs"] = scale
    settings = {
        "base": ctx.pick("face-world-shaped pipeline, random weights (16.5M-param UNet, 32x16x16 latents)",
                         "embedded tiny base"),
        "lidb": {"a": spec.a, "b": spec.b, "r": spec.r, "layers": len(layers)},
        "batch_size_per_identity": BATCH_SIZE, "photos_per_identity": PHOTOS_PER_IDENTITY,
        "timed_steps": steps, "production_steps": PRODUCTION_STEPS, "identities_per_call": ks,
        "torch_threads": torch.get_num_threads(),
    }
    notes = ["identities/hour are for ONE process with the torch threads shown; `torchrun --nproc-per-node 2` "
             "with 1 thread each runs two such processes on 2 cores.",
             "alone_vs_chunk_max_abs_diff: the largest weight difference of identity 0 fitted alone vs in the "
             "largest chunk (same seed, same steps): float round-off only."]
    return Outcome(settings, results, notes)

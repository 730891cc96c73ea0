"""Stage-1 batching: LiDB fits per hour with K identities per UNet call vs one at a time.

Pretraining's stage 1 fits one LiDB per identity (`hypernet.methods.lidb.train_lidb_batch`).
One identity's micro-batch at face-world scale (4 latents of 32x16x16) keeps 2 CPU cores mostly
waiting on kernel overheads; K identities share every UNet call through per-sample adapter
weights. Every variant runs the same steps per identity with the same code (K = 1 is a chunk of
one), alternating run by run, so the ratios are the batching alone. Speed does not depend on the
weights, so the base is a face-world-shaped pipeline with random weights
(`face_world_unet_config()`, the face world's text tower and scheduler); latents are random.
Both wall time and this process's CPU time are recorded: on a shared machine the CPU time of a
1-thread run is the steadier measure of the work. Also checked: an identity's weights fitted alone
and in a chunk agree to float round-off.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.harness import BenchContext, Outcome, ratio, summarize

NAME = "stage1_batching"
#: Steps per identity of the production config (pretrain/configs/face-world-cpu.yaml).
PRODUCTION_STEPS = 60
BATCH_SIZE = 4
PHOTOS_PER_IDENTITY = 2


def face_world_shaped_pipe(seed: int = 0):
    """A face-world pipeline (UNet, text tower, scheduler, tokenizer) with random weights."""
    import tempfile
    from pathlib import Path

    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from hypernet.base.taef2 import TAEF2
    from hypernet.base.tokenizer import load_clip_tokenizer, write_clip_tokenizer
    from hypernet.face_world import face_world_scheduler_config, face_world_text_config, face_world_unet_config

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


def _interleaved(fns: dict, repeats: int) -> dict[str, dict[str, dict[str, Any]]]:
    """`repeats` rounds alternating the variants (A B C A B C):
    {variant: {"wall": summary, "cpu": summary}} (CPU: this process's user + system time)."""
    runs: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            runs[k]["wall"].append(time.perf_counter() - w0)
            runs[k]["cpu"].append(time.process_time() - c0)
    return {k: {c: summarize(v) for c, v in r.items()} for k, r in runs.items()}


def run(ctx: BenchContext) -> Outcome:
    from hypernet.adapters import LiDB, default_spec_for, lidb_layers
    from hypernet.methods.lidb import LiDBFitData, train_lidb_batch
    from hypernet.training import TrainConfig, encode_prompts
    from pretrain.config import Stage1Config

    pipe = _tiny_pipe() if ctx.tiny else face_world_shaped_pipe()
    spec = default_spec_for(pipe)
    layers = lidb_layers(pipe, spec)
    handle = LiDB(pipe, spec, name="bench-stage1", layers=layers)
    init = handle.state_dict()
    text_emb = encode_prompts(pipe, ["a photo of ohwx person"])  # (1, 77, D)
    c, s = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    ks = ctx.pick([1, 16, 32, 64], [1, 4])
    steps = 1
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
        def fit_all(k: int) -> None:  # every variant fits the same identities, k per call
            for i in range(0, len(items), k):
                train_lidb_batch(pipe, handle, items[i : i + k], text_emb, cfg, init=init)

        for k in ks:  # warm-up: one chunk of each size
            train_lidb_batch(pipe, handle, items[:k], text_emb, cfg, init=init)
        t = _interleaved({f"K={k}": (lambda k=k: fit_all(k)) for k in ks}, repeats=ctx.pick(2, 1))
    finally:
        handle.remove()
    results: dict[str, Any] = {}
    n = len(items)
    for clock in ("wall", "cpu"):
        base = t["K=1"][clock]["median"]
        for k in ks:
            run_s = t[f"K={k}"][clock]["median"]  # n identities x `steps` steps, k per call
            per_identity_step = run_s / (n * steps)
            results.setdefault(f"K={k}", {})[clock] = {
                "run_s": t[f"K={k}"][clock], "seconds_per_identity_step": per_identity_step,
                "identities_per_hour_at_production_steps": 3600 / (per_identity_step * PRODUCTION_STEPS),
                "speedup_vs_K1": ratio(base, run_s),
            }
    results["alone_vs_chunk_max_abs_diff"] = diff
    results["weights_max_abs"] = scale
    settings = {
        "base": ctx.pick("face-world-shaped pipeline, random weights (16.5M-param UNet, 32x16x16 latents)",
                         "embedded tiny base"),
        "lidb": {"a": spec.a, "b": spec.b, "r": spec.r, "layers": len(layers)},
        "batch_size_per_identity": BATCH_SIZE, "photos_per_identity": PHOTOS_PER_IDENTITY,
        "identities_fitted_per_variant": n, "timed_steps": steps, "production_steps": PRODUCTION_STEPS,
        "identities_per_call": ks, "default_identities_per_call": Stage1Config().identities_per_call,
        "torch_threads": torch.get_num_threads(),
    }
    notes = ["identities/hour are for ONE process with the torch threads shown; `torchrun --nproc-per-node 2` "
             "with 1 thread each runs two such processes on 2 cores.",
             "alone_vs_chunk_max_abs_diff: the largest weight difference of identity 0 fitted alone vs in the "
             "largest chunk (same seed, same steps): float round-off only."]
    return Outcome(settings, results, notes)

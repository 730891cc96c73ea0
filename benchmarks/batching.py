"""Batching: images/s for 8 different identities in one batched call vs one after another.

`hypernet.batch_generate.generate_batch` runs sample i with identity i's LiDB + relaxed LoRA as
per-sample adapter weights, so 8 users' images share every UNet call. Sequential = the same
function with one request at a time (the same code path, so the ratio is the batching alone).
Target (issue 7): batched >= 3x the sequential images/s. Both variants alternate run by run, and
the batched images are checked against the sequential ones (an image must not depend on its
batch-mates).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.assets import hypernet_source, load_pipe, photo_bytes
from benchmarks.harness import BenchContext, Outcome, measure_interleaved, ratio

NAME = "batching"
N_IDENTITIES = 8
TARGET_SPEEDUP = 3.0
PROMPT = "a photo of ohwx person"


def run(ctx: BenchContext) -> Outcome:
    from hypernet.batch_generate import GenRequest, generate_batch
    from hypernet.personalize import load_runtime, personalize

    pipe = load_pipe()
    hyper = hypernet_source(ctx, pipe)
    runtime = load_runtime(str(hyper.path))
    photos, source = photo_bytes(N_IDENTITIES)
    ft_steps = ctx.pick(40, 1)
    detector = ctx.pick("auto", "center")  # tiny: skip MTCNN; the identities only need to differ
    identities = [personalize(pipe, p, hypernet=runtime, steps=ft_steps, seed=i, detector=detector)
                  for i, p in enumerate(photos)]
    native = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    sizes = ctx.pick([native, 2 * native], [native])
    steps = ctx.pick(25, 2)
    results: dict[str, Any] = {}
    for size in sizes:
        reqs = [GenRequest(PROMPT, identity=ident, seed=i, steps=steps, height=size, width=size)
                for i, ident in enumerate(identities)]
        batched = generate_batch(pipe, reqs)
        sequential = [generate_batch(pipe, [r])[0] for r in reqs]
        diff = max(int(np.abs(np.asarray(b[0], np.int16) - np.asarray(s[0], np.int16)).max())
                   for b, s in zip(batched, sequential, strict=True))
        t = measure_interleaved(
            {"batched": lambda reqs=reqs: generate_batch(pipe, reqs),
             "sequential": lambda reqs=reqs: [generate_batch(pipe, [r]) for r in reqs]},
            warmup=1, repeats=ctx.pick(5, 1))
        results[f"{size}px"] = {
            "batched_s": t["batched"], "sequential_s": t["sequential"],
            "batched_images_per_s": N_IDENTITIES / t["batched"]["median"],
            "sequential_images_per_s": N_IDENTITIES / t["sequential"]["median"],
            "speedup": ratio(t["sequential"]["median"], t["batched"]["median"]),
            "meets_target": (ratio(t["sequential"]["median"], t["batched"]["median"]) or 0) >= TARGET_SPEEDUP,
            "max_pixel_diff_batched_vs_sequential": diff,
        }
    settings = {
        "identities": N_IDENTITIES, "identity_finetune_steps": ft_steps, "photos": source,
        "hypernetwork": hyper.to_json(), "generate_steps": steps, "scheduler": "DPM-Solver++ 2M (generate_batch)",
        "guidance": GenRequest(PROMPT).guidance, "sizes": sizes, "target_speedup": TARGET_SPEEDUP,
        "base": "embedded tiny base",
    }
    notes = ["max_pixel_diff_batched_vs_sequential is in 0..255 per channel: 0-2 means batching does not change "
             "the images beyond float rounding."]
    return Outcome(settings, results, notes)

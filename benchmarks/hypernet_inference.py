"""Hypernetwork inference: torch vs onnxruntime latency at batch 1 and 8 (CPU).

Both backends load the same export through `HypernetRuntime` (what `personalize` and the service
use); the two variants alternate run by run so a noisy machine affects both alike. The outputs of
the two backends are compared too (max abs difference), so a fast but wrong export shows up.
"""

from __future__ import annotations

from typing import Any

from benchmarks.assets import hypernet_source, load_pipe
from benchmarks.harness import BenchContext, Outcome, measure_interleaved, ratio

NAME = "hypernet_inference"
BATCHES = (1, 8)


def run(ctx: BenchContext) -> Outcome:
    import torch

    from hypernet.hypernetwork import HypernetRuntime

    pipe = load_pipe()
    hyper = hypernet_source(ctx, pipe)
    del pipe
    runtimes = {b: HypernetRuntime.load(hyper.path, backend=b) for b in ("torch", "onnx")}
    res = runtimes["torch"].resolution
    repeats, inner = ctx.pick(15, 1), ctx.pick(5, 1)
    results: dict[str, Any] = {}
    for n in BATCHES:
        gen = torch.Generator().manual_seed(n)
        pixels = torch.rand(n, 3, res, res, generator=gen) * 2 - 1  # (N, 3, R, R) in [-1, 1]
        outs = {b: rt.predict(pixels) for b, rt in runtimes.items()}
        diff = max(float((outs["torch"][k] - outs["onnx"][k]).abs().max()) for k in outs["torch"])
        t = measure_interleaved({b: (lambda rt=rt, x=pixels: rt.predict(x)) for b, rt in runtimes.items()},
                                warmup=ctx.pick(3, 1), repeats=repeats, inner=inner)
        results[f"batch{n}"] = {
            "torch_s": t["torch"], "onnx_s": t["onnx"],
            "onnx_speedup": ratio(t["torch"]["median"], t["onnx"]["median"]),
            "torch_per_image_s": t["torch"]["median"] / n, "onnx_per_image_s": t["onnx"]["median"] / n,
            "max_abs_diff": diff,
        }
    cfg = runtimes["torch"].config
    settings = {
        "hypernetwork": hyper.to_json(), "resolution": res, "batches": list(BATCHES), "repeats": repeats,
        "calls_per_run": inner, "torch_threads": torch.get_num_threads(),
        "architecture": {"encoder": cfg.encoder, "encoder_kwargs": cfg.encoder_kwargs, "image_size": cfg.image_size,
                         "decoder_dim": cfg.dim, "decoder_depth": cfg.depth, "iterations": cfg.iterations,
                         "layers": cfg.num_layers, "a": cfg.a, "b": cfg.b, "r": cfg.r},
    }
    notes = ["onnxruntime: CPUExecutionProvider with intra-op thread spinning off (HypernetRuntime's setting, "
             "which keeps it from slowing torch in the same process on small machines)."]
    return Outcome(settings, results, notes)

"""GPU timings: personalisation (hypernetwork + 40-step fine-tune) and generation on CUDA.

Runs only where torch sees a CUDA device; elsewhere it records, explicitly, that no GPU was
available (and why) instead of guessing numbers. Results are labelled with the GPU's name.
"""

from __future__ import annotations

from typing import Any

from benchmarks.assets import hypernet_source, load_pipe, photo_bytes
from benchmarks.harness import BenchContext, Outcome, gpu_name, measure

NAME = "gpu"


def run(ctx: BenchContext) -> Outcome:
    import torch

    name = gpu_name()
    if name is None:
        reason = ("no CUDA device in this session: torch.cuda.is_available() is False "
                  f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
        return Outcome({"device": "cuda"}, {"available": False, "reason": reason},
                       [f"GPU benchmark not run: {reason}. No GPU numbers are reported or estimated."])
    return _run_on_gpu(ctx, name)


def _run_on_gpu(ctx: BenchContext, name: str) -> Outcome:
    import torch

    from hypernet.batch_generate import GenRequest, generate_batch
    from hypernet.personalize import load_runtime, personalize

    pipe = load_pipe(device="cuda")
    hyper = hypernet_source(ctx, pipe)
    runtime = load_runtime(str(hyper.path), device="cuda")
    photo = photo_bytes(1)[0][0]
    steps = ctx.pick(40, 2)
    repeats = ctx.pick(5, 1)

    def sync(fn):
        def wrapped():
            out = fn()
            torch.cuda.synchronize()
            return out
        return wrapped

    ident = personalize(pipe, photo, hypernet=runtime, steps=steps)
    results: dict[str, Any] = {"available": True, "gpu": name}
    results["personalize_s"] = measure(sync(lambda: personalize(pipe, photo, hypernet=runtime, steps=steps)),
                                       warmup=1, repeats=repeats)
    results["hypernetwork_only_s"] = measure(sync(lambda: personalize(pipe, photo, hypernet=runtime, steps=0)),
                                             warmup=1, repeats=repeats)
    for n in (1, 8):
        reqs = [GenRequest("a photo of ohwx person", identity=ident, seed=i, steps=25) for i in range(n)]
        results[f"generate_batch{n}_s"] = measure(sync(lambda reqs=reqs: generate_batch(pipe, reqs)),
                                                  warmup=1, repeats=repeats)
    results["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    settings = {"device": "cuda", "gpu": name, "finetune_steps": steps, "generate_steps": 25,
                "hypernetwork": hyper.to_json(), "base": "embedded tiny base"}
    return Outcome(settings, results, [f"Measured on {name}."])

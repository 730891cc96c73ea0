"""Personalisation methods compared: same base, same photo, same machine, each at its default steps.

Rows: HyperDreamBooth (hypernetwork + 40-step rank-relaxed fine-tune), hypernetwork only, LiDB
from scratch, LoRA (peft, rank 4), Textual Inversion and DreamBooth (full UNet, prior
preservation). Per method: wall time (photo in -> artifact out), time per optimizer step, peak
memory, artifact bytes (the real saved file or folder), and the diffusion loss on held-out photos
of the same identity versus photos of other identities, against the base model's loss on the
same noised latents. An identity-specific effect shows as a bigger loss drop on the former.

In full mode each method runs in its own subprocess (a fresh heap, so peak RSS is that method's
alone); tiny mode runs them in-process with a couple of steps. Paper claims checked here:
25x faster than DreamBooth, 125x faster than Textual Inversion, 10,000x smaller than DreamBooth
(sizes at SD 1.5 scale are in sd15_scale.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.assets import FACES_MISSING, base_dir, face_plan, hypernet_source, load_pipe
from benchmarks.harness import (
    ROOT,
    BenchContext,
    Outcome,
    measure,
    peak_rss,
    ratio,
    reset_peak_rss,
    rss_bytes,
    summarize,
)

log = logging.getLogger(__name__)

NAME = "methods"
METHODS = ("hyperdreambooth", "hypernetwork", "lidb", "lora", "textual-inversion", "dreambooth")
TOKEN, CLASS_NOUN = "ohwx", "person"
#: The paper's claims (Ruiz et al. 2024): DreamBooth / HDB time, TI / HDB time, DreamBooth / HDB size.
PAPER = {"speedup_vs_dreambooth": 25.0, "speedup_vs_textual_inversion": 125.0, "smaller_than_dreambooth": 10_000.0}
#: Timed runs per method; the two slowest (minutes per run at their default steps) get fewer so
#: `make bench` stays under 30 minutes on 2 cores.
REPEATS, LONG_REPEATS, LONG_METHODS = 3, 2, ("textual-inversion", "dreambooth")
#: Timesteps the held-out loss is averaged over (fixed, so every method sees the same noised latents).
EVAL_TIMESTEPS = (50, 150, 250, 350, 450, 550, 650, 750, 850, 950)


# ---------------------------------------------------------------------------- one method
def _trainer(method: str, pipe, job: dict):
    """(train(steps, progress) -> artifact, eval prompt, default steps) for `method`."""
    photo = Path(job["photo"])
    if method in ("hyperdreambooth", "hypernetwork"):
        from hypernet.personalize import PersonalizeConfig, load_runtime, personalize

        runtime = load_runtime(job["hypernet"])
        default = PersonalizeConfig().steps if method == "hyperdreambooth" else 0

        def run_hdb(steps, progress):
            return personalize(pipe, photo, hypernet=runtime, steps=steps, token=TOKEN, class_noun=CLASS_NOUN,
                               detector="center", progress=progress)

        return run_hdb, PersonalizeConfig(token=TOKEN, class_noun=CLASS_NOUN).prompt, default
    from hypernet.methods import get_method
    from hypernet.methods._common import format_prompt

    m = get_method(method)
    base_cfg = m.config_cls()
    if method == "dreambooth":
        base_cfg = dataclasses.replace(base_cfg, class_images_dir=Path(job["work_dir"]) / "class-images",
                                       **job.get("dreambooth", {}))

    def run_method(steps, progress):
        cfg = dataclasses.replace(base_cfg, train=dataclasses.replace(base_cfg.train, steps=steps))
        return m.train(pipe, [photo], token=TOKEN, class_noun=CLASS_NOUN, config=cfg, progress=progress,
                       detector="center")

    return run_method, format_prompt(base_cfg.prompt, TOKEN, CLASS_NOUN), base_cfg.train.steps


def _step_seconds(events: list[tuple[str, int, float]]) -> list[float]:
    """Seconds per optimizer step from (stage, step, elapsed) progress events of one run."""
    out, last = [], {}
    for stage, step, elapsed in events:
        if stage in last and step == last[stage][0] + 1:
            out.append(elapsed - last[stage][1])
        last[stage] = (step, elapsed)
    return out


def _class_images(pipe, job: dict) -> float | None:
    """Generate DreamBooth's class images once (timed); training runs then reuse the cache."""
    from hypernet.methods._common import format_prompt, pipe_resolution
    from hypernet.methods.dreambooth import DreamBoothMethodConfig
    from hypernet.methods.dreambooth.prior import class_images

    cfg = DreamBoothMethodConfig(**job.get("dreambooth", {}))
    if not cfg.prior_preservation:
        return None
    t0 = time.perf_counter()
    class_images(pipe, format_prompt(cfg.class_prompt, TOKEN, CLASS_NOUN), cfg.num_class_images,
                 pipe_resolution(pipe), cfg.class_image_steps, Path(job["work_dir"]) / "class-images")
    return time.perf_counter() - t0


def run_job(job: dict) -> dict[str, Any]:
    """Warm up, time `repeats` runs of one method at its default steps, save, evaluate."""
    import torch

    method = job["method"]
    pipe = load_pipe(Path(job["base"]))
    baseline = rss_bytes() or 0  # the loaded base: peak memory is reported above this
    reset_peak_rss()
    train, prompt, default_steps = _trainer(method, pipe, job)
    steps = default_steps if job.get("steps") is None else job["steps"]
    out: dict[str, Any] = {"method": method, "steps": steps, "default_steps": default_steps, "prompt": prompt}
    if method == "dreambooth":
        out["class_images_seconds"] = _class_images(pipe, job)
    if job["warmup"]:
        train(min(steps, job["warmup"]), None)  # loads lazily imported code, MTCNN, runtimes
    walls, per_step, artifact = [], [], None
    for _ in range(job["repeats"]):
        events: list[tuple[str, int, float]] = []

        def progress(ev, events=events):
            if ev.loss is not None and ev.stage not in ("preprocess", "hypernetwork", "done"):
                events.append((ev.stage, int(ev.step), float(ev.elapsed)))

        t0 = time.perf_counter()
        artifact = train(steps, progress)
        walls.append(time.perf_counter() - t0)
        per_step += _step_seconds(events)
    out["wall_s"] = summarize(walls)
    out["step_s"] = summarize(per_step) if per_step else None
    # Peak RSS over warm-up + timed runs, above the loaded base (a fresh process in full mode).
    out["peak_rss_bytes"] = peak_rss()
    out["peak_rss_above_base_bytes"] = max(0, (peak_rss() or 0) - baseline)
    path = Path(job["work_dir"]) / f"artifact-{method}" / ("model" if method == "dreambooth" else "a.safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    out["artifact_bytes"] = artifact.save(path)
    out["artifact_kind"] = "pipeline directory" if method == "dreambooth" else ".safetensors file"
    if job.get("eval_pixels"):
        with torch.no_grad():
            out["heldout_loss"] = heldout_losses(pipe, artifact, prompt, job)
    return out


# ---------------------------------------------------------------------------- held-out loss
def _mean_loss(pipe, latents, prompt: str, timesteps: list[int], seed: int) -> float:
    """Mean diffusion loss of `latents` at each fixed timestep, with seeded noise (library loss)."""
    import torch

    from hypernet.training import diffusion_loss, encode_prompts, make_noise_scheduler

    n, k = latents.shape[0], len(timesteps)
    lat = latents.repeat_interleave(k, dim=0)  # (N*K, 4, h, w): each photo at every timestep
    ts = torch.tensor(list(timesteps) * n)  # (N*K,)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(lat.shape, generator=gen)  # (N*K, 4, h, w), the same for every method
    emb = encode_prompts(pipe, prompt).expand(lat.shape[0], -1, -1)  # (N*K, 77, D)
    per = diffusion_loss(pipe.unet, make_noise_scheduler(pipe), lat, emb, gen, reduction="none",
                         timesteps=ts, noise=noise)  # (N*K,)
    return float(per.mean())


def heldout_losses(pipe, artifact, prompt: str, job: dict) -> dict[str, float | None]:
    """Loss of base and personalised model on held-out same-identity vs other-identity photos."""
    import torch

    from hypernet.training import encode_images

    ts = list(job.get("eval_timesteps") or EVAL_TIMESTEPS)
    pixels = torch.load(job["eval_pixels"])  # {"same": (N, 3, R, R), "other": (M, 3, R, R)}
    lat = {k: encode_images(pipe, pixels[k]) for k in ("same", "other")}
    base = {k: _mean_loss(pipe, v, prompt, ts, seed=i) for i, (k, v) in enumerate(lat.items())}
    artifact.apply(pipe)
    try:
        tuned = {k: _mean_loss(pipe, v, prompt, ts, seed=i) for i, (k, v) in enumerate(lat.items())}
    finally:
        artifact.remove(pipe)
    drop = {k: (base[k] - tuned[k]) / base[k] for k in base}
    return {
        "base_same": base["same"], "base_other": base["other"],
        "same": tuned["same"], "other": tuned["other"],
        "drop_same": drop["same"], "drop_other": drop["other"],
        "identity_effect": drop["same"] - drop["other"],
    }


# ---------------------------------------------------------------------------- the benchmark
def _run_isolated(job: dict, work: Path) -> dict[str, Any]:
    """Run one job in a fresh interpreter (its own heap: peak memory is its own)."""
    job_file = work / f"job-{job['method']}.json"
    out_file = work / f"result-{job['method']}.json"
    job_file.write_text(json.dumps(job))
    out_file.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.methods", "--job", str(job_file), "--out", str(out_file)],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0 or not out_file.is_file():
        tail = (proc.stderr or proc.stdout)[-3000:]
        raise RuntimeError(f"method {job['method']} benchmark failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out_file.read_text())


def run(ctx: BenchContext) -> Outcome:
    plan_sizes = ctx.pick((8, 8), (1, 1))
    pipe = load_pipe()
    hyper = hypernet_source(ctx, pipe)
    plan = face_plan(*plan_sizes, hypernet_dir=hyper.path)
    settings: dict[str, Any] = {"token": TOKEN, "class_noun": CLASS_NOUN, "hypernetwork": hyper.to_json(),
                                "base": "embedded tiny base (random weights)", "isolation": ctx.pick(
                                    "one subprocess per method", "in-process")}
    if plan is None:
        return Outcome(settings, {"skipped": FACES_MISSING}, [FACES_MISSING])
    work = ctx.work_dir / "methods"
    work.mkdir(parents=True, exist_ok=True)
    face_png, detect = _face_inputs(pipe, plan, work, repeats=ctx.pick(3, 1))
    del pipe
    job_base = {
        "base": str(base_dir()), "hypernet": str(hyper.path), "photo": str(face_png),
        "eval_pixels": str(work / "eval_pixels.pt"),
        "work_dir": str(work), "warmup": ctx.pick(2, 1),
        "eval_timesteps": ctx.pick(list(EVAL_TIMESTEPS), [250, 750]),
        "dreambooth": ctx.pick({}, {"num_class_images": 2, "class_image_steps": 2}),
    }
    repeats = {m: ctx.pick(LONG_REPEATS if m in LONG_METHODS else REPEATS, 1) for m in METHODS}
    settings.update({"photos": plan.to_json(), "warmup_steps": job_base["warmup"], "repeats": repeats,
                     "eval_timesteps": job_base["eval_timesteps"], "steps": ctx.pick("each method's default", 2)})
    rows = {}
    for method in METHODS:
        job = {**job_base, "method": method, "repeats": repeats[method],
               "steps": None if not ctx.tiny or method == "hypernetwork" else 2}
        log.info("methods: %s", method)
        rows[method] = _run_isolated(job, ctx.work_dir) if not ctx.tiny else run_job(job)
    results = {"rows": rows, "ratios": _ratios(rows), "paper": PAPER, "face_detect_s": detect}
    notes = [
        "Every method gets the same face crop (hypernet.photos.face_crop, detector auto, timed once as "
        "face_detect_s) with detector='center', so wall times compare the methods, not the face detector.",
        "Times are on the embedded tiny base (random weights, 64 px): the ratios are the claim under test; "
        "sd15_scale.json checks the per-step ratios at real SD 1.5 shapes.",
        "DreamBooth's class-image generation is timed separately (class_images_seconds) and excluded from its "
        "wall time, as the cache makes it a one-off per base and class.",
    ]
    if not hyper.trained:
        notes.append(f"The hypernetwork is {hyper.label}: its timings are real, its held-out losses are not "
                     "meaningful.")
    return Outcome(settings, results, notes)


def _face_inputs(pipe, plan, work: Path, repeats: int) -> tuple[Path, dict]:
    """Crop the training photo once (timed) and preprocess the evaluation photos once."""
    import torch

    from hypernet.methods._common import pipe_resolution
    from hypernet.photos import decode_image, face_crop, load_photos

    img = decode_image(plan.train_photo)
    detect = measure(lambda: face_crop(img, detector="auto"), warmup=1, repeats=repeats)
    face_png = work / "face.png"
    face_crop(img, detector="auto").save(face_png)
    res = pipe_resolution(pipe)
    torch.save({"same": load_photos(plan.same, res), "other": load_photos(plan.other, res)},  # (N, 3, R, R)
               work / "eval_pixels.pt")
    return face_png, detect


def _ratios(rows: dict[str, dict]) -> dict[str, float | None]:
    def wall(m):
        return rows.get(m, {}).get("wall_s", {}).get("median")

    def size(m):
        return rows.get(m, {}).get("artifact_bytes")

    return {
        "speedup_vs_dreambooth": ratio(wall("dreambooth"), wall("hyperdreambooth")),
        "speedup_vs_textual_inversion": ratio(wall("textual-inversion"), wall("hyperdreambooth")),
        "speedup_vs_lora": ratio(wall("lora"), wall("hyperdreambooth")),
        "speedup_vs_lidb": ratio(wall("lidb"), wall("hyperdreambooth")),
        "smaller_than_dreambooth": ratio(size("dreambooth"), size("hyperdreambooth")),
        "hypernetwork_only_smaller_than_dreambooth": ratio(size("dreambooth"), size("hypernetwork")),
    }


def main(argv: list[str] | None = None) -> int:
    """Subprocess entry: `python -m benchmarks.methods --job job.json --out result.json`."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = run_job(json.loads(args.job.read_text()))
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

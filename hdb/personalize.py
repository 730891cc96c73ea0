"""`hdb personalize PHOTO... --out IDENTITY.safetensors`: 1 to 8 photos of one person -> identity (-> images)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqdm.auto import tqdm


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "personalize",
        help="personalise a base to the face in 1 to 8 photos of one person (HyperDreamBooth)",
        description="Predict LiDB weights with the hypernetwork (combining the photos' predictions), "
        "fine-tune a rank-relaxed adapter on all the photos for a few steps, save the identity, and "
        "optionally generate images with it. Without "
        "--base/--hypernet it uses the embedded tiny base and the tiny-cpu hypernetwork (built and cached "
        "on first use, a few minutes on a laptop CPU).",
    )
    p.add_argument("photos", type=Path, nargs="+", metavar="PHOTO",
                   help="JPEG/PNG/WebP photos of one face (1 to 8)")
    p.add_argument("--out", type=Path, required=True, help="where to write IDENTITY.safetensors")
    p.add_argument("--base", type=Path, help="diffusers base directory (default: the embedded tiny base)")
    p.add_argument("--hypernet", type=Path, help="exported hypernetwork folder or file (default: tiny-cpu)")
    p.add_argument("--backend", choices=("auto", "onnx", "torch"), default="auto", help="hypernetwork runtime")
    d = _defaults()
    p.add_argument("--steps", type=int, default=d.steps,
                   help=f"fast fine-tune steps; 0 = hypernetwork only ({d.steps})")
    p.add_argument("--rank", type=int, default=d.rank,
                   help=f"rank of the subspace core, or of the relaxed LoRA with --relax lora ({d.rank})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"fine-tune learning rate ({d.lr:g})")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="photos per fine-tune step, drawn from the photos given; 0 = as many as photos "
                   f"given, at that many UNet passes per step ({d.batch_size})")
    p.add_argument("--finetune-photos", type=int, default=d.finetune_photos,
                   help="how many of the photos (the first ones) the fine-tune trains on; 0 = all. The "
                   f"prediction combines all of them either way ({d.finetune_photos})")
    from hypernet.personalize_config import COMBINE_MODES

    p.add_argument("--combine", choices=COMBINE_MODES, default=d.combine,
                   help="several photos: mean of the predicted weights, or of the encoder tokens, or 'each-norm': "
                        "one fine-tune per photo, their deltas averaged at their norm (photos x the time) "
                        f"({d.combine})")
    p.add_argument("--relax", choices=("lora", "subspace"), default=d.relax,
                   help="relaxed fine-tune: rank --rank inside the LiDB subspace (8x smaller at SD 1.5; measured "
                   f"at least as good), or a LoRA over full layer dims ({d.relax})")
    p.add_argument("--identity-weight", type=float, default=d.identity_weight,
                   help="weight of the fine-tune's identity term (the face encoder's 1 - cos between the "
                   "decoded one-step estimate and the photos); 0 = off, the diffusion loss alone "
                   f"({d.identity_weight:g})")
    p.add_argument("--prediction-scale", type=float, default=d.prediction_scale,
                   help="multiply the hypernetwork's predicted delta_W by this before the fine-tune (default: "
                   "the hypernetwork's own, calibrated on held-out people and stored in its file at export)")
    p.add_argument("--token", default=d.token, help=f"identifier token ({d.token})")
    p.add_argument("--class-noun", default=d.class_noun, help=f"class noun ({d.class_noun})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the fine-tune and of generation ({d.seed})")
    p.add_argument("--detector", choices=("auto", "mtcnn", "center"), default=d.detector,
                   help=f"face crop ({d.detector})")
    p.add_argument("--prompt", action="append", help="generate with this prompt (repeatable); "
                   "use the token, e.g. 'a photo of ohwx person smiling'")
    p.add_argument("--negative-prompt", default="", help="negative prompt for generation")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (1)")
    p.add_argument("--gen-steps", type=int, default=25, help="DPM-Solver++ steps (25)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance (7.5)")
    p.add_argument("--images-out", type=Path, help="folder for generated PNGs (default: next to --out)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA when present)")
    p.add_argument("--dtype", help="fp32, fp16, bf16 (default: half on CUDA, fp32 on CPU)")
    p.set_defaults(func=run)


def _defaults():
    """The library's PersonalizeConfig defaults: the flags show and use them, never a copy."""
    from hypernet.personalize_config import PersonalizeConfig

    return PersonalizeConfig()


def run(args: argparse.Namespace) -> int:
    from hypernet.base import load_pipeline
    from hypernet.batch_generate import GenRequest, generate_batch
    from hypernet.defaults import default_base_dir
    from hypernet.personalize import PersonalizeConfig, load_runtime, personalize

    cfg = PersonalizeConfig(steps=args.steps, rank=args.rank, lr=args.lr, token=args.token,
                            class_noun=args.class_noun, seed=args.seed, detector=args.detector,
                            combine=args.combine, relax=args.relax, batch_size=args.batch_size,
                            finetune_photos=args.finetune_photos, prediction_scale=args.prediction_scale,
                            identity_weight=args.identity_weight)
    photos = list(args.photos)  # paths: a missing or bad one is named in the error (`photos[i]` (path))
    personalize_photos = photos if len(photos) > 1 else photos[0]
    pipe = load_pipeline(args.base or default_base_dir(), device=args.device, dtype=args.dtype)
    if args.hypernet is None:
        from hdb.defaults import default_hypernet_path

        args.hypernet = default_hypernet_path()
    runtime = load_runtime(str(args.hypernet), args.backend, args.device)
    bar = tqdm(total=cfg.steps, desc="fine-tune", unit="step", disable=cfg.steps == 0)

    def on_progress(e) -> None:
        if e.stage == "finetune" and e.total != bar.total:  # combine=each-norm: one fine-tune per photo
            bar.total = e.total
            bar.refresh()
        if e.stage == "finetune" and e.step > bar.n:
            bar.update(e.step - bar.n)
            if e.loss is not None:
                bar.set_postfix(loss=f"{e.loss:.4f}")

    identity = personalize(pipe, personalize_photos, hypernet=runtime, config=cfg, progress=on_progress)
    bar.close()
    size = identity.save(args.out)
    timings = dict(identity.timings)
    written: list[Path] = []
    if args.prompt:
        t = time.perf_counter()
        reqs = [GenRequest(p, identity, negative_prompt=args.negative_prompt, seed=args.seed,
                           steps=args.gen_steps, guidance=args.guidance, num_images=args.num_images)
                for p in args.prompt]
        images = [img for group in generate_batch(pipe, reqs) for img in group]
        timings["generation"] = time.perf_counter() - t
        folder = args.images_out or args.out.with_suffix("")
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            written.append(folder / f"{i:03d}.png")
            img.save(written[-1])
    print(f"identity: {args.out} ({size:,} bytes; method {identity.method}, "
          f"{identity.num_photos} photo(s), hypernetwork {runtime.backend})")
    print("timing breakdown:")
    for k, v in timings.items():
        print(f"  {k:<13} {v * 1000:9.1f} ms")
    print(f"  {'total':<13} {sum(timings.values()) * 1000:9.1f} ms")
    for w in written:
        print(f"image: {w}")
    return 0

"""`hdb generate --prompt ... --out DIR [--identity ARTIFACT]`: text-to-image, personalised or not.

    hdb generate --identity me-lora.safetensors --prompt "a photo of ohwx person as a knight" --out out/

The artifact's kind (DreamBooth folder, LoRA, Textual Inversion, LiDB, HyperDreamBooth identity)
is detected from its content.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate images, optionally with a personalisation artifact",
        description="Generate PNGs with DPM-Solver++ (default). --identity takes any artifact "
        "`hdb train` or `hdb personalize` wrote; its method is detected from the file. Image i uses "
        "seed SEED+i.",
    )
    p.add_argument("--prompt", required=True, help='e.g. "a photo of ohwx person as a knight"')
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    p.add_argument("--base", type=Path, help="diffusers base directory (default: the embedded tiny base)")
    p.add_argument("--identity", type=Path, help="artifact: DreamBooth folder or .safetensors file")
    p.add_argument("--negative-prompt", default="", help="what to avoid")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (25)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (7.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (0)")
    p.add_argument("--num-images", type=int, default=1, help="how many images (1)")
    p.add_argument("--height", type=int, help="pixels, multiple of 8 (16 on SD3/FLUX; default: the base's)")
    p.add_argument("--width", type=int, help="pixels, multiple of 8 (16 on SD3/FLUX; default: the base's)")
    p.add_argument("--scheduler", help="dpmsolver++ (default), ddim, euler, euler-a, pndm, ddpm, base; "
                   "on SD3/FLUX euler (default, flow matching) or base")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA when present)")
    p.add_argument("--dtype", help="fp32, fp16, bf16 (default: half on CUDA, fp32 on CPU)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hypernet.base import load_pipeline
    from hypernet.base.arch import arch_from_model_index
    from hypernet.defaults import default_base_dir
    from hypernet.generate import check_generate_args, generate
    from hypernet.methods import load_artifact

    base = args.base or default_base_dir()
    index = base / "model_index.json"  # the arch, to check sizes before loading anything
    arch = arch_from_model_index(json.loads(index.read_text()), str(index)) if index.is_file() else "sd15"
    check_generate_args(
        args.prompt,
        args.negative_prompt,
        args.steps,
        args.guidance,
        args.seed,
        args.height,
        args.width,
        args.num_images,
        args.scheduler,
        arch,
    )
    t0 = time.perf_counter()
    artifact = load_artifact(args.identity) if args.identity is not None else None
    pipe = load_pipeline(base, device=args.device, dtype=args.dtype)
    images = generate(
        pipe,
        args.prompt,
        artifact=artifact,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        height=args.height,
        width=args.width,
        num_images=args.num_images,
        scheduler=args.scheduler,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        path = args.out / f"{i:03d}-seed{args.seed + i}.png"
        img.save(path)
        print(path)
    print(f"time: {time.perf_counter() - t0:.1f} s ({len(images)} images)")
    return 0

"""`hdb base ...`: make and inspect base models."""

from __future__ import annotations

import argparse
from pathlib import Path

# Heavy imports (torch, diffusers) happen inside the commands: `hdb --help` must stay fast.


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("base", help="create or inspect base models")
    bsub = p.add_subparsers(dest="base_command", metavar="ACTION", required=True)
    tiny = bsub.add_parser(
        "make-tiny",
        help="write a tiny pipeline (SD 1.x, SDXL, SD3 or FLUX layout) with random weights",
        description="Write a tiny pipeline of the chosen family (denoiser, VAE and text encoders of a few "
        "million parameters, the real CLIP tokenizer, an offline-built T5 tokenizer for SD3/FLUX) that "
        "loads with the family's stock diffusers pipeline class (StableDiffusionPipeline, "
        "StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline).from_pretrained(DIR). "
        "Same arch and seed -> byte-identical files.",
    )
    tiny.add_argument("dir", type=Path, help="output directory")
    tiny.add_argument("--arch", default="sd15", choices=["sd15", "sdxl", "sd3", "flux"],
                      help="base family (default sd15: SD 1.x/2.x layout)")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    tiny.set_defaults(func=_make_tiny)
    single = bsub.add_parser(
        "to-single-file",
        help="write a diffusers SD 1.x base as one original-layout .safetensors file",
        description="Write the UNet, VAE and CLIP text encoder of a diffusers SD 1.x pipeline "
        "directory as one checkpoint in the original (LDM/CompVis) key layout, the format most "
        "community SD 1.x bases ship in. Load it back with `load_pipeline(FILE, config_dir=DIR)`.",
    )
    single.add_argument("dir", type=Path, help="diffusers pipeline directory (with model_index.json)")
    single.add_argument("out", type=Path, help="output .safetensors file")
    single.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                        help="weight precision in the file (default fp32: exact; fp16 halves the size)")
    single.set_defaults(func=_to_single_file)
    from hdb.face_world import register_base_action  # `train-face-world` (issue 9)

    register_base_action(bsub)


def _make_tiny(args: argparse.Namespace) -> int:
    from hypernet.base.tiny import make_tiny_pipeline

    out = make_tiny_pipeline(args.dir, seed=args.seed, arch=args.arch)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote tiny base ({args.arch}) to {out} ({size:,} bytes)")
    return 0


def _to_single_file(args: argparse.Namespace) -> int:
    from hypernet.base.loading import load_pipeline
    from hypernet.base.single_file import save_single_file

    pipe = load_pipeline(args.dir, device="cpu", dtype=args.dtype)
    out = save_single_file(pipe, args.out)
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")
    return 0

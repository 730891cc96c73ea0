"""`hdb base ...`: make and inspect base models."""

from __future__ import annotations

import argparse
from pathlib import Path

from hypernet.base.tiny import make_tiny_pipeline


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("base", help="create or inspect base models")
    bsub = p.add_subparsers(dest="base_command", metavar="ACTION", required=True)
    tiny = bsub.add_parser(
        "make-tiny",
        help="write a tiny SD-architecture pipeline with random weights",
        description="Write a tiny Stable Diffusion pipeline (UNet/VAE/CLIP text encoder of a few "
        "million parameters, the real CLIP tokenizer) that loads with "
        "StableDiffusionPipeline.from_pretrained(DIR). Same seed -> byte-identical weights.",
    )
    tiny.add_argument("dir", type=Path, help="output directory")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    tiny.set_defaults(func=_make_tiny)
    from hypernet.recipes.face_world import register_base_action  # `train-face-world` (issue 9)

    register_base_action(bsub)


def _make_tiny(args: argparse.Namespace) -> int:
    out = make_tiny_pipeline(args.dir, seed=args.seed)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote tiny base to {out} ({size:,} bytes)")
    return 0

"""`hdb base train-face-world`: train the CPU-scale face world (see hypernet.face_world).

Registered as an action of `hdb base` (hdb/base.py calls `register_base_action`).

    nice -n 19 hdb base train-face-world --corpus ../shared/data/faces/caltech/identities.csv \
        --out runs/face_world [--steps 6000 --batch-size 32] [--resume]
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from hypernet.face_world_config import FaceWorldConfig


def register_base_action(bsub: argparse._SubParsersAction) -> None:
    """Add `train-face-world` to the `hdb base` action parsers."""
    p = bsub.add_parser(
        "train-face-world",
        help="train the small real text-to-image face world on a labelled face corpus",
        description="Train a ~16M-parameter UNet over TAEF2 latents (128 px) on the training "
        "identities of a `file,identity` manifest; the held-out identities are written to "
        "OUT/split.json. OUT becomes a diffusers pipeline directory usable as --base. "
        "Resumable: checkpoints go to OUT/checkpoint/.",
    )
    helps = {f.name: f.metadata.get("help", "") for f in fields(FaceWorldConfig)}
    d = FaceWorldConfig()

    def opt(flag: str, name: str, typ: type) -> None:
        default = getattr(d, name)
        p.add_argument(flag, type=typ, default=default, help=f"{helps[name]} (default {default})")

    p.add_argument("--corpus", type=Path, required=True, help="`file,identity` CSV (or its folder)")
    p.add_argument("--out", type=Path, required=True, help="output pipeline directory")
    opt("--steps", "steps", int)
    opt("--batch-size", "batch_size", int)
    opt("--lr", "lr", float)
    opt("--holdout", "holdout_identities", int)
    opt("--width", "width", int)
    opt("--export-every", "export_every", int)
    opt("--grid-samples", "grid_samples", int)
    opt("--threads", "num_threads", int)
    p.add_argument("--taef2", type=Path, default=None, help="TAEF2 weights (default ../shared/data/models/taef2)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint/")
    p.set_defaults(func=_train_face_world)


def _train_face_world(args: argparse.Namespace) -> int:
    from hypernet.face_world import train_face_world  # torch/diffusers: only when it runs

    cfg = FaceWorldConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, holdout_identities=args.holdout,
        width=args.width, export_every=args.export_every, grid_samples=args.grid_samples,
        num_threads=args.threads,
    )
    out = train_face_world(args.corpus, args.out, cfg, taef2_dir=args.taef2, resume=args.resume)
    print(f"face world at {out} (use it as --base {out})")
    return 0

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
    # argparse %-formats help strings: a config's "81%" must reach it as "81%%"
    helps = {f.name: f.metadata.get("help", "").replace("%", "%%") for f in fields(FaceWorldConfig)}
    d = FaceWorldConfig()

    def opt(flag: str, name: str, typ: type) -> None:
        default = getattr(d, name)
        p.add_argument(flag, type=typ, default=default, help=f"{helps[name]} (default {default})")

    p.add_argument("--corpus", type=Path, required=True, help="`file,identity` CSV (or its folder)")
    p.add_argument("--out", type=Path, required=True, help="output pipeline directory")
    opt("--steps", "steps", int)
    opt("--batch-size", "batch_size", int)
    opt("--lr", "lr", float)
    opt("--decay-start", "decay_start", int)
    opt("--holdout", "holdout_identities", int)
    opt("--width", "width", int)
    opt("--export-every", "export_every", int)
    opt("--grid-samples", "grid_samples", int)
    opt("--detect-samples", "detect_samples", int)
    opt("--threads", "num_threads", int)
    opt("--detector", "detector", str)
    opt("--max-photos", "max_photos", int)
    p.add_argument("--no-mirror", dest="mirror", action="store_false",
                   help="do not encode mirrored copies (halves encoding; for corpora with many people)")
    p.add_argument("--margins", type=float, nargs="+", default=list(d.margins),
                   help=f"{helps['margins']} (default {' '.join(map(str, d.margins))}; with --detector center "
                   "every margin gives the same crop, so pass one)")
    p.add_argument("--taef2", type=Path, default=None, help="TAEF2 weights (default ../shared/data/models/taef2)")
    p.add_argument("--split", type=Path, default=None,
                   help="split.json to use (e.g. from `hdb base make-corpus`) instead of drawing --holdout")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint/")
    p.set_defaults(func=_train_face_world)
    _register_make_corpus(bsub)


def _register_make_corpus(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser(
        "make-corpus",
        help="merge labelled face corpora into one manifest with a held-out split",
        description="Merge `file,identity` manifests (labels prefixed NAME:) into OUT/identities.csv "
        "and draw the held-out identities of each part into OUT/split.json. The face world "
        "(--split), pretraining (data.corpus + exclusion of held-out people) and `hdb eval` all read "
        "these two files, so no held-out person is seen by any training stage.",
        epilog="example: hdb base make-corpus --out runs/corpus_v2 "
        "--part lfw=../shared/data/faces/lfw/identities.csv --holdout lfw=48:5 "
        "--part caltech=../shared/data/faces/caltech/identities.csv --holdout caltech=7:3",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--part", action="append", required=True, metavar="NAME=CSV",
                   help="a corpus part (repeatable)")
    p.add_argument("--holdout", action="append", default=[], metavar="NAME=N[:MIN_PHOTOS]",
                   help="hold out N people of part NAME among those with >= MIN_PHOTOS photos (default 3)")
    p.add_argument("--max-photos", type=int, default=20, help="photos kept per identity (default 20)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.set_defaults(func=_make_corpus)


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, rest = v.partition("=")
        if not sep or not name or not rest:
            raise SystemExit(f"hdb: error: `{flag}` must be NAME=VALUE, got {v!r}")
        out[name] = rest
    return out


def _make_corpus(args: argparse.Namespace) -> int:
    from hypernet.eval.corpus import merge_corpora, read_manifest, split_corpora, write_manifest

    parts = {name: read_manifest(path) for name, path in _pairs(args.part, "--part").items()}
    holdout = {}
    for name, spec in _pairs(args.holdout, "--holdout").items():
        n, _, min_photos = spec.partition(":")
        try:
            holdout[name] = (int(n), int(min_photos or 3))
        except ValueError:
            raise SystemExit(f"hdb: error: `--holdout` must be NAME=N[:MIN_PHOTOS], got {name}={spec}") from None
    split = split_corpora(parts, holdout, args.seed)
    merged = merge_corpora(parts, args.max_photos)
    args.out.mkdir(parents=True, exist_ok=True)
    write_manifest(merged, args.out / "identities.csv")
    split.save(args.out / "split.json")
    n_photos = sum(len(v) for v in merged.photos.values())
    print(f"wrote {args.out}/identities.csv ({len(merged.photos)} identities, {n_photos} photos) and "
          f"split.json ({len(split.train)} train, {len(split.holdout)} held out)")
    return 0


def _train_face_world(args: argparse.Namespace) -> int:
    from hypernet.face_world import train_face_world  # torch/diffusers: only when it runs

    cfg = FaceWorldConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, decay_start=args.decay_start,
        holdout_identities=args.holdout,
        width=args.width, export_every=args.export_every, grid_samples=args.grid_samples,
        detect_samples=args.detect_samples,
        num_threads=args.threads, detector=args.detector, margins=tuple(args.margins),
        mirror=args.mirror, max_photos=args.max_photos,
    )
    out = train_face_world(args.corpus, args.out, cfg, taef2_dir=args.taef2, resume=args.resume, split=args.split)
    print(f"face world at {out} (use it as --base {out})")
    return 0

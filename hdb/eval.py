"""`hdb eval`: measure identity quality of every method on held-out identities (REPORT.md).

    hdb eval --base runs/face_world --hypernet runs/face_world_hypernet/export \
        --corpus ../shared/data/faces/caltech/identities.csv --out runs/eval
    hdb eval ... --conditions lora,base --identities 2 --images-per-id 4 --override lora.steps=50
    hdb eval --base runs/face_world_v2 --corpus runs/corpus_v2/identities.csv ... --slow-methods-people 12

Reruns resume: finished (condition, identity) cells in OUT/cells/ are reused when their settings match;
a cell missing a face metric is rescored from its saved images. Grids show only the people of
--grid-parts (default caltech: LFW's faces are never to be committed).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from hypernet.eval.conditions import CONDITIONS, CONTROLS, VARIANTS

    p = sub.add_parser(
        "eval", help="compare personalisation methods on held-out identities (Face Rec., margin, time, size)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", type=Path, required=True, help="base pipeline dir (its split.json names held-out ids)")
    p.add_argument("--hypernet", type=Path, default=None,
                   help="hypernetwork export (needed for hyperdreambooth/hypernetwork/fast-finetune)")
    p.add_argument("--mean-adapter", type=Path, default=None,
                   help="the control hypernetwork from `hdb pretrain mean-adapter` (one adapter for everyone; "
                   f"needed for {'/'.join(CONTROLS)})")
    p.add_argument("--corpus", type=Path, required=True, help="`file,identity` CSV of labelled faces")
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="output folder (default runs/eval)")
    p.add_argument("--identities", type=int, default=None, help="evaluate the first N held-out identities")
    p.add_argument("--images-per-id", type=int, default=10, help="images per identity and method (default 10)")
    p.add_argument("--conditions", default=",".join(CONDITIONS),
                   help=f"comma-separated subset of {','.join(CONDITIONS)} (default all) and the opt-in "
                   f"variants {','.join(VARIANTS)} and controls {','.join(CONTROLS)}")
    p.add_argument("--override", action="append", default=[], metavar="COND.KEY=VALUE",
                   help="method config override, e.g. lora.steps=100 (repeatable)")
    p.add_argument("--gen-steps", type=int, default=25, help="sampling steps (default 25)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--sample-seeds", default="shared", choices=("shared", "per-identity"),
                   help="seeds of the generated images: the same seed..seed+N-1 for every person (shared, "
                   "default), or each person's own block, the same for every method (per-identity)")
    p.add_argument("--device", default=None, help="cpu or cuda (default auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default torch's; use 1 on a busy machine)")
    p.add_argument("--detector", default="auto", choices=("auto", "mtcnn", "center"),
                   help="face crop of the input and reference photos (default auto: MTCNN)")
    p.add_argument("--metrics", default="dlib,facenet", help="face metrics that score (default dlib,facenet)")
    p.add_argument("--slow-methods-people", type=int, default=None, metavar="N",
                   help="run DreamBooth, LoRA and Textual Inversion on only the first N people (default all)")
    p.add_argument("--other-train-ids", type=int, default=64,
                   help="training people per corpus part the margin compares against (default 64)")
    p.add_argument("--people", action="append", default=[], metavar="COND=N",
                   help="run COND on only the first N people (repeatable), e.g. lidb=8: expensive conditions "
                        "on a subset; rerun with the same caps to rebuild the report from the cached cells")
    p.add_argument("--inputs", type=int, default=None, metavar="N",
                   help="photos held back as inputs per person (default: the most any condition takes, e.g. 3 "
                        "with a -3photos variant); give the same N to runs of other condition lists to pair them")
    p.add_argument("--grid-parts", default="caltech",
                   help="comma-separated corpus parts whose people appear in grids, or 'all' (default caltech)")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from hypernet.eval.conditions import parse_overrides
    from hypernet.eval.runner import EvalConfig, run_evaluation

    cfg = EvalConfig(
        base=args.base, corpus=args.corpus, out=args.out, hypernet=args.hypernet, mean_adapter=args.mean_adapter,
        identities=args.identities,
        images_per_id=args.images_per_id, conditions=_csv(args.conditions),
        overrides=parse_overrides(args.override), gen_steps=args.gen_steps, guidance=args.guidance,
        seed=args.seed, sample_seeds=args.sample_seeds, device=args.device, num_threads=args.threads,
        detector=args.detector, metrics=_csv(args.metrics), slow_methods_people=args.slow_methods_people,
        other_train_ids=args.other_train_ids, grid_parts=_csv(args.grid_parts), held_inputs=args.inputs,
        people=_people(args.people),
    )
    report = run_evaluation(cfg)
    print(report.read_text())
    print(f"report: {report}")
    return 0


def _people(items: list[str]) -> dict[str, int]:
    """["lidb=8"] -> {"lidb": 8}."""
    from hypernet.errors import InvalidInputError

    out: dict[str, int] = {}
    for item in items:
        cond, sep, n = item.partition("=")
        if not sep or not n.strip().isdigit():
            raise InvalidInputError(f"`--people` must be COND=N with N a whole number, got {item!r}")
        out[cond.strip()] = int(n)
    return out


def _csv(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())

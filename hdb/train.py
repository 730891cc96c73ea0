"""`hdb train --method M --images PHOTOS --out PATH`: the classic personalisation methods.

    hdb train --method lora --images me/ --out me-lora.safetensors            # rank 4, 500 steps
    hdb train --method dreambooth --base sd15/ --images me/ --out me-db/      # 1000 steps + prior
    hdb train --method textual-inversion --images a.jpg b.jpg --out me-ti.safetensors
    hdb train --method lidb --images me/ --out me-lidb.safetensors

Defaults per method are the published ones (DreamBooth 1000 steps at 5e-6, LoRA rank 4 500 steps
at 1e-4, Textual Inversion 3000 steps at 5e-4); flags override them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

#: Flags that only make sense for some methods: flag -> (dest, methods).
_METHOD_ONLY = {
    "--rank": ("rank", ("lora",)),
    "--num-vectors": ("num_vectors", ("textual-inversion",)),
    "--train-text-encoder": ("train_text_encoder", ("lora", "dreambooth")),
    "--no-prior-preservation": ("no_prior_preservation", ("dreambooth",)),
    "--num-class-images": ("num_class_images", ("dreambooth",)),
    "--prior-loss-weight": ("prior_loss_weight", ("dreambooth",)),
}


def register(sub: argparse._SubParsersAction) -> None:
    from hypernet.methods.base import METHOD_NAMES

    p = sub.add_parser(
        "train",
        help="personalise a base with DreamBooth, Textual Inversion, LoRA or LiDB",
        description="Train one of the classic personalisation methods on photos of one person and "
        "save the artifact (a pipeline directory for DreamBooth, a .safetensors file otherwise). "
        "Prints the artifact's path, size in bytes and the time taken.",
    )
    p.add_argument("--method", required=True, choices=METHOD_NAMES, help="personalisation method")
    p.add_argument("--images", nargs="+", required=True, help="a folder of photos, or photo files")
    p.add_argument("--out", type=Path, required=True, help="artifact path (.safetensors; a folder for dreambooth)")
    p.add_argument("--base", type=Path, help="diffusers base directory (default: the embedded tiny base)")
    p.add_argument("--token", default="ohwx", help="identifier token (ohwx)")
    p.add_argument("--class-noun", default="person", help="class noun (person)")
    p.add_argument("--prompt", help="training prompt template with {token} and {class_noun}")
    g = p.add_argument_group("optimisation (defaults: the method's published ones)")
    g.add_argument("--steps", type=int, help="optimizer steps")
    g.add_argument("--lr", type=float, help="learning rate")
    g.add_argument("--seed", type=int, help="seed of batches, noise and init (0)")
    g.add_argument("--batch-size", type=int, help="photos per micro-batch (1)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per step (1)")
    g.add_argument("--lr-scheduler", help="constant, constant_with_warmup, linear, cosine, ...")
    g.add_argument("--warmup-steps", type=int, help="LR warm-up steps (0)")
    g.add_argument("--min-snr-gamma", type=float, help="min-SNR loss weighting, e.g. 5 (off)")
    g.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), help="autocast on CUDA (no)")
    g.add_argument("--gradient-checkpointing", action="store_true", default=None, help="save memory")
    g.add_argument("--checkpoint-dir", type=Path, help="resumable checkpoints here (resumes if present)")
    g.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (0: on interrupt only)")
    m = p.add_argument_group("method-specific")
    m.add_argument("--rank", type=int, help="LoRA rank (4)")
    m.add_argument("--num-vectors", type=int, help="Textual Inversion vectors per token (1)")
    m.add_argument("--train-text-encoder", action="store_true", default=None, help="LoRA/DreamBooth")
    m.add_argument("--no-prior-preservation", action="store_true", default=None, help="DreamBooth")
    m.add_argument("--num-class-images", type=int, help="DreamBooth class images (100)")
    m.add_argument("--prior-loss-weight", type=float, help="DreamBooth prior loss weight (1.0)")
    p.add_argument("--detector", choices=("auto", "mtcnn", "center"), default="auto", help="face crop")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA when present)")
    p.add_argument("--dtype", help="fp32, fp16, bf16 (default: half on CUDA, fp32 on CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace):
    """The method's config with the given flags applied.

    Raises:
        InvalidInputError: a flag given for a method it does not apply to.
    """
    import dataclasses

    from hypernet.errors import InvalidInputError
    from hypernet.methods import get_method

    for flag, (dest, methods) in _METHOD_ONLY.items():
        if getattr(args, dest) is not None and args.method not in methods:
            raise InvalidInputError(f"`{flag}` applies to {', '.join(methods)} only, got --method {args.method}")
    cls = get_method(args.method).config_cls
    kw = {
        k: getattr(args, k)
        for k in ("rank", "num_vectors", "train_text_encoder", "num_class_images", "prior_loss_weight", "prompt")
        if getattr(args, k) is not None
    }
    if args.no_prior_preservation:
        kw["prior_preservation"] = False
    config = cls(**kw)
    train_kw = {
        k: getattr(args, k)
        for k in (
            "steps",
            "lr",
            "seed",
            "batch_size",
            "grad_accum",
            "lr_scheduler",
            "warmup_steps",
            "min_snr_gamma",
            "mixed_precision",
            "gradient_checkpointing",
            "checkpoint_every",
        )
    }
    train_kw["progress_bar"] = not args.no_progress
    return dataclasses.replace(config, train=config.train.with_overrides(**train_kw))


def run(args: argparse.Namespace) -> int:
    from hypernet.base import load_pipeline
    from hypernet.defaults import default_base_dir
    from hypernet.methods import get_method
    from hypernet.methods._common import dir_size

    config = build_config(args)
    t0 = time.perf_counter()
    pipe = load_pipeline(args.base or default_base_dir(), device=args.device, dtype=args.dtype)
    images = [Path(i) for i in args.images]
    artifact = get_method(args.method).train(
        pipe,
        images,
        token=args.token,
        class_noun=args.class_noun,
        config=config,
        checkpoint_dir=args.checkpoint_dir,
        detector=args.detector,
    )
    size = artifact.save(args.out)
    seconds = time.perf_counter() - t0
    if args.out.is_dir():
        size = dir_size(args.out)
    print(f"artifact: {args.out}")
    print(f"size: {size} bytes")
    print(f"time: {seconds:.1f} s")
    return 0

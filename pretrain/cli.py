"""`hdb pretrain STAGE` and `python -m pretrain STAGE` (the same parser; torchrun runs the latter).

    hdb pretrain all --config tiny-cpu --output-dir runs/tiny
    torchrun --nproc-per-node 2 -m pretrain all --config tiny-cpu --output-dir runs/tiny --stage2.steps 200

STAGE is prepare, stage1, stage2, export or all; `probe` (after stage1, not part of all) measures
whether the condition can predict stage 1's targets at all, before stage 2 is paid for;
`mean-adapter` (after stage1) writes the control a trained hypernetwork must beat: one adapter for
everyone (the mean stage-1 target) in the export format, to OUTPUT/mean_adapter/. `compare` (after
stage2 with stage2.val_finetune_steps) reads this run's validation after the fine-tune against
`--set compare.against=OTHER_RUN`'s, photo by photo, with standard errors across photos and
clustered by person, to OUTPUT/compare.json.
Every config value can be overridden with
`--section.key VALUE` (or `--set section.key=VALUE`; values parsed as YAML). Every stage skips work already done for the
same settings, so rerunning a killed command resumes it.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from hypernet.errors import InvalidInputError

STAGES = ("prepare", "stage1", "stage2", "export")
#: Read-outs run on their own after stage1: `probe` (can the condition predict the targets?) and
#: `mean-adapter` (the control hypernetwork: one adapter for everyone, in the export format);
#: `compare` (after stage2: its validation after the fine-tune against another run's, photo by photo).
EXTRA_STAGES = ("probe", "mean-adapter", "compare")

log = logging.getLogger("pretrain")


_OVERRIDE = "override:"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=(*STAGES, *EXTRA_STAGES, "all"),
                   help="which stage to run (all: prepare to export in order; probe and mean-adapter: "
                        "after stage1, compare: after stage2; not part of all)")
    p.add_argument("--config", default="tiny-cpu",
                   help="YAML/TOML file, or a shipped config name: tiny-cpu, face-world-cpu, sd15-gpu "
                        "(default tiny-cpu)")
    p.add_argument("--output-dir", type=Path, required=True, help="the run folder (created; reused to resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set stage2.steps=50 (repeatable)")
    group = p.add_argument_group("config overrides (values parsed as YAML; default: the config file's)")
    for key, help_text in _config_keys():
        group.add_argument(f"--{key}", dest=_OVERRIDE + key, default=argparse.SUPPRESS, metavar="V",
                           help=help_text)


def _config_keys(cls=None, prefix: str = ""):
    """(dotted key, help) for every leaf field of PretrainConfig, nested dataclasses included."""
    import dataclasses
    import typing

    from pretrain.config import PretrainConfig

    cls = cls or PretrainConfig
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _config_keys(hints[f.name], key + ".")
        else:
            yield key, f.metadata.get("help", "")


def collect_overrides(args: argparse.Namespace) -> list[str]:
    """`--set` items, then `--section.key V` options, as KEY=VALUE strings."""
    out = list(args.overrides)
    out += [f"{k[len(_OVERRIDE):]}={v}" for k, v in vars(args).items() if k.startswith(_OVERRIDE)]
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain", help="offline pretraining: corpus -> stage-1 LiDBs -> hypernetwork -> export",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=_run_args)


def _run_args(args: argparse.Namespace) -> int:
    stages = STAGES if args.stage == "all" else (args.stage,)
    run_stages(args.config, args.output_dir, stages, collect_overrides(args))
    return 0


def run_stages(config: str | Path | None, output_dir: str | Path, stages, overrides=None,
               distributed: bool = True) -> Path:
    """Load the config, join torchrun's job (if any) and run `stages` in order on this rank.

    `distributed=False` runs alone even inside a torchrun worker (library callers building the
    embedded default must not join a job they do not belong to).
    """
    import torch

    from hypernet.device import resolve_device
    from pretrain.config import load_config
    from pretrain.context import RunContext
    from pretrain.distributed import DistInfo, cleanup, init_distributed

    cfg = load_config(config, overrides)
    threads_before = torch.get_num_threads()  # restored: a library caller keeps its own setting
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if distributed:
        dist = init_distributed(cfg.device, cfg.dist_timeout_min)
    else:
        dist = DistInfo(0, 1, 0, resolve_device(None if cfg.device == "auto" else cfg.device))
    if not dist.is_main:  # one voice: other ranks only warn
        logging.getLogger().setLevel(logging.WARNING)
    ctx = RunContext(cfg, Path(output_dir), dist)
    ctx.out.mkdir(parents=True, exist_ok=True)
    if set(stages) != {"compare"}:  # a read-out of finished runs keeps the config that made them
        ctx.write_config()
    try:
        for stage in stages:
            t0 = time.monotonic()
            if dist.is_main:
                log.info("=== %s (rank 0 of %d, %s) ===", stage, dist.world_size, dist.device)
            _run_stage(stage, ctx)
            if dist.is_main:
                log.info("=== %s finished in %.1f s ===", stage, time.monotonic() - t0)
    finally:
        torch.set_num_threads(threads_before)
        if distributed:
            cleanup()
    return ctx.out


def _run_stage(stage: str, ctx) -> None:
    """One stage's function, imported when it runs (each pulls in torch and the model stack)."""
    if stage == "prepare":
        from pretrain.prepare import run_prepare as fn
    elif stage == "stage1":
        from pretrain.stage1 import run_stage1 as fn
    elif stage == "stage2":
        from pretrain.stage2 import run_stage2 as fn
    elif stage == "export":
        from pretrain.export import run_export as fn
    elif stage == "probe":
        from pretrain.probe import run_probe as fn
    elif stage == "mean-adapter":
        from pretrain.mean_adapter import run_mean_adapter as fn
    elif stage == "compare":
        from pretrain.compare import run_compare as fn
    else:
        raise InvalidInputError(f"`stage` must be one of {', '.join((*STAGES, *EXTRA_STAGES))}, got {stage!r}")
    fn(ctx)


def main(argv: list[str] | None = None) -> int:
    """`python -m pretrain ...` (what torchrun starts): only this parser, so a worker does not
    import every other `hdb` subcommand; errors map to the same exit codes as `hdb`."""
    from hypernet.exit_codes import run_with_exit_codes

    parser = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_with_exit_codes(lambda: _run_args(args))


__all__ = ["EXTRA_STAGES", "STAGES", "main", "register", "run_stages"]

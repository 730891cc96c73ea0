"""Stage `mean-adapter` (after stage1, not part of `all`): the control hypernetwork.

    OUTPUT/mean_adapter/hypernet.safetensors (+ .onnx, report.json)   the export format

A hypernetwork of stage 2's architecture that ignores the photo and predicts the mean stage-1
target of stage 2's training identities: one adapter for everyone. A trained hypernetwork has
learned something about the *person* only where it beats this control, so the evaluation runs
both the same way (`hdb eval --mean-adapter OUTPUT/mean_adapter --conditions mean-adapter,...`), and
HyperDreamBooth started from it is the fine-tune from a generic prior rather than from zero.
It costs seconds: no training, only the mean and the export's ONNX check. Like every stage it
skips work already done for the same settings: rewriting the files would change their mtimes,
which `hdb eval` reads as a new hypernetwork and reruns its cells.
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch

from hypernet.errors import InvalidInputError
from hypernet.hypernetwork.export import SAFETENSORS_NAME, HypernetInfo, read_info, save_hypernet
from hypernet.hypernetwork.model import HyperNetwork, make_constant
from pretrain.cache import PreparedData
from pretrain.context import RunContext
from pretrain.distributed import barrier
from pretrain.export import export_files
from pretrain.stage1 import Stage1Outputs, load_stage1

log = logging.getLogger(__name__)

MEAN_ADAPTER_DIR = "mean_adapter"


def mean_target(data: PreparedData, s1: Stage1Outputs) -> tuple[dict[str, torch.Tensor], int]:
    """The mean over stage 2's training identities of their stage-1 targets, A (L, r, a) and
    B (L, b, r) (what stage 2's validation reports as `weight_mse_mean`), and how many there are."""
    ids = s1.fitted(data.identities("train"))
    if not ids:
        raise InvalidInputError("`mean-adapter` must have training identities with stage-1 targets, got none: "
                                "run `stage1` first")
    return {k: v.mean(0) for k, v in s1.targets(ids).items()}, len(ids)


def mean_adapter_key(ctx: RunContext, s1: Stage1Outputs) -> str:
    """What the control depends on: the stage-1 targets (their index's key), stage 2's
    architecture and seed, the data split and the export settings."""
    d = ctx.cfg.to_dict()
    stage1_index = json.loads((s1.root / "index.json").read_text()).get("key")
    payload = {"stage1": stage1_index, "model": d["stage2"]["model"], "seed": d["stage2"]["seed"],
               "data": d["data"], "export": d["export"]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_mean_adapter(ctx: RunContext) -> None:
    if ctx.dist.is_main:
        _write(ctx)
    barrier()


def _write(ctx: RunContext) -> None:
    data, s1 = PreparedData(ctx.prepared_dir), load_stage1(ctx.stage1_dir)
    out = ctx.out / MEAN_ADAPTER_DIR
    key = mean_adapter_key(ctx, s1)
    path = out / SAFETENSORS_NAME
    if path.is_file() and (out / "report.json").is_file() and read_info(path).metadata.get("control_key") == key:
        log.info("mean-adapter: already done for these settings (%s), skipping", out)
        return
    weights, n = mean_target(data, s1)
    spec = s1.spec
    mcfg = ctx.cfg.stage2.model.for_lidb(len(s1.layers), spec.a, spec.b, spec.r)
    torch.manual_seed(ctx.cfg.stage2.seed)  # the rest of the network is never read, but stays seeded
    model = make_constant(HyperNetwork(mcfg), weights)
    info = HypernetInfo(mcfg, spec, s1.layers, s1.base_fingerprint, data.resolution,
                        arch=ctx.arch())
    # report.json is written last: a run killed before it is redone.
    (out / "report.json").unlink(missing_ok=True)
    save_hypernet(path, model, info, extra_meta={"control": "mean_adapter", "control_key": key})
    export_files(ctx, path, out)
    log.info("mean-adapter: one adapter for everyone (the mean of %d identities' stage-1 targets) in %s",
             n, out)


__all__ = ["MEAN_ADAPTER_DIR", "mean_adapter_key", "mean_target", "run_mean_adapter"]

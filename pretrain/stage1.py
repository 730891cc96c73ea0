"""Stage `stage1`: one pre-optimised LiDB per identity - the hypernetwork's regression targets.

Identities are dealt round-robin to ranks (sorted, identity i on rank i % world). Each result is
written atomically as `identities/<slug>.safetensors` (the standard LiDB file, with identity,
split and final loss in its metadata), so a restarted job skips what is done. Held-out
identities get targets too: validation measures weight-space error against them (they are never
trained on). Each identity's seed derives from its name, so results do not depend on the rank
layout. Rank 0 writes `index.json` last.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from hypernet.adapters.lidb.config import LiDBSpec
from hypernet.adapters.lidb.io import lidb_from_bytes, lidb_to_bytes
from hypernet.adapters.lidb.model import LiDB, default_spec_for, lidb_layers
from hypernet.errors import InvalidInputError
from hypernet.files import atomic_write_bytes
from pretrain.cache import PreparedData
from pretrain.context import RunContext
from pretrain.corpus import identity_slug
from pretrain.distributed import barrier
from pretrain.stream import step_seed

log = logging.getLogger(__name__)

INDEX = "index.json"


def stage1_key(ctx: RunContext) -> str:
    return ctx.cfg.section_key("data", "stage1")


def make_spec(ctx: RunContext) -> LiDBSpec:
    c = ctx.cfg.stage1
    over = {"r": c.r, "seed": c.spec_seed}
    over.update({k: getattr(c, k) for k in ("a", "b") if getattr(c, k) is not None})
    return default_spec_for(ctx.pipe(), **over)


def run_stage1(ctx: RunContext) -> None:
    out = ctx.stage1_dir
    key = stage1_key(ctx)
    idx = out / INDEX
    if idx.is_file() and json.loads(idx.read_text()).get("key") == key:
        if ctx.dist.is_main:
            log.info("stage1: already done for these settings (%s), skipping", idx)
        return
    data = PreparedData(ctx.prepared_dir)
    spec = make_spec(ctx)
    layers = lidb_layers(ctx.pipe(), spec)
    ids = data.identities()
    mine = ids[ctx.dist.rank :: ctx.dist.world_size]
    if ctx.dist.is_main:
        log.info("stage1: %d identities over %d ranks, LiDB a=%d b=%d r=%d on %d layers, %d steps each",
                 len(ids), ctx.dist.world_size, spec.a, spec.b, spec.r, len(layers),
                 ctx.cfg.stage1.train.steps)
    text_emb = data.text_emb()  # (1, 77, D)
    todo = [i for i in mine if not _done(_path(ctx, i), key)]
    if len(todo) < len(mine):
        log.info("stage1: rank %d: %d of its %d identities already done", ctx.dist.rank,
                 len(mine) - len(todo), len(mine))
    # One handle per rank, reset to its fresh init for every identity (aux bases drawn once).
    handle = LiDB(ctx.pipe(), spec, name="stage1", layers=layers)
    init = handle.state_dict()
    t0 = time.monotonic()
    try:
        for n, ident in enumerate(tqdm(todo, desc="stage1", unit="identity", disable=not ctx.dist.is_main)):
            _fit_identity(ctx, data, ident, _path(ctx, ident), spec, layers, text_emb, key, handle, init)
            if ctx.dist.is_main:
                el = time.monotonic() - t0
                log.info("stage1: %s done (%d/%d on rank 0), ~%.0f s left", ident, n + 1, len(todo),
                         el / (n + 1) * (len(todo) - n - 1))
    finally:
        handle.remove()
    barrier()
    if ctx.dist.is_main:
        _write_index(ctx, data, ids, spec, layers, key)
    barrier()


def _path(ctx: RunContext, ident: str) -> Path:
    return ctx.stage1_dir / "identities" / f"{identity_slug(ident)}.safetensors"


def _done(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    try:
        return lidb_from_bytes(path.read_bytes(), str(path)).metadata.get("stage1_key") == key
    except InvalidInputError:
        return False  # torn or foreign file: redo it


def _fit_identity(ctx, data, ident, path, spec, layers, text_emb, key, handle, init) -> None:
    from hypernet.methods.lidb import train_lidb

    rows = data.rows(ident)
    dev, c = ctx.dist.device, ctx.cfg.stage1.train
    tcfg = dataclasses.replace(c, seed=step_seed(c.seed, *ident.encode()) % 2**31, progress_bar=False)
    weights, final_loss = train_lidb(
        ctx.pipe(), data.latents(rows).to(dev), text_emb.to(dev), spec, tcfg,
        flipped=data.latents(rows, flip=True).to(dev), handle=handle, init=init, stage="stage1",
    )
    meta = {"identity": ident, "split": data.index["identities"][ident]["split"],
            "final_loss": repr(float(final_loss)), "stage1_key": key}
    atomic_write_bytes(path, lidb_to_bytes(weights, spec, layers, ctx.fingerprint(), extra_meta=meta))


def _write_index(ctx, data, ids, spec, layers, key) -> None:
    entries = {}
    for ident in ids:
        path = _path(ctx, ident)
        f = lidb_from_bytes(path.read_bytes(), str(path))
        entries[ident] = {"file": str(path.relative_to(ctx.stage1_dir)), "split": f.metadata["split"],
                          "final_loss": float(f.metadata["final_loss"])}
    losses = {s: [e["final_loss"] for e in entries.values() if e["split"] == s] for s in ("train", "val")}
    index = {
        "key": key, "spec": spec.to_json(), "layers": layers, "base_fingerprint": ctx.fingerprint(),
        "identities": entries,
        "mean_final_loss": {s: (sum(v) / len(v) if v else None) for s, v in losses.items()},
    }
    atomic_write_bytes(ctx.stage1_dir / INDEX, json.dumps(index, indent=1).encode())
    log.info("stage1: done: %d identities, mean final loss %s", len(entries), index["mean_final_loss"])


@dataclass
class Stage1Outputs:
    """A finished stage 1: the spec/layers the targets use, and per-identity weights on demand."""

    root: Path
    spec: LiDBSpec
    layers: list[str]
    base_fingerprint: str
    identities: dict[str, dict]

    def targets(self, ids: list[str]) -> dict[str, torch.Tensor]:
        """Packed weights of `ids`: A_train (n, L, r, a), B_train (n, L, b, r) (fp32, CPU)."""
        L, s = len(self.layers), self.spec
        if not ids:
            return {"A_train": torch.zeros(0, L, s.r, s.a), "B_train": torch.zeros(0, L, s.b, s.r)}
        ws = [lidb_from_bytes((self.root / self.identities[i]["file"]).read_bytes()).weights for i in ids]
        return {k: torch.stack([w[k] for w in ws]) for k in ("A_train", "B_train")}


def load_stage1(root: str | Path) -> Stage1Outputs:
    root = Path(root)
    idx = root / INDEX
    if not idx.is_file():
        raise InvalidInputError(f"`--output-dir` must hold a finished `stage1` ({idx} missing): run `stage1` first")
    d = json.loads(idx.read_text())
    return Stage1Outputs(root, LiDBSpec.from_json(d["spec"]), d["layers"], d["base_fingerprint"], d["identities"])


__all__ = ["Stage1Outputs", "load_stage1", "make_spec", "run_stage1", "stage1_key"]

"""Stage `stage1`: one pre-optimised LiDB per identity - the hypernetwork's regression targets.

Which identities: `data.max_identities` of the prepared ones, a seeded, nested sample
(`pretrain.corpus.select_identities`), dealt round-robin to ranks in that order. Each rank fits
its list in fixed chunks of `stage1.identities_per_call` (K) identities, all K through one denoiser
call per step (`hypernet.methods.lidb.train_lidb_batch`: each keeps its own loss, clipping and
AdamW state, so a result matches a fit alone up to float round-off). As soon as a chunk finishes
each result is written atomically as `identities/<slug>.safetensors` (the standard LiDB file,
with identity, split and final loss in its metadata), so a restarted job skips what is done.
Held-out identities get targets too: validation measures weight-space error against them (they
are never trained on). Each identity's seed derives from its name. Rank 0 writes `index.json`
last.
"""

from __future__ import annotations

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
from pretrain.corpus import identity_slug, select_identities
from pretrain.distributed import barrier
from pretrain.stream import step_seed

log = logging.getLogger(__name__)

INDEX = "index.json"


def stage1_key(ctx: RunContext) -> str:
    """The whole stage's key (the index): every data and stage-1 setting, and the base's content.

    The base's fingerprint, not only its path: a face world re-exported into the same directory
    (every `--export-every` steps) is another base, and targets fitted on the old one are stale.
    """
    return f"{ctx.cfg.section_key('data', 'stage1')}-{ctx.fingerprint()[:12]}"


def target_key(ctx: RunContext) -> str:
    """What one identity's file depends on (stored in it; a file under another key is redone).

    Leaves out `data.max_identities` (which identities are fitted, not how: raising it keeps the
    files already fitted) and `stage1.identities_per_call` (how many share a UNet call: only float
    round-off differs).
    """
    keep = ctx.cfg.section_key("data", "stage1", exclude=("data.max_identities", "stage1.identities_per_call"))
    return f"{keep}-{ctx.fingerprint()[:12]}"


def make_spec(ctx: RunContext) -> LiDBSpec:
    c = ctx.cfg.stage1
    over = {"r": c.r, "seed": c.spec_seed}
    over.update({k: getattr(c, k) for k in ("a", "b") if getattr(c, k) is not None})
    return default_spec_for(ctx.pipe(), **over)


def fit_order(ctx: RunContext, data: PreparedData) -> list[str]:
    """The identities stage 1 fits, in fitting order: `data.max_identities` of the prepared ones."""
    return select_identities(data.identities(), ctx.cfg.data.max_identities, ctx.cfg.data.split_seed)


def run_stage1(ctx: RunContext) -> None:
    out = ctx.stage1_dir
    key = stage1_key(ctx)
    idx = out / INDEX
    if ctx.already_done("stage1", idx, key):
        return
    data = PreparedData(ctx.prepared_dir)
    spec = make_spec(ctx)
    layers = lidb_layers(ctx.pipe(), spec)
    ids = fit_order(ctx, data)
    mine = ids[ctx.dist.rank :: ctx.dist.world_size]
    per_call = ctx.cfg.stage1.identities_per_call
    # Fixed chunks of this rank's list: a restart regroups nothing, so it refits bit-identically.
    chunks = [mine[i : i + per_call] for i in range(0, len(mine), per_call)]
    tkey = target_key(ctx)
    todo = [c for c in chunks if not all(_done(_path(ctx, i), tkey) for i in c)]
    n_todo = sum(len(c) for c in todo)
    if ctx.dist.is_main:
        log.info("stage1: %d of %d prepared identities over %d ranks, %d per UNet call; LiDB a=%d b=%d r=%d "
                 "on %d layers, %d steps each", len(ids), len(data.identities()), ctx.dist.world_size, per_call,
                 spec.a, spec.b, spec.r, len(layers), ctx.cfg.stage1.train.steps)
    if n_todo < len(mine):
        log.info("stage1: rank %d: %d of its %d identities already done", ctx.dist.rank, len(mine) - n_todo, len(mine))
    # One handle per rank (aux bases drawn once); every chunk starts from its fresh init.
    handle = LiDB(ctx.pipe(), spec, name="stage1", layers=layers)
    init = handle.state_dict()
    text_emb, pooled = data.text_emb(), data.pooled()  # (1, T, D), (1, P) or None (SD 1.x)
    t0, done = time.monotonic(), 0
    try:
        with tqdm(total=n_todo, desc="stage1", unit="identity", disable=not ctx.dist.is_main) as bar:
            for chunk in todo:
                _fit_chunk(ctx, data, chunk, spec, layers, (text_emb, pooled), tkey, handle, init)
                done += len(chunk)
                bar.update(len(chunk))
                if ctx.dist.is_main:
                    el = time.monotonic() - t0
                    log.info("stage1: %d/%d identities on rank 0 (%.0f/h), ~%.0f s left", done, n_todo,
                             3600 * done / el, el / done * (n_todo - done))
    finally:
        handle.remove()
    barrier()
    if ctx.dist.is_main:
        _write_index(ctx, data, sorted(ids), spec, layers, key)
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


def _fit_chunk(ctx, data, chunk, spec, layers, cond, key, handle, init) -> None:
    """Fit `chunk` together (each identity seeded by its name) and write the files missing.

    A chunk cut short is refitted whole, never regrouped, so every file a restart writes is
    bit-identical to what the uninterrupted run would have written.
    """
    from hypernet.methods.lidb import LiDBFitData, train_lidb_batch

    dev, c = ctx.dist.device, ctx.cfg.stage1.train
    items = []
    for ident in chunk:
        rows = data.rows(ident)
        items.append(LiDBFitData(data.latents(rows).to(dev), data.latents(rows, flip=True).to(dev),
                                 seed=step_seed(c.seed, *ident.encode()) % 2**31))
    text_emb, pooled = cond
    fits = train_lidb_batch(ctx.pipe(), handle, items, text_emb.to(dev), c, init=init,
                            pooled=None if pooled is None else pooled.to(dev))  # SD 1.x: no pooled text
    for ident, (weights, final_loss) in zip(chunk, fits, strict=True):
        path = _path(ctx, ident)
        if _done(path, key):
            continue  # written before an interruption: left as it is
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

    def fitted(self, ids) -> list[str]:
        """`ids` (in their order) that this stage 1 has a target for: the split's identities a later
        stage can train or score on (a split may name people stage 1 skipped or has not reached)."""
        return [i for i in ids if i in self.identities]

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


__all__ = ["Stage1Outputs", "fit_order", "load_stage1", "make_spec", "run_stage1", "stage1_key", "target_key"]

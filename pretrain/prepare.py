"""Stage `prepare`: corpus -> validated, face-cropped photos -> cached latents + prompt embeddings.

Shards are processed round-robin over ranks (shard i on rank i % world), each written atomically
and skipped on a rerun when already present for the same settings, so a killed job resumes
where it stopped. Bad photos are reported (log + index.json "skipped") and left out, never fatal.
Photos go through `hypernet.photos.preprocess`, the same call fast personalisation makes.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from hypernet.errors import InvalidInputError
from hypernet.files import atomic_write_bytes
from hypernet.photos import decode_image, preprocess
from hypernet.training.data import encode_images
from pretrain.cache import INDEX, PROMPTS, read_shard_meta, shard_name, write_shard
from pretrain.config import LFW, PREPARE_FREE_FIELDS
from pretrain.context import RunContext
from pretrain.corpus import PhotoRef, read_corpus, resolve_corpus, split_identities
from pretrain.distributed import barrier

log = logging.getLogger(__name__)


def prepare_key(ctx: RunContext) -> str:
    """Every data setting but `max_identities`, which picks what stage 1 fits, not what is prepared."""
    return ctx.cfg.section_key("data", exclude=PREPARE_FREE_FIELDS)


def run_prepare(ctx: RunContext) -> None:
    """Run (or finish, or skip) the prepare stage on this rank: the latent cache, then (for an
    identity-conditioned hypernetwork) the face-encoder embeddings (pretrain.face_embeddings)."""
    from pretrain.face_embeddings import ensure_face_embeddings

    _run_latent_cache(ctx)
    ensure_face_embeddings(ctx)


def _run_latent_cache(ctx: RunContext) -> None:
    out, cfg = ctx.prepared_dir, ctx.cfg.data
    key = prepare_key(ctx)
    idx_path = out / INDEX
    if ctx.already_done("prepare", idx_path, key):
        return
    # 1. Which photos, whose, which split (deterministic: every rank computes the same plan).
    corpus = resolve_corpus(cfg.corpus)
    photos = read_corpus(corpus, cfg)
    detector = "center" if corpus == LFW else cfg.detector  # LFW images are already face crops
    train_ids, val_ids = split_identities([p.identity for p in photos], cfg)
    shards = [photos[i : i + cfg.shard_size] for i in range(0, len(photos), cfg.shard_size)]
    if ctx.dist.is_main:
        log.info("prepare: corpus %s: %d photos of %d identities (%d train / %d val), %d shards, "
                 "face crop %s", corpus, len(photos), len(train_ids) + len(val_ids), len(train_ids),
                 len(val_ids), len(shards), detector)
    # 2. This rank's shards: validate, crop, encode, write.
    res = ctx.resolution()
    mine = list(range(ctx.dist.rank, len(shards), ctx.dist.world_size))
    t0 = time.monotonic()
    for i in tqdm(mine, desc="prepare", unit="shard", disable=not ctx.dist.is_main):
        path = out / shard_name(i)
        meta = read_shard_meta(path)
        if meta is not None and meta.get("key") == key:
            continue
        _process_shard(ctx, shards[i], path, key, res, detector)
        if ctx.dist.is_main:
            _log_eta("prepare", t0, mine.index(i) + 1, len(mine))
    barrier()
    # 3. Rank 0: prompt embeddings and the index (written last: its presence means "done").
    if ctx.dist.is_main:
        _write_prompts(ctx)
        _write_index(ctx, corpus, key, res, shards, set(val_ids))
    barrier()


def _process_shard(ctx: RunContext, refs: list[PhotoRef], path, key: str, res: int, detector: str) -> None:
    pixels, rows, skipped = [], [], []
    for ref in refs:
        try:
            item = ref.load()
            img = decode_image(item, source=ref.source) if isinstance(item, Path) else item
            pixels.append(preprocess(img, res, detector=detector))  # (3, R, R) in [-1, 1]
            rows.append({"identity": ref.identity, "source": ref.source})
        except (InvalidInputError, OSError) as e:  # ImageDecodeError/TooLarge are InvalidInputError
            log.warning("prepare: skipping %s (identity %s): %s", ref.source, ref.identity, e)
            skipped.append({"identity": ref.identity, "source": ref.source, "error": str(e)})
    pipe, h = ctx.pipe(), res // ctx.pipe().vae_scale_factor
    if pixels:
        P = torch.stack(pixels)  # (n, 3, R, R)
        # fp32 even on GPU: a one-off pass whose output every later step trains on.
        lat = encode_images(pipe, P, batch_size=ctx.cfg.data.encode_batch)  # (n, 4, h, w)
        lat_f = encode_images(pipe, P, flip=True, batch_size=ctx.cfg.data.encode_batch)
    else:
        P = torch.zeros(0, 3, res, res)
        lat = lat_f = torch.zeros(0, pipe.vae.config.latent_channels, h, h)
    write_shard(path, P, lat, lat_f, {"key": key, "rows": rows, "skipped": skipped})


def _write_prompts(ctx: RunContext) -> None:
    """The prompt's conditioning as the base family's objective makes it (SD 1.x: exactly
    `encode_prompts`, no pooled vector)."""
    from safetensors.torch import save as st_save

    from hypernet.training.objectives import objective_for

    pipe = ctx.pipe()
    emb, pooled = objective_for(pipe).encode_prompts(pipe, [ctx.cfg.data.prompt])  # (1, T, D), (1, P) | None
    tensors = {"text_emb": emb.cpu().contiguous()}
    if pooled is not None:
        tensors["pooled"] = pooled.cpu().contiguous()
    atomic_write_bytes(ctx.prepared_dir / PROMPTS, st_save(tensors, metadata={"prompt": ctx.cfg.data.prompt}))


def _write_index(ctx: RunContext, corpus: str, key: str, res: int, shards: list, val_ids: set) -> None:
    identities: dict[str, dict] = {}
    skipped: list[dict] = []
    for i in range(len(shards)):
        meta = read_shard_meta(ctx.prepared_dir / shard_name(i))
        if meta is None or meta.get("key") != key:
            raise RuntimeError(f"prepare: shard {i} must be complete after the barrier, got {meta!r}")
        skipped += meta["skipped"]
        for j, row in enumerate(meta["rows"]):
            ident = row["identity"]
            entry = identities.setdefault(
                ident, {"split": "val" if ident in val_ids else "train", "rows": [], "sources": []}
            )
            entry["rows"].append([i, j])
            entry["sources"].append(row["source"])
    if not any(v["split"] == "train" for v in identities.values()):
        raise InvalidInputError(f"corpus must have at least one valid training photo, got none in {corpus}")
    index = {
        "key": key, "corpus": corpus, "base": str(ctx.base_path),
        "base_fingerprint": ctx.fingerprint(), "resolution": res,
        "prompt": ctx.cfg.data.prompt, "flip": ctx.cfg.data.flip,
        "shards": [shard_name(i) for i in range(len(shards))],
        "identities": identities, "skipped": skipped,
        "counts": {
            "photos": sum(len(v["rows"]) for v in identities.values()), "skipped": len(skipped),
            "train_identities": sum(v["split"] == "train" for v in identities.values()),
            "val_identities": sum(v["split"] == "val" for v in identities.values()),
        },
    }
    atomic_write_bytes(ctx.prepared_dir / INDEX, json.dumps(index, indent=1).encode())
    log.info("prepare: done: %s (corpus %s)", index["counts"], corpus)


def _log_eta(stage: str, t0: float, done: int, total: int) -> None:
    el = time.monotonic() - t0
    log.info("%s: %d/%d done, %.0f s elapsed, ~%.0f s left", stage, done, total, el,
             el / max(done, 1) * (total - done))


__all__ = ["prepare_key", "run_prepare"]

"""The face-encoder embeddings of the prepared corpus, computed once (part of `prepare`'s cache).

    prepared/face_embeddings/shard-00000.safetensors
        emb, emb_flip (n, 512) float32   unit embeddings of each photo's aligned face (and its mirror)
        found (n,) uint8                 1: MTCNN landmarks were found; 0: the centre crop was used

Only for an identity-conditioned hypernetwork (`stage2.model.condition` "identity" or "both"):
stage 2 then reads these rows beside the cached pixels and latents, so the frozen face encoder
never runs per training step. Row j of embedding shard i is row j of prepared shard i. Each
photo is decoded again at full resolution and aligned with its 5 MTCNN landmarks to the ArcFace
112x112 template (hypernet.face_alignment): the embedding sees the whole face, not the R x R crop.
The mirror's embedding is that of the horizontally flipped aligned face (the template is
symmetric up to half a pixel), which saves a second detection.

Shards are spread round-robin over ranks, written atomically and skipped on a rerun when present
for the same settings (key: the prepare key, the encoder and the detector), like `prepare`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from hypernet.errors import InvalidInputError
from hypernet.files import atomic_write_bytes
from pretrain.cache import PreparedData, read_shard_meta, shard_name
from pretrain.config import LFW, PREPARE_FREE_FIELDS
from pretrain.context import RunContext
from pretrain.distributed import barrier

log = logging.getLogger(__name__)

EMB_DIR = "face_embeddings"
#: photos per face-encoder call
_ENCODE_BATCH = 32


def embeddings_key(ctx: RunContext) -> str:
    """Outputs under another key are stale: the prepared cache, the encoder or the detector changed."""
    import hashlib

    from hypernet.face_encoder import ONNX_SHA256

    # = pretrain.prepare.prepare_key (prepare imports this module: no circle)
    prepared = ctx.cfg.section_key("data", exclude=PREPARE_FREE_FIELDS)
    payload = [prepared, ctx.cfg.stage2.model.face_encoder, ONNX_SHA256, _detector(ctx)]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def _detector(ctx: RunContext) -> str:
    """How the embedding's face is aligned: as the runtime aligns it (`HypernetRuntime.faces_for`'s
    default "auto": MTCNN landmarks, centre crop when none is found), whatever `data.detector` is.

    `data.detector` picks the R x R crop the latents are made of; the face world trains on
    "center" crops of aligned photos, and reusing that here embedded the whole 250 px LFW frame
    (background and all) at pretraining while the runtime embeds a landmark-aligned face: the
    hypernetwork then saw other features at inference than in training. Only the built-in
    25 px LFW subset is never detected (too small for MTCNN).
    """
    data = PreparedData(ctx.prepared_dir)
    return "center" if data.index.get("corpus") == LFW else "auto"


def ensure_face_embeddings(ctx: RunContext) -> None:
    """Compute (or finish, or skip) the embeddings of every prepared photo on this rank's shards.

    A no-op for the pixel condition without the identity term. Needs a finished `prepare` stage.
    """
    if not (ctx.cfg.stage2.model.uses_identity or ctx.cfg.stage2.identity_weight > 0):
        return
    data = PreparedData(ctx.prepared_dir)
    key, out = embeddings_key(ctx), ctx.prepared_dir / EMB_DIR
    sources = _sources_by_shard(data)
    mine = [i for i in range(ctx.dist.rank, len(data.index["shards"]), ctx.dist.world_size)
            if (read_shard_meta(out / shard_name(i)) or {}).get("key") != key]
    if mine:
        from hypernet.face_encoder import FaceEncoder

        encoder = FaceEncoder.load().to(ctx.dist.device)
        for i in mine:
            _embed_shard(encoder, sources.get(i, []), out / shard_name(i), key, _detector(ctx), ctx.dist.device)
    barrier()
    if ctx.dist.is_main:
        found = total = 0
        for i in range(len(data.index["shards"])):
            meta = read_shard_meta(out / shard_name(i)) or {}
            found, total = found + meta.get("found", 0), total + meta.get("n", 0)
        log.info("face embeddings: %d photos, landmarks found on %d (the rest: centre crops), in %s",
                 total, found, out)


def _sources_by_shard(data: PreparedData) -> dict[int, list[str]]:
    """shard -> the source of each of its rows, in row order."""
    rows: dict[int, dict[int, str]] = {}
    for v in data.index["identities"].values():
        for (s, r), src in zip(v["rows"], v["sources"], strict=True):
            rows.setdefault(s, {})[r] = src
    return {s: [m[r] for r in range(len(m))] for s, m in rows.items()}


def _embed_shard(encoder, sources: list[str], path: Path, key: str, detector: str, device) -> None:
    from hypernet.face_alignment import align_face
    from hypernet.photos import decode_image
    from pretrain.corpus import PhotoRef

    faces, found = [], []
    for src in sources:
        item = PhotoRef("", src).load()
        img = decode_image(item, source=src) if isinstance(item, Path) else item
        a = align_face(img, detector=detector, source=src)
        faces.append(a.face)
        found.append(a.found)
    F = torch.stack(faces) if faces else torch.zeros(0, 3, 112, 112)  # (n, 3, 112, 112)
    emb, emb_flip = [], []
    with torch.no_grad():
        for s in range(0, F.shape[0], _ENCODE_BATCH):
            chunk = F[s : s + _ENCODE_BATCH].to(device)
            emb.append(encoder(chunk).cpu())  # (b, 512)
            emb_flip.append(encoder(chunk.flip(-1)).cpu())
    tensors = {
        "emb": torch.cat(emb) if emb else torch.zeros(0, 512),
        "emb_flip": torch.cat(emb_flip) if emb_flip else torch.zeros(0, 512),
        "found": torch.tensor(found, dtype=torch.uint8),
    }
    meta = {"key": key, "n": len(sources), "found": int(sum(found)), "detector": detector}
    atomic_write_bytes(path, st_save({k: v.contiguous() for k, v in tensors.items()},
                                     metadata={"meta": json.dumps(meta)}))


class FaceEmbeddings:
    """Read access to the cached embeddings (shards opened lazily, memory-mapped)."""

    def __init__(self, prepared_dir: str | Path, key: str):
        self.root = Path(prepared_dir) / EMB_DIR
        self.key = key
        self._handles: dict[int, object] = {}

    def _open(self, shard: int):
        h = self._handles.get(shard)
        if h is None:
            path = self.root / shard_name(shard)
            meta = read_shard_meta(path)
            if meta is None or meta.get("key") != self.key:
                raise InvalidInputError(
                    f"face embeddings {path} must exist for these settings (key {self.key}), got "
                    f"{'none' if meta is None else 'key ' + str(meta.get('key'))}: run `prepare` (or stage2) again"
                )
            h = self._handles[shard] = safe_open(str(path), framework="pt")
        return h

    def get(self, rows: list[tuple[int, int]], flips: torch.Tensor | None = None) -> torch.Tensor:
        """(n, 512) embeddings of `rows` (of the mirrored photo where `flips` (n,) is True)."""
        out = []
        for k, (s, r) in enumerate(rows):
            name = "emb_flip" if flips is not None and bool(flips[k]) else "emb"
            out.append(self._open(s).get_slice(name)[r : r + 1][0])
        return torch.stack(out)  # (n, 512)


__all__ = ["EMB_DIR", "FaceEmbeddings", "embeddings_key", "ensure_face_embeddings"]

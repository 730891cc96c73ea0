"""The prepared cache: sharded `.safetensors` of pixels + latents, prompt embeddings, an index.

    prepared/
      index.json                  corpus, split, per identity its (shard, row) pairs, skipped photos
      prompts.safetensors         text_emb (1, T, D) of the identity prompt (+ pooled (1, P): SDXL, SD3, FLUX)
      shard-00000.safetensors     pixels (n, 3, R, R) uint8, latents / latents_flip (n, C, R/8, R/8)

The conditioning is the base family's (`hypernet.training.objectives`): SD 1.x CLIP states (77
tokens); SDXL both CLIPs' (77) + pooled; SD3 CLIPs + T5 (333) + pooled; FLUX T5 (512) + CLIP pooled.
Latents have the VAE's C channels (4; SD3/FLUX 16), normalised with its shift and scale.

Pixels are stored as uint8: `hypernet.photos.preprocess` returns x/127.5 - 1 of 8-bit values, so
this is lossless and 4x smaller than fp32 (it matters at 512 px). Readers memory-map shards, so
a large corpus is never loaded whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from hypernet.errors import InvalidInputError
from hypernet.files import atomic_write_bytes

INDEX = "index.json"
PROMPTS = "prompts.safetensors"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def pixels_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, R, R) in [-1, 1] -> uint8 [0, 255] (exact for `preprocess` output)."""
    return ((pixels + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def uint8_to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `pixels_to_uint8`: uint8 -> float32 in [-1, 1], as `preprocess` returns."""
    return x.float() / 127.5 - 1.0


def write_shard(path: Path, pixels: torch.Tensor, latents: torch.Tensor, latents_flip: torch.Tensor,
                meta: dict) -> None:
    """Atomically write one shard; `meta` (rows, skipped, key) goes to the header as JSON."""
    tensors = {
        "pixels": pixels_to_uint8(pixels).contiguous(),  # (n, 3, R, R)
        "latents": latents.to("cpu", torch.float32).contiguous(),  # (n, 4, h, w)
        "latents_flip": latents_flip.to("cpu", torch.float32).contiguous(),  # (n, 4, h, w)
    }
    atomic_write_bytes(path, st_save(tensors, metadata={"meta": json.dumps(meta)}))


def read_shard_meta(path: Path) -> dict | None:
    """A shard's metadata, or None when the file is missing or torn."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("meta", "null"))
    except Exception:  # noqa: BLE001 - any unreadable shard is simply redone
        return None


class PreparedData:
    """Read access to a finished `prepare` output (shards opened lazily, memory-mapped)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        idx = self.root / INDEX
        if not idx.is_file():
            raise InvalidInputError(
                f"`--output-dir` must hold a finished `prepare` stage ({idx} missing): run `prepare` first"
            )
        self.index = json.loads(idx.read_text())
        self._handles: dict[int, object] = {}

    @property
    def resolution(self) -> int:
        return int(self.index["resolution"])

    def identities(self, split: str | None = None) -> list[str]:
        ids = self.index["identities"]
        return sorted(i for i, v in ids.items() if split is None or v["split"] == split)

    def rows(self, identity: str) -> list[tuple[int, int]]:
        return [tuple(r) for r in self.index["identities"][identity]["rows"]]

    def _get(self, shard: int, key: str, row: int) -> torch.Tensor:
        h = self._handles.get(shard)
        if h is None:
            h = self._handles[shard] = safe_open(str(self.root / self.index["shards"][shard]), framework="pt")
        return h.get_slice(key)[row : row + 1][0]

    def latents(self, rows: list[tuple[int, int]], flip: bool = False) -> torch.Tensor:
        """(n, C, h, w) float32 latents of `rows` (mirrored photos when `flip`)."""
        key = "latents_flip" if flip else "latents"
        return torch.stack([self._get(s, key, r) for s, r in rows])

    def pixels(self, rows: list[tuple[int, int]]) -> torch.Tensor:
        """(n, 3, R, R) float32 in [-1, 1] of `rows` (the unflipped photos)."""
        return uint8_to_pixels(torch.stack([self._get(s, "pixels", r) for s, r in rows]))

    def text_emb(self) -> torch.Tensor:
        """(1, T, D) embeddings of the identity prompt."""
        with safe_open(str(self.root / PROMPTS), framework="pt") as f:
            return f.get_tensor("text_emb")

    def pooled(self) -> torch.Tensor | None:
        """(1, P) pooled embedding of the identity prompt, or None (SD 1.x has none)."""
        with safe_open(str(self.root / PROMPTS), framework="pt") as f:
            return f.get_tensor("pooled") if "pooled" in f.keys() else None


__all__ = ["INDEX", "PROMPTS", "PreparedData", "pixels_to_uint8", "read_shard_meta", "shard_name",
           "uint8_to_pixels", "write_shard"]

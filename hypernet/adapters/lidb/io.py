"""LiDB weights on disk: one `.safetensors` with two packed tensors and self-describing metadata.

Layer names are stored once, in the metadata, not as tensor keys: at SD 1.5 scale 256 keys of
~60 characters would cost more than the 120 KB of weights they name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hypernet.adapters.lidb.config import LiDBSpec
from hypernet.errors import IncompatibleAdapterError, InvalidInputError
from hypernet.files import atomic_write_bytes

FORMAT = "hdb.lidb"
FORMAT_VERSION = "1"


@dataclass
class LiDBFile:
    """A loaded LiDB (or any file in this family): weights, spec, layers, base fingerprint."""

    weights: dict[str, torch.Tensor]
    spec: LiDBSpec
    layers: list[str]
    base_fingerprint: str
    metadata: dict[str, str] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # other tensors (e.g. relaxed LoRA)

    def check_compatible(self, base_fingerprint: str, layers: list[str]) -> None:
        """Raise `IncompatibleAdapterError` unless this file was made for that base and layer set."""
        if self.base_fingerprint != base_fingerprint:
            raise IncompatibleAdapterError(
                f"adapter must be applied to the base it was trained on (fingerprint "
                f"{self.base_fingerprint}), got a base with fingerprint {base_fingerprint}"
            )
        if self.layers != layers:
            missing = sorted(set(self.layers) - set(layers))[:3]
            raise IncompatibleAdapterError(
                f"adapter must match the base's adapted layers ({len(self.layers)} layers), got "
                f"{len(layers)} layers" + (f"; e.g. {missing} are missing" if missing else "")
            )


def encode_metadata(spec: LiDBSpec, layers: list[str], base_fingerprint: str,
                    fmt: str = FORMAT, extra: dict[str, str] | None = None) -> dict[str, str]:
    meta = {
        "format": fmt,
        "format_version": FORMAT_VERSION,
        "base_fingerprint": base_fingerprint,
        "spec": spec.to_json(),
        "a": str(spec.a), "b": str(spec.b), "r": str(spec.r), "seed": str(spec.seed),
        "layers": ",".join(layers),
    }
    meta.update(extra or {})
    return meta


def lidb_to_bytes(weights: dict[str, torch.Tensor], spec: LiDBSpec, layers: list[str],
                  base_fingerprint: str, extra_tensors: dict[str, torch.Tensor] | None = None,
                  fmt: str = FORMAT, extra_meta: dict[str, str] | None = None) -> bytes:
    """Serialise packed weights (fp32, contiguous) plus metadata to safetensors bytes."""
    tensors = {f"lidb.{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
    for k, v in (extra_tensors or {}).items():
        tensors[k] = v.detach().to("cpu", torch.float32).contiguous()
    return st_save(tensors, metadata=encode_metadata(spec, layers, base_fingerprint, fmt, extra_meta))


def save_lidb(path: str | Path, weights: dict[str, torch.Tensor], spec: LiDBSpec, layers: list[str],
              base_fingerprint: str) -> int:
    """Atomically write a LiDB file; returns its size in bytes."""
    data = lidb_to_bytes(weights, spec, layers, base_fingerprint)
    atomic_write_bytes(path, data)
    return len(data)


def lidb_from_bytes(data: bytes, source: str = "<bytes>", fmt: str | None = FORMAT) -> LiDBFile:
    """Parse a file in this family; `fmt` None accepts any format of it (caller checks).

    Raises:
        InvalidInputError: not a safetensors file of this family, or a newer format version.
    """
    try:
        tensors = st_load(data)
        meta = _read_metadata(data)
    except (SafetensorError, ValueError, json.JSONDecodeError) as e:
        raise InvalidInputError(
            f"{source} must be a .safetensors adapter file, got unreadable data ({e})"
        ) from e
    if meta.get("format") is None or (fmt is not None and meta.get("format") != fmt):
        raise InvalidInputError(
            f"{source} must be a {fmt or 'hyperdreambooth'} file, got format {meta.get('format')!r}"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise IncompatibleAdapterError(
            f"{source} must have format_version {FORMAT_VERSION}, got {meta.get('format_version')!r}"
        )
    return LiDBFile(
        weights={k.removeprefix("lidb."): v for k, v in tensors.items() if k.startswith("lidb.")},
        spec=LiDBSpec.from_json(meta["spec"]),
        layers=meta["layers"].split(",") if meta.get("layers") else [],
        base_fingerprint=meta["base_fingerprint"],
        metadata=meta,
        extra={k: v for k, v in tensors.items() if not k.startswith("lidb.")},
    )


def load_lidb(path: str | Path) -> LiDBFile:
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"`identity` must be an existing .safetensors file, got {str(path)!r}")
    return lidb_from_bytes(path.read_bytes(), source=str(path))


def _read_metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return dict(header.get("__metadata__", {}))


__all__ = ["FORMAT", "FORMAT_VERSION", "LiDBFile", "load_lidb", "save_lidb", "lidb_to_bytes",
           "lidb_from_bytes", "encode_metadata"]

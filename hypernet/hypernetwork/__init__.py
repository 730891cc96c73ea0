"""The hypernetwork: photo -> LiDB weights; its export (safetensors, ONNX) and inference runtime.

The names below load lazily (PEP 562): the CLI reads `hypernet.hypernetwork.config` defaults to
build `--help`, which must not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypernet.lazy import lazy_exports

if TYPE_CHECKING:  # the names, for type checkers and linters
    from hypernet.hypernetwork.config import HypernetConfig
    from hypernet.hypernetwork.export import HypernetInfo, export_onnx, load_hypernet, read_info, save_hypernet
    from hypernet.hypernetwork.heads import BaseHeads, sized_for_base
    from hypernet.hypernetwork.model import HyperNetwork, pack_theta, unpack_theta
    from hypernet.hypernetwork.runtime import HypernetRuntime

__all__ = [
    "BaseHeads",
    "HyperNetwork",
    "HypernetConfig",
    "HypernetInfo",
    "HypernetRuntime",
    "export_onnx",
    "load_hypernet",
    "pack_theta",
    "read_info",
    "save_hypernet",
    "sized_for_base",
    "unpack_theta",
]

_HOME = {
    "HypernetConfig": "hypernet.hypernetwork.config",
    "BaseHeads": "hypernet.hypernetwork.heads",
    "sized_for_base": "hypernet.hypernetwork.heads",
    "HypernetInfo": "hypernet.hypernetwork.export",
    "export_onnx": "hypernet.hypernetwork.export",
    "load_hypernet": "hypernet.hypernetwork.export",
    "read_info": "hypernet.hypernetwork.export",
    "save_hypernet": "hypernet.hypernetwork.export",
    "HyperNetwork": "hypernet.hypernetwork.model",
    "pack_theta": "hypernet.hypernetwork.model",
    "unpack_theta": "hypernet.hypernetwork.model",
    "HypernetRuntime": "hypernet.hypernetwork.runtime",
}


__getattr__ = lazy_exports(__name__, _HOME)

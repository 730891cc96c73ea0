"""The hypernetwork: photo -> LiDB weights; its export (safetensors, ONNX) and inference runtime."""

from hypernet.hypernetwork.config import HypernetConfig
from hypernet.hypernetwork.export import (
    HypernetInfo,
    export_onnx,
    load_hypernet,
    read_info,
    save_hypernet,
)
from hypernet.hypernetwork.model import HyperNetwork, pack_theta, unpack_theta
from hypernet.hypernetwork.runtime import HypernetRuntime

__all__ = ["HyperNetwork", "HypernetConfig", "HypernetInfo", "HypernetRuntime", "export_onnx", "load_hypernet",
           "pack_theta", "read_info", "save_hypernet", "unpack_theta"]

"""Adapters: one wrapper (`AdaptedLinear`), kinds registered by name (LiDB, LoRA), export."""

from hypernet.adapters.export import stack_factors, to_diffusers_lora, to_kohya_lora
from hypernet.adapters.handle import AdapterHandle
from hypernet.adapters.inject import adapted_layers, delete_adapter, inject, uninject, wrappers_detached
from hypernet.adapters.layer import AdaptedLinear
from hypernet.adapters.lidb.config import LiDBSpec
from hypernet.adapters.lidb.io import LiDBFile, load_lidb, save_lidb
from hypernet.adapters.lidb.model import LiDB, default_spec_for, lidb_layers
from hypernet.adapters.lora.model import LoRA

__all__ = [
    "AdaptedLinear", "AdapterHandle", "LiDB", "LiDBFile", "LiDBSpec", "LoRA", "adapted_layers",
    "default_spec_for", "delete_adapter", "inject", "lidb_layers", "load_lidb", "save_lidb",
    "stack_factors", "to_diffusers_lora", "to_kohya_lora", "uninject",
    "wrappers_detached",
]

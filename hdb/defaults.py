"""The embedded default hypernetwork: the app's choice of cache, base and recipe.

`hdb personalize` and `hdb serve` without `--hypernet` use `default_hypernet_path()`; the library
and the service only take paths. Built on first use by the pretraining pipeline (~1-2 CPU-minutes)
on the embedded tiny base and cached under `$HDB_CACHE_DIR` (else `~/.cache/hyperdreambooth`).
"""

from __future__ import annotations

from pathlib import Path

from hypernet.defaults import DEFAULT_TINY_SEED, cache_dir, default_base_dir
from pretrain.embedded import TINY_HYPERNET_OVERRIDES, tiny_hypernet_path

#: The `tiny-cpu` overrides the embedded default is built with (read at call time: a test cuts it down).
DEFAULT_HYPERNET_OVERRIDES: tuple[str, ...] = TINY_HYPERNET_OVERRIDES


def default_hypernet_path() -> Path:
    """The embedded tiny hypernetwork's export folder (hypernet.onnx + hypernet.safetensors)."""
    return tiny_hypernet_path(cache_dir(), default_base_dir(), str(DEFAULT_TINY_SEED), DEFAULT_HYPERNET_OVERRIDES)

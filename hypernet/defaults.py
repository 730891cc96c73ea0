"""The embedded defaults the library owns: the cache folder and the tiny base cached there.

Built on first use, so a fresh clone works with no model download. The embedded tiny
*hypernetwork* is built by the pretraining pipeline, so it is the app's (`hdb.defaults`):
the library and the service only take its path. The cache folder is
`$HDB_CACHE_DIR`, else `~/.cache/hyperdreambooth`.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_TINY_SEED = 0


def cache_dir() -> Path:
    return Path(os.environ.get("HDB_CACHE_DIR") or Path.home() / ".cache" / "hyperdreambooth")


def default_base_dir() -> Path:
    """The tiny base, written on first use (atomically: built aside, then renamed)."""
    target = cache_dir() / f"tiny-base-seed{DEFAULT_TINY_SEED}"
    if (target / "model_index.json").is_file():
        return target
    from hypernet.base.tiny import make_tiny_pipeline  # torch: only when building

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    make_tiny_pipeline(tmp, seed=DEFAULT_TINY_SEED)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; use its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target

"""The embedded defaults: where the tiny base (and later the tiny hypernetwork) are cached.

Built on first use, so a fresh clone works with no model download. The cache folder is
`$HDB_CACHE_DIR`, else `~/.cache/hyperdreambooth`.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypernet.base.tiny import make_tiny_pipeline

DEFAULT_TINY_SEED = 0


def cache_dir() -> Path:
    return Path(os.environ.get("HDB_CACHE_DIR") or Path.home() / ".cache" / "hyperdreambooth")


def default_base_dir() -> Path:
    """The tiny base, written on first use (atomically: built aside, then renamed)."""
    target = cache_dir() / f"tiny-base-seed{DEFAULT_TINY_SEED}"
    if (target / "model_index.json").is_file():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    make_tiny_pipeline(tmp, seed=DEFAULT_TINY_SEED)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; use its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


#: How the embedded tiny hypernetwork is built: the `tiny-cpu` pretraining config, cut down so the
#: first `hdb personalize`/`hdb serve` without a hypernetwork waits ~1-2 min on 2 CPU cores, not
#: longer. LFW (bundled in scikit-image's wheel, no face detector needed) makes it the same on
#: every machine, whether or not ../shared is there.
DEFAULT_HYPERNET_OVERRIDES = (
    'data.corpus=["skimage:lfw_subset"]', "data.lfw_count=24", "data.detector=center",
    "stage1.train.steps=20", "stage2.steps=60", "stage2.val_every=30", "stage2.ckpt_every=60",
    "stage2.warmup_steps=6", "device=cpu",
)


def default_hypernet_path() -> Path:
    """The embedded tiny hypernetwork's export folder (hypernet.onnx + hypernet.safetensors).

    Built on first use by running the pretraining pipeline (prepare -> stage1 -> stage2 ->
    export, one process) on the embedded tiny base, in a temporary folder renamed into the cache
    when complete, so a crash or a concurrent builder never leaves a half-written one.
    """
    import hashlib
    import logging
    import shutil

    from pretrain.config import resolve_config_path

    recipe = resolve_config_path("tiny-cpu").read_text() + "\n".join(DEFAULT_HYPERNET_OVERRIDES)
    key = hashlib.sha256(f"{DEFAULT_TINY_SEED}\n{recipe}".encode()).hexdigest()[:12]
    target = cache_dir() / f"tiny-hypernet-{key}"
    if (target / "hypernet.safetensors").is_file():
        return target
    base = default_base_dir()
    work = cache_dir() / f".tiny-hypernet-{key}.build{os.getpid()}"
    log = logging.getLogger(__name__)
    log.warning("building the embedded tiny hypernetwork (first use: ~1-2 min on 2 CPU cores) into %s", target)
    from pretrain.cli import STAGES, run_stages

    try:
        run_stages("tiny-cpu", work, STAGES, [*DEFAULT_HYPERNET_OVERRIDES, f"base={base}"], distributed=False)
        try:
            (work / "export").rename(target)
        except OSError:  # another process won the race; use its copy
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("embedded tiny hypernetwork ready: %s", target)
    return target

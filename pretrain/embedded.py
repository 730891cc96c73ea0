"""Build a cut-down `tiny-cpu` hypernetwork into a cache folder, once (the embedded default's recipe).

The app (`hdb.defaults.default_hypernet_path`) decides where the cache is and which base it
uses; benchmarks ask for the same build with the same paths, so they share one cached copy.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

#: How the embedded tiny hypernetwork is built: the `tiny-cpu` pretraining config, cut down so the
#: first `hdb personalize`/`hdb serve` without a hypernetwork waits ~1-2 min on 2 CPU cores, not
#: longer. LFW (bundled in scikit-image's wheel, no face detector needed) makes it the same on
#: every machine, whether or not ../shared is there.
TINY_HYPERNET_OVERRIDES = (
    'data.corpus=["skimage:lfw_subset"]', "data.lfw_count=24", "data.detector=center",
    "stage1.train.steps=20", "stage2.steps=60", "stage2.val_every=30", "stage2.ckpt_every=60",
    "stage2.warmup_steps=6", "device=cpu",
)


def tiny_hypernet_path(cache: Path, base: Path, base_key: str,
                       overrides: tuple[str, ...] = TINY_HYPERNET_OVERRIDES) -> Path:
    """The export folder (hypernet.onnx + hypernet.safetensors) of a `tiny-cpu` run with
    `overrides` on `base`, under `cache/tiny-hypernet-KEY`; built on first use.

    `base_key` names the base in the cache key (the base folder's path may differ between
    machines; its recipe does not). The run happens in a temporary folder renamed into the cache
    when complete, so a crash or a concurrent builder never leaves a half-written one.
    """
    from pretrain.cli import STAGES, run_stages
    from pretrain.config import resolve_config_path

    recipe = resolve_config_path("tiny-cpu").read_text() + "\n".join(overrides)
    key = hashlib.sha256(f"{base_key}\n{recipe}".encode()).hexdigest()[:12]
    target = Path(cache) / f"tiny-hypernet-{key}"
    if (target / "hypernet.safetensors").is_file():
        return target
    work = Path(cache) / f".tiny-hypernet-{key}.build{os.getpid()}"
    log.warning("building the embedded tiny hypernetwork (first use: ~1-2 min on 2 CPU cores) into %s", target)
    try:
        run_stages("tiny-cpu", work, STAGES, [*overrides, f"base={base}"], distributed=False)
        try:
            (work / "export").rename(target)
        except OSError:  # another process won the race; use its copy
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("embedded tiny hypernetwork ready: %s", target)
    return target

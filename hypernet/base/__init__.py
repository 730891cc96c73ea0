"""Base models: tiny pipelines of each family (SD 1.x, SDXL, SD3, FLUX), offline loading, fingerprints.

The names below load lazily (PEP 562): importing a light submodule (as `hdb --help` does)
must not pull in torch and diffusers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypernet.lazy import lazy_exports

if TYPE_CHECKING:  # the names, for type checkers and linters
    from hypernet.base.arch import Arch, pipeline_arch
    from hypernet.base.loading import base_fingerprint, load_pipeline
    from hypernet.base.tiny import TINY_RESOLUTION, make_tiny_pipeline

__all__ = ["TINY_RESOLUTION", "Arch", "base_fingerprint", "load_pipeline", "make_tiny_pipeline", "pipeline_arch"]

_HOME = {
    "Arch": "hypernet.base.arch",
    "pipeline_arch": "hypernet.base.arch",
    "base_fingerprint": "hypernet.base.loading",
    "load_pipeline": "hypernet.base.loading",
    "TINY_RESOLUTION": "hypernet.base.tiny",
    "make_tiny_pipeline": "hypernet.base.tiny",
}


__getattr__ = lazy_exports(__name__, _HOME)

"""Personalisation methods (DreamBooth, Textual Inversion, LoRA, LiDB) behind one interface.

Each method package exports `METHOD` (name, config class, `train`, artifact class); the
subpackages import diffusers/peft, so they load on first use through `get_method`.
"""

from hypernet.methods.base import (
    METHOD_ARCHS,
    METHOD_NAMES,
    Artifact,
    Method,
    Personaliser,
    check_method_arch,
    detect_kind,
    get_method,
    load_artifact,
    methods_for,
)

__all__ = ["METHOD_ARCHS", "METHOD_NAMES", "Artifact", "Method", "Personaliser", "check_method_arch", "detect_kind",
           "get_method", "load_artifact", "methods_for"]

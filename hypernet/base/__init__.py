"""Base models: the tiny SD pipeline, offline loading, fingerprints."""

from hypernet.base.loading import base_fingerprint, load_pipeline
from hypernet.base.tiny import TINY_RESOLUTION, make_tiny_pipeline

__all__ = ["TINY_RESOLUTION", "base_fingerprint", "load_pipeline", "make_tiny_pipeline"]

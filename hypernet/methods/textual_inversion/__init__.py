"""Textual Inversion: new token embeddings, saved for stock `load_textual_inversion`."""

from hypernet.methods.base import Method
from hypernet.methods.textual_inversion.config import TIMethodConfig
from hypernet.methods.textual_inversion.method import TIArtifact, train

METHOD = Method("textual-inversion", TIMethodConfig, train, TIArtifact)

__all__ = ["METHOD", "TIArtifact", "TIMethodConfig", "train"]

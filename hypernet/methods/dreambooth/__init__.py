"""DreamBooth: full UNet fine-tune with prior preservation; the artifact is a pipeline directory."""

from hypernet.methods.base import Method
from hypernet.methods.dreambooth.config import DreamBoothMethodConfig
from hypernet.methods.dreambooth.method import DreamBoothArtifact, train

METHOD = Method("dreambooth", DreamBoothMethodConfig, train, DreamBoothArtifact)

__all__ = ["DreamBoothArtifact", "DreamBoothMethodConfig", "METHOD", "train"]

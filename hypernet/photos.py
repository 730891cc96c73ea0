"""Input photos: decode safely, crop on the face, resize, normalise.

Every path that turns user photos into model input (training a method, stage-1 pretraining, fast
personalisation, the service) goes through `preprocess`, so a photo means the same tensor
everywhere. Decoding is defensive because photos come from users: anything that is not a JPEG,
PNG or WebP, is truncated, or is absurdly large is an `ImageDecodeError` / `ImageTooLargeError`
naming the file, raised here rather than as a crash deep in torch.
"""

from __future__ import annotations

import io
import logging
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from hypernet.errors import (
    EnvironmentProblem,
    ImageDecodeError,
    ImageTooLargeError,
    InvalidInputError,
)
from hypernet.personalize_config import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)

#: Formats a user may send, by the name Pillow detects from the bytes (never the file suffix).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
#: Suffixes picked up when a directory is given (other files, e.g. a CSV, are ignored there).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
#: Face detection runs on a copy whose long side is at most this (MTCNN is slow on big photos).
_DETECT_MAX_SIDE = 640

Detector = Literal["auto", "mtcnn", "center"]


def decode_image(
    data: bytes | str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    source: str | None = None,
) -> Image.Image:
    """Decode a JPEG/PNG/WebP into an upright RGB image.

    The pixel count is checked from the header before any pixel is decoded, so a small file that
    claims a huge canvas (a decompression bomb) costs nothing.

    Args:
        data: the encoded bytes, or a path to read them from.
        max_pixels: the largest width * height accepted.
        source: a name for the input in error messages (default: the path, or "image").

    Returns:
        An RGB image with EXIF orientation applied (animated images: the first frame; alpha is
        composited on white; CMYK, palette, 16-bit and float modes converted).

    Raises:
        ImageDecodeError: missing/empty file, a format other than JPEG/PNG/WebP, corrupt data.
        ImageTooLargeError: more than `max_pixels` pixels.
    """
    if isinstance(data, (str, Path)):
        path = Path(data)
        source = source or str(path)
        if not path.is_file():
            raise ImageDecodeError(f"{source} must be an existing image file, got no such file")
        data = path.read_bytes()
    source = source or "image"
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"{source} must be bytes or a path, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError(f"{source} must be a JPEG, PNG or WebP image, got an empty file")
    img = _open_header(bytes(data), source, max_pixels)
    try:
        if getattr(img, "is_animated", False):
            img.seek(0)  # animated WebP/PNG: the first frame
        img.load()
        img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{source} must have at most {max_pixels:,} pixels ({e})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(
            f"{source} must be a complete {img.format} image, got corrupt or truncated data ({e})"
        ) from e
    return _to_rgb(img)


def _open_header(data: bytes, source: str, max_pixels: int) -> Image.Image:
    """Image.open reads only the header: check format and size there."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=None)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"{source} must have at most {max_pixels:,} pixels ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError(
            f"{source} must be a JPEG, PNG or WebP image, got data no image decoder recognises"
        ) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"{source} must be a JPEG, PNG or WebP image, got unreadable data ({e})") from e
    if img.format not in ALLOWED_FORMATS:
        raise ImageDecodeError(f"{source} must be a JPEG, PNG or WebP image, got {img.format or 'an unknown format'}")
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageDecodeError(f"{source} must have a non-empty canvas, got {w}x{h}")
    if w * h > max_pixels:
        raise ImageTooLargeError(f"{source} must have at most {max_pixels:,} pixels, got {w}x{h} = {w * h:,}")
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (alpha over white, high bit depths rescaled, not clipped)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)  # (H, W)
        peak = float(arr.max(initial=0))
        if img.mode == "F":
            hi = max(peak, 1.0)  # float images have no fixed range: stretch to the peak
        else:
            hi = 65535.0 if peak > 255 else 255.0  # 16-bit (PNG "I;16"/"I") vs 8-bit stored as I
        gray = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


# ---------------------------------------------------------------------------- face cropping

_detector = None
_detector_failed: str | None = None
_detector_lock = threading.Lock()


def _get_detector():
    """facenet-pytorch's MTCNN on CPU, built once per process (its weights ship in the wheel)."""
    global _detector, _detector_failed
    with _detector_lock:
        if _detector is None and _detector_failed is None:
            try:
                from facenet_pytorch import MTCNN

                _detector = MTCNN(keep_all=True, device="cpu")
            except Exception as e:  # ImportError, or weights missing from a broken install
                _detector_failed = f"{type(e).__name__}: {e}"
                log.warning("face detector unavailable (%s); using centre crops", _detector_failed)
    return _detector


def _detect(img: Image.Image) -> tuple[np.ndarray, np.ndarray] | None:
    """MTCNN on a copy downscaled to `_DETECT_MAX_SIDE` -> (box (4,), landmarks (5, 2)) of the most
    confident face in `img`'s pixels, or None."""
    det = _get_detector()
    if det is None:
        raise EnvironmentProblem(f"face detector must be available, got {_detector_failed}")
    scale = min(1.0, _DETECT_MAX_SIDE / max(img.size))
    small = (
        img
        if scale == 1.0
        else img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))),
            Image.Resampling.BILINEAR,
        )
    )
    with torch.no_grad():
        boxes, probs, points = det.detect(small, landmarks=True)
    if boxes is None or len(boxes) == 0:
        return None
    best = int(np.argmax(np.asarray(probs, dtype=np.float64)))
    return (np.asarray(boxes[best], dtype=np.float64) / scale,
            np.asarray(points[best], dtype=np.float64) / scale)  # (4,), (5, 2)


def detect_face(img: Image.Image) -> tuple[float, float, float, float] | None:
    """The most confident face box (x0, y0, x1, y1) in `img`'s pixels, or None.

    Raises:
        EnvironmentProblem: facenet-pytorch's MTCNN cannot be loaded.
    """
    best = _detect(img)
    if best is None:
        return None
    x0, y0, x1, y1 = (float(v) for v in best[0])
    return x0, y0, x1, y1


def detect_landmarks(img: Image.Image) -> np.ndarray | None:
    """The 5 landmarks (left eye, right eye, nose, left and right mouth corner; (5, 2) x, y in
    `img`'s pixels) of the most confident face, or None. Used to align faces for the face encoder
    (`hypernet.face_alignment`).

    Raises:
        EnvironmentProblem: facenet-pytorch's MTCNN cannot be loaded.
    """
    best = _detect(img)
    return None if best is None else best[1]



def face_crop(img: Image.Image, *, detector: Detector = "auto", margin: float = 0.5) -> Image.Image:
    """A square crop centred on the face, else on the image.

    The square's side is the face box's longer side times (1 + 2 * margin) - with the default
    0.5, twice the face, which keeps hair and chin as in the paper's face crops - clamped to the
    image and shifted to stay inside it.

    Args:
        detector: "auto" (MTCNN when it loads, else centre), "mtcnn" (required), "center".
        margin: extra context on each side, as a fraction of the face size.

    Raises:
        InvalidInputError: unknown `detector` or a negative `margin`.
        EnvironmentProblem: detector "mtcnn" asked for but unavailable.
    """
    if detector not in ("auto", "mtcnn", "center"):
        raise InvalidInputError(f"`detector` must be 'auto', 'mtcnn' or 'center', got {detector!r}")
    if not margin >= 0:
        raise InvalidInputError(f"`margin` must be >= 0, got {margin!r}")
    w, h = img.size
    box = None
    if detector == "mtcnn" or (detector == "auto" and _get_detector() is not None):
        box = detect_face(img)
        if box is None:
            log.info("no face found; using a centre crop")
    return square_crop(img, box, margin)


def square_crop(img: Image.Image, box: tuple[float, float, float, float] | None, margin: float) -> Image.Image:
    """The square around face `box` grown by `margin` of its size on each side, kept inside the
    image (None: the centred largest square). The face world's training crops use this too, so
    that it learns faces framed exactly as users' photos will be."""
    w, h = img.size
    if box is None:
        side = min(w, h)
        cx, cy = w / 2, h / 2
    else:
        x0, y0, x1, y1 = box
        side = min(max(x1 - x0, y1 - y0) * (1 + 2 * margin), w, h)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    side = max(1, int(round(side)))
    left = int(round(min(max(cx - side / 2, 0), w - side)))
    top = int(round(min(max(cy - side / 2, 0), h - side)))
    return img.crop((left, top, left + side, top + side))


def preprocess(img: Image.Image, resolution: int, *, detector: Detector = "auto") -> torch.Tensor:
    """Face crop, resize to `resolution` square, scale to [-1, 1].

    Returns:
        (3, resolution, resolution) float32 in [-1, 1] (the VAE's input range).
    """
    if not isinstance(resolution, int) or resolution < 8:
        raise InvalidInputError(f"`resolution` must be an integer >= 8, got {resolution!r}")
    crop = face_crop(_to_rgb(img), detector=detector)
    crop = crop.resize((resolution, resolution), Image.Resampling.LANCZOS)
    arr = np.asarray(crop, dtype=np.uint8)  # (H, W, 3)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()  # (3, H, W) in [0, 255]
    return x / 127.5 - 1.0


def to_pil(x: torch.Tensor) -> Image.Image:
    """The inverse of `preprocess`'s scaling: (3, H, W) in [-1, 1] -> an RGB image."""
    arr = ((x.detach().float().cpu().permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255)
    return Image.fromarray(arr.astype(np.uint8))


PhotoInput = str | Path | bytes | Image.Image


def list_photos(inputs: PhotoInput | Sequence[PhotoInput]) -> list[Path | bytes | Image.Image]:
    """Expand a directory into its image files (sorted); pass files, bytes and images through.

    Raises:
        InvalidInputError: a missing path, or no images at all.
    """
    single = isinstance(inputs, (str, Path, bytes, Image.Image))
    items = [inputs] if single else list(inputs)
    out: list[Path | bytes | Image.Image] = []
    for item in items:
        if isinstance(item, (bytes, bytearray)):
            out.append(bytes(item))
            continue
        if isinstance(item, Image.Image):
            out.append(item)
            continue
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            out.append(p)
        else:
            raise InvalidInputError(f"`images` must be existing files or directories, got {str(p)!r}")
    if not out:
        raise InvalidInputError(f"`images` must contain at least one JPEG/PNG/WebP photo, got none in {inputs!r}")
    return out


def load_photos(
    inputs: PhotoInput | Sequence[PhotoInput],
    resolution: int,
    *,
    detector: Detector = "auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> torch.Tensor:
    """Decode and preprocess photos from a directory, files, encoded bytes or decoded images.

    Returns:
        (N, 3, resolution, resolution) float32 in [-1, 1].

    Raises:
        ImageDecodeError / ImageTooLargeError naming the offending file; InvalidInputError.
    """
    tensors = []
    for i, item in enumerate(list_photos(inputs)):
        if isinstance(item, Image.Image):
            img = _to_rgb(item)  # already decoded (and size-checked) by the caller
        else:
            source = f"image #{i}" if isinstance(item, bytes) else str(item)
            img = decode_image(item, max_pixels=max_pixels, source=source)
        tensors.append(preprocess(img, resolution, detector=detector))
    return torch.stack(tensors)  # (N, 3, H, W)


__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "decode_image",
    "detect_face",
    "detect_landmarks",
    "face_crop",
    "list_photos",
    "load_photos",
    "preprocess",
    "square_crop",
]

"""Face alignment for the face encoder: 5 MTCNN landmarks -> similarity transform -> 112x112.

    face, found = align_face(img)            # (3, 112, 112) float32 in [-1, 1]; found: landmarks seen
    faces = align_faces([img1, img2])        # (N, 3, 112, 112)

Face-recognition networks are trained on faces warped so that the eyes, nose tip and mouth corners
land on fixed points (the "ArcFace" 112x112 template below; the faceplugin MobileFaceNet uses the
same five points). The warp is the least-squares *similarity* (rotation, uniform scale, shift;
Umeyama 1991) from the detected landmarks to the template, so faces are never sheared.

When MTCNN finds no face (or is unavailable under detector "auto") the centre square of the image
is resized to 112x112 instead, and the log says so: the embedding of such a crop is weaker but the
caller still gets one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image

from hypernet.errors import InvalidInputError

log = logging.getLogger(__name__)

FACE_SIZE = 112
#: The standard ArcFace 112x112 template (insightface `arcface_dst`): left eye, right eye, nose,
#: left and right mouth corner, as (x, y) pixels.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)

AlignDetector = Literal["auto", "mtcnn", "center"]


class AlignedFace(NamedTuple):
    face: torch.Tensor  # (3, 112, 112) float32 in [-1, 1]
    found: bool  # False: no landmarks, the centre crop was used


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares similarity (2, 3) matrix M with dst ~ M @ [src; 1] (Umeyama).

    Args:
        src, dst: (K, 2) corresponding points, K >= 2.

    Raises:
        InvalidInputError: shapes differ, fewer than 2 points, or all src points coincide.
    """
    src, dst = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise InvalidInputError(f"`src`/`dst` must both be (K>=2, 2) points, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    var_s = (s_c**2).sum() / len(src)
    if var_s <= 1e-12:
        raise InvalidInputError("`src` points must not all coincide, got a single point")
    cov = d_c.T @ s_c / len(src)  # (2, 2)
    U, S, Vt = np.linalg.svd(cov)
    D = np.eye(2)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        D[1, 1] = -1.0  # a reflection would fit better; similarity transforms exclude it
    R = U @ D @ Vt
    scale = float((S * np.diag(D)).sum() / var_s)
    t = mu_d - scale * R @ mu_s
    return np.concatenate([scale * R, t[:, None]], axis=1)  # (2, 3)


def warp_face(img: Image.Image, landmarks: np.ndarray, size: int = FACE_SIZE) -> Image.Image:
    """Warp `img` so that its 5 `landmarks` (5, 2) land on the ArcFace template scaled to `size`."""
    M = similarity_transform(landmarks, ARCFACE_TEMPLATE * (size / FACE_SIZE))  # image -> face
    A = np.vstack([M, [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(A)[:2]  # PIL maps each output pixel back to the input: face -> image
    return img.transform((size, size), Image.Transform.AFFINE, tuple(inv.ravel()),
                         resample=Image.Resampling.BILINEAR)


def grid_theta(M: np.ndarray, in_size: tuple[int, int], size: int = FACE_SIZE) -> torch.Tensor:
    """The (2, 3) `F.affine_grid` matrix of the warp `warp_face` does, for tensors.

    Args:
        M: (2, 3) image pixels -> face pixels (the template at `size`), e.g. `similarity_transform`.
        in_size: the source image's (H, W).

    Returns:
        (2, 3) float32: normalised output coordinates (align_corners=False) -> normalised input ones.
    """
    h, w = in_size
    A = np.vstack([np.asarray(M, dtype=np.float64), [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(A)  # face pixels -> image pixels (pixel centres at integers)
    out_px = np.array([[size / 2, 0, (size - 1) / 2], [0, size / 2, (size - 1) / 2], [0, 0, 1]])  # n_o -> p_o
    in_norm = np.array([[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1], [0, 0, 1]])  # p_i -> n_i
    return torch.from_numpy((in_norm @ inv @ out_px)[:2]).float()


def warp_faces(images: torch.Tensor, theta: torch.Tensor, size: int = FACE_SIZE) -> torch.Tensor:
    """Differentiable `warp_face` of a batch: (N, 3, H, W) -> (N, 3, size, size), bilinear, zeros
    outside (what a loss on generated images backpropagates through).

    Args:
        theta: (2, 3) for every image, or (N, 2, 3), from `grid_theta`.
    """
    if images.dim() != 4:
        raise InvalidInputError(f"`images` must have shape (N, C, H, W), got {tuple(images.shape)}")
    n = images.shape[0]
    th = theta.to(images.device, images.dtype)
    th = th.expand(n, 2, 3) if th.dim() == 2 else th  # (N, 2, 3)
    grid = torch.nn.functional.affine_grid(th, [n, images.shape[1], size, size], align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def center_face(img: Image.Image, size: int = FACE_SIZE) -> Image.Image:
    """The fallback: the centred largest square, resized."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> (3, H, W) float32 in [-1, 1] (the project's pixel convention)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def align_face(img: Image.Image, *, detector: AlignDetector = "auto", source: str = "photo") -> AlignedFace:
    """One photo -> the aligned 112x112 face (centre crop when no face is found, logged).

    Args and Raises: as `align_face_with_landmarks`.
    """
    return align_face_with_landmarks(img, detector=detector, source=source)[0]


def align_face_with_landmarks(img: Image.Image, *, detector: AlignDetector = "auto", source: str = "photo"
                              ) -> tuple[AlignedFace, np.ndarray | None]:
    """`align_face`, plus the (5, 2) MTCNN landmarks it aligned by, in `img`'s pixels (None when it
    used the centre crop): for callers that need both without detecting twice.

    Args:
        detector: "auto" (MTCNN when it loads), "mtcnn" (required), "center" (never detect).
        source: a name for the photo in the log.

    Raises:
        InvalidInputError: unknown `detector`.
        EnvironmentProblem: "mtcnn" asked for but unavailable.
    """
    from hypernet.photos import _get_detector, detect_landmarks

    if detector not in ("auto", "mtcnn", "center"):
        raise InvalidInputError(f"`detector` must be 'auto', 'mtcnn' or 'center', got {detector!r}")
    img = img.convert("RGB")
    points = None
    if detector == "mtcnn" or (detector == "auto" and _get_detector() is not None):
        points = detect_landmarks(img)
    if points is None:
        if detector != "center":
            log.info("face alignment: no face found in %s; using the centre crop", source)
        return AlignedFace(to_tensor(center_face(img)), False), None
    return AlignedFace(to_tensor(warp_face(img, points)), True), points


def align_faces(images: Sequence[Image.Image], *, detector: AlignDetector = "auto") -> torch.Tensor:
    """Several photos -> (N, 3, 112, 112) aligned faces in [-1, 1]."""
    return torch.stack([align_face(im, detector=detector, source=f"photo #{i}").face
                        for i, im in enumerate(images)])


def pixels_to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1] -> RGB images (to align faces from already-preprocessed crops)."""
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise InvalidInputError(f"`pixels` must have shape (N, 3, H, W), got {tuple(pixels.shape)}")
    arr = ((pixels.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy(), mode="RGB") for a in arr]


__all__ = ["ARCFACE_TEMPLATE", "FACE_SIZE", "AlignedFace", "align_face", "align_face_with_landmarks", "align_faces",
           "center_face", "grid_theta", "pixels_to_images", "similarity_transform", "to_tensor", "warp_face",
           "warp_faces"]

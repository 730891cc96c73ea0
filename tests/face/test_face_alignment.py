"""Face alignment: the similarity fit, the warp onto the ArcFace template, the centre fallback."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image, ImageDraw

from hypernet.errors import InvalidInputError
from hypernet.face_alignment import ARCFACE_TEMPLATE, align_face, similarity_transform, warp_face


def _similarity(theta: float, scale: float, shift) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[scale * c, -scale * s, shift[0]], [scale * s, scale * c, shift[1]]])


def test_similarity_fit_recovers_a_known_transform_and_never_reflects():
    M = _similarity(0.3, 2.5, (40.0, -7.0))
    src = ARCFACE_TEMPLATE
    dst = src @ M[:, :2].T + M[:, 2]
    np.testing.assert_allclose(similarity_transform(src, dst), M, atol=1e-9)
    mirrored = dst * np.array([-1.0, 1.0])  # only a reflection maps src onto this exactly
    R = similarity_transform(src, mirrored)[:, :2]
    assert np.linalg.det(R) > 0  # a rotation + scale, not a reflection
    with pytest.raises(InvalidInputError, match="must both be"):
        similarity_transform(src, dst[:4])
    with pytest.raises(InvalidInputError, match="coincide"):
        similarity_transform(np.zeros((5, 2)), dst)


def test_warp_puts_the_landmarks_on_the_template():
    """5 coloured dots at rotated/scaled/shifted template positions of a 300 px canvas land on
    the template's pixels of the 112x112 output."""
    M = _similarity(-0.25, 2.2, (60.0, 35.0))
    pts = ARCFACE_TEMPLATE @ M[:, :2].T + M[:, 2]  # where the face's landmarks are in the photo
    img = Image.new("RGB", (300, 300), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    for (x, y), col in zip(pts, colours, strict=True):
        draw.ellipse((x - 5, y - 5, x + 5, y + 5), fill=col)
    out = np.asarray(warp_face(img, pts))  # (112, 112, 3)
    assert out.shape == (112, 112, 3)
    for (x, y), col in zip(ARCFACE_TEMPLATE, colours, strict=True):
        got = out[int(round(y)), int(round(x))]
        np.testing.assert_allclose(got, col, atol=40)


def test_no_face_falls_back_to_the_centre_crop_and_says_so(caplog):
    img = Image.new("RGB", (200, 100), (10, 20, 30))
    img.paste((250, 250, 250), (50, 0, 150, 100))  # the centre square is white
    with caplog.at_level(logging.INFO, logger="hypernet.face_alignment"):
        face, found = align_face(img, source="blank.png")
    assert not found and tuple(face.shape) == (3, 112, 112)
    assert float(face.min()) > 0.9  # only the centre square, resized: all white
    assert "no face found in blank.png; using the centre crop" in caplog.text
    with pytest.raises(InvalidInputError, match="`detector` must be"):
        align_face(img, detector="dlib")


@pytest.mark.needs_shared
def test_real_photo_is_aligned_from_mtcnn_landmarks(faces_dir):
    """After alignment, MTCNN finds the eyes of a real photo within 3 px of the template, and all 5
    points within 3 px on average (the nose tip moves with the head pose: a similarity cannot fit it)."""
    from hypernet.photos import decode_image, detect_landmarks

    img = decode_image(faces_dir / "image_0001.jpg")
    face, found = align_face(img, detector="mtcnn")
    assert found
    aligned = Image.fromarray(((face.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
    pts = detect_landmarks(aligned.resize((224, 224), Image.Resampling.BILINEAR))  # MTCNN likes >= 2x
    assert pts is not None
    err = np.linalg.norm(pts / 2 - ARCFACE_TEMPLATE, axis=1)  # (5,) px
    assert err[:2].max() < 3.0 and err.mean() < 3.0, err


def test_tensor_warp_is_the_pil_warp_and_carries_gradients():
    """`warp_faces` with `grid_theta` is `warp_face` for tensors (what a loss on generated images
    backpropagates through): the same pixels up to bilinear round-off, at any source size."""

    from hypernet.face_alignment import grid_theta, to_tensor, warp_faces

    yy, xx = np.mgrid[0:96, 0:128]
    arr = np.stack([(xx * 2) % 256, (yy * 3) % 256, ((xx + yy) * 1.5) % 256], -1)  # smooth ramps
    img = Image.fromarray(np.uint8(arr), "RGB")
    landmarks = ARCFACE_TEMPLATE * 0.7 + np.array([20.0, 5.0])  # a face somewhere in the image
    M = similarity_transform(landmarks, ARCFACE_TEMPLATE)
    want = to_tensor(warp_face(img, landmarks))  # (3, 112, 112)
    src = to_tensor(img)[None].requires_grad_(True)  # (1, 3, 96, 128)
    got = warp_faces(src, grid_theta(M, (96, 128)))[0]
    assert got.shape == want.shape
    inner = (slice(None), slice(8, -8), slice(8, -8))  # away from wrap-around edges of the ramps
    assert (got[inner] - want[inner]).abs().mean() < 0.02
    got.sum().backward()
    assert src.grad.abs().sum() > 0
    with pytest.raises(InvalidInputError, match="must have shape"):
        warp_faces(src[0], grid_theta(M, (96, 128)))

"""Photo input: formats, modes, orientation, bad files, face crops, the shared preprocess path."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hypernet.errors import ImageDecodeError, ImageTooLargeError, InvalidInputError
from hypernet.photos import decode_image, face_crop, load_photos, preprocess

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(w: int = 40, h: int = 30) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    return Image.fromarray(np.stack([x, x[:, ::-1], np.full_like(x, 60)], -1), "RGB")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that *claims* width x height but carries almost no data (a bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat = b"IDAT" + zlib.compress(b"\0" * 16)
    body += struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat))
    iend = b"IEND"
    body += struct.pack(">I", 0) + iend + struct.pack(">I", zlib.crc32(iend))
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_accepted_formats_decode_to_rgb(fmt):
    img = decode_image(_encode(_gradient(), fmt))
    assert img.mode == "RGB" and img.size == (40, 30)


def test_exif_orientation_is_honoured():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img = decode_image(_encode(_gradient(40, 30), "JPEG", exif=exif.tobytes()))
    assert img.size == (30, 40)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _encode(_gradient().convert("CMYK"), "JPEG"),
        lambda: _encode(Image.fromarray(np.full((8, 8), 65535, np.uint16)), "PNG"),  # 16-bit gray
        lambda: _encode(_gradient().convert("P"), "PNG", transparency=0),
        lambda: _encode(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "PNG"),
        lambda: _encode(Image.new("LA", (8, 8), (10, 255)), "PNG"),
    ],
    ids=["cmyk", "16bit", "palette-transparency", "rgba", "la"],
)
def test_any_mode_becomes_rgb(make):
    img = decode_image(make())
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.shape[2] == 3


def test_sixteen_bit_white_stays_white_and_alpha_composites_on_white():
    white16 = decode_image(_encode(Image.fromarray(np.full((4, 4), 65535, np.uint16)), "PNG"))
    assert np.asarray(white16).min() == 255
    clear = decode_image(_encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "PNG"))
    assert np.asarray(clear).min() == 255  # fully transparent red -> white background


def test_animated_webp_gives_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    px = np.asarray(decode_image(data))[4, 4]
    assert px[0] > 200 and px[2] < 50


def test_truncated_jpeg_names_the_file(tmp_path):
    f = tmp_path / "cut.jpg"
    f.write_bytes(_encode(_gradient(200, 200), "JPEG")[:600])
    with pytest.raises(ImageDecodeError, match="cut.jpg"):
        decode_image(f)


@pytest.mark.parametrize(
    "name, data, match",
    [
        ("notes.jpg", b"this is a text file, not a photo\n", "no image decoder"),
        ("empty.png", b"", "empty"),
        ("anim.gif", None, "GIF"),
        ("pic.bmp", None, "BMP"),
    ],
)
def test_rejected_inputs_name_the_file(tmp_path, name, data, match):
    if data is None:
        data = _encode(_gradient(), name.rsplit(".", 1)[1].upper().replace("JPG", "JPEG"))
    f = tmp_path / name
    f.write_bytes(data)
    with pytest.raises(ImageDecodeError, match=match) as e:
        decode_image(f)
    assert name in str(e.value)


def test_missing_file_is_a_decode_error(tmp_path):
    with pytest.raises(ImageDecodeError, match="nope.jpg"):
        decode_image(tmp_path / "nope.jpg")


@pytest.mark.parametrize("side", [7000, 60000])  # over our limit; over Pillow's bomb limit too
def test_bomb_header_is_rejected_before_decoding(tmp_path, side):
    f = tmp_path / "bomb.png"
    f.write_bytes(_png_header_only(side, side))
    with pytest.raises(ImageTooLargeError, match="bomb.png"):
        decode_image(f)


def test_max_pixels_is_configurable():
    data = _encode(_gradient(40, 30), "PNG")
    with pytest.raises(ImageTooLargeError, match="1,200"):
        decode_image(data, max_pixels=1000, source="upload")
    assert decode_image(data, max_pixels=1200).size == (40, 30)


def test_center_crop_is_square_and_centred():
    img = _gradient(40, 30)
    crop = face_crop(img, detector="center")
    assert crop.size == (30, 30)
    assert np.array_equal(np.asarray(crop), np.asarray(img)[:, 5:35])


def test_auto_without_a_face_falls_back_to_centre():
    img = Image.new("RGB", (50, 30), (120, 120, 120))
    assert face_crop(img, detector="auto").size == (30, 30)


def test_preprocess_shape_and_range():
    x = preprocess(_gradient(40, 30), 16, detector="center")
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.max() > 0.5 and x.min() < -0.5


def test_bad_arguments_are_invalid_input():
    with pytest.raises(InvalidInputError, match="`detector`"):
        face_crop(_gradient(), detector="yolo")
    with pytest.raises(InvalidInputError, match="`resolution`"):
        preprocess(_gradient(), 0)


def test_load_photos_from_dir_skips_non_images(tmp_path):
    (tmp_path / "a.png").write_bytes(_encode(_gradient(), "PNG"))
    (tmp_path / "b.webp").write_bytes(_encode(_gradient(), "WEBP"))
    (tmp_path / "labels.csv").write_text("file,identity\n")
    x = load_photos(tmp_path, 8, detector="center")
    assert x.shape == (2, 3, 8, 8)
    with pytest.raises(InvalidInputError, match="at least one"):
        load_photos([], 8)
    with pytest.raises(InvalidInputError, match="existing"):
        load_photos(tmp_path / "missing", 8)


def test_load_photos_names_the_bad_file_among_good_ones(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(_encode(_gradient(), "PNG"))
    bad = tmp_path / "bad.jpg"
    bad.write_text("hello")
    with pytest.raises(ImageDecodeError, match="bad.jpg"):
        load_photos([good, bad], 8)


@pytest.mark.needs_shared
def test_face_crop_centres_on_a_real_face(faces_dir: Path):
    from hypernet.photos import detect_face

    img = decode_image(faces_dir / "image_0001.jpg")
    box = detect_face(img)
    assert box is not None
    crop = face_crop(img, detector="mtcnn")
    assert crop.width == crop.height and crop.width <= min(img.size)
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    # Crop the same square by hand and compare: the crop is centred on the face unless clamped.
    side = crop.width
    lx = min(max(cx - side / 2, 0), img.width - side)
    ly = min(max(cy - side / 2, 0), img.height - side)
    ref = img.crop((round(lx), round(ly), round(lx) + side, round(ly) + side))
    assert np.array_equal(np.asarray(crop), np.asarray(ref))
    assert round(lx) <= x0 + 1 and round(lx) + side >= x1 - 1

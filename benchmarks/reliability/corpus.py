"""The hostile-photo corpus: every case generated here from code, never downloaded.

    python -m benchmarks.reliability.corpus            # (re)writes tests/reliability/corpus/

Each case is one file `<name>.bin` plus an entry in `manifest.json` naming the gRPC status codes
the service may answer to a Personalize with it. "OK" is allowed only for inputs that are valid
photos in odd clothing (CMYK, 16-bit, palette, alpha, animated, huge EXIF ...): the service must
accept those, and reject everything else with a precise INVALID_ARGUMENT (or RESOURCE_EXHAUSTED
for sizes) - never INTERNAL, never a dead server. The whole corpus stays well under 2 MB: bombs
are small files that *claim* or *decompress to* huge canvases.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
CORPUS_DIR = ROOT / "tests" / "reliability" / "corpus"
MAX_CORPUS_BYTES = 2 << 20
OK, INVALID, EXHAUSTED = "OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"
REJECT = (INVALID, EXHAUSTED)


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    expect: tuple[str, ...]  # allowed status code names
    note: str


# ---------------------------------------------------------------------------- building blocks
def _photo(w: int = 96, h: int = 80, seed: int = 0) -> Image.Image:
    """A smooth gradient with a little noise: decodes everywhere, compresses a little."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(255, 0, h)[:, None, None]
    rgb = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2)  # (H, W, 3)
    rgb = np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc & 0xFFFFFFFF)


def raw_png(width: int, height: int, *, bit_depth: int = 8, color_type: int = 2, rows: bytes | None = None,
            extra: list[bytes] = (), level: int = 9) -> bytes:
    """A PNG written by hand (any IHDR, any chunks): what an attacker's encoder would send.

    `rows` is the filtered scanline data (default: all zero, filter 0) - zlib shrinks zeros
    ~1000:1, which is what makes a PNG decompression bomb.
    """
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type]
    if rows is None:
        row_bytes = 1 + (width * channels * bit_depth + 7) // 8
        comp = zlib.compressobj(level)
        zero_row = b"\x00" * row_bytes
        parts = []
        # compress streaming: a bomb's raw size may be 100s of MB
        for _ in range(height):
            parts.append(comp.compress(zero_row))
        parts.append(comp.flush())
        idat = b"".join(parts)
    else:
        idat = zlib.compress(rows, level)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + b"".join(extra) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def _patch_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the SOF0/SOF2 frame size of a JPEG (a header that lies about its canvas)."""
    out = bytearray(data)
    i = 2
    while i < len(out) - 9:
        if out[i] != 0xFF:
            i += 1
            continue
        marker = out[i + 1]
        if marker in (0xC0, 0xC1, 0xC2):
            struct.pack_into(">HH", out, i + 5, height, width)
            return bytes(out)
        seg_len = struct.unpack(">H", out[i + 2:i + 4])[0]
        i += 2 + seg_len
    raise ValueError("no SOF marker found")


def _exif(orientation: int = 1, pad: int = 0, raw_tail: bytes = b"") -> bytes:
    """A little-endian TIFF/EXIF block: Orientation plus a `pad`-byte ImageDescription.

    PNG eXIf and WebP EXIF chunks hold this as is; JPEG's APP1 needs `_jpeg_exif` (a prefix)."""
    entries = [(0x0112, 3, 1, orientation)]
    blob_offset = 8 + 2 + 12 * 2 + 4
    entries.append((0x010E, 2, pad, blob_offset if pad > 4 else 0))  # ImageDescription (ASCII)
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        if typ == 3:
            ifd += struct.pack("<HHIHH", tag, typ, count, value, 0)
        else:
            ifd += struct.pack("<HHII", tag, typ, count, value)
    ifd += struct.pack("<I", 0)
    body = b"II*\x00" + struct.pack("<I", 8) + ifd + (b"A" * (pad - 1) + b"\x00" if pad > 4 else b"")
    return body + raw_tail


def _jpeg_exif(**kw) -> bytes:
    return b"Exif\x00\x00" + _exif(**kw)


def _webp_with_chunk(webp: bytes, kind: bytes, payload: bytes) -> bytes:
    """Append a RIFF chunk (EXIF, XMP, junk) to a simple WebP, switching it to VP8X."""
    assert webp[:4] == b"RIFF" and webp[8:12] == b"WEBP"
    body = webp[12:]
    img = Image.open(io.BytesIO(webp))
    w, h = img.size
    flags = 0x08 if kind == b"EXIF" else 0x04 if kind == b"XMP " else 0
    vp8x = _riff_chunk(b"VP8X", struct.pack("<I", flags) + (w - 1).to_bytes(3, "little")
                       + (h - 1).to_bytes(3, "little"))
    payload_chunk = _riff_chunk(kind, payload)
    new_body = b"WEBP" + vp8x + body + payload_chunk
    return b"RIFF" + struct.pack("<I", len(new_body)) + new_body


def _riff_chunk(kind: bytes, data: bytes) -> bytes:
    pad = b"\x00" if len(data) % 2 else b""
    return kind + struct.pack("<I", len(data)) + data + pad


def _webp_canvas(width: int, height: int) -> bytes:
    """A VP8X WebP header claiming a `width` x `height` canvas, with a tiny real frame inside."""
    small = _encode(_photo(16, 16), "WEBP", lossless=True)
    frame = small[12:]
    vp8x = _riff_chunk(b"VP8X", struct.pack("<I", 0) + (width - 1).to_bytes(3, "little")
                       + (height - 1).to_bytes(3, "little"))
    body = b"WEBP" + vp8x + frame
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _flip(data: bytes, start: float, count: int, seed: int) -> bytes:
    """Overwrite `count` bytes from `start` (a fraction of the length) with random ones."""
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    i = int(len(out) * start)
    out[i:i + count] = rng.integers(0, 256, min(count, len(out) - i), dtype=np.uint8).tobytes()
    return bytes(out)


# ---------------------------------------------------------------------------- the cases
def _cases() -> list[Callable[[], Case]]:
    photo = _photo()
    jpeg, png = _encode(photo, "JPEG", quality=90), _encode(photo, "PNG")
    webp = _encode(photo, "WEBP", quality=80)
    cases: list[Callable[[], Case]] = [
        # --- empty / wrong magic
        lambda: Case("empty", b"", REJECT, "zero bytes"),
        lambda: Case("one_byte", b"\xff", REJECT, "a single byte"),
        lambda: Case("nul_64k", b"\x00" * 65536, REJECT, "64 KiB of NUL"),
        lambda: Case("random_bytes", np.random.default_rng(1).bytes(4096), REJECT, "4 KiB of noise"),
        lambda: Case("text", b"hello, this is not an image\n" * 10, REJECT, "plain text"),
        lambda: Case("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="9e9" height="9e9"/>',
                     REJECT, "SVG (not a raster photo format)"),
        lambda: Case("gif", _encode(photo.convert("P"), "GIF"), REJECT, "a valid GIF: not an allowed format"),
        lambda: Case("bmp", _encode(photo, "BMP"), REJECT, "a valid BMP: not an allowed format"),
        lambda: Case("tiff", _encode(photo, "TIFF"), REJECT, "a valid TIFF: not an allowed format"),
        lambda: Case("ico", _encode(photo, "ICO"), REJECT, "a valid ICO: not an allowed format"),
        lambda: Case("jpeg2000", _encode(photo, "JPEG2000"), REJECT, "a valid JPEG 2000: not allowed"),
        lambda: Case("pdf_magic", b"%PDF-1.7\n" + b"0" * 200, REJECT, "PDF magic"),
        lambda: Case("zip_magic", b"PK\x03\x04" + b"\x00" * 200, REJECT, "ZIP magic"),
        lambda: Case("png_magic_jpeg_body", b"\x89PNG\r\n\x1a\n" + jpeg[2:], REJECT,
                     "PNG signature followed by a JPEG body"),
        lambda: Case("jpeg_magic_png_body", b"\xff\xd8\xff\xe0" + png[8:], REJECT,
                     "JPEG SOI followed by PNG chunks"),
        lambda: Case("riff_not_webp", b"RIFF" + struct.pack("<I", 100) + b"WAVEfmt " + b"\x00" * 92,
                     REJECT, "a RIFF/WAVE header"),
        lambda: Case("png_signature_only", b"\x89PNG\r\n\x1a\n", REJECT, "PNG signature, no chunks"),
        # --- truncated / corrupt
        lambda: Case("truncated_jpeg", jpeg[: len(jpeg) // 2], REJECT, "first half of a JPEG"),
        lambda: Case("truncated_jpeg_header", jpeg[:40], REJECT, "a JPEG cut inside its headers"),
        lambda: Case("truncated_png", png[: len(png) // 2], REJECT, "first half of a PNG"),
        lambda: Case("truncated_png_header", png[:20], REJECT, "a PNG cut inside IHDR"),
        lambda: Case("truncated_webp", webp[: len(webp) // 2], REJECT, "first half of a WebP"),
        lambda: Case("truncated_webp_header", webp[:16], REJECT, "a WebP cut inside its header"),
        lambda: Case("corrupt_jpeg_scan", _flip(jpeg, 0.6, 64, 2), (OK, INVALID),
                     "64 random bytes in the entropy-coded data (decoders may tolerate it)"),
        lambda: Case("corrupt_jpeg_tables", _flip(jpeg, 0.05, 32, 3), (OK, INVALID),
                     "random bytes over the quantisation/Huffman tables"),
        lambda: Case("corrupt_png_crc", png[:33 + 8] + b"\x00\x00\x00\x00" + png[33 + 12:], (OK, INVALID),
                     "a wrong CRC on the first chunk after IHDR"),
        lambda: Case("corrupt_png_zlib", raw_png(64, 64, rows=b"", extra=[]).replace(
            zlib.compress(b"", 9), b"\x78\x9c\xde\xad\xbe\xef"), REJECT, "an IDAT that is not zlib"),
        lambda: Case("corrupt_webp", _flip(webp, 0.5, 64, 4), (OK, INVALID), "random bytes in the VP8 data"),
        lambda: Case("png_bad_ihdr_depth", raw_png(64, 64, bit_depth=7), REJECT, "bit depth 7 (invalid)"),
        lambda: Case("png_zero_width", raw_png(0, 64, rows=b""), REJECT, "a 0 x 64 canvas"),
        # --- decompression bombs and absurd canvases
        lambda: Case("bomb_png_header_20k", raw_png(20_000, 20_000, rows=b"\x00" * 1024), REJECT,
                     "IHDR claims 20000 x 20000 (400 MP) over a 1 KiB IDAT"),
        lambda: Case("bomb_png_zlib_8k", raw_png(8_000, 8_000, color_type=0), REJECT,
                     "a real zlib bomb: 8000 x 8000 gray (64 MP > the 40 MP limit)"),
        lambda: Case("bomb_png_zlib_6k", raw_png(6_000, 6_000, color_type=0), (OK,),
                     "a real zlib bomb under the limit: 36 MP of zeros from ~35 KB (must decode, bounded)"),
        lambda: Case("bomb_png_max_dims", raw_png(2**31 - 1, 2**31 - 1, rows=b"\x00"), REJECT,
                     "IHDR claims the largest legal PNG canvas"),
        lambda: Case("bomb_jpeg_header", _patch_jpeg_size(jpeg, 65_000, 65_000), REJECT,
                     "SOF claims 65000 x 65000"),
        lambda: Case("bomb_webp_canvas", _webp_canvas(16_383, 16_383), REJECT,
                     "VP8X claims a 16383 x 16383 canvas"),
        lambda: Case("bomb_png_ztxt", raw_png(64, 64, extra=[_chunk(
            b"zTXt", b"comment\x00\x00" + zlib.compress(b"A" * (64 << 20), 9))]), (OK, INVALID),
            "a zTXt chunk that inflates to 64 MiB"),
        lambda: Case("png_many_text_chunks", raw_png(64, 64, extra=[
            _chunk(b"tEXt", b"k%d\x00v" % i) for i in range(5_000)]), (OK, INVALID),
            "5000 tEXt chunks"),
        # --- extreme aspect ratios and sizes
        lambda: Case("tall_1x100000", _encode(Image.new("RGB", (1, 100_000), (90, 60, 30)), "PNG"), REJECT,
                     "1 x 100000 pixels"),
        lambda: Case("wide_100000x1", _encode(Image.new("RGB", (100_000, 1), (90, 60, 30)), "PNG"), REJECT,
                     "100000 x 1 pixels"),
        lambda: Case("sliver_3x3000", _encode(_photo(3, 3000), "PNG"), REJECT, "3 x 3000 pixels"),
        lambda: Case("tiny_1x1", _encode(Image.new("RGB", (1, 1)), "PNG"), REJECT, "a single pixel"),
        lambda: Case("small_16x16", _encode(_photo(16, 16), "PNG"), REJECT, "16 x 16 pixels"),
        lambda: Case("wide_8to1", _encode(_photo(1024, 128), "JPEG"), (OK,), "1024 x 128 (8:1, still a photo)"),
        # --- valid photos in unusual modes: must be accepted
        lambda: Case("cmyk_jpeg", _encode(photo.convert("CMYK"), "JPEG"), (OK,), "CMYK JPEG"),
        lambda: Case("gray_jpeg", _encode(photo.convert("L"), "JPEG"), (OK,), "grayscale JPEG"),
        lambda: Case("progressive_jpeg", _encode(photo, "JPEG", progressive=True), (OK,), "progressive JPEG"),
        lambda: Case("png_16bit_gray", _encode(Image.fromarray(
            np.asarray(photo.convert("L"), dtype=np.uint16) * 257), "PNG"), (OK,), "16-bit grayscale PNG"),
        lambda: Case("png_16bit_rgba", raw_png(48, 48, bit_depth=16, color_type=6, rows=b"".join(
            b"\x00" + bytes(range(256))[: 48 * 8 // 2] * 2 for _ in range(48))), (OK,),
            "16-bit RGBA PNG (written by hand)"),
        lambda: Case("png_1bit", _encode(photo.convert("1"), "PNG"), (OK,), "1-bit PNG"),
        lambda: Case("png_palette", _encode(photo.convert("P"), "PNG"), (OK,), "palette PNG"),
        lambda: Case("png_palette_transparency", _encode(photo.convert("P"), "PNG", transparency=0), (OK,),
                     "palette PNG with a transparent index"),
        lambda: Case("png_rgba", _encode(photo.convert("RGBA"), "PNG"), (OK,), "RGBA PNG"),
        lambda: Case("png_la", _encode(photo.convert("LA"), "PNG"), (OK,), "gray + alpha PNG"),
        lambda: Case("png_handwritten", raw_png(64, 64, rows=b"".join(b"\x00" + b"\x80" * 192 for _ in range(64))),
                     (OK,), "a minimal hand-written RGB PNG"),
        lambda: Case("apng_animated", _encode(photo, "PNG", save_all=True, append_images=[
            _photo(seed=s) for s in (1, 2)], duration=100, loop=0), (OK,), "animated PNG (3 frames)"),
        lambda: Case("webp_animated", _encode(photo, "WEBP", save_all=True, append_images=[
            _photo(seed=s) for s in (1, 2)], duration=100, loop=0), (OK,), "animated WebP (3 frames)"),
        lambda: Case("webp_lossless_alpha", _encode(photo.convert("RGBA"), "WEBP", lossless=True), (OK,),
                     "lossless WebP with alpha"),
        # --- EXIF
        lambda: Case("jpeg_exif_rotated", _encode(photo, "JPEG", exif=_jpeg_exif(orientation=6)), (OK,),
                     "EXIF orientation 6 (rotate 90)"),
        lambda: Case("jpeg_exif_bad_orientation", _encode(photo, "JPEG", exif=_jpeg_exif(orientation=65535)),
                     (OK,), "EXIF orientation 65535 (undefined)"),
        lambda: Case("jpeg_exif_huge", _encode(photo, "JPEG", exif=_jpeg_exif(pad=65_000)), (OK,),
                     "a 65 KB EXIF block (the APP1 maximum)"),
        lambda: Case("jpeg_exif_garbage", _encode(photo, "JPEG", exif=b"Exif\x00\x00II*\x00" + b"\xff" * 2000),
                     (OK, INVALID), "an EXIF block whose IFD offsets point nowhere"),
        lambda: Case("webp_exif_huge", _webp_with_chunk(webp, b"EXIF", _exif(pad=200_000)), (OK,),
                     "a 200 KB EXIF chunk in a WebP"),
        lambda: Case("png_exif_huge", raw_png(64, 64, extra=[_chunk(b"eXIf", _exif(orientation=3, pad=200_000))]),
                     (OK, INVALID), "a 200 KB eXIf chunk in a PNG"),
        lambda: Case("jpeg_polyglot_zip", jpeg + b"PK\x03\x04" + b"\x00" * 1000, (OK,),
                     "a valid JPEG with a ZIP appended (polyglot)"),
        lambda: Case("mpo_like_jpeg", _encode(photo, "MPO", save_all=True, append_images=[_photo(seed=5)]),
                     (OK, INVALID), "a multi-picture JPEG (MPO, as some phone cameras write)"),
    ]
    return cases


def build() -> list[Case]:
    """Every corpus case, in order."""
    return [make() for make in _cases()]


def write(out: Path = CORPUS_DIR) -> dict:
    """Write the corpus files and `manifest.json` into `out` (old .bin files are removed)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.bin"):
        old.unlink()
    entries = []
    for case in build():
        (out / f"{case.name}.bin").write_bytes(case.data)
        entries.append({"name": case.name, "file": f"{case.name}.bin", "bytes": len(case.data),
                        "sha256": hashlib.sha256(case.data).hexdigest(), "expect": list(case.expect),
                        "note": case.note})
    total = sum(e["bytes"] for e in entries)
    if total > MAX_CORPUS_BYTES:
        raise ValueError(f"the corpus must stay under {MAX_CORPUS_BYTES} bytes, got {total}")
    manifest = {"generator": "benchmarks/reliability/corpus.py", "total_bytes": total, "cases": entries}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def load(corpus_dir: Path = CORPUS_DIR) -> list[Case]:
    """The checked-in corpus (as written by `write`)."""
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    return [Case(e["name"], (corpus_dir / e["file"]).read_bytes(), tuple(e["expect"]), e["note"])
            for e in manifest["cases"]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reliability.corpus", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=CORPUS_DIR, help="corpus folder (default: the checked-in one)")
    args = p.parse_args(argv)
    manifest = write(args.out)
    print(f"{len(manifest['cases'])} cases, {manifest['total_bytes']:,} bytes -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

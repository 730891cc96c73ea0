"""The checked-in hostile-photo corpus: what its generator writes, and answered precisely."""

from __future__ import annotations

import json

import grpc
import pytest
from hdb_serving_helpers import rpc_code

from benchmarks.reliability import corpus

pytestmark = pytest.mark.timeout(300)

CASES = corpus.load()


def test_corpus_is_what_the_generator_writes(tmp_path):
    """Regenerate: same cases, same bytes (the script is the source; nothing is downloaded)."""
    fresh = corpus.write(tmp_path)
    checked_in = json.loads((corpus.CORPUS_DIR / "manifest.json").read_text())
    assert [(e["name"], e["sha256"], e["expect"]) for e in fresh["cases"]] == \
        [(e["name"], e["sha256"], e["expect"]) for e in checked_in["cases"]]
    size = sum(p.stat().st_size for p in corpus.CORPUS_DIR.iterdir())
    assert size < corpus.MAX_CORPUS_BYTES
    names = {c.name for c in CASES}
    for family in ("empty", "truncated_jpeg", "truncated_png", "truncated_webp", "bomb_png_zlib_6k",
                   "tall_1x100000", "cmyk_jpeg", "png_16bit_gray", "png_palette", "png_rgba",
                   "apng_animated", "webp_animated", "jpeg_exif_huge", "png_magic_jpeg_body"):
        assert family in names


@pytest.fixture(scope="module")
def server(make_module_server):
    return make_module_server()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_corpus_photo_gets_a_precise_status(server, client_for, case):
    c = client_for(server)
    try:
        c.personalize(case.data, options=c.options(steps=0), timeout=300)
        code, details = "OK", ""
    except grpc.RpcError as e:
        code, details = e.code().name, e.details()
    assert code in case.expect, f"{case.name} ({case.note}): {code} {details}"
    if code == "INVALID_ARGUMENT":
        assert "`photo`" in details, details
    assert c.health() == "SERVING"


@pytest.mark.parametrize("size", [(1, 100_000), (100_000, 1), (3, 3000), (1, 1), (16, 16), (800, 99)])
def test_sliver_and_tiny_photos_are_invalid_argument_not_internal(server, client_for, size):
    """Regression: these crashed the face detector's pyramid (INTERNAL) before serving checked
    the photo's short side (>= 32 px) and aspect ratio (<= 8:1)."""
    c = client_for(server)
    data = corpus._encode(corpus._photo(*size), "PNG")
    err = rpc_code(c.personalize, data, options=c.options(steps=0))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"got {size[0]}x{size[1]}" in err.details() and "`photo`" in err.details()

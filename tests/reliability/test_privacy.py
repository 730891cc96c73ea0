"""Photos never touch disk; DeleteIdentity and TTL leave no trace; logs hold no secrets."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.reliability import privacy

pytestmark = pytest.mark.timeout(300)


def test_uploaded_photos_never_touch_disk(rig):
    """Every method: the photo is never written, and nothing but the store is written to (method
    artifacts are serialised in the store's own temp area; DreamBooth's class images apart)."""
    res = privacy.photos_never_touch_disk(rig)
    for m in privacy.ALL_METHODS:
        assert res[f"personalize_{m}"] == "OK", (m, res[f"personalize_{m}"])
    assert res["personalize_and_generate"] == "OK"
    assert res["photo_found_in"] == [] and res["temp_files_left"] == 0
    assert res["writes_outside_store"] == []  # every file opened for writing was an identity's
    assert res["files_written"] >= 4


def test_delete_leaves_no_trace_in_either_store(rig, photo_bytes):
    res = privacy.delete_leaves_no_trace(rig, photo_bytes)
    for store in ("local", "s3"):
        r = res[store]
        assert r["traces_before"] == 2 and r["traces_after"] == [], r
        assert not r["job_still_shows_identity"] and r["in_identity_cache"] == 0
        assert r["get_after"] == r["generate_after"] == "NOT_FOUND"


def test_ttl_expiry_deletes_from_both_stores(rig, photo_bytes):
    res = privacy.ttl_expiry_deletes(rig, photo_bytes, ttl_s=1.0)
    for store in ("local", "s3"):
        assert res[store]["objects_while_alive"] == 2 and res[store]["expires_at_set"]
        assert res[store]["get_after"] == "NOT_FOUND"


def test_logs_never_hold_images_keys_or_prompts():
    """Regression: diffusers logs the truncated tail of long prompts through its own stderr
    handler; `configure_logging` (what `hdb serve` calls) now routes it through ours at ERROR."""
    code = (
        "from serving.logs import configure_logging\n"
        "configure_logging('json', 'DEBUG')\n"
        "from diffusers.utils import logging as dl\n"
        "dl.get_logger('diffusers.pipelines.x').warning('The following part of your input was truncated: SECRET')\n"
        "import logging; logging.getLogger('serving').info('hello')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "SECRET" not in out.stderr and '"msg": "hello"' in out.stderr


def test_authenticated_debug_server_logs_hold_no_keys_prompts_or_photos(rig):
    """`make reliability`'s log scan in short (a local store instead of S3): a real `hdb serve`
    (API keys, DEBUG, JSON logs) under calls that could leak (a wrong key, a distinctive photo, a
    prompt long enough for CLIP to log its truncated tail, bad photos); its stderr is searched."""
    res = privacy.logs_clean(rig, s3=False)
    assert res["log_level"] == "DEBUG" and res["lines"] > 10
    assert res["api_keys_found"] == 0 and not res["bearer_found"]
    assert not res["prompt_found"] and not res["photo_found"]
    # The only non-JSON lines: the model-loading progress bars diffusers draws at startup (before
    # any call; searched like every other line above).
    assert all("Loading" in line for line in res["non_json_sample"]), res["non_json_sample"]


def test_scan_logs_finds_what_it_looks_for():
    """The scanner itself can fail: plant each secret kind and see it found."""
    photo, rows = privacy.distinctive_photo()
    clean = ['{"msg": "rpc", "code": "OK"}\n']
    assert not any(privacy.scan_logs(clean, ["key-123456789"], photo, rows)[k]
                   for k in ("api_keys_found", "prompt_found", "photo_found"))
    planted = clean + [f"key-123456789 {privacy.PROMPT_MARKER} {photo[len(photo) // 2:][:40].hex()}\n"]
    res = privacy.scan_logs(planted, ["key-123456789"], photo, rows)
    assert res["api_keys_found"] == 1 and res["prompt_found"] and res["photo_found"] and res["non_json_lines"] == 1

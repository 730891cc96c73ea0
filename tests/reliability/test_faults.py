"""Fault injection on real servers: store outages, kill -9, worker exceptions, disconnects."""

from __future__ import annotations

import os

import pytest

from benchmarks.reliability import faults

pytestmark = pytest.mark.timeout(600)


def test_worker_exception_fails_only_its_own_request(rig, photo_bytes):
    """Regression: one failing image used to fail every request batched with it (INTERNAL for
    all four); now the batch is retried image by image and only the culprit fails."""
    res = faults.worker_exception(rig, photo_bytes)
    assert res["batch"]["generate_calls"][0] == 4  # the four images really shared a UNet call
    assert res["batch"]["faulty"] == "INTERNAL"
    assert res["batch"]["bystanders"] == ["OK", "OK", "OK"]
    assert res["faulty_job"] == "INTERNAL" and res["bystander_job"] == "OK"
    assert res["after"] == {"health": "SERVING", "generate": "OK", "worker_alive": True}


def test_client_disconnect_frees_the_worker_at_the_next_step(rig, photo_bytes):
    res = faults.disconnect_frees_worker(rig, photo_bytes)
    p, g = res["personalize"], res["generate"]
    assert p["state"] == "CANCELLED" and p["calls_final"] < p["steps_total"]
    assert p["steps_after_notice"] <= 2  # the step in flight when the server noticed, at most one more
    assert g["calls_final"] < g["steps_total"] // 4
    assert res["after"] == {"generate": "OK", "health": "SERVING"}


def test_s3_outage_is_unavailable_and_loses_nothing(rig, photo_bytes):
    res = faults.s3_outage(rig, photo_bytes, short=True)
    ph = res["phases"]
    assert ph["baseline"] == {"personalize": "OK", "list": "OK", "health": "SERVING"}
    assert ph["slow"]["personalize"] == ph["slow"]["get"] == "OK"
    assert ph["refused"]["get"] == "UNAVAILABLE"
    assert ph["refused"]["s3_attempts_per_call"] >= 2  # the server retried before giving up
    refused = {k: v for k, v in ph["refused_more"].items() if k not in ("health", "generate_base")}
    assert set(refused.values()) == {"UNAVAILABLE"}, refused
    assert ph["refused_more"]["generate_base"] == "OK"  # the base model needs no store
    assert ph["refused_more"]["health"] == "SERVING"
    # regression: hung store calls used to fill asyncio's default pool and stall even this
    assert ph["hung"] == {"get_2s_deadline": "DEADLINE_EXCEEDED", "generate_base": "OK", "health": "SERVING"}
    moto = ph["moto_stopped"]
    assert moto["retry_final"] == "OK" and "UNAVAILABLE" in moto["retry_codes"]
    assert set(moto["writer_codes"]) <= {"OK", "UNAVAILABLE"}
    audit = res["audit"]
    assert audit["half_written"] == [] and audit["lost"] == [] and audit["complete"] >= res["acked"]
    assert set(res["generate_after"]) == {"OK"}


def test_kill9_during_identity_writes_leaves_every_identity_complete_or_absent(rig, photo_bytes):
    """`hdb serve` (local store, and S3 via moto) SIGKILLed while 3 clients write identities;
    both servers start at once (their start-up is the slow part)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(faults.kill_during_writes, rig, photo_bytes, store, rounds=1, seed=k)
                   for k, store in enumerate(("local", "s3"))]
        results = [f.result() for f in futures]
    for res in results:
        assert res["kills"] == 1 and res["acked"] >= 3, res
        assert res["identities_lost"] == 0 and res["half_written"] == 0, res
        restart = res["rounds"][-1]
        assert restart["missing_acked"] == [] and set(restart["generate"]) == {"OK"}, res
        assert res["left_after_sweep"]["orphan_blobs"] == res["left_after_sweep"]["temp_files"] == 0, res


def test_sweep_removes_temp_files_of_interrupted_writes(tmp_path):
    """Regression: a kill -9 between a local store's temp write and its rename left a hidden
    `.x.bin.*.tmp` with partial identity weights that nothing ever deleted."""
    import time

    from serving.identities import ORPHAN_AGE_S, IdentityRepository
    from serving.store import LocalDirStore

    store = LocalDirStore(tmp_path)
    (tmp_path / "blob" / "dev").mkdir(parents=True)
    stale = tmp_path / "blob" / "dev" / ".abc.bin.k2j3.tmp"
    fresh = tmp_path / "blob" / "dev" / ".def.bin.x9y8.tmp"
    stale.write_bytes(b"partial weights")
    fresh.write_bytes(b"a write in progress")
    old = time.time() - ORPHAN_AGE_S - 10
    os.utime(stale, (old, old))
    assert IdentityRepository(store).sweep() == 0
    assert not stale.exists() and fresh.exists()

"""A few seconds of the mixed locust soak, and the report built from its results."""

from __future__ import annotations

import pytest

from benchmarks.reliability import report, soak

pytestmark = pytest.mark.timeout(300)


def test_short_soak_has_no_unexpected_errors_and_writes_the_report(rig, photo_bytes, tmp_path):
    # 8 s, then on until one identity was renewed beyond the 3 first ones (a state, not a clock:
    # on a loaded machine the first personalisations alone may take longer than the TTL)
    res = soak.run(rig, photo_bytes, duration=8.0, users=3, in_process=True, sample_every=0.5, ttl_s=4.5,
                   min_renewals=3 + 1, max_extra_s=200.0)
    assert res["calls"] > 5 and res["unexpected_errors"] == 0, res["by_task"]
    # identities expire (TTL 4.5 s) during the run: users renew theirs, so no NOT_FOUND anywhere
    assert res["by_task"]["personalize_renew"]["OK"] >= 3 + 1
    assert res["health_at_end"] == "SERVING"
    assert res["memory"]["samples"] >= 10 and res["memory"]["within_bound"]
    assert "bad_prompt" in soak.TASKS and "bad_key" in soak.TASKS
    path = report.write({"soak": res, "meta": {"mode": "test"}}, tmp_path)
    text = path.read_text()
    assert "soak unexpected errors | 0 | 0 | yes" in text
    assert (tmp_path / "reliability_soak.png").stat().st_size > 1000
    assert (tmp_path / "reliability.json").is_file()


def test_verdicts_flag_lost_identities_and_crashes():
    """The report's bars can fail: a lost identity or a crash is a missed bar."""
    res = {"faults": {"kill9_local": {"identities_lost": 1, "half_written": 0, "kills": 1}},
           "fuzz": {"tally": {"tried": 3, "by_code": {"INTERNAL": 1}, "crashes": [{"code": "INTERNAL"}],
                              "imprecise": []}}}
    missed = {v["figure"] for v in report.verdicts(res) if not v["met"]}
    assert "identities lost" in missed and "crashes (INTERNAL/UNKNOWN/not SERVING)" in missed

"""Hostile request fields against a real server: the named edge cases and hypothesis."""

from __future__ import annotations

import pytest

from benchmarks.reliability import fuzz

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(make_module_server):
    return make_module_server(**fuzz.FUZZ_LIMITS)


def test_named_edge_cases_get_precise_statuses(server, client_for, photo_bytes):
    """Oversized messages, invalid UTF-8, 10k-token prompts, negative/huge/NaN numbers."""
    c = client_for(server)
    tally = fuzz.Tally()
    rows = fuzz.edge_cases(c, photo_bytes, tally, fuzz.FUZZ_LIMITS["max_message_bytes"])
    bad = [r for r in rows if not r["ok"]]
    assert not bad and not tally.crashes and not tally.imprecise, (bad, tally.crashes, tally.imprecise)
    codes = {r["name"]: r["code"] for r in rows}
    assert codes["photo_over_max_message_bytes"] == codes["prompt_over_max_message_bytes"] == "INVALID_ARGUMENT"
    assert codes["message_over_transport_limit"] == "RESOURCE_EXHAUSTED"
    assert codes["invalid_utf8_prompt"] == codes["prompt_10k_tokens"] == codes["guidance_nan"] == "INVALID_ARGUMENT"
    assert codes["prompt_1000_emoji"] == "OK"  # far over CLIP's 77 tokens: truncated, not an error
    assert fuzz.healthy(c)


def test_hypothesis_over_every_rpc(server, client_for, photo_bytes):
    """One hostile field per request: INVALID_ARGUMENT must name it; valid requests succeed;
    ids answer NOT_FOUND; raw wire bytes never crash the server."""
    c = client_for(server)
    tally = fuzz.Tally()
    fuzz.fuzz_requests(c, photo_bytes, tally, max_examples=12, seed=None, raise_on_crash=True)
    assert not tally.crashes and not tally.imprecise
    kinds = tally.by_kind()
    for rpc in ("Generate", "Personalize", "PersonalizeAndGenerate", "GetIdentity", "ListIdentities",
                "DeleteIdentity", "ExportIdentity", "GetJob", "WatchJob", "CancelJob", "wire"):
        assert rpc in kinds, rpc
    assert kinds["Generate"].get("OK") and kinds["Generate"].get("INVALID_ARGUMENT")
    assert fuzz.healthy(c)

"""Keys (malformed, brute force), tenant isolation over every RPC, TLS, per-tenant rate limits."""

from __future__ import annotations

import pytest

from benchmarks.reliability import security

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def auth_server(make_module_server):
    return make_module_server(no_auth=False, api_keys=security.KEYS)


def _failed(cases: security.Cases) -> list:
    return [r for r in cases.rows if not r["passed"]]


def test_malformed_and_guessed_keys_are_unauthenticated(auth_server):
    cases = security.Cases()
    security.malformed_and_brute_force(auth_server.target, cases, n_random=30)
    assert not _failed(cases) and len(cases.rows) >= 20


def test_tenant_isolation_across_every_rpc(auth_server, photo_bytes):
    """Another tenant's ids answer NOT_FOUND exactly like ids that never existed."""
    cases = security.Cases()
    security.isolation(auth_server.target, photo_bytes, cases)
    assert not _failed(cases)
    assert {r["case"] for r in cases.rows} >= {"GetIdentity", "Generate", "ExportIdentity", "DeleteIdentity",
                                                "GetJob", "WatchJob", "ListIdentities"}


def test_tls_with_a_self_signed_certificate(rig):
    cases = security.Cases()
    security.tls(rig, cases)
    assert not _failed(cases) and len(cases.rows) == 5


def test_rate_limit_per_tenant(rig):
    cases = security.Cases()
    res = security.rate_limit(rig, cases)
    assert not _failed(cases), cases.rows
    assert res["alice_codes"].get("RESOURCE_EXHAUSTED", 0) >= 1


def test_timing_comparison_is_computed(auth_server):
    """Only that the statistics come out: timing is judged in the report, never asserted."""
    res = security.timing(auth_server.target, n_inprocess=200, n_grpc=10)
    for path in ("in_process", "grpc"):
        assert res[path]["n_each"] in (200, 10) and 0 <= res[path]["mannwhitney_p"] <= 1

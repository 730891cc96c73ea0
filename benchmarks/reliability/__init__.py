"""Reliability and security of the gRPC service (issue 10): fuzzing, faults, soak, privacy.

    make reliability                          # full: < 30 min on 2 cores -> benchmarks/results/
    python -m benchmarks.reliability --short  # a few minutes (soak 30 s, 1 kill per store)
    python -m benchmarks.reliability.corpus   # regenerate tests/reliability/corpus/

Modules, one job each: `corpus` (hostile photos, generated), `fuzz` (corpus replay, named edge
cases, hypothesis over every RPC), `faults` (S3 slow/down/stopped, kill -9 during writes, worker
exceptions, disconnects), `soak` (+ `soak_locust`, the locust child), `security` (keys, timing,
isolation, TLS, rate limits), `privacy` (disk, delete, TTL, logs), `report` (markdown, JSON, PNG),
`rig` (servers, moto, the fault proxy). tests/reliability/ runs each with small sizes.
"""

#: Sections of a run, in order.
SECTIONS = ("fuzz", "faults", "security", "privacy", "soak")

__all__ = ["SECTIONS"]

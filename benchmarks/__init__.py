"""Benchmarks and load tests: the numbers that say whether we are fast (issue 7).

    make bench                                   # everything, CPU, < 30 min -> benchmarks/results/
    python -m benchmarks --only batching         # one benchmark
    python -m benchmarks --tiny --out /tmp/b     # smoke-test sizes (what the test suite runs)

One module per benchmark, each with `NAME` and `run(ctx) -> Outcome`; `benchmarks.harness` times
(warm-up, then the median of repeats), records the machine and writes `<name>.json`;
`benchmarks.report` turns the JSONs into REPORT.md with tables and PNG plots.
"""

#: Module names under `benchmarks`, in run order (cheap and self-contained first).
BENCHMARKS = ("gpu", "hypernet_inference", "batching", "stage1_batching", "sd15_scale", "bases_scale",
              "service_load", "methods")

__all__ = ["BENCHMARKS"]

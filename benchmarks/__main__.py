"""`python -m benchmarks [--tiny] [--only NAME ...] [--out DIR]`: run benchmarks, write REPORT.md."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import BENCHMARKS

log = logging.getLogger("benchmarks")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true",
                   help="smoke-test sizes: every benchmark runs in seconds (numbers are meaningless)")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help=f"run only these (repeatable or comma-separated): {', '.join(BENCHMARKS)}")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default: benchmarks/results; --tiny: a temporary folder)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch/OpenMP threads here and in child processes (default: all cores, or 1 when "
                        "the machine is already loaded at start; --tiny: 1)")
    p.add_argument("--no-report", action="store_true", help="skip writing REPORT.md")
    return p.parse_args(argv)


def selected(only: list[str]) -> list[str]:
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        raise SystemExit(f"--only must name benchmarks among {list(BENCHMARKS)}, got {unknown}")
    return [b for b in BENCHMARKS if not names or b in names]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from benchmarks.harness import RESULTS_DIR, BenchContext
    from benchmarks.report import write_report

    out = args.out or (Path(tempfile.mkdtemp(prefix="hdb-bench-tiny-")) if args.tiny else RESULTS_DIR)
    ctx = BenchContext(out_dir=out, tiny=args.tiny)
    threads = args.threads or (1 if args.tiny else auto_threads())
    with _threads(threads):
        failed = _run_all(ctx, selected(args.only))
    if not args.no_report:
        report = write_report(ctx.out_dir)
        log.info("report: %s", report)
    if failed:
        log.error("failed benchmarks: %s", ", ".join(failed))
        return 1
    return 0


def auto_threads() -> int | None:
    """1 when other work already loads every core, else None (torch's default: all cores).

    On oversubscribed cores OpenMP threads spin-waiting for each other make multi-threaded torch
    far slower than one thread (measured here: a tiny-base LoRA step took 133 ms with 1 thread
    and 2.5 s with 2 at a load average of 10 on 2 cores).
    """
    from benchmarks.harness import is_noisy, load_average

    load = load_average()
    if is_noisy(load, os.cpu_count()):
        log.warning("load average %s on %d cores: running torch with 1 thread", load, os.cpu_count())
        return 1
    return None


@contextlib.contextmanager
def _threads(n: int | None):
    """Pin torch's (and child processes') thread count for the run, then restore it.

    Smoke runs use 1: on a shared 2-core machine OpenMP threads that spin while others wait turn
    a tiny model's step from milliseconds into seconds.
    """
    if n is None:
        yield
        return
    import torch

    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env


def _run_all(ctx, names: list[str]) -> list[str]:
    from benchmarks.harness import run_benchmark

    failed = []
    for name in names:
        mod = importlib.import_module(f"benchmarks.{name}")
        log.info("benchmark %s: start", name)
        t0 = time.perf_counter()
        try:
            path = run_benchmark(ctx, name, mod.run)
        except Exception:
            log.exception("benchmark %s failed", name)
            failed.append(name)
            continue
        log.info("benchmark %s: %.1f s -> %s", name, time.perf_counter() - t0, path)
    return failed


if __name__ == "__main__":
    sys.exit(main())

"""The measuring harness every benchmark shares: machine facts, timed repeats, result files.

Rules it enforces (issue 7): every figure is the median of several runs after warm-up, the raw
runs are kept next to it, and every result file says on which machine, with which versions, at
which git commit and under how much background load it was taken. Comparisons are ratios of
figures measured in the same run.

    ctx = BenchContext(out_dir=Path("benchmarks/results"), tiny=False)
    t = measure(lambda: pipe(...), warmup=1, repeats=5)   # {"runs": [...], "median": ...}
    write_result(ctx, "batching", settings={...}, results={...})
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from hypernet.errors import InvalidInputError

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Versions recorded in every result file (the ones whose speed we measure).
PACKAGES = ("torch", "diffusers", "transformers", "peft", "onnxruntime-gpu", "onnxruntime", "grpcio", "locust")
#: A 1-minute load average above this many runnable tasks per core marks a run as noisy.
NOISY_LOAD_PER_CORE = 1.0


@dataclass
class BenchContext:
    """What a benchmark run shares: where results go, tiny vs full, scratch space, the clock."""

    out_dir: Path = field(default=RESULTS_DIR, metadata={"help": "where <name>.json files are written"})
    tiny: bool = field(default=False, metadata={"help": "smoke-test sizes (the test suite's mode)"})
    work_dir: Path | None = field(default=None, metadata={"help": "scratch space (default: out_dir/.work)"})
    started: float = field(default_factory=time.time, metadata={"help": "wall clock at start (epoch s)"})

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.work_dir = Path(self.work_dir) if self.work_dir is not None else self.out_dir / ".work"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.work_dir.mkdir(parents=True, exist_ok=True)

    def pick(self, full: Any, tiny: Any) -> Any:
        """`tiny` in tiny mode, else `full`: keeps the two sizes side by side at each call site."""
        return tiny if self.tiny else full


# ---------------------------------------------------------------------------- statistics
def summarize(runs: list[float]) -> dict[str, Any]:
    """Raw runs plus median, min, max and the interquartile range (a noise indicator)."""
    if not runs:
        raise InvalidInputError("`runs` must hold at least one measurement, got none")
    xs = sorted(runs)
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) >= 2 else [xs[0]] * 3
    return {
        "runs": [float(x) for x in runs],
        "n": len(xs),
        "median": float(statistics.median(xs)),
        "min": float(xs[0]),
        "max": float(xs[-1]),
        "iqr": float(q[2] - q[0]),
    }


def measure(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5, inner: int = 1) -> dict[str, Any]:
    """Time `fn`: `warmup` untimed calls, then `repeats` timed runs of `inner` calls each.

    A run's value is seconds per call (its total / `inner`): `inner` > 1 keeps very short calls
    above the clock's and the scheduler's resolution.

    Returns:
        `summarize` of the per-call seconds of each run.
    """
    if repeats < 1 or inner < 1 or warmup < 0:
        raise InvalidInputError(
            f"`repeats`/`inner` must be >= 1 and `warmup` >= 0, got {repeats}, {inner}, {warmup}"
        )
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        runs.append((time.perf_counter() - t0) / inner)
    return summarize(runs)


def measure_interleaved(
    fns: dict[str, Callable[[], Any]], *, warmup: int = 1, repeats: int = 5, inner: int = 1
) -> dict[str, dict[str, Any]]:
    """Like `measure` for several variants, alternating them run by run (A B A B ...).

    On a shared machine load drifts over seconds; alternating puts every variant under the
    same drift, so the ratio of their medians is fairer than timing A fully, then B.
    """
    if repeats < 1 or inner < 1 or warmup < 0:
        raise InvalidInputError(
            f"`repeats`/`inner` must be >= 1 and `warmup` >= 0, got {repeats}, {inner}, {warmup}"
        )
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    runs: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            runs[k].append((time.perf_counter() - t0) / inner)
    return {k: summarize(v) for k, v in runs.items()}


def percentile(xs: list[float], p: float) -> float | None:
    """The p-th percentile (0..100, linear interpolation) of `xs`; None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return float(s[lo] + (s[hi] - s[lo]) * (k - lo))


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, or None when either is missing or den is 0 (a ratio we could not measure)."""
    if num is None or den is None or den == 0:
        return None
    return float(num) / float(den)


# ---------------------------------------------------------------------------- memory
def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) so the next `peak_rss` covers only what follows.

    Linux >= 4.0: writing 5 to /proc/self/clear_refs. Returns False where unsupported.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_bytes(field_name: str = "VmRSS") -> int | None:
    """A /proc/self/status memory field (VmRSS: now, VmHWM: peak since reset) in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss() -> int | None:
    return rss_bytes("VmHWM")


# ---------------------------------------------------------------------------- machine facts
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10).stdout
    try:
        return {"commit": git("rev-parse", "HEAD").strip() or None,
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no").strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def gpu_name() -> str | None:
    """The CUDA device's name, or None (torch imported lazily: CPU-only runs need no CUDA)."""
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a broken CUDA install means "no GPU" here
        return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, GPU, versions, git commit and torch's thread count."""
    threads = None
    if "torch" in sys.modules:
        threads = sys.modules["torch"].get_num_threads()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_bytes": _ram_bytes(),
        "gpu": gpu_name(),
        "platform": platform.platform(),
        "torch_threads": threads,
        "versions": _versions(),
        "git": _git_commit(),
    }


def is_noisy(load: list[float] | None, cores: int | None) -> bool:
    """True when the 1-minute load average says other work shared the CPU."""
    if not load or not cores:
        return False
    return load[0] > NOISY_LOAD_PER_CORE * cores


# ---------------------------------------------------------------------------- result files
def write_result(
    ctx: BenchContext,
    name: str,
    *,
    settings: dict[str, Any],
    results: dict[str, Any],
    load_before: list[float] | None,
    notes: list[str] | None = None,
    seconds: float | None = None,
) -> Path:
    """Write `<out_dir>/<name>.json`: machine, versions, settings, raw runs, medians, load."""
    machine = machine_info()
    load_after = load_average()
    noisy = is_noisy(load_before, machine["cores"]) or is_noisy(load_after, machine["cores"])
    doc = {
        "name": name,
        "mode": "tiny" if ctx.tiny else "full",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": seconds,
        "machine": machine,
        "load_average": {"before": load_before, "after": load_after, "noisy": noisy},
        "settings": settings,
        "results": results,
        "notes": list(notes or []),
    }
    path = ctx.out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def read_result(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())




@dataclass
class Outcome:
    """What a benchmark's `run(ctx)` returns: its settings, its measured results, and notes
    (skips, fallbacks, caveats) that REPORT.md prints next to its tables."""

    settings: dict[str, Any]
    results: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def run_benchmark(ctx: BenchContext, name: str, fn: Callable[[BenchContext], Outcome]) -> Path:
    """Run one benchmark, recording the load average before and after, and write its JSON."""
    load_before = load_average()
    t0 = time.perf_counter()
    out = fn(ctx)
    return write_result(ctx, name, settings=out.settings, results=out.results, load_before=load_before,
                        notes=out.notes, seconds=round(time.perf_counter() - t0, 2))

__all__ = [
    "RESULTS_DIR", "BenchContext", "Outcome", "gpu_name", "is_noisy", "load_average", "machine_info", "measure",
    "measure_interleaved",
    "peak_rss", "percentile", "ratio", "read_result", "reset_peak_rss", "rss_bytes", "run_benchmark", "summarize",
    "write_result",
]

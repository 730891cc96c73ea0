"""Soak: a bounded mixed load (locust, every RPC, two tenants) for a fixed time, recording
unexpected errors, the server's RSS curve and latency percentiles per time window.

Bounded: `users` closed-loop clients, each waiting 0.5-1.5 s between calls, so the offered load
stays near what a 2-core CPU serves and the queue never grows without bound. The server runs
with an identity TTL (90 s), so identities left behind are swept while the load runs; each
user renews its own identity 30 s before it expires.

Memory bound (stated, checked in the report): after warm-up (the first 20% of the run), the
median RSS of the last 10% of samples may exceed that of the first post-warm-up 10% by at most
`RSS_GROWTH_BOUND` (relative) + `RSS_SLACK_MB` (allocator noise).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.reliability.rig import ROOT, Rig, ServerProcess, client, rss_bytes
from benchmarks.reliability.soak_locust import BACKPRESSURE, TASKS

RSS_GROWTH_BOUND = 0.10
RSS_SLACK_MB = 64
KEYS = [("acme", "acme-soak-key-0123456789abcdef"), ("globex", "globex-soak-key-0123456789abcdef")]


def _percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(calls: list[list], rss: list[tuple[float, int]], duration: float, windows: int = 6) -> dict[str, Any]:
    """Errors by task and code, latency percentiles per window, the RSS growth verdict."""
    by_task: dict[str, dict[str, int]] = {}
    unexpected = backpressure = 0
    for _, task, code, _, expected in calls:
        by_task.setdefault(task, {}).setdefault(code, 0)
        by_task[task][code] += 1
        unexpected += not expected
        backpressure += code == BACKPRESSURE
    win = []
    for k in range(windows):
        lo, hi = duration * k / windows, duration * (k + 1) / windows
        lat = [c[3] for c in calls if lo <= c[0] < hi and c[2] == "OK" and c[1].startswith("generate")]
        win.append({"t0_s": round(lo, 1), "calls": sum(1 for c in calls if lo <= c[0] < hi),
                    "generate_p50_s": _percentile(lat, 50), "generate_p95_s": _percentile(lat, 95),
                    "generate_p99_s": _percentile(lat, 99)})
    ok_gen = [c[3] for c in calls if c[2] == "OK" and c[1].startswith("generate")]
    mem: dict[str, Any] = {"samples": len(rss)}
    if len(rss) >= 10:
        t_end = rss[-1][0]
        post = [r for t, r in rss if t >= 0.2 * t_end]
        n = max(1, len(post) // 10)
        first, last = sorted(post[:n])[n // 2], sorted(post[-n:])[n // 2]
        bound = first * (1 + RSS_GROWTH_BOUND) + RSS_SLACK_MB * 2**20
        mem.update({"rss_after_warmup_mb": round(first / 2**20, 1), "rss_end_mb": round(last / 2**20, 1),
                    "rss_peak_mb": round(max(r for _, r in rss) / 2**20, 1),
                    "growth_mb": round((last - first) / 2**20, 1), "bound_mb": round(bound / 2**20, 1),
                    "within_bound": last <= bound})
    p95 = [w["generate_p95_s"] for w in win if w["generate_p95_s"] is not None]
    return {"duration_s": round(duration, 1), "calls": len(calls), "unexpected_errors": unexpected,
            "backpressure": backpressure, "by_task": by_task, "windows": win,
            "generate_latency_s": {"p50": _percentile(ok_gen, 50), "p95": _percentile(ok_gen, 95),
                                   "p99": _percentile(ok_gen, 99)},
            "p95_last_over_first_window": (p95[-1] / p95[0]) if len(p95) >= 2 and p95[0] else None,
            "memory": mem}


def _sampler(pid: int, t0: float, stop: threading.Event, out: list[tuple[float, int]], every: float) -> None:
    while not stop.is_set():
        out.append((round(time.monotonic() - t0, 2), rss_bytes(pid)))
        stop.wait(every)


def run(rig: Rig, photo: bytes, *, duration: float, users: int = 6, in_process: bool = False,
        sample_every: float = 2.0, gen_steps: int = 2, ttl_s: float = 90.0, min_renewals: int = 0,
        max_extra_s: float = 240.0) -> dict[str, Any]:
    """Serve (a `hdb serve` subprocess, or in this process), load it for `duration` seconds, then
    on until `min_renewals` identities were renewed (at most `max_extra_s` more seconds)."""
    keys = ",".join(f"{t}:{k}" for t, k in KEYS)
    settings = dict(identity_ttl_s=ttl_s, sweep_interval_s=min(5.0, ttl_s / 4), queue_size=32, max_batch=8)
    if in_process:
        import os

        bg = rig.server(no_auth=False, api_keys=keys, **settings)
        target, pid, stop_server = bg.target, os.getpid(), lambda: bg.close(grace=0.0)
    else:
        flags = [f"--{k.replace('_', '-')}" for k in settings]
        extra = ["--api-keys", keys] + [x for k, f in zip(settings, flags, strict=True) for x in (f, str(settings[k]))]
        proc = ServerProcess(rig, store=str(rig.work / f"soak-store-{time.time_ns()}"), extra=extra,
                             name="soak").wait_serving()
        target, pid, stop_server = proc.target, proc.pid, proc.stop
    try:
        with tempfile.TemporaryDirectory(prefix="hdb-soak-") as d:
            cfg_file, out_file, photo_file = Path(d) / "cfg.json", Path(d) / "out.json", Path(d) / "photo.png"
            photo_file.write_bytes(photo)
            cfg_file.write_text(json.dumps({
                "target": target, "keys": KEYS, "renew_s": ttl_s / 3, "photo": str(photo_file),
                "users": users, "duration": duration, "wait_min": 0.5, "wait_max": 1.5, "timeout": 120.0,
                "gen_steps": gen_steps, "min_renewals": min_renewals, "max_extra_s": max_extra_s}))
            stop, rss = threading.Event(), []
            t0 = time.monotonic()
            sampler = threading.Thread(target=_sampler, args=(pid, t0, stop, rss, sample_every), daemon=True)
            sampler.start()
            try:
                proc_l = subprocess.run([sys.executable, "-m", "benchmarks.reliability.soak_locust", "--config-json",
                                         str(cfg_file), "--out", str(out_file)], cwd=ROOT, capture_output=True,
                                        text=True, timeout=duration + max_extra_s + 300)
            finally:
                stop.set()
                sampler.join(10)
            if proc_l.returncode != 0 or not out_file.is_file():
                raise RuntimeError(f"the locust process failed ({proc_l.returncode}): {proc_l.stderr[-2000:]}")
            res = json.loads(out_file.read_text())
        with client(target, api_key=KEYS[0][1]) as c:
            health = c.health()
    finally:
        rc = stop_server()
    out = summarize(res["calls"], rss, res["duration_s"])
    out.update({"users": users, "ttl_s": ttl_s, "in_process": in_process, "health_at_end": health,
                "tasks": sorted(TASKS), "rss_curve": rss, "exit_code": rc if not in_process else None})
    return out

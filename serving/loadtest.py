"""`hdb loadtest`: load-test a running HyperDreamBooth service with locust (headless, gRPC users).

    hdb loadtest --target localhost:50051 --users 16 --duration 60
    hdb loadtest --target api.example.com:443 --tls --api-key $KEY --scenario personalize-and-generate \\
        --photo me.jpg --users 4 --duration 120 --json results.json

Each locust user is a closed loop: one call, wait for its last streamed message, next call. A
RESOURCE_EXHAUSTED answer (the server's queue is full: deliberate back-pressure) is counted apart
from failures, and the user honours the server's `retry-after-ms` hint before calling again.
Every other non-OK status is a failure; the exit code is 1 when there was any.

locust monkey-patches the standard library with gevent, so the run happens in a child process
(`python -m serving.loadtest --config-json FILE --out FILE`): the caller's process - the
`hdb` CLI or a benchmark holding a torch model - stays unpatched.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypernet.errors import EnvironmentProblem, InvalidInputError

SCENARIOS = ("generate", "personalize-and-generate")
#: gRPC status that is deliberate back-pressure, not a failure (issue 7).
BACKPRESSURE = "RESOURCE_EXHAUSTED"
DEFAULT_PROMPT = "a photo of ohwx person"


@dataclass
class LoadTestConfig:
    """One headless run: `users` closed-loop clients calling `scenario` for `duration` seconds."""

    target: str = field(default="localhost:50051", metadata={"help": "HOST:PORT of the service"})
    users: int = field(default=4, metadata={"help": "concurrent clients"})
    duration: float = field(default=30.0, metadata={"help": "seconds of load after the users started"})
    spawn_rate: float | None = field(default=None, metadata={"help": "users started per second (default: all)"})
    scenario: str = field(default="generate", metadata={"help": f"one of {SCENARIOS}"})
    api_key: str | None = field(default=None, metadata={"help": "API key (default: $HDB_API_KEY)"})
    tls: bool = field(default=False, metadata={"help": "connect with TLS"})
    ca_cert: str | None = field(default=None, metadata={"help": "PEM root certificate for TLS"})
    prompt: str = field(default=DEFAULT_PROMPT, metadata={"help": "prompt of every generation"})
    identities: list[str] = field(default_factory=list, metadata={
        "help": "identity ids Generate cycles through, one per user (none: the base model)"})
    photo: str | None = field(default=None, metadata={
        "help": "photo for PersonalizeAndGenerate (default: a synthetic stand-in face)"})
    gen_steps: int = field(default=0, metadata={"help": "denoising steps (0: the server's default)"})
    size: int = field(default=0, metadata={"help": "image width = height (0: the base's native size)"})
    personalize_steps: int | None = field(default=None, metadata={"help": "fine-tune steps (None: default)"})
    timeout: float = field(default=300.0, metadata={"help": "deadline of each call, seconds"})
    honor_retry_after: bool = field(default=True, metadata={
        "help": "after RESOURCE_EXHAUSTED wait the server's retry-after-ms hint (else retry at once)"})

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise InvalidInputError(f"`scenario` must be one of {SCENARIOS}, got {self.scenario!r}")
        if not isinstance(self.users, int) or not 1 <= self.users <= 10_000:
            raise InvalidInputError(f"`users` must be an integer in [1, 10000], got {self.users!r}")
        if not (math.isfinite(self.duration) and self.duration > 0):
            raise InvalidInputError(f"`duration` must be a positive number of seconds, got {self.duration!r}")
        if self.spawn_rate is not None and not self.spawn_rate > 0:
            raise InvalidInputError(f"`spawn_rate` must be > 0, got {self.spawn_rate!r}")
        host, _, port = self.target.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidInputError(f"`target` must be HOST:PORT, got {self.target!r}")
        if not self.timeout > 0:
            raise InvalidInputError(f"`timeout` must be > 0, got {self.timeout!r}")
        if self.photo is not None and not Path(self.photo).is_file():
            raise InvalidInputError(f"`photo` must be an existing image file, got {self.photo!r}")


def run_loadtest(cfg: LoadTestConfig) -> dict[str, Any]:
    """Run one load test in a child process and return its results (see `summarize_calls`).

    Raises:
        EnvironmentProblem: locust is not installed, or the child process failed.
    """
    import importlib.util

    # Never import locust here: its import monkey-patches this whole process with gevent.
    if importlib.util.find_spec("locust") is None:
        raise EnvironmentProblem("`hdb loadtest` needs locust: pip install locust (it is in the dev group)")
    with tempfile.TemporaryDirectory(prefix="hdb-loadtest-") as d:
        cfg_file, out_file = Path(d) / "config.json", Path(d) / "result.json"
        cfg_file.write_text(json.dumps(dataclasses.asdict(cfg)))
        cmd = [sys.executable, "-m", "serving.loadtest", "--config-json", str(cfg_file),
               "--out", str(out_file)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.duration + cfg.timeout + 120)
        if proc.returncode != 0 or not out_file.is_file():
            raise EnvironmentProblem(f"the locust process failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        return json.loads(out_file.read_text())


def summarize_calls(calls: list[tuple[str, float]], duration: float, images_per_call: int) -> dict[str, Any]:
    """(status code name, latency seconds) per finished call -> throughput, percentiles, codes.

    Latency percentiles are over OK calls only; `failures` counts every non-OK status except
    RESOURCE_EXHAUSTED, which is reported as `rejected`.
    """
    ok = sorted(lat for code, lat in calls if code == "OK")
    codes: dict[str, int] = {}
    for code, _ in calls:
        codes[code] = codes.get(code, 0) + 1

    def pct(p: float) -> float | None:
        if not ok:
            return None
        k = (len(ok) - 1) * p / 100.0
        lo, hi = math.floor(k), math.ceil(k)
        return ok[lo] + (ok[hi] - ok[lo]) * (k - lo)

    return {
        "calls": len(calls),
        "ok": len(ok),
        "rejected": codes.get(BACKPRESSURE, 0),
        "failures": sum(n for c, n in codes.items() if c not in ("OK", BACKPRESSURE)),
        "status_counts": dict(sorted(codes.items())),
        "duration_s": duration,
        "throughput_rps": len(ok) / duration,
        "images_per_s": len(ok) * images_per_call / duration,
        "latency_s": {"p50": pct(50), "p95": pct(95), "p99": pct(99),
                      "mean": sum(ok) / len(ok) if ok else None, "max": ok[-1] if ok else None},
    }


def _stand_in_photo() -> bytes:
    """A synthetic face-like PNG for PersonalizeAndGenerate when no --photo is given."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (256, 256), (120, 120, 120))
    draw = ImageDraw.Draw(img)
    draw.ellipse((64, 38, 192, 218), fill=(224, 172, 140))
    for x in (102, 154):
        draw.ellipse((x - 10, 102, x + 10, 118), fill=(40, 30, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------- child process
def _locust_main(cfg: LoadTestConfig) -> dict[str, Any]:
    """The locust run itself (gevent-patched: call only in a dedicated process).

    Calls started while the measuring window is open are recorded. When it closes, users start
    no new call and the run waits (at most `timeout`) for the calls in flight to finish, so a
    call slower than the window - PersonalizeAndGenerate at 64 users - is measured, not dropped.
    Throughput is over the window plus that drain.
    """
    import gevent
    import grpc.experimental.gevent as grpc_gevent
    from locust import events
    from locust.env import Environment

    grpc_gevent.init_gevent()  # after gevent's monkey-patching (`_child` imports locust first), before any channel
    # gRPC's gevent mode waits for call events in gevent's hub threadpool (10 threads by default):
    # with more calls in flight than threads, finished calls queue behind slow ones and a sweep at
    # 64 users saw no call complete at all. One thread per user (+ slack) keeps every call live.
    gevent.get_hub().threadpool.maxsize = max(gevent.get_hub().threadpool.maxsize, cfg.users + 8)

    state = {"open": False, "accepting": True, "inflight": 0, "users": 0}
    calls: list[tuple[str, float]] = []
    env = Environment(user_classes=[_user_class(cfg, state, calls)], events=events)
    runner = env.create_local_runner()
    runner.start(cfg.users, spawn_rate=cfg.spawn_rate or cfg.users)
    while runner.user_count < cfg.users:  # the window opens once every user runs
        gevent.sleep(0.05)
    state["open"] = True
    t0 = time.perf_counter()
    gevent.sleep(cfg.duration)
    state["open"] = state["accepting"] = False
    window = time.perf_counter() - t0
    deadline = time.perf_counter() + cfg.timeout
    while state["inflight"] and time.perf_counter() < deadline:
        gevent.sleep(0.05)
    duration = time.perf_counter() - t0
    runner.quit()
    runner.greenlet.join(timeout=30)
    out = summarize_calls(calls, duration, images_per_call=1)
    total = env.stats.total
    out.update({"scenario": cfg.scenario, "users": cfg.users, "target": cfg.target, "window_s": window,
                "drain_s": duration - window, "unfinished": state["inflight"],
                "locust": {"requests": total.num_requests, "failures": total.num_failures,
                           "median_ms": total.median_response_time, "avg_ms": total.avg_response_time}})
    return out


def _user_class(cfg: LoadTestConfig, state: dict, calls: list[tuple[str, float]]):
    """The locust User: one HdbClient (one channel) per user, one call at a time."""
    import gevent
    import grpc
    from locust import User, constant, events, task

    from serving.client import HdbClient, retry_after_ms

    photo = Path(cfg.photo).read_bytes() if cfg.photo else _stand_in_photo()
    root_certs = Path(cfg.ca_cert).read_bytes() if cfg.ca_cert else None

    class HdbUser(User):
        wait_time = constant(0)

        def on_start(self) -> None:
            self.index = state["users"]
            state["users"] += 1
            self.client = HdbClient(cfg.target, api_key=cfg.api_key, tls=cfg.tls, root_certificates=root_certs,
                                    timeout=cfg.timeout)
            self.identity = cfg.identities[self.index % len(cfg.identities)] if cfg.identities else ""

        def on_stop(self) -> None:
            self.client.close()

        def _call(self, name: str, fn) -> None:
            recorded, exc, code, wait_s = state["open"], None, "OK", 0.0
            state["inflight"] += 1
            t0 = time.perf_counter()
            try:
                fn()
            except grpc.RpcError as e:
                exc, code = e, e.code().name
                if code == BACKPRESSURE and cfg.honor_retry_after:
                    wait_s = (retry_after_ms(e) or 0) / 1000.0
            except Exception as e:  # noqa: BLE001 - a broken stream is a failure, not a crash
                exc, code = e, f"CLIENT_{type(e).__name__}"
            finally:
                state["inflight"] -= 1
            latency = time.perf_counter() - t0
            if recorded:
                calls.append((code, latency))
            events.request.fire(request_type="grpc", name=name, response_time=latency * 1000, response_length=0,
                                exception=exc, context={})
            if wait_s:
                gevent.sleep(wait_s)

        @task
        def work(self) -> None:
            if not state["accepting"]:  # the window closed: no new calls while the others drain
                gevent.sleep(0.1)
                return
            gen = HdbClient.generation(n=1, steps=cfg.gen_steps, width=cfg.size, height=cfg.size, seed=self.index)
            if cfg.scenario == "generate":
                self._call("Generate", lambda: list(self.client.generate_stream(cfg.prompt, self.identity, gen)))
            else:
                opts = HdbClient.options(steps=cfg.personalize_steps, seed=self.index)
                self._call("PersonalizeAndGenerate", lambda: self.client.personalize_and_generate(
                    photo, [cfg.prompt], options=opts, generation=gen))

    return HdbUser


# ---------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    p = subparsers.add_parser("loadtest", help="load-test a running service (locust, headless, gRPC)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--target", default="localhost:50051", help="HOST:PORT of the service")
    p.add_argument("--users", type=int, default=4, help="concurrent clients (closed loop each)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load once every user runs")
    p.add_argument("--spawn-rate", type=float, default=None, help="users started per second (default: all)")
    p.add_argument("--scenario", choices=SCENARIOS, default="generate", help="which RPC the users call")
    p.add_argument("--api-key", default=None, help="API key (default: $HDB_API_KEY)")
    p.add_argument("--tls", action="store_true", help="connect with TLS (system roots or --ca-cert)")
    p.add_argument("--ca-cert", default=None, help="PEM root certificate (TLS)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt of every generation")
    p.add_argument("--identity", action="append", default=[], help="identity id for Generate (repeatable)")
    p.add_argument("--photo", default=None, help="photo for PersonalizeAndGenerate (default: synthetic)")
    p.add_argument("--gen-steps", type=int, default=0, help="denoising steps (0: server default)")
    p.add_argument("--size", type=int, default=0, help="image width = height (0: native)")
    p.add_argument("--personalize-steps", type=int, default=None, help="fine-tune steps (default: server's)")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline per call, seconds")
    p.add_argument("--no-retry-after", action="store_true", help="retry at once after RESOURCE_EXHAUSTED")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    cfg = LoadTestConfig(
        target=args.target, users=args.users, duration=args.duration, spawn_rate=args.spawn_rate,
        scenario=args.scenario, api_key=args.api_key, tls=args.tls, ca_cert=args.ca_cert, prompt=args.prompt,
        identities=list(args.identity), photo=args.photo, gen_steps=args.gen_steps, size=args.size,
        personalize_steps=args.personalize_steps, timeout=args.timeout, honor_retry_after=not args.no_retry_after,
    )
    res = run_loadtest(cfg)
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    print(format_summary(res))
    return 1 if res["failures"] else 0


def format_summary(res: dict[str, Any]) -> str:
    lat = res["latency_s"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f} ms"

    codes = ", ".join(f"{k} {v}" for k, v in res["status_counts"].items()) or "none"
    return (
        f"{res['scenario']} x {res['users']} users for {res.get('window_s', res['duration_s']):.1f} s "
        f"(+ {res.get('drain_s', 0.0):.1f} s for calls in flight to finish) against {res['target']}\n"
        f"  ok {res['ok']} / {res['calls']} calls, {res['throughput_rps']:.2f} calls/s, "
        f"{res['images_per_s']:.2f} images/s\n"
        f"  latency p50 {ms(lat['p50'])}, p95 {ms(lat['p95'])}, p99 {ms(lat['p99'])}\n"
        f"  statuses: {codes}; rejected (RESOURCE_EXHAUSTED) {res['rejected']}; failures {res['failures']}"
    )


def _child(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="locust child process of `hdb loadtest` (internal)")
    p.add_argument("--config-json", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    import locust  # noqa: F401  - gevent monkey-patching first, before anything opens sockets

    cfg = LoadTestConfig(**json.loads(args.config_json.read_text()))
    res = _locust_main(cfg)
    args.out.write_text(json.dumps(res))
    return 0


__all__ = ["SCENARIOS", "LoadTestConfig", "format_summary", "register", "run_loadtest", "summarize_calls"]

if __name__ == "__main__":
    sys.exit(_child())

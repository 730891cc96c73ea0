"""The test rig every reliability check shares: real servers, real sockets, real S3 (moto).

- `Rig`: the tiny base + hypernetwork paths and a scratch folder; starts in-process servers
  (`serving.server.BackgroundServer` on a loopback port, as tests/serving's `make_server` does)
  and `hdb serve` subprocesses (`ServerProcess`, for kill -9 and RSS);
- `moto_s3()`: moto's `ThreadedMotoServer` with throwaway credentials and a bucket;
- `FaultProxy`: a TCP proxy in front of moto whose behaviour is switched mid-run (pass, delay,
  refuse, blackhole), so "S3 is slow" and "S3 is gone" are real network conditions;
- small helpers: `code_of` (status name of a call), `wait_until` (poll a state, never a
  duration), `rss_bytes` (from /proc).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "hdb-reliability"


def code_of(fn: Callable[[], Any]) -> tuple[str, Any]:
    """("OK", result) or (status code name, the RpcError); a stream is consumed to the end."""
    try:
        result = fn()
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str, dict, list)):
            result = list(result)
        return "OK", result
    except grpc.RpcError as e:
        return e.code().name, e


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition",
               interval: float = 0.02) -> None:
    """Poll `predicate` until true (a state is what checks wait for, never a duration)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc), 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------- servers
@dataclass
class Rig:
    """Paths of the models every server loads, and a scratch folder for stores and logs."""

    base_dir: Path
    hypernet_dir: Path
    work: Path
    short: bool = True
    _servers: list = field(default_factory=list)

    @classmethod
    def default(cls, work: Path, short: bool) -> Rig:
        """The embedded tiny base and an untrained tiny hypernetwork for it (reliability needs
        the service's code paths, not good identities; training one would take minutes)."""
        from hypernet.defaults import default_base_dir

        base = default_base_dir()
        return cls(base, tiny_hypernet(work / "hypernet", base), work, short)

    def engine(self, cls=None):
        from serving.engine import Engine

        return (cls or Engine)(str(self.base_dir), str(self.hypernet_dir), "cpu", "fp32")

    def config(self, **overrides):
        from serving.config import ServeConfig

        n = len(self._servers)
        base = dict(host="localhost", port=0, metrics_port=-1, warmup=False, no_auth=True,
                    store=str(self.work / f"store{n}-{os.getpid()}"), log_format="text",
                    sweep_interval_s=3600.0, grace_s=5.0)
        base.update(overrides)
        return ServeConfig(**base)

    def server(self, engine=None, store_obj=None, **overrides):
        """An in-process server (its own loop thread) on a free loopback port; `close()` it."""
        import torch

        from serving.server import BackgroundServer

        torch.set_num_threads(1)
        bg = BackgroundServer(self.config(**overrides), engine=engine or self.engine(), store=store_obj)
        self._servers.append(bg)
        return bg

    @contextlib.contextmanager
    def serving(self, engine=None, store_obj=None, **overrides) -> Iterator[Any]:
        bg = self.server(engine, store_obj, **overrides)
        try:
            yield bg
        finally:
            bg.close(grace=0.0)

    def close(self) -> None:
        for bg in self._servers:
            with contextlib.suppress(Exception):
                bg.close(grace=0.0)
        self._servers.clear()


def tiny_hypernet(out: Path, base_dir: Path) -> Path:
    """An untrained hypernetwork export for the tiny base (weights random but fixed)."""
    # Copied from tests/serving/conftest.py::tiny_hypernet_dir (a fixture: not importable here).
    import torch

    from hypernet.adapters import default_spec_for, lidb_layers
    from hypernet.base import load_pipeline
    from hypernet.hypernetwork import HypernetConfig, HypernetInfo, HyperNetwork, save_hypernet
    from hypernet.identity import cached_fingerprint

    if (out / "hypernet.safetensors").is_file():
        return out
    pipe = load_pipeline(base_dir, device="cpu", dtype="fp32")
    spec = default_spec_for(pipe)
    layers = lidb_layers(pipe, spec)
    cfg = HypernetConfig(num_layers=len(layers), a=spec.a, b=spec.b, r=spec.r, dim=32, depth=1,
                         heads=2, iterations=2, head_init_std=0.05,
                         encoder_kwargs={"patch_size": 16, "depth": 1})
    torch.manual_seed(0)
    info = HypernetInfo(config=cfg, spec=spec, layers=layers,
                        base_fingerprint=cached_fingerprint(pipe),
                        resolution=pipe.unet.config.sample_size * pipe.vae_scale_factor)
    out.mkdir(parents=True, exist_ok=True)
    save_hypernet(out / "hypernet.safetensors", HyperNetwork(cfg), info)
    return out


def client(target: str, api_key: str | None = "", **kw):
    from serving.client import HdbClient

    return HdbClient(target, api_key=api_key, **kw)


class ServerProcess:
    """`hdb serve` in a subprocess (JSON logs captured), for kill -9, RSS and log checks."""

    def __init__(self, rig: Rig, *, store: str, extra: list[str] = (), env: dict[str, str] | None = None,
                 log_level: str = "INFO", name: str = "server"):
        cmd = [sys.executable, "-m", "hdb.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--metrics-port", "-1", "--no-warmup", "--base", str(rig.base_dir), "--hypernet",
               str(rig.hypernet_dir), "--store", store, "--log-format", "json", "--log-level", log_level,
               "--device", "cpu", "--grace-s", "2", *extra]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        if "--no-auth" not in extra and "--api-keys" not in extra and "--keys-file" not in extra:
            cmd.append("--no-auth")
        self.log_path = rig.work / f"{name}-{time.time_ns()}.log"
        self.lines: list[str] = []
        self.port = 0
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=full_env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with self.log_path.open("w") as log:
            for line in self.proc.stderr:
                self.lines.append(line)
                log.write(line)
                if not self.port and line.startswith("{") and '"listening"' in line:
                    with contextlib.suppress(ValueError, KeyError):
                        self.port = int(json.loads(line)["address"].rsplit(":", 1)[1])

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_serving(self, timeout: float = 600.0) -> ServerProcess:
        wait_until(lambda: self.port or self.proc.poll() is not None, timeout, "the server to listen", 0.1)
        if not self.port:
            raise RuntimeError(f"hdb serve exited {self.proc.returncode}: {''.join(self.lines[-20:])}")
        with client(self.target) as c:
            def serving() -> bool:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"hdb serve exited {self.proc.returncode}: {''.join(self.lines[-20:])}")
                try:
                    return c.health(timeout=5) == "SERVING"
                except grpc.RpcError:
                    return False

            wait_until(serving, timeout, "SERVING", 0.2)
        return self

    def kill9(self) -> None:
        """SIGKILL: no handler, no drain, no flush - the crash a power cut or OOM killer causes."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._reader.join(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._reader.join(10)
        return self.proc.returncode


# ---------------------------------------------------------------------------- S3
@contextlib.contextmanager
def moto_s3(bucket: str = BUCKET) -> Iterator[MotoS3]:
    """moto's S3 server on a free loopback port with throwaway credentials and `bucket`."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's per-request access log
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    moto = MotoS3(bucket)
    try:
        moto.start()
        import boto3

        boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        yield moto
    finally:
        moto.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class MotoS3:
    """A stoppable, restartable moto server (its data lives in this process: it survives restarts)."""

    def __init__(self, bucket: str):
        self.bucket = bucket
        self._server = None
        self.address: tuple[str, int] = ("127.0.0.1", 0)

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        self.address = tuple(self._server.get_host_and_port())

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.address[0]}:{self.address[1]}"

    def s3(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def objects(self, prefix: str = "") -> dict[str, bytes]:
        """Every object under `prefix`: key -> bytes."""
        s3, out, token = self.s3(), {}, None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            resp = s3.list_objects_v2(**kw)
            for o in resp.get("Contents", []):
                try:
                    out[o["Key"]] = s3.get_object(Bucket=self.bucket, Key=o["Key"])["Body"].read()
                except s3.exceptions.NoSuchKey:  # deleted between the listing and the read
                    continue
            if not resp.get("IsTruncated"):
                return out
            token = resp["NextContinuationToken"]


class FaultProxy:
    """A TCP proxy to an upstream address whose behaviour can change mid-run.

    Modes: "pass" (forward), "delay" (sleep `delay_s` before forwarding each chunk the client
    sends: a slow store), "refuse" (accept, then reset: a dead endpoint), "blackhole" (accept,
    never answer: a hung endpoint). Switching mode drops open connections, so a client's
    keep-alive pool cannot hide the change. `connections` counts accepted connections (the
    server's retries show up here).
    """

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.mode = "pass"
        self.delay_s = 0.0
        self.connections = 0
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, name="fault-proxy", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(self, mode: str, delay_s: float = 0.0, upstream: tuple[str, int] | None = None) -> None:
        if mode not in ("pass", "delay", "refuse", "blackhole"):
            raise ValueError(f"`mode` must be pass, delay, refuse or blackhole, got {mode!r}")
        self.mode, self.delay_s = mode, delay_s
        if upstream is not None:
            self.upstream = upstream
        self._drop_all()

    def _drop_all(self) -> None:
        with self._lock:
            socks, self._open = list(self._open), set()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._open.add(s)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        mode = self.mode
        if mode == "refuse":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            conn.close()  # RST
            return
        self._track(conn)
        if mode == "blackhole":
            with contextlib.suppress(OSError):
                while conn.recv(65536):
                    pass
            return
        try:
            up = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            with contextlib.suppress(OSError):
                conn.close()
            return
        up.settimeout(None)
        self._track(up)
        threading.Thread(target=self._pump, args=(conn, up, True), daemon=True).start()
        self._pump(up, conn, False)

    def _pump(self, src: socket.socket, dst: socket.socket, upstream_bound: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upstream_bound and self.mode == "delay" and self.delay_s > 0:
                    time.sleep(self.delay_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self._drop_all()

"""`HdbServer`: assemble and run the gRPC service; `run(cfg)` is what `hdb serve` calls.

Lifecycle:
1. start(): bind the port, health NOT_SERVING, metrics HTTP, then load + warm up the models
   in a thread (health probes are answered meanwhile; other calls get UNAVAILABLE);
2. ready: the model worker starts, health SERVING;
3. stop() (SIGTERM/SIGINT): health NOT_SERVING, new calls UNAVAILABLE, in-flight calls and
   queued/running jobs get `grace_s` to finish, then the server stops and the worker joins.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hypernet.errors import InvalidInputError
from serving.auth import KeyRing
from serving.config import ServeConfig
from serving.core import ServiceCore
from serving.engine import Engine
from serving.identities import IdentityRepository
from serving.interceptors import GRPC_LIMIT_FACTOR, ServerState, ServiceInterceptor
from serving.metrics import Metrics
from serving.ratelimit import TenantRateLimiter
from serving.servicer import PersonalizationServicer
from serving.store import Store, open_store
from serving.stubs import SERVICE_NAME, pb_grpc

log = logging.getLogger("serving")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _in_daemon_thread(fn, *args) -> asyncio.Future:
    """Run `fn` on a daemon thread: a SIGTERM during a long model load (the embedded
    hypernetwork builds on first use) must not keep the process alive until it finishes."""
    import threading

    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(result=None, error: BaseException | None = None) -> None:
        if not fut.done():
            fut.set_exception(error) if error is not None else fut.set_result(result)

    def work() -> None:
        try:
            outcome = (fn(*args), None)
        except BaseException as e:  # delivered to the awaiting task
            outcome = (None, e)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop is gone: the server stopped while we worked
            pass

    threading.Thread(target=work, name="hdb-model-load", daemon=True).start()
    return fut


def resolve_keyring(cfg: ServeConfig) -> KeyRing | None:
    """The API keys, or None for dev mode (no auth).

    Dev mode only when asked (`no_auth`), or implied when no keys are configured and the server
    binds to loopback only (so `hdb serve` works out of the box and nobody else can reach it).

    Raises:
        InvalidInputError: no keys configured on a non-loopback address.
    """
    if cfg.no_auth:
        return None
    ring = KeyRing.load(cfg.keys_file, cfg.api_keys)
    if len(ring):
        return ring
    if cfg.binds_loopback_only():
        return None
    raise InvalidInputError(
        f"API keys must be configured to serve on {cfg.host!r} (keys_file / HDB_API_KEYS), got "
        "none; pass --no-auth only for development"
    )


class HdbServer:
    def __init__(self, cfg: ServeConfig, *, engine: Engine | None = None,
                 store: Store | None = None, default_hypernet: Callable[[], str | Path] | None = None):
        """`default_hypernet`: see `Engine` (used when `cfg.hypernet` is empty and no `engine` is given)."""
        self.cfg = cfg
        self._default_hypernet = default_hypernet
        self._engine = engine
        self._store = store
        self.port = 0
        self.metrics_port = -1
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        cfg = self.cfg
        keyring = resolve_keyring(cfg)
        if keyring is None:
            log.warning("AUTH DISABLED (dev mode): every caller is tenant `dev`%s",
                        "" if cfg.no_auth else f" because no API keys are configured and "
                        f"{cfg.host} is loopback-only")
        from hypernet.defaults import cache_dir

        store = self._store or open_store(cfg.store, default_dir=cache_dir() / "identities",
                                          endpoint_url=cfg.s3_endpoint_url, region=cfg.s3_region)
        self.metrics = Metrics()
        self.repo = IdentityRepository(store, cfg.identity_ttl_s)
        engine = self._engine or Engine(cfg.base, cfg.hypernet, cfg.device, cfg.dtype,
                                        cfg.base_config_dir, default_hypernet=self._default_hypernet)
        root = getattr(store, "root", None)  # a local store: artifacts pass through its temp area
        engine.scratch_dir = Path(root) / ".scratch" if root is not None else None
        self.core = ServiceCore(cfg, engine,
                                self.repo, self.metrics, auth_required=keyring is not None)
        self.state = ServerState(keyring, TenantRateLimiter(cfg.rate_limit_rps,
                                                            cfg.rate_limit_burst),
                                 max_message_bytes=cfg.max_message_bytes)
        self.health = health.aio.HealthServicer()
        self.server = aio.server(
            interceptors=[ServiceInterceptor(self.state, self.metrics)],
            options=[("grpc.max_receive_message_length",
                      GRPC_LIMIT_FACTOR * cfg.max_message_bytes),
                     ("grpc.max_send_message_length", cfg.max_message_bytes),
                     ("grpc.so_reuseport", 0)],
        )
        pb_grpc.add_PersonalizationServiceServicer_to_server(PersonalizationServicer(self.core),
                                                      self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, NOT_SERVING)
        self.port = self._bind()
        await self.server.start()
        if cfg.metrics_port >= 0:
            self.metrics_port = self.metrics.serve_http(cfg.metrics_host or cfg.host,
                                                        cfg.metrics_port)
        log.info("listening", extra={"address": f"{cfg.host}:{self.port}", "tls": cfg.tls,
                                     "metrics_port": self.metrics_port, "store": store.describe(),
                                     "auth": keyring is not None})
        self._ready = asyncio.create_task(self._load())
        self._sweeper = asyncio.create_task(self._sweep_loop())

    def _bind(self) -> int:
        cfg = self.cfg
        if cfg.tls:
            with open(cfg.tls_key, "rb") as k, open(cfg.tls_cert, "rb") as c:
                creds = grpc.ssl_server_credentials([(k.read(), c.read())])
            port = self.server.add_secure_port(cfg.bind_address, creds)
        else:
            port = self.server.add_insecure_port(cfg.bind_address)
        if not port:
            raise InvalidInputError(f"`port` must be free to bind, got {cfg.bind_address} in use")
        return port

    async def _load(self) -> None:
        t0 = time.perf_counter()
        await _in_daemon_thread(self.core.load, self.cfg.warmup)
        self.core.start()
        self.state.ready = True
        for name in ("", SERVICE_NAME):
            await self.health.set(name, SERVING)
        log.info("serving", extra={"base": self.core.engine.base_name,
                                   "device": self.core.engine.device,
                                   "load_s": round(time.perf_counter() - t0, 2)})

    async def wait_ready(self) -> None:
        """Return once SERVING; raise what loading raised."""
        await self._ready

    async def _sweep_loop(self) -> None:
        while True:
            try:
                n = await self.core.store_call(self.repo.sweep)
                self.metrics.identities.set(n)
                self.core.jobs.prune()
            except Exception as e:  # a store outage must not end the loop
                log.warning("identity sweep failed: %s", e)
            await asyncio.sleep(self.cfg.sweep_interval_s)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: refuse new calls, let accepted ones finish within `grace` s, then stop."""
        if self.state.draining:
            await self.stopped.wait()
            return
        grace = self.cfg.grace_s if grace is None else grace
        t0 = time.monotonic()
        self.state.draining = True
        await self.health.enter_graceful_shutdown()
        log.info("draining", extra={"inflight": self.state.inflight, "grace_s": grace})
        while (self.state.inflight > 0 or self.core.jobs.active()) and time.monotonic() - t0 < grace:
            await asyncio.sleep(0.05)
        if self.state.inflight > 0 or self.core.jobs.active():  # grace is over: stop the rest
            log.warning("grace period over; stopping unfinished work",
                        extra={"inflight": self.state.inflight,
                               "jobs": len(self.core.jobs.active())})
            self.core.abort_all("the server is shutting down")
        await self.server.stop(1.0)
        self._ready.cancel()
        self._sweeper.cancel()
        if self.state.ready:
            await self.core.drain(max(5.0, grace - (time.monotonic() - t0)))
        self.metrics.close()
        log.info("stopped", extra={"drain_s": round(time.monotonic() - t0, 2)})
        self.stopped.set()


async def run(cfg: ServeConfig, default_hypernet: Callable[[], str | Path] | None = None) -> int:
    """Serve until SIGTERM/SIGINT (graceful drain). Returns the process exit code."""
    server = HdbServer(cfg, default_hypernet=default_hypernet)
    await server.start()
    loop = asyncio.get_running_loop()
    stop_task: list[asyncio.Task] = []

    def on_signal(sig: signal.Signals) -> None:
        log.info("signal", extra={"signal": sig.name})
        if not stop_task:
            stop_task.append(loop.create_task(server.stop()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await asyncio.wait([server._ready])  # loaded, failed, or cancelled by a signal's stop()
    if not server._ready.cancelled() and server._ready.exception() is not None:
        log.error("loading the models failed", exc_info=server._ready.exception())
        await server.stop(0)
        return 1
    await server.stopped.wait()
    return 0


class BackgroundServer:
    """An `HdbServer` on its own event loop thread, for embedding in sync code and tests.

        with BackgroundServer(ServeConfig(port=0, metrics_port=-1)) as bg:
            HdbClient(f"localhost:{bg.port}").health()
    """

    def __init__(self, cfg: ServeConfig, *, engine: Engine | None = None,
                 store: Store | None = None, wait_ready: bool = True):
        import threading

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="hdb-server-loop",
                                        daemon=True)
        self._thread.start()
        self.server = HdbServer(cfg, engine=engine, store=store)
        try:
            self.call(self.server.start())
            if wait_ready:
                self.call(self.server.wait_ready())
        except BaseException:
            self.close()
            raise

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def target(self) -> str:
        return f"localhost:{self.port}"

    def call(self, coro, timeout: float | None = None):
        """Run `coro` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float | None = None) -> None:
        if not self.server.stopped.is_set() and hasattr(self.server, "state"):
            self.call(self.server.stop(grace))

    def close(self, grace: float | None = 0.0) -> None:
        try:
            self.stop(grace)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self.loop.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

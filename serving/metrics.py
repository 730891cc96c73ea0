"""Prometheus metrics of one server, on their own registry (tests run several servers at once).

Exposed over HTTP by `serve_http` (`/metrics`, prometheus_client's text format):
    hdb_requests_total{method,code}      RPCs by method and final status code
    hdb_request_seconds{method}          RPC latency
    hdb_stage_seconds{stage}             queue wait, decode, personalisation stages, batches
    hdb_queue_depth                      queued work items (images + personalisations)
    hdb_batch_size                       images per UNet batch
    hdb_identities_stored                identities in the store (updated by the sweeper)
    hdb_inflight_requests                RPCs being served
    hdb_jobs{state}                      personalisation jobs remembered, by state
    hdb_gpu_memory_bytes{kind}           allocated / reserved (only on a GPU)
    hdb_pipeline_repairs_total{action}   jobs that left the shared pipeline modified, by what
                                         fixed it ("repaired" in place, or "reloaded")
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import start_http_server as _start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                    900)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter("hdb_requests", "RPCs by method and status code",
                                ["method", "code"], registry=r)
        self.latency = Histogram("hdb_request_seconds", "RPC latency", ["method"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("hdb_stage_seconds", "time per stage of the work", ["stage"],
                               buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("hdb_queue_depth", "queued work items", registry=r)
        self.batch_size = Histogram("hdb_batch_size", "images per UNet batch",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.identities = Gauge("hdb_identities_stored", "identities in the store", registry=r)
        self.inflight = Gauge("hdb_inflight_requests", "RPCs being served", registry=r)
        self.jobs = Gauge("hdb_jobs", "personalisation jobs remembered", ["state"], registry=r)
        self.gpu_memory = Gauge("hdb_gpu_memory_bytes", "GPU memory of the model worker",
                                ["kind"], registry=r)
        self.pipeline_repairs = Counter(
            "hdb_pipeline_repairs", "jobs that left the shared pipeline modified",
            ["action"], registry=r)
        self._http = None

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.stage.labels("generate_batch").observe(seconds)

    def watch_gpu(self, read: Callable[[], dict[str, float]]) -> None:
        """Report `read()` (kind -> bytes) at every scrape."""
        for kind in ("allocated", "reserved"):
            self.gpu_memory.labels(kind).set_function(lambda k=kind: read().get(k, 0.0))

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics HTTP server (daemon thread). Returns the bound port."""
        self._http, _ = _start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def text(self) -> str:
        return generate_latest(self.registry).decode()

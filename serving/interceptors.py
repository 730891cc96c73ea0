"""The one server interceptor: request id, auth, readiness/drain, error -> status, metrics, logs.

Every RPC handler is wrapped here, so handlers contain no cross-cutting code:
1. a request id (the caller's `x-request-id` when well-formed, else a new one) goes into a
   contextvar for logs and back to the caller as initial metadata;
2. health and reflection pass freely; every other call must be ready (models loaded), not
   draining, and carry a valid `authorization: Bearer KEY` (-> tenant contextvar), unless dev mode;
3. exceptions map to status codes through one table (`status_for`), RESOURCE_EXHAUSTED from a
   full queue with trailing metadata `retry-after-ms`; unexpected ones become INTERNAL with the
   request id, their traceback only in the log;
4. every call is counted and timed per method and final code, and logged once, without payloads.
A request that fails to parse (e.g. invalid UTF-8 in a string field) becomes INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import time
import uuid
from dataclasses import dataclass

import grpc
from grpc import aio

import hypernet.errors
from hypernet.errors import (
    EnvironmentProblem,
    InvalidInputError,
    ModelNotFoundError,
    NotFoundError,
)
from serving.auth import DEV_TENANT, KeyRing
from serving.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    QueueFull,
    Unauthenticated,
    Unavailable,
)
from serving.logs import request_id_var, tenant_var
from serving.metrics import Metrics
from serving.ratelimit import TenantRateLimiter

log = logging.getLogger("serving.rpc")

_OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

S = grpc.StatusCode
#: Exception class -> status code; the first matching entry wins (subclasses before bases).
STATUS_TABLE: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (Unauthenticated, S.UNAUTHENTICATED),
    (QueueFull, S.RESOURCE_EXHAUSTED),
    (Cancelled, S.CANCELLED),
    (hypernet.errors.Cancelled, S.CANCELLED),  # the library's stop on should_stop()
    (DeadlineExceeded, S.DEADLINE_EXCEEDED),
    (Unavailable, S.UNAVAILABLE),
    (FailedPrecondition, S.FAILED_PRECONDITION),
    (InvalidInputError, S.INVALID_ARGUMENT),  # incl. ImageDecodeError, ImageTooLargeError
    (NotFoundError, S.NOT_FOUND),
    (ModelNotFoundError, S.FAILED_PRECONDITION),
    (EnvironmentProblem, S.FAILED_PRECONDITION),
    (ModuleNotFoundError, S.UNIMPLEMENTED),
]



def status_for(exc: BaseException, request_id: str | None = None) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception raised by a handler.

    `request_id`: the id an INTERNAL error's traceback was logged under (default: this call's;
    a job's error read by GetJob names the call that started the job).
    """
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without torch
        return S.RESOURCE_EXHAUSTED, "the model worker ran out of GPU memory; retry later"
    for cls, code in STATUS_TABLE:
        if isinstance(exc, cls):
            if cls is ModuleNotFoundError:
                return code, f"this server build lacks a model component ({exc.name})"
            return code, str(exc) or cls.__name__
    rid = request_id or request_id_var.get()
    return S.INTERNAL, f"internal error (request id {rid}); see the server log"


@dataclass
class ServerState:
    """What the interceptor needs to know about the server, updated by `serving.server`."""

    keyring: KeyRing | None  # None: dev mode, every caller is tenant `dev`
    limiter: TenantRateLimiter | None = None
    ready: bool = False
    draining: bool = False
    inflight: int = 0
    #: Largest request accepted (the documented limit); gRPC itself accepts up to
    #: GRPC_LIMIT_FACTOR x this, so that a request in between is our INVALID_ARGUMENT naming the
    #: field instead of gRPC's RESOURCE_EXHAUSTED (which clients must read as "try later").
    max_message_bytes: int = 0


#: gRPC's own receive limit is this many times `max_message_bytes` (memory stays bounded).
GRPC_LIMIT_FACTOR = 4


def check_size(request, limit: int) -> None:
    """INVALID_ARGUMENT naming the largest field when `request` is over `limit` bytes."""
    size = request.ByteSize()
    if not limit or size <= limit:
        return
    fields = [(len(v) if isinstance(v, (bytes, str)) else getattr(v, "ByteSize", lambda: 0)(),
               f.name) for f, v in request.ListFields()]
    name = max(fields)[1] if fields else "request"
    raise InvalidInputError(f"`{name}` must keep the request within max_message_bytes={limit} "
                            f"bytes, got a request of {size} bytes")


class _BadRequest:
    def __init__(self, exc: Exception):
        self.exc = exc


def _safe_deserializer(deserialize):
    def wrapped(data: bytes):
        try:
            return deserialize(data)
        except Exception as e:  # protobuf DecodeError: bad wire data or invalid UTF-8
            return _BadRequest(e)

    return wrapped if deserialize is not None else None


class ServiceInterceptor(aio.ServerInterceptor):
    def __init__(self, state: ServerState, metrics: Metrics):
        self.state = state
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        open_ = method.startswith(_OPEN_PREFIXES)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, open_),
                _safe_deserializer(handler.request_deserializer), handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, open_),
                _safe_deserializer(handler.request_deserializer), handler.response_serializer)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(handler.stream_stream, method, open_),
                handler.request_deserializer, handler.response_serializer)
        return grpc.stream_unary_rpc_method_handler(
            self._wrap_unary(handler.stream_unary, method, open_),
            handler.request_deserializer, handler.response_serializer)

    # ------------------------------------------------------------------ per call
    async def _enter(self, request, context, method: str, open_: bool) -> None:
        md = {k: v for k, v in (context.invocation_metadata() or ())}
        rid = md.get("x-request-id", "")
        request_id_var.set(rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex[:16])
        tenant_var.set("")
        if isinstance(request, _BadRequest):
            raise InvalidInputError(
                f"request must be a valid {method.rsplit('/', 1)[-1]} message (strings must be "
                f"UTF-8), got unparseable bytes ({type(request.exc).__name__})"
            )
        if not open_:
            check_size(request, self.state.max_message_bytes)
            # Checked before the initial metadata goes out, with no await in between: a client
            # that has the metadata knows its call was admitted, and a drain (counting it in
            # flight since _begin) lets it finish. Checked after, a SIGTERM landing during the
            # send refused a call the client already saw as accepted.
            if self.state.draining:
                raise Unavailable("the server is shutting down; retry on another replica")
            if not self.state.ready:
                raise Unavailable("the server is still loading its models; retry shortly "
                                  "(grpc.health.v1 reports SERVING when ready)")
        await context.send_initial_metadata((("x-request-id", request_id_var.get()),))
        if open_:
            return
        if self.state.keyring is None:
            tenant_var.set(DEV_TENANT)
        else:
            tenant_var.set(self.state.keyring.tenant_for(md.get("authorization")))
        if self.state.limiter is not None:
            self.state.limiter.acquire(tenant_var.get())

    async def _fail(self, exc: BaseException, context) -> grpc.StatusCode:
        code, message = status_for(exc)
        if code == S.INTERNAL:
            log.error("unhandled error", exc_info=exc)
        if isinstance(exc, QueueFull):
            context.set_trailing_metadata((("retry-after-ms", str(exc.retry_after_ms)),))
        await context.abort(code, message)
        return code  # unreachable: abort raises

    def _cancel_code(self, context) -> grpc.StatusCode:
        left = context.time_remaining()
        return S.DEADLINE_EXCEEDED if left is not None and left <= 0 else S.CANCELLED

    def _exit(self, method: str, code: grpc.StatusCode, t0: float, open_: bool) -> None:
        seconds = time.perf_counter() - t0
        name = method.lstrip("/")
        self.metrics.requests.labels(name, code.name).inc()
        self.metrics.latency.labels(name).observe(seconds)
        if not open_:
            self.metrics.inflight.dec()
            self.state.inflight -= 1
        level = logging.DEBUG if name.startswith("grpc.") and code == S.OK else logging.INFO
        log.log(level, "rpc", extra={"rpc": name, "code": code.name, "ms": round(seconds * 1e3, 1)})

    def _begin(self, open_: bool) -> float:
        """Count the call (not health/reflection: a Health.Watch stream never ends by itself and
        must not hold up a drain)."""
        if not open_:
            self.state.inflight += 1
            self.metrics.inflight.inc()
        return time.perf_counter()

    def _wrap_unary(self, behavior, method: str, open_: bool):
        async def wrapper(request, context):
            t0, code = self._begin(open_), S.OK
            try:
                await self._enter(request, context, method, open_)
                return await behavior(request, context)
            except aio.AbortError:
                code = context.code() or S.UNKNOWN
                raise
            except asyncio.CancelledError:
                code = self._cancel_code(context)
                raise
            except Exception as e:
                code = status_for(e)[0]
                await self._fail(e, context)
            finally:
                self._exit(method, code, t0, open_)

        return wrapper

    def _wrap_stream(self, behavior, method: str, open_: bool):
        if not inspect.isasyncgenfunction(behavior):  # writes with context.write (health Watch)
            return self._wrap_unary(behavior, method, open_)

        async def wrapper(request, context):
            t0, code = self._begin(open_), S.OK
            try:
                await self._enter(request, context, method, open_)
                # aclosing: the handler's own cleanup (cancel its work) runs now, not at GC
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response
            except aio.AbortError:
                code = context.code() or S.UNKNOWN
                raise
            except (asyncio.CancelledError, GeneratorExit):
                code = self._cancel_code(context)
                raise
            except Exception as e:
                code = status_for(e)[0]
                await self._fail(e, context)
            finally:
                self._exit(method, code, t0, open_)

        return wrapper

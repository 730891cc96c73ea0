"""Errors only the service raises; `serving.interceptors` maps them (and hypernet.errors) to codes.

Each class names its gRPC status code so the mapping stays in one table.
"""

from __future__ import annotations

from hypernet.errors import HdbError


class ServiceError(HdbError):
    """Base of the service's own errors."""


class Unauthenticated(ServiceError):
    """Missing, malformed or unknown API key. -> UNAUTHENTICATED."""


class QueueFull(ServiceError):
    """The bounded work queue cannot take this request now. -> RESOURCE_EXHAUSTED + retry hint."""

    def __init__(self, message: str, retry_after_ms: int):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class RateLimited(QueueFull):
    """The tenant's request rate is over its limit. -> RESOURCE_EXHAUSTED + retry hint."""


class Cancelled(ServiceError):
    """The call or job was cancelled; work stopped at its next step. -> CANCELLED."""


class DeadlineExceeded(ServiceError):
    """The call's deadline passed; work stopped at its next step. -> DEADLINE_EXCEEDED."""


class Unavailable(ServiceError):
    """Not serving right now (loading, draining) or a dependency is down. -> UNAVAILABLE."""


class StoreUnavailable(Unavailable):
    """The identity store (S3 endpoint, disk) failed; retry later. -> UNAVAILABLE."""


class FailedPrecondition(ServiceError):
    """The request is valid but the server cannot run it (e.g. a method not available)."""

"""Personalisation jobs: state, progress fan-out to watchers, cancellation, retention.

Every personalisation is a job, so one code path serves both kinds:
- foreground (fast methods): the Personalize call watches its job and cancels it when the call
  ends early (client cancel, deadline) - work stops at the next step;
- background (slow methods, or `options.background`): the job outlives its call; any call of
  the same tenant may `WatchJob` (re-attach), `GetJob` or `CancelJob` it.

Jobs live in this process's memory (they are minutes long; identities, the durable output, go
to the store). Every method here runs on the event loop; the worker thread reports progress
through `report_progress`, which hops onto the loop.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import hypernet.errors
from hypernet.errors import NotFoundError
from serving.cancel import CancelToken
from serving.errors import Cancelled, DeadlineExceeded
from serving.identities import IdentityRecord, check_name

#: A slow watcher gets coalesced progress: beyond this many pending events the oldest are dropped.
MAX_PENDING_EVENTS = 256
_DONE = object()
#: Errors meaning "stopped on request" (cancel, deadline, shutdown) -> state CANCELLED.
_STOPPED = (Cancelled, DeadlineExceeded, asyncio.CancelledError, hypernet.errors.Cancelled)

STATES = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")


@dataclass(frozen=True)
class ProgressInfo:
    stage: str
    step: int
    total: int
    loss: float | None = None


@dataclass(eq=False)
class Job:
    id: str
    tenant: str
    method: str
    background: bool
    token: CancelToken
    state: str = "QUEUED"
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    queue_position: int = 0
    progress: ProgressInfo | None = None
    record: IdentityRecord | None = None
    loaded: Any = None  # the in-memory personalisation (PersonalizeAndGenerate reuses it)
    error: BaseException | None = None
    task: asyncio.Task | None = None
    item: Any = None  # its WorkItem in the model worker's queue
    request_id: str = ""  # of the call that started it: its errors are logged under this id
    watchers: set[asyncio.Queue] = field(default_factory=set)

    @property
    def done(self) -> bool:
        return self.state in ("SUCCEEDED", "FAILED", "CANCELLED")


class JobManager:
    def __init__(self, retention_s: float = 3600.0, max_jobs: int = 1000, on_change=None):
        self.retention_s = retention_s
        self.max_jobs = max_jobs
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_change = on_change or (lambda counts: None)

    def create(self, tenant: str, method: str, background: bool, token: CancelToken,
               request_id: str = "") -> Job:
        self._loop = asyncio.get_running_loop()
        self.prune()
        job = Job(secrets.token_hex(16), tenant, method, background, token,
                  request_id=request_id)
        self._jobs[job.id] = job
        self._changed()
        return job

    def forget(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        self._changed()

    def get(self, tenant: str, job_id: str) -> Job:
        """The tenant's job; another tenant's (or an unknown / forgotten) id is NotFoundError."""
        check_name("job_id", job_id)
        job = self._jobs.get(job_id)
        if job is None or job.tenant != tenant:
            raise NotFoundError(
                f"job {job_id!r} not found: unknown to this server for this API key, or finished "
                f"more than {self.retention_s:.0f} s ago (its identity, if any, is in "
                "ListIdentities)"
            )
        return job

    def scrub_identity(self, tenant: str, identity_id: str) -> None:
        """Forget a deleted identity in finished jobs (its weights and its metadata)."""
        for job in self._jobs.values():
            if job.tenant == tenant and job.record is not None and job.record.id == identity_id:
                job.record, job.loaded = None, None

    def active(self) -> list[Job]:
        return [j for j in self._jobs.values() if not j.done]

    # ------------------------------------------------------------------ updates
    def report_progress(self, job: Job, info: ProgressInfo) -> None:
        """Thread-safe: called from the model worker at every step."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._publish, job, info)

    def report_running(self, job: Job) -> None:
        """Thread-safe: the worker started the job."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._set_running, job)

    def _set_running(self, job: Job) -> None:
        if job.state == "QUEUED":
            job.state = "RUNNING"
            self._changed()

    def _publish(self, job: Job, info: ProgressInfo) -> None:
        if job.done:
            return
        self._set_running(job)
        job.progress = info
        for q in job.watchers:
            if q.qsize() >= MAX_PENDING_EVENTS:
                q.get_nowait()
            q.put_nowait(info)

    def finish(self, job: Job, record: IdentityRecord | None = None, loaded: Any = None,
               error: BaseException | None = None) -> None:
        if job.done:
            return
        job.finished_at = time.time()
        # weights stay in memory only for the call that will generate with them right away
        job.record, job.loaded, job.error = record, None if job.background else loaded, error
        if error is None:
            job.state = "SUCCEEDED"
        elif isinstance(error, _STOPPED):
            job.state = "CANCELLED"
        else:
            job.state = "FAILED"
        for q in job.watchers:
            q.put_nowait(_DONE)
        self._changed()

    # ------------------------------------------------------------------ watching
    async def watch(self, job: Job) -> AsyncIterator[ProgressInfo | IdentityRecord]:
        """The latest progress, further progress, then the IdentityRecord (or the job's error)."""
        q: asyncio.Queue = asyncio.Queue()
        job.watchers.add(q)
        try:
            if job.progress is not None and not job.done:
                yield job.progress
            while not job.done:
                item = await q.get()
                if item is _DONE:
                    break
                yield item
            if job.error is not None:
                raise job.error
            if job.record is None:
                raise NotFoundError(f"job {job.id!r} made an identity that was since deleted")
            yield job.record
        finally:
            job.watchers.discard(q)

    # ------------------------------------------------------------------ housekeeping
    def prune(self) -> None:
        """Forget finished jobs past retention, then the oldest finished ones above max_jobs."""
        now = time.time()
        for job_id, job in list(self._jobs.items()):
            if job.done and job.finished_at is not None and now - job.finished_at > self.retention_s:
                del self._jobs[job_id]
        finished = [j for j in self._jobs.values() if j.done]
        excess = len(self._jobs) - self.max_jobs + 1
        for job in finished[:max(0, excess)]:
            del self._jobs[job.id]

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no job is running or queued. True when idle within `timeout`."""
        tasks = [j.task for j in self.active() if j.task is not None]
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        return not pending

    def _changed(self) -> None:
        counts = dict.fromkeys(STATES, 0)
        for j in self._jobs.values():
            counts[j.state] += 1
        self._on_change(counts)

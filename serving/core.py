"""`ServiceCore`: what the service does, independent of protobuf.

It owns the engine, the work queue and model worker, the identity repository and the jobs, and
exposes async operations the servicer calls. Model work goes to the worker thread through the
bounded queue; store I/O runs on its own threads (`store_call`), image codecs in
`asyncio.to_thread`; the event loop only coordinates.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from serving.batching import BatchPolicy, GenWork
from serving.cancel import CancelToken
from serving.config import ServeConfig
from serving.engine import Engine, Loaded
from serving.errors import FailedPrecondition, Unavailable
from serving.identities import IdentityRecord, IdentityRepository, new_identity_id
from serving.imaging import encode_image
from serving.jobs import Job, JobManager, ProgressInfo
from serving.logs import request_id_var
from serving.metrics import Metrics
from serving.queue.worker import ModelWorker, WorkItem, WorkQueue
from serving.validation import GenerateSpec, PersonalizeSpec

log = logging.getLogger(__name__)

#: Concurrent photo decodes (each may hold up to max_pixels * 3 bytes): bounded memory.
MAX_CONCURRENT_DECODES = 2
#: Threads for identity-store I/O, apart from asyncio's default pool (photo decode, image
#: encode): a hung S3 endpoint then stalls store calls only. Sharing the default pool, 10 hung
#: GetIdentity calls stalled even Generate on the bare base (found by reliability fault injection).
STORE_THREADS = 8


@dataclass
class FollowUp:
    """The images a PersonalizeAndGenerate call wants once its identity exists: the worker makes
    (and queues, first in line) their work items right after the personalisation."""

    specs: list[GenerateSpec]
    token: CancelToken
    items: list[list[WorkItem]] = field(default_factory=list)  # per spec; set by the worker

    def close(self, queue: WorkQueue) -> None:
        """The call is over: stop its running images, drop its queued ones."""
        self.token.cancel("the call ended")
        queue.discard([i for items in self.items for i in items])


@dataclass
class GeneratedImage:
    index: int
    seed: int
    data: bytes
    format: str
    width: int
    height: int


class ServiceCore:
    def __init__(self, cfg: ServeConfig, engine: Engine, repo: IdentityRepository,
                 metrics: Metrics, auth_required: bool = True):
        self.cfg = cfg
        self.auth_required = auth_required
        self.engine = engine
        self.repo = repo
        self.metrics = metrics
        self.queue = WorkQueue(cfg.queue_size, cfg.retry_after_ms,
                               on_depth=metrics.queue_depth.set)
        self.worker = ModelWorker(
            self.queue, engine.generate,
            BatchPolicy(cfg.max_batch, cfg.max_wait_ms / 1000.0),
            on_batch=metrics.observe_batch,
            on_queue_wait=metrics.stage.labels("queue_wait").observe,
            after_task=self._check_pipeline,
        )
        self.jobs = JobManager(cfg.job_retention_s, cfg.max_jobs, on_change=self._job_counts)
        self._decodes = asyncio.Semaphore(MAX_CONCURRENT_DECODES)
        self._store_io = concurrent.futures.ThreadPoolExecutor(STORE_THREADS,
                                                               thread_name_prefix="hdb-store")

    async def store_call(self, fn, *args):
        """`fn(*args)` (a blocking store/repository call) on the store's own threads."""
        return await asyncio.get_running_loop().run_in_executor(self._store_io,
                                                                functools.partial(fn, *args))

    def _check_pipeline(self) -> None:
        """After every job (worker thread): the shared pipeline must be the base again."""
        if self.engine.pipe is None:
            return
        problems, action = self.engine.restore_base()
        if problems:
            self.metrics.pipeline_repairs.labels(action).inc()
            log.error("THE LAST JOB LEFT THE SHARED PIPELINE MODIFIED; %s it before the next job: %s",
                      action, "; ".join(problems), extra={"action": action})

    def _job_counts(self, counts: dict[str, int]) -> None:
        for state, n in counts.items():
            self.metrics.jobs.labels(state).set(n)

    # ------------------------------------------------------------------ lifecycle
    def load(self, warmup: bool) -> None:
        """Load (and warm up) the models. Blocking: run it in a thread before start()."""
        t0 = time.perf_counter()
        self.engine.load()
        self.metrics.stage.labels("load").observe(time.perf_counter() - t0)
        if warmup:
            t0 = time.perf_counter()
            self.engine.warmup()
            self.metrics.stage.labels("warmup").observe(time.perf_counter() - t0)
        self.metrics.watch_gpu(self.engine.gpu_memory)

    def start(self) -> None:
        self.worker.start()

    def abort_all(self, reason: str) -> None:
        """Stop every job at its next step and fail every queued item (shutdown past grace)."""
        for job in self.jobs.active():
            job.token.cancel(reason)
        self.queue.abort_all(Unavailable(f"{reason}; retry on another replica"))

    async def drain(self, timeout: float) -> bool:
        """Let queued and running jobs finish (<= timeout), then stop the worker."""
        t0 = time.monotonic()
        idle = await self.jobs.wait_idle(timeout)
        left = max(0.0, timeout - (time.monotonic() - t0))
        stopped = await asyncio.to_thread(self.worker.stop, left)
        self._store_io.shutdown(wait=False, cancel_futures=True)
        return idle and stopped

    # ------------------------------------------------------------------ personalise
    async def decode(self, photo: bytes, field: str = "photo"):
        """One photo -> a decoded image; `field` ("photos[2]") names it in errors."""
        async with self._decodes:
            t0 = time.perf_counter()
            img = await asyncio.to_thread(self.engine.decode_photo, photo, self.cfg.max_pixels,
                                          field)
            self.metrics.stage.labels("decode").observe(time.perf_counter() - t0)
            return img

    async def start_personalize(self, tenant: str, spec: PersonalizeSpec,
                                deadline: float | None, follow_up: FollowUp | None = None) -> Job:
        """Decode, queue and track a personalisation; returns its job at once.

        Foreground jobs carry the call's deadline; background ones run until done or cancelled.
        With `follow_up` (PersonalizeAndGenerate), its images are queued by the worker the moment
        the identity is ready, ahead of everything queued: a caller's images do not wait behind
        personalisations that arrived after it (no head-of-line blocking). They are consumed
        with `follow_up_images`.

        Raises:
            InvalidInputError (bad photo), QueueFull, Unavailable (draining),
            FailedPrecondition (a method the base's family does not support: no job is made).
        """
        t_start = time.perf_counter()
        self.engine.check_supported(spec.method)
        self.queue.check_room(1)  # before paying for the decode
        # One after another: the decode semaphore bounds memory per photo, and the first bad
        # photo is the one the error names.
        images = [await self.decode(p, spec.photo_name(k)) for k, p in enumerate(spec.photos)]
        t_decoded = time.perf_counter()
        token = CancelToken(None if spec.background else deadline)
        job = self.jobs.create(tenant, spec.method, spec.background, token,
                               request_id=request_id_var.get())

        def run():
            self.jobs.report_running(job)

            def progress(stage: str, step: int, total: int, loss: float | None) -> None:
                token.check()  # raising inside the library's loop stops it at this step
                self.jobs.report_progress(job, ProgressInfo(stage, step, total, loss))

            result = self.engine.personalize(images, spec.method, spec.options, progress,
                                             lambda: token.stopped)
            if follow_up is not None and not token.stopped:
                follow_up.items = [self._image_items(s, result.loaded, follow_up.token)
                                   for s in follow_up.specs]
                self.queue.put_front([i for items in follow_up.items for i in items])
            return result

        item = job.item = WorkItem(token=token, fn=run)
        try:
            job.queue_position = self.queue.put_all([item])
        except BaseException:
            self.jobs.forget(job)
            raise
        job.task = asyncio.create_task(self._complete(job, item, spec, t_start, t_decoded))
        return job

    def cancel(self, job: Job, reason: str) -> None:
        """Stop a job: its queued work leaves the queue now, running work at its next step."""
        job.token.cancel(reason)
        if job.item is not None:
            self.queue.discard([job.item])

    async def _complete(self, job: Job, item: WorkItem, spec: PersonalizeSpec, t_start: float,
                        t_decoded: float) -> None:
        try:
            result = await asyncio.wrap_future(item.future)
            if job.token.stopped and not job.background:
                raise job.token.error()  # the caller left while the last step ran: keep nothing
            # the library's stages, its own "total" renamed: "total" here is the whole call
            timings = {("personalize" if k == "total" else k): float(v)
                       for k, v in result.timings.items()}
            timings["decode"] = t_decoded - t_start
            if item.started_at is not None:
                timings["queue"] = item.started_at - item.enqueued_at
            timings["total"] = time.perf_counter() - t_start  # + the store write, added by save
            record = IdentityRecord(
                id=new_identity_id(), tenant=job.tenant, method=spec.method, artifact_bytes=0,
                created_at=time.time(), timings=timings, base_fingerprint=self.engine.fingerprint,
                token=spec.options.token, class_noun=spec.options.class_noun,
            )
            await self.store_call(self.repo.save, record, result.blob)
            self.metrics.identities.inc()
            for stage, seconds in timings.items():
                self.metrics.stage.labels(f"personalize.{stage}").observe(seconds)
            log.info("identity created", extra={"identity_id": record.id, "method": spec.method,
                                                 "artifact_bytes": record.artifact_bytes,
                                                 "job_id": job.id})
        except BaseException as e:
            self.queue.discard([item])
            self.jobs.finish(job, error=e)
            if not isinstance(e, Exception):
                raise
            return
        self.jobs.finish(job, record=record, loaded=result.loaded)

    # ------------------------------------------------------------------ identities
    async def load_identity(self, tenant: str, identity_id: str) -> tuple[IdentityRecord, Loaded]:
        record, loaded = await self.store_call(
            self.repo.load, tenant, identity_id,
            lambda rec, blob: self.engine.load_identity(blob, rec.method),
        )
        if record.base_fingerprint and record.base_fingerprint != self.engine.fingerprint:
            raise FailedPrecondition(
                f"identity {identity_id!r} must be used with the base it was made for "
                f"(fingerprint {record.base_fingerprint}), got a server with base "
                f"{self.engine.fingerprint}"
            )
        return record, loaded

    async def delete_identity(self, tenant: str, identity_id: str) -> IdentityRecord:
        record = await self.store_call(self.repo.delete, tenant, identity_id)
        self.jobs.scrub_identity(tenant, identity_id)
        self.metrics.identities.dec()
        log.info("identity deleted", extra={"identity_id": identity_id})
        return record

    async def export(self, tenant: str, identity_id: str, fmt: str) -> tuple[bytes, str]:
        """(file bytes, format) of an identity; `fmt` "" = its method's default format."""
        _, loaded = await self.load_identity(tenant, identity_id)
        data, fmt = await asyncio.to_thread(self.engine.export, loaded, fmt)
        if len(data) > self.cfg.max_message_bytes - 1024:
            raise FailedPrecondition(
                f"the exported file must fit in max_message_bytes={self.cfg.max_message_bytes}, "
                f"got {len(data)} bytes"
            )
        return data, fmt

    # ------------------------------------------------------------------ generate
    def _image_items(self, spec: GenerateSpec, loaded: Loaded | None,
                     token: CancelToken) -> list[WorkItem]:
        """spec.n work items (seeds seed..seed+n-1), not queued yet."""
        works = [GenWork(spec.prompt, spec.negative_prompt, spec.seed + i, spec.steps,
                         spec.guidance, spec.height, spec.width, identity=loaded)
                 for i in range(spec.n)]
        for w in works:
            w.batch_key = self.engine.batch_key(w, loaded)
        return [WorkItem(token=token, gen=w) for w in works]

    async def generate(self, spec: GenerateSpec, loaded: Loaded | None, deadline: float | None,
                       ) -> AsyncIterator[GeneratedImage]:
        """Queue spec.n images (seeds seed..seed+n-1); yield each as soon as it is encoded.

        If the consumer stops early (cancel, deadline, error), queued images are dropped and
        running batches stop at their next step.
        """
        token = CancelToken(deadline)
        items = self._image_items(spec, loaded, token)
        self.queue.put_all(items)
        try:
            async for img in self._stream(spec, items):
                yield img
        finally:
            token.cancel("the call ended")  # a running batch of only our images stops

    async def follow_up_images(self, follow_up: FollowUp
                               ) -> AsyncIterator[tuple[int, GeneratedImage]]:
        """(prompt index, image) of a finished personalisation's follow-up, prompt by prompt."""
        try:
            for k, (spec, items) in enumerate(zip(follow_up.specs, follow_up.items, strict=True)):
                async for img in self._stream(spec, items):
                    yield k, img
        finally:
            follow_up.close(self.queue)

    async def _stream(self, spec: GenerateSpec, items: list[WorkItem]
                      ) -> AsyncIterator[GeneratedImage]:
        """Encode and yield queued images as they finish; drop the rest if the consumer stops."""
        pending = {asyncio.wrap_future(i.future): k for k, i in enumerate(items)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in sorted(done, key=pending.__getitem__):
                    k = pending.pop(fut)
                    img = fut.result()
                    t0 = time.perf_counter()
                    data = await asyncio.to_thread(encode_image, img, spec.format)
                    self.metrics.stage.labels("encode").observe(time.perf_counter() - t0)
                    yield GeneratedImage(k, spec.seed + k, data, spec.format, img.width,
                                         img.height)
        finally:
            for fut in pending:  # nobody will read these now
                if not fut.cancel() and not fut.cancelled():
                    fut.exception()  # retrieved: no "never retrieved" warning
            self.queue.discard(items)

"""The model worker: one thread that owns the pipeline, fed by one bounded queue.

Why one thread: a diffusion pipeline (and its adapters) is not re-entrant, and on one GPU
concurrent kernels only fight for memory. Requests never run model code on the event loop;
they enqueue `WorkItem`s and await their futures. The queue is bounded: when full, `put`
raises QueueFull at once (the RPC answers RESOURCE_EXHAUSTED with a retry hint) instead of
building a backlog no one will wait for.

Generate images are batched here: the worker takes the oldest item and, when it is an image,
pulls every compatible queued image (see `serving.batching`) up to `max_batch`, waiting at most
`max_wait_s` for more to arrive.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from serving.batching import BatchPolicy, GenWork, take_compatible
from serving.cancel import CancelToken
from serving.errors import QueueFull, Unavailable

log = logging.getLogger(__name__)


@dataclass(eq=False)
class WorkItem:
    """A task (`fn` run on the worker thread) or one image (`gen`)."""

    token: CancelToken
    fn: Callable[[], Any] | None = None
    gen: GenWork | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class WorkQueue:
    """A bounded FIFO that lets the worker pull compatible images out of order."""

    def __init__(self, capacity: int, retry_after_ms: int = 1000,
                 on_depth: Callable[[int], None] | None = None):
        self.capacity = capacity
        self.retry_after_ms = retry_after_ms
        self._items: list[WorkItem] = []
        self._cond = threading.Condition()
        self._closed = False
        self._on_depth = on_depth or (lambda n: None)

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def check_room(self, n: int) -> None:
        """Raise what `put_all` of `n` items would raise now (a cheap early refusal)."""
        with self._cond:
            self._refuse_unless_room(n)

    def _refuse_unless_room(self, n: int) -> None:
        if self._closed:
            raise Unavailable("the server is shutting down; retry on another replica")
        if n > self.capacity - len(self._items):
            raise QueueFull(
                f"the work queue is full ({len(self._items)}/{self.capacity} queued, "
                f"{n} more asked); retry after the hint in `retry-after-ms`",
                self.retry_after_ms,
            )

    def put_all(self, items: list[WorkItem]) -> int:
        """Enqueue all of `items` or none. Returns the queue position of the first one.

        Raises:
            QueueFull: fewer than len(items) free places.
            Unavailable: the queue is closed (server draining).
        """
        with self._cond:
            self._refuse_unless_room(len(items))
            position = len(self._items)
            self._items.extend(items)
            self._on_depth(len(self._items))
            self._cond.notify_all()
            return position

    def put_front(self, items: list[WorkItem]) -> None:
        """Enqueue `items` ahead of everything queued (the follow-up images of a call whose
        personalisation just finished). Never refused: the call was admitted already, and its
        follow-up is bounded by max_prompts x max_images; a closed (draining) queue still runs
        it, since the worker finishes what is queued."""
        with self._cond:
            self._items[0:0] = items
            self._on_depth(len(self._items))
            self._cond.notify_all()

    def discard(self, items: list[WorkItem]) -> None:
        """Drop still-queued `items` (their caller is gone), freeing their places at once;
        their futures fail with their token's error."""
        drop = set(map(id, items))
        with self._cond:
            removed = [i for i in self._items if id(i) in drop]
            self._items = [i for i in self._items if id(i) not in drop]
            self._on_depth(len(self._items))
        for item in removed:
            item.token.cancel("removed from the queue")
            item.fail(item.token.error())

    def abort_all(self, exc: BaseException) -> None:
        """Close the queue and fail every queued item with `exc`."""
        with self._cond:
            self._closed = True
            items, self._items = self._items, []
            self._on_depth(0)
            self._cond.notify_all()
        for item in items:
            item.token.cancel("aborted")
            item.fail(exc)

    def take(self) -> WorkItem | None:
        """The oldest item (blocking); None once closed and empty."""
        with self._cond:
            while not self._items:
                if self._closed:
                    return None
                self._cond.wait()
            item = self._items.pop(0)
            self._on_depth(len(self._items))
            return item

    def take_compatible(self, key, limit: int, wait_s: float) -> list[WorkItem]:
        """Up to `limit` queued images compatible with `key`, waiting <= `wait_s` to fill up."""
        def key_of(i: WorkItem):
            return i.gen.batch_key if i.gen is not None else None

        chosen: list[WorkItem] = []
        deadline = time.monotonic() + wait_s
        with self._cond:
            while True:
                more, key = take_compatible(self._items, key, limit - len(chosen), key_of)
                chosen += more
                left = deadline - time.monotonic()
                if len(chosen) >= limit or left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            self._on_depth(len(self._items))
        return chosen

    def close(self) -> None:
        """Refuse new items; the worker still finishes the queued ones."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class ModelWorker:
    """Runs queued work on one thread.

    `generate(works, should_stop) -> images` runs one batch; `should_stop()` turns True when
    every caller of the batch is gone (then the batch stops at its next step).
    """

    def __init__(
        self,
        queue: WorkQueue,
        generate: Callable[[list[GenWork], Callable[[], bool]], list[Any]],
        policy: BatchPolicy,
        on_batch: Callable[[int, float], None] | None = None,
        on_queue_wait: Callable[[float], None] | None = None,
        after_task: Callable[[], None] | None = None,
    ):
        self.queue = queue
        self._generate = generate
        self.policy = policy
        self._on_batch = on_batch or (lambda n, s: None)
        self._on_queue_wait = on_queue_wait or (lambda s: None)
        #: Run after every task (a personalisation job) and every failed batch, whatever the
        #: outcome: the check that the shared pipeline is the base again (`PipelineGuard`).
        self._after_task = after_task or (lambda: None)
        self._thread = threading.Thread(target=self._run, name="hdb-model-worker", daemon=True)
        self._busy = threading.Event()

    def start(self) -> None:
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._busy.is_set()

    def stop(self, timeout: float | None = None) -> bool:
        """Close the queue, finish what is queued, join. True when the thread ended in time."""
        self.queue.close()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while (item := self.queue.take()) is not None:
            self._busy.set()
            try:
                if item.gen is not None:
                    self._run_batch(item)
                else:
                    self._run_task(item)
            except BaseException as e:  # never let one request kill the worker
                log.exception("worker item failed outside its handler")
                item.fail(e)
            finally:
                self._busy.clear()

    def _check_after(self) -> None:
        try:
            self._after_task()
        except Exception:  # noqa: BLE001 - logged loudly; the worker must keep serving
            log.exception("the after-task pipeline check failed")

    def _start(self, item: WorkItem) -> bool:
        if item.token.stopped:
            item.fail(item.token.error())
            return False
        item.started_at = time.monotonic()
        self._on_queue_wait(item.started_at - item.enqueued_at)
        return item.future.set_running_or_notify_cancel()

    def _run_task(self, item: WorkItem) -> None:
        if not self._start(item):
            return
        try:
            result = item.fn()
        except BaseException as e:  # a stop we asked for reports why (cancel vs deadline)
            self._check_after()  # before the caller hears of it: the next job sees the base
            item.future.set_exception(item.token.error() if item.token.stopped else e)
        else:
            self._check_after()
            item.future.set_result(result)

    def _run_alone(self, item: WorkItem) -> None:
        """One already-started image in a batch of its own (after its batch failed)."""
        if item.token.stopped:
            item.future.set_exception(item.token.error())
            return
        t0 = time.monotonic()
        try:
            (image,) = self._generate([item.gen], lambda: item.token.stopped)
        except BaseException as e:
            item.future.set_exception(item.token.error() if item.token.stopped else e)
            return
        self._on_batch(1, time.monotonic() - t0)
        item.future.set_result(image)

    def _run_batch(self, first: WorkItem) -> None:
        assert first.gen is not None
        more = self.queue.take_compatible(first.gen.batch_key, self.policy.max_batch - 1,
                                          self.policy.max_wait_s)
        batch = [i for i in [first, *more] if self._start(i)]
        if not batch:
            return
        t0 = time.monotonic()
        try:
            images = self._generate([i.gen for i in batch],
                                    lambda: all(i.token.stopped for i in batch))
            if len(images) != len(batch):
                raise RuntimeError(f"generate must return {len(batch)} images, got {len(images)}")
        except BaseException as e:
            self._check_after()
            if len(batch) > 1 and isinstance(e, Exception) and not all(i.token.stopped for i in batch):
                # One image may have caused it (its identity, its prompt): rerun the batch one
                # image at a time so the failure stays with the request that caused it.
                log.warning("a batch of %d images failed (%s); retrying them one by one",
                            len(batch), type(e).__name__)
                for i in batch:
                    self._run_alone(i)
                return
            for i in batch:
                i.future.set_exception(i.token.error() if i.token.stopped else e)
            return
        self._on_batch(len(batch), time.monotonic() - t0)
        for i, img in zip(batch, images, strict=True):
            i.future.set_result(img)

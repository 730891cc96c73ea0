"""Queue-full, deadlines, cancellation and dynamic batching, on real servers.

A long personalisation (LONG steps) occupies the single model worker so that queue states are
reached deterministically (by waiting for states, never for durations). If cancellation did not
stop it at its next step, it would run to its last step - which the tests detect.
"""

from __future__ import annotations

import io
import threading

import grpc
import numpy as np
import pytest
from hdb_serving_helpers import rpc_code, wait_until
from PIL import Image

from serving.client import retry_after_ms
from serving.stubs import pb

pytestmark = pytest.mark.timeout(240)

LONG = 2000  # fine-tune steps: minutes on CPU, unless stopped


def _start_blocker(client, photo_bytes):
    """Start a long personalisation; return (call, job_id) once it runs on the worker."""
    call = client.personalize_events(photo_bytes, options=client.options(steps=LONG))
    events = iter(call)
    job_id = next(events).accepted.job_id
    for ev in events:
        if ev.WhichOneof("event") == "progress" and ev.progress.stage == "finetune":
            return call, job_id
    raise AssertionError("the blocker ended before fine-tuning")


def _job(bg, job_id):
    return bg.server.core.jobs._jobs[job_id]


def test_queue_full_is_resource_exhausted_and_cancel_frees_the_worker(make_server, client_for,
                                                                       photo_bytes):
    bg = make_server(queue_size=1, max_batch=1, retry_after_ms=250)
    c = client_for(bg)
    blocker, job_id = _start_blocker(c, photo_bytes)
    queued = c.generate_stream("a photo", options=c.generation(steps=1, seed=0))
    wait_until(lambda: len(bg.server.core.queue) == 1, what="the Generate to be queued")

    err = rpc_code(c.generate, "another", steps=1)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_after_ms(err) == 250 and "queue is full" in err.details()
    err = rpc_code(c.personalize, photo_bytes)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after_ms(err) == 250
    assert c.health() == "SERVING"

    blocker.cancel()  # the client goes away: the job stops at its next step
    images = list(queued)  # ... so the queued image gets the worker
    assert len(images) == 1 and images[0].data
    job = _job(bg, job_id)
    wait_until(lambda: job.done, what="the cancelled job to finish")
    assert job.state == "CANCELLED" and job.progress.step < LONG
    assert list(c.list_identities()) == []  # nothing kept from a cancelled personalisation


def _call_until_deadline(c, photo_bytes, timeout: float) -> str | None:
    """Personalise (LONG steps) under a deadline; the job id if it was fine-tuning when the
    deadline expired, None if the deadline came first (a loaded machine may not even accept it)."""
    job_id, running = None, False
    with pytest.raises(grpc.RpcError) as err:
        for ev in c.personalize_events(photo_bytes, options=c.options(steps=LONG), timeout=timeout):
            if ev.WhichOneof("event") == "accepted":
                job_id = ev.accepted.job_id
            elif ev.WhichOneof("event") == "progress" and ev.progress.stage == "finetune":
                running = True
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    return job_id if running else None


def test_deadline_stops_the_work_at_the_next_step(make_server, client_for, photo_bytes):
    """The deadline is a clock, so the state it catches depends on the machine's load: the test
    reads the states the call went through, and when the deadline expired before the job was
    fine-tuning, tries again with a doubled deadline instead of assuming it got that far."""
    bg = make_server()
    c = client_for(bg)
    jobs = bg.server.core.jobs._jobs
    for timeout in (4.0, 8.0, 16.0, 32.0):
        job_id = _call_until_deadline(c, photo_bytes, timeout)
        wait_until(lambda: all(j.done for j in jobs.values()) and not bg.server.core.worker.busy,
                   timeout=60, what="the expired job to stop")
        if job_id is not None:
            break
    else:
        pytest.fail("no deadline up to 32 s caught the job fine-tuning")
    job = jobs[job_id]
    assert job.state == "CANCELLED" and job.progress.step < LONG
    assert c.generate("after", steps=1)  # the worker is free again
    assert list(c.list_identities()) == []


def test_cancelled_queued_generate_frees_its_place(make_server, client_for, photo_bytes):
    bg = make_server(queue_size=2, max_batch=1)
    c = client_for(bg)
    blocker, _ = _start_blocker(c, photo_bytes)
    gone = c.generate_stream("gone", options=c.generation(n=2, steps=1))
    wait_until(lambda: len(bg.server.core.queue) == 2, what="two queued images")
    gone.cancel()
    wait_until(lambda: len(bg.server.core.queue) == 0, what="the cancelled images to leave")
    kept = c.generate_stream("kept", options=c.generation(n=2, steps=1, seed=4))
    wait_until(lambda: len(bg.server.core.queue) == 2, what="the new images to be queued")
    blocker.cancel()
    assert sorted(i.seed for i in kept) == [4, 5]


def test_background_job_survives_disconnect_and_can_be_cancelled(make_server, client_for,
                                                                 photo_bytes):
    bg = make_server()
    c = client_for(bg)
    events = c.personalize_events(photo_bytes, options=c.options(steps=LONG, background=True))
    first = next(iter(events))
    assert first.accepted.background
    events.cancel()  # the caller leaves; a background job keeps running
    job_id = first.accepted.job_id
    wait_until(lambda: c.get_job(job_id).progress.stage == "finetune", what="the job to train")
    watch = c.watch_job(job_id)  # re-attach: progress resumes
    ev = next(iter(watch))
    assert ev.WhichOneof("event") == "progress" and ev.progress.total == LONG
    watch.cancel()
    job = c.cancel_job(job_id)
    assert job.state == pb.JOB_STATE_CANCELLED and job.error_code == "CANCELLED"
    assert job.progress.step < LONG
    err = rpc_code(c.watch_job, job_id)
    assert err.code() == grpc.StatusCode.CANCELLED


def test_background_job_result_via_watch_and_get(make_server, client_for, photo_bytes):
    bg = make_server()
    c = client_for(bg)
    events = c.personalize_events(photo_bytes, options=c.options(steps=3, background=True))
    job_id = next(iter(events)).accepted.job_id
    events.cancel()
    final = [ev for ev in c.watch_job(job_id)][-1]
    assert final.WhichOneof("event") == "identity"
    job = c.get_job(job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.identity.id == final.identity.id
    assert c.get_identity(final.identity.id).id == final.identity.id


def _pixels(img: pb.GeneratedImage) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(img.data)), dtype=np.int16)


def test_batched_generate_equals_unbatched(make_server, client_for, photo_bytes):
    bg = make_server(queue_size=16, max_batch=8, max_wait_ms=0)
    c = client_for(bg)
    a = c.personalize(photo_bytes, options=c.options(steps=0, seed=1)).id
    b = c.personalize(photo_bytes, options=c.options(steps=2, seed=2)).id
    # two identities, the bare base, and one identity twice: all share one UNet call
    asks = [("a photo of ohwx person", a, 1), ("ohwx person smiling", b, 2),
            ("a photo of a person", "", 3), ("ohwx person in a hat", a, 4)]

    def one(prompt, ident, seed):
        return c.generate_stream(prompt, ident, c.generation(steps=3, seed=seed))

    alone = [list(one(*ask))[0] for ask in asks]  # sequential: each its own UNet batch
    counts = bg.server.metrics.batch_size.collect()[0].samples
    before = {s.name: s.value for s in counts if s.name.endswith(("_count", "_sum"))}
    assert before["hdb_batch_size_count"] == before["hdb_batch_size_sum"]  # all batches of 1

    blocker, _ = _start_blocker(c, photo_bytes)
    calls = [one(*ask) for ask in asks]
    wait_until(lambda: len(bg.server.core.queue) == len(asks), what="all asks queued")
    blocker.cancel()
    together = [list(call)[0] for call in calls]

    samples = {s.name: s.value for s in bg.server.metrics.batch_size.collect()[0].samples
               if s.name.endswith(("_count", "_sum"))}
    assert samples["hdb_batch_size_count"] - before["hdb_batch_size_count"] == 1
    assert samples["hdb_batch_size_sum"] - before["hdb_batch_size_sum"] == len(asks)
    for x, y in zip(alone, together, strict=True):
        assert x.seed == y.seed
        # the same image: float sums in a batch of 4 may round a pixel 1/255 the other way
        diff = np.abs(_pixels(x) - _pixels(y))
        assert diff.max() <= 1 and diff.mean() < 0.01


def test_many_concurrent_generates_all_complete(make_server, client_for):
    bg = make_server(queue_size=32, max_batch=4, max_wait_ms=20)
    c = client_for(bg)
    results, errors = [], []

    def worker(k: int) -> None:
        try:
            results.append(c.generate(f"prompt {k}", steps=1, seed=k, n=2))
        except grpc.RpcError as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 6
    assert sorted(img.seed for r in results for img in r) == sorted(
        s for k in range(6) for s in (k, k + 1))


def test_cancelled_queued_personalize_leaves_the_queue(make_server, client_for, photo_bytes):
    bg = make_server(queue_size=2)
    c = client_for(bg)
    blocker, _ = _start_blocker(c, photo_bytes)
    waiting = c.personalize_events(photo_bytes, options=c.options(steps=1))
    job_id = next(iter(waiting)).accepted.job_id
    assert len(bg.server.core.queue) == 1
    waiting.cancel()
    job = _job(bg, job_id)
    wait_until(lambda: job.done, what="the queued job to be cancelled")
    assert job.state == "CANCELLED" and job.progress is None  # it never ran
    assert len(bg.server.core.queue) == 0 and bg.server.core.worker.busy  # blocker still runs
    blocker.cancel()

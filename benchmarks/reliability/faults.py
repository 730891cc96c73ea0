"""Fault injection: the store goes slow or away, the server is killed, the model worker throws,
clients vanish mid-stream. What must hold:

- a store outage answers UNAVAILABLE (after the server's bounded S3 retries), clients that retry
  with backoff succeed once it is back, and no identity is ever half-written;
- after kill -9 during identity writes, every identity is complete (metadata + decodable weights)
  or absent, and none the server acknowledged is lost;
- an exception in the model worker fails only the request that caused it, even inside a batch;
- a client that disconnects frees the worker at the next step.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.reliability.rig import BUCKET, FaultProxy, Rig, ServerProcess, client, code_of, moto_s3, wait_until
from serving.engine import Engine

FAULT_PROMPT = "trigger an injected worker fault"
FAULT_SEED = 424_242


class FaultyEngine(Engine):
    """The real engine, except that marked requests raise inside the model worker (an injected
    fault: what a bad kernel, a corrupt identity or a library bug would do)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.batch_sizes: list[int] = []  # images per generate call, to show what was batched

    def generate(self, works, should_stop):
        self.batch_sizes.append(len(works))
        if any(FAULT_PROMPT in w.prompt for w in works):
            raise RuntimeError("injected worker fault (generate)")
        return super().generate(works, should_stop)

    def personalize(self, photo, method, opts, progress, should_stop):
        if opts.seed == FAULT_SEED:
            raise RuntimeError("injected worker fault (personalize)")
        return super().personalize(photo, method, opts, progress, should_stop)


# ---------------------------------------------------------------------------- store consistency
@dataclass
class StoreAudit:
    """What a store holds after a fault: identities complete, half-written, lost, orphans."""

    complete: list[str] = field(default_factory=list)
    half_written: list[str] = field(default_factory=list)  # meta without (decodable) weights
    lost: list[str] = field(default_factory=list)  # acknowledged to a client, then gone
    orphan_blobs: int = 0  # weights without meta: invisible, swept later
    temp_files: int = 0  # local store: interrupted atomic writes (dot files)

    def to_json(self) -> dict[str, Any]:
        return {"complete": len(self.complete), "half_written": self.half_written, "lost": self.lost,
                "orphan_blobs": self.orphan_blobs, "temp_files": self.temp_files}


def audit_store(store, acked: set[str], tenant: str = "dev", root: Path | None = None) -> StoreAudit:
    """Check every identity in `store` decodes, and that every acknowledged id is there."""
    from serving.identities import IdentityRecord

    out = StoreAudit()
    metas = {o.key.split("/")[-1].removesuffix(".json"): o.key for o in store.list(f"meta/{tenant}/")}
    blobs = {o.key.split("/")[-1].removesuffix(".bin") for o in store.list(f"blob/{tenant}/")}
    for identity_id, key in sorted(metas.items()):
        try:
            record = IdentityRecord.from_json(store.get(key))
            Engine().load_identity(store.get(f"blob/{tenant}/{identity_id}.bin"), record.method)
            out.complete.append(identity_id)
        except Exception:  # noqa: BLE001 - any failure to read it back is a half-written identity
            out.half_written.append(identity_id)
    out.lost = sorted(acked - set(metas))
    out.orphan_blobs = len(blobs - set(metas))
    if root is not None and root.is_dir():
        out.temp_files = sum(1 for p in root.rglob(".*") if p.is_file())
    return out


def _writers(target: str, photo: bytes, n: int, stop: threading.Event, acked: set[str], codes: list[str],
             timeout: float = 120.0) -> list[threading.Thread]:
    """`n` client threads personalising (steps 0) in a loop; acknowledged ids go to `acked`."""

    def loop() -> None:
        with client(target) as c:
            while not stop.is_set():
                code, res = code_of(lambda: c.personalize(photo, options=c.options(steps=0), timeout=timeout))
                codes.append(code)
                if code == "OK":
                    acked.add(res.id)
                elif code == "UNAVAILABLE" and stop.is_set():
                    return
                elif code not in ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"):
                    return

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def retry_with_backoff(fn, attempts: int = 12, base_s: float = 0.2, cap_s: float = 3.0,
                       retry_on: tuple[str, ...] = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")) -> dict[str, Any]:
    """What a well-behaved client does: retry `retry_on` codes with capped exponential backoff
    and full jitter. Returns the final code and every attempt's code and wait."""
    log: list[tuple[str, float]] = []
    for k in range(attempts):
        code, res = code_of(fn)
        wait = random.uniform(0, min(cap_s, base_s * 2**k)) if code in retry_on else 0.0
        log.append((code, round(wait, 3)))
        if code not in retry_on:
            return {"code": code, "attempts": log, "result": res}
        time.sleep(wait)
    return {"code": log[-1][0], "attempts": log, "result": None}


# ---------------------------------------------------------------------------- S3 outage
def s3_outage(rig: Rig, photo: bytes, *, short: bool = True) -> dict[str, Any]:
    """moto behind a fault proxy: slow, refusing, stopped mid-run, restarted; then audit."""
    from serving.store import S3Store

    out: dict[str, Any] = {"phases": {}}
    acked: set[str] = set()
    with moto_s3() as moto:
        proxy = FaultProxy(moto.address)
        prefix = f"outage-{time.time_ns()}"
        try:
            with rig.serving(store=f"s3://{BUCKET}/{prefix}", s3_endpoint_url=proxy.endpoint) as bg, \
                    client(bg.target) as c:
                def personalize(timeout: float = 120.0):
                    ident = c.personalize(photo, options=c.options(steps=0), timeout=timeout)
                    acked.add(ident.id)
                    return ident

                def phase(name: str, calls: dict[str, Any]) -> None:
                    out["phases"][name] = {k: code_of(fn)[0] for k, fn in calls.items()}
                    out["phases"][name]["health"] = c.health()

                phase("baseline", {"personalize": personalize, "list": lambda: list(c.list_identities())})
                # 1. slow: every request chunk waits 0.3 s at the proxy
                proxy.set("delay", 0.3)
                t0 = time.monotonic()
                phase("slow", {"personalize": personalize, "get": lambda: c.get_identity(next(iter(acked)))})
                out["phases"]["slow"]["seconds"] = round(time.monotonic() - t0, 2)
                # 2. refused: the server retries (botocore, bounded) then answers UNAVAILABLE
                proxy.set("refuse")
                before = proxy.connections
                phase("refused", {"get": lambda: c.get_identity(next(iter(acked)))})
                out["phases"]["refused"]["s3_attempts_per_call"] = proxy.connections - before
                phase("refused_more", {"personalize": personalize, "list": lambda: list(c.list_identities()),
                                       "delete": lambda: c.delete_identity(next(iter(acked))),
                                       "generate_base": lambda: c.generate("a photo", steps=1)})
                # 3. moto stopped while writers run; clients retry with backoff until it is back
                proxy.set("pass")
                stop, codes = threading.Event(), []
                writers = _writers(bg.target, photo, 2, stop, acked, codes)
                wait_until(lambda: codes.count("OK") >= 2, 120, "writes before the outage")
                moto.stop()
                proxy.set("pass")  # drop pooled connections: the next ones find moto gone
                wait_until(lambda: "UNAVAILABLE" in codes, 120, "writers to see the outage")
                retry: dict[str, Any] = {}
                retrier = threading.Thread(target=lambda: retry.update(retry_with_backoff(personalize)))
                retrier.start()
                time.sleep(1.0 if short else 5.0)
                moto.start()
                proxy.set("pass", upstream=moto.address)
                retrier.join(120)
                wait_until(lambda: codes[-1:] == ["OK"] or not any(t.is_alive() for t in writers), 120,
                           "writers to recover")
                stop.set()
                for t in writers:
                    t.join(120)
                out["phases"]["moto_stopped"] = {
                    "writer_codes": {k: codes.count(k) for k in sorted(set(codes))},
                    "retry_codes": [a[0] for a in retry.get("attempts", [])],
                    "retry_waits_s": [a[1] for a in retry.get("attempts", [])],
                    "retry_final": retry.get("code"), "health": c.health()}
                # 4. a hung endpoint: callers' deadlines hold, and work that needs no store goes on
                proxy.set("blackhole")
                some = next(iter(acked))
                hung: list[str] = []
                getters = [threading.Thread(target=lambda: hung.append(code_of(
                    lambda: c.get_identity(some, timeout=2))[0])) for _ in range(10)]
                for t in getters:
                    t.start()
                for t in getters:
                    t.join(60)
                out["phases"]["hung"] = {"get_2s_deadline": ",".join(sorted(set(hung))),
                                         "generate_base": code_of(lambda: c.generate("a photo", steps=1,
                                                                                     timeout=60))[0],
                                         "health": c.health()}
                proxy.set("pass")  # drops the hung connections: the store calls fail over and finish
                # the identities that exist must all work end to end
                ids = [i.id for i in c.list_identities()]
                gen_codes = [code_of(lambda i=i: c.generate("ohwx", i, steps=1))[0] for i in ids[:5]]
                out["generate_after"] = {k: gen_codes.count(k) for k in set(gen_codes)}
        finally:
            proxy.close()
        store = S3Store(BUCKET, prefix, endpoint_url=moto.endpoint)
        out["audit"] = audit_store(store, acked).to_json()
    out["acked"] = len(acked)
    return out


# ---------------------------------------------------------------------------- kill -9
def kill_round(rig: Rig, photo: bytes, store_spec: str, extra: list[str], *, writers: int = 3,
               min_acks: int = 3, rng: random.Random) -> dict[str, Any]:
    """Start `hdb serve`, write identities from `writers` clients, SIGKILL it mid-stream."""
    proc = ServerProcess(rig, store=store_spec, extra=extra, name="kill9").wait_serving()
    stop, acked, codes = threading.Event(), set(), []
    threads = _writers(proc.target, photo, writers, stop, acked, codes)
    try:
        wait_until(lambda: len(acked) >= min_acks, 300, f"{min_acks} identities written")
        time.sleep(rng.uniform(0.0, 0.3))  # land anywhere in the write cycle
        proc.kill9()
    finally:
        stop.set()
        proc.kill9()
        for t in threads:
            t.join(60)
    return {"acked": set(acked), "codes": {k: codes.count(k) for k in sorted(set(codes))}}


def kill_during_writes(rig: Rig, photo: bytes, store: str, *, rounds: int, seed: int = 0) -> dict[str, Any]:
    """`rounds` kill -9s of `hdb serve` while it writes identities to a local or S3 store; after
    each, audit the store; finally restart in-process and use every identity through the API."""
    from serving.store import LocalDirStore, S3Store

    rng = random.Random(seed)
    acked: set[str] = set()
    rows = []

    def run(spec: str, extra: list[str], store_obj, root: Path | None, proxy: FaultProxy | None) -> None:
        for k in range(rounds):
            if proxy is not None:  # slow S3 writes: a kill lands inside a PUT more often
                proxy.set("delay", rng.choice([0.0, 0.05, 0.2]))
            r = kill_round(rig, photo, spec, extra, rng=rng)
            acked.update(r["acked"])
            audit = audit_store(store_obj, acked, root=root)
            rows.append({"round": k, "acked_total": len(acked), "codes": r["codes"], **audit.to_json()})
        if proxy is not None:
            proxy.set("pass")
        # an hour later the sweeper has removed what the crashes left (orphans, temp files)
        from serving.identities import ORPHAN_AGE_S, IdentityRepository

        IdentityRepository(store_obj, clock=lambda: time.time() + ORPHAN_AGE_S + 1).sweep()
        rows.append({"after_sweep": True, **audit_store(store_obj, acked, root=root).to_json()})
        with rig.serving(store_obj=store_obj) as bg, client(bg.target) as c:
            listed = {i.id for i in c.list_identities()}
            codes = [code_of(lambda i=i: c.generate("ohwx", i, steps=1))[0] for i in sorted(listed)[:8]]
            rows.append({"restart": True, "listed": len(listed), "generate": {k: codes.count(k) for k in set(codes)},
                         "missing_acked": sorted(acked - listed)})

    if store == "local":
        root = rig.work / f"kill-local-{time.time_ns()}"
        run(str(root), [], LocalDirStore(root), root, None)
    else:
        with moto_s3() as moto:
            proxy = FaultProxy(moto.address)
            prefix = f"kill-{time.time_ns()}"
            try:
                run(f"s3://{BUCKET}/{prefix}", ["--s3-endpoint-url", proxy.endpoint],
                    S3Store(BUCKET, prefix, endpoint_url=moto.endpoint), None, proxy)
            finally:
                proxy.close()
    kills = [r for r in rows if "round" in r]
    swept = next(r for r in rows if "after_sweep" in r)
    return {"store": store, "kills": len(kills), "acked": len(acked), "rounds": rows,
            "left_after_sweep": {"orphan_blobs": swept["orphan_blobs"], "temp_files": swept["temp_files"],
                                 "complete": swept["complete"]},
            "identities_lost": len({i for r in kills for i in r["lost"]} | set(rows[-1]["missing_acked"])),
            "half_written": len({i for r in kills for i in r["half_written"]}),
            "orphan_blobs_max": max((r["orphan_blobs"] for r in kills), default=0),
            "temp_files_max": max((r["temp_files"] for r in kills), default=0)}


# ---------------------------------------------------------------------------- worker exceptions
def _occupy_worker(c, photo: bytes, steps: int = 2000):
    """Start a long personalisation; return its call once it runs on the worker."""
    call = c.personalize_events(photo, options=c.options(steps=steps))
    events = iter(call)
    next(events)
    for ev in events:
        if ev.WhichOneof("event") == "progress" and ev.progress.stage == "finetune":
            return call
    raise AssertionError("the blocker ended before fine-tuning")


def worker_exception(rig: Rig, photo: bytes) -> dict[str, Any]:
    """An exception inside the worker, for one image of a shared batch and for one job."""
    out: dict[str, Any] = {}
    with rig.serving(engine=rig.engine(FaultyEngine), max_batch=8, max_wait_ms=0, queue_size=16) as bg, \
            client(bg.target) as c:
        blocker = _occupy_worker(c, photo)
        prompts = ["a photo of a person", FAULT_PROMPT, "a portrait", "a person smiling"]
        calls = [c.generate_stream(p, options=c.generation(steps=2, seed=k)) for k, p in enumerate(prompts)]
        wait_until(lambda: len(bg.server.core.queue) == len(prompts), 60, "the batch to queue up")
        engine = bg.server.core.engine
        engine.batch_sizes.clear()
        blocker.cancel()
        codes = [code_of(lambda call=call: list(call))[0] for call in calls]
        out["batch"] = {"faulty": codes[1], "bystanders": [codes[0], *codes[2:]],
                        "generate_calls": list(engine.batch_sizes)}
        bad = threading.Thread(target=lambda: out.update(
            faulty_job=code_of(lambda: c.personalize(photo, options=c.options(steps=1, seed=FAULT_SEED)))[0]))
        bad.start()
        out["bystander_job"] = code_of(lambda: c.personalize(photo, options=c.options(steps=1, seed=1)))[0]
        bad.join(120)
        out["after"] = {"health": c.health(), "generate": code_of(lambda: c.generate("after", steps=1))[0],
                        "worker_alive": bg.server.core.worker._thread.is_alive()}
    return out


# ---------------------------------------------------------------------------- disconnects
class StepCounter:
    """Counts UNet forward calls (one per denoising / fine-tune step) and samples the count
    at the moment `flag()` turns true (the server noticing the caller left)."""

    def __init__(self, unet):
        self.calls = 0
        self._handle = unet.register_forward_hook(lambda *a: self._hit())
        self.at_flag: int | None = None

    def _hit(self) -> None:
        self.calls += 1

    def watch(self, flag) -> threading.Thread:
        def poll() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                if flag():
                    self.at_flag = self.calls
                    return
                time.sleep(0.001)

        t = threading.Thread(target=poll, daemon=True)
        t.start()
        return t

    def close(self) -> None:
        self._handle.remove()


def disconnect_frees_worker(rig: Rig, photo: bytes) -> dict[str, Any]:
    """Cancel a Personalize and a Generate stream mid-work; count the steps that ran after."""
    out: dict[str, Any] = {}
    with rig.serving(max_generate_steps=1000, max_batch=1) as bg, client(bg.target) as c:
        core = bg.server.core
        counter = StepCounter(core.engine.pipe.unet)
        try:
            # 1. Personalize (2000 fine-tune steps), cancelled once fine-tuning runs
            call = _occupy_worker(c, photo)
            (job,) = [j for j in core.jobs._jobs.values() if not j.done]
            watcher = counter.watch(lambda: job.token.stopped)
            at_cancel = counter.calls
            call.cancel()
            wait_until(lambda: job.done and not core.worker.busy, 120, "the cancelled job to stop")
            watcher.join(5)
            out["personalize"] = {"state": job.state, "steps_total": 2000, "calls_at_client_cancel": at_cancel,
                                  "calls_when_server_noticed": counter.at_flag, "calls_final": counter.calls,
                                  "steps_after_notice": counter.calls - (counter.at_flag or 0)}
            # 2. Generate (1000 denoising steps), cancelled after a few steps
            counter.calls, counter.at_flag = 0, None
            stream = c.generate_stream("a long one", options=c.generation(steps=1000, seed=1))
            stream.initial_metadata()
            wait_until(lambda: counter.calls >= 3, 120, "denoising to start")
            at_cancel = counter.calls
            stream.cancel()
            wait_until(lambda: not core.worker.busy and len(core.queue) == 0, 120, "the worker to free")
            out["generate"] = {"steps_total": 1000, "calls_at_client_cancel": at_cancel,
                               "calls_final": counter.calls, "steps_after_cancel": counter.calls - at_cancel}
            out["after"] = {"generate": code_of(lambda: c.generate("next", steps=1))[0], "health": c.health()}
        finally:
            counter.close()
    return out


def run(rig: Rig, photo: bytes, *, short: bool) -> dict[str, Any]:
    """Every fault scenario; the kill -9 rounds per store: 1 (short) or 2 (full)."""
    from concurrent.futures import ThreadPoolExecutor

    rounds = 1 if short else 2
    res: dict[str, Any] = {}

    def guarded(fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - the report shows which scenario broke
            return {"error": f"{type(e).__name__}: {e}"}

    with ThreadPoolExecutor(2) as pool:  # both stores at once: server start-up is the slow part
        kills = {name: pool.submit(guarded, lambda store=store, k=k: kill_during_writes(
            rig, photo, store, rounds=rounds, seed=k)) for k, (name, store) in
            enumerate((("kill9_local", "local"), ("kill9_s3", "s3")))}
        res.update({name: f.result() for name, f in kills.items()})
    for name, fn in [("s3_outage", lambda: s3_outage(rig, photo, short=short)),
                     ("worker_exception", lambda: worker_exception(rig, photo)),
                     ("disconnect", lambda: disconnect_frees_worker(rig, photo))]:
        res[name] = guarded(fn)
    return res


__all__ = ["FAULT_PROMPT", "FAULT_SEED", "FaultyEngine", "StoreAudit", "audit_store", "disconnect_frees_worker",
           "kill_during_writes", "retry_with_backoff", "run", "s3_outage", "worker_exception"]

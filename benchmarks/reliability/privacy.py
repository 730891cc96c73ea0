"""Privacy guarantees, checked on real servers and stores:

- uploaded photos never touch disk: a Python audit hook records every file opened for writing
  while personalisations run (transient temp files included), and every file left in the
  temp and store folders is searched for the photo's bytes and its decoded pixel rows;
- DeleteIdentity leaves no trace: no key, file name or content naming the id in either store,
  nothing in the server's identity cache or its job records;
- TTL expiry deletes from the store by itself (the sweeper), with no read to trigger it;
- logs never hold image bytes, API keys or prompt text (`hdb serve` at DEBUG, JSON logs).
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.reliability.rig import BUCKET, Rig, ServerProcess, client, code_of, moto_s3, wait_until

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def distinctive_photo(seed: int = 7, size: tuple[int, int] = (96, 96)) -> tuple[bytes, list[bytes]]:
    """A noisy PNG (no two photos share its bytes) and 3 of its decoded RGB rows, to search for."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)  # (H, W, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue(), [arr[k].tobytes()[:96] for k in (5, size[1] // 2, size[1] - 3)]


def needles(photo: bytes, rows: list[bytes]) -> list[bytes]:
    """Byte strings whose presence in a file means the photo (encoded or decoded) was written."""
    n = len(photo)
    return [photo[k:k + 32] for k in (n // 4, n // 2, 3 * n // 4)] + rows


class WriteWatcher:
    """Records files opened for writing (an audit hook: sees transient files too) while active."""

    _installed: WriteWatcher | None = None

    def __init__(self) -> None:
        self.active = False
        self.paths: list[str] = []
        if WriteWatcher._installed is None:
            sys.addaudithook(WriteWatcher._hook)
        WriteWatcher._installed = self

    @staticmethod
    def _hook(event: str, args: tuple) -> None:
        w = WriteWatcher._installed
        if w is None or not w.active or event != "open":
            return
        path, mode, flags = (args + (None, None))[:3]
        writing = (isinstance(mode, str) and any(ch in mode for ch in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writing and isinstance(path, (str, bytes, os.PathLike)):
            w.paths.append(os.fsdecode(path))

    def __enter__(self) -> WriteWatcher:
        self.paths.clear()
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        self.active = False


def _scan(folder: Path, patterns: list[bytes]) -> list[str]:
    hits = []
    for p in folder.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            if any(pat in data for pat in patterns):
                hits.append(str(p))
    return hits


#: Every personalisation method the service offers (client names).
ALL_METHODS = ("hyperdreambooth", "lidb", "lora", "textual_inversion", "dreambooth")


def photos_never_touch_disk(rig: Rig, methods: tuple[str, ...] = ALL_METHODS) -> dict[str, Any]:
    """Personalise (and PersonalizeAndGenerate) with a distinctive photo while watching writes.

    The one write allowed outside the store: DreamBooth's class-prior images, which the base
    generates from the class prompt (not from the photo) into the shared class-image cache by
    design; they are listed apart and searched for the photo like everything else."""
    from hypernet.defaults import cache_dir

    photo, rows = distinctive_photo()
    tmp = rig.work / "watched-tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    saved_tempdir = tempfile.tempdir
    tempfile.tempdir = str(tmp)  # anything that asks for a temp file lands where we look
    watcher = WriteWatcher()
    out: dict[str, Any] = {}
    try:
        with rig.serving() as bg, client(bg.target) as c:
            store_root = Path(bg.server.repo.store.root).resolve()
            with watcher:
                for m in methods:
                    out[f"personalize_{m}"] = code_of(lambda m=m: c.personalize(
                        photo, method=m, options=c.options(steps=2)))[0]
                out["personalize_and_generate"] = code_of(lambda: c.personalize_and_generate(
                    photo, ["a photo of ohwx person"], options=c.options(steps=1),
                    generation=c.generation(steps=1)))[0]
            writes = sorted(set(watcher.paths))
            class_cache = (cache_dir() / "class-images").resolve()
            class_images = [p for p in writes if Path(p).resolve().is_relative_to(class_cache)]
            outside = [p for p in writes if not Path(p).resolve().is_relative_to(store_root) and p not in class_images]
            out["files_written"] = len(writes)
            out["writes_outside_store"] = outside
            out["class_image_writes"] = len(class_images)
            out["store_files"] = sum(1 for p in store_root.rglob("*") if p.is_file())
            out["photo_found_in"] = (_scan(store_root, needles(photo, rows)) + _scan(tmp, needles(photo, rows))
                                     + (_scan(class_cache, needles(photo, rows)) if class_cache.is_dir() else []))
            out["temp_files_left"] = sum(1 for p in tmp.rglob("*") if p.is_file())
    finally:
        tempfile.tempdir = saved_tempdir
    return out


# ---------------------------------------------------------------------------- delete / TTL
def _traces(identity_id: str, *, root: Path | None = None, objects: dict[str, bytes] | None = None) -> list[str]:
    """Where `identity_id` still appears: file names or contents (local), keys or bodies (S3)."""
    found = []
    needle = identity_id.encode()
    if root is not None:
        for p in root.rglob("*"):
            if identity_id in p.name or (p.is_file() and needle in p.read_bytes()):
                found.append(str(p.relative_to(root)))
    for key, body in (objects or {}).items():
        if identity_id in key or needle in body:
            found.append(key)
    return found


def delete_leaves_no_trace(rig: Rig, photo: bytes) -> dict[str, Any]:
    """Create (and use: cache, export) an identity on each store, delete it, look everywhere."""
    out: dict[str, Any] = {}
    with moto_s3() as moto:
        for kind in ("local", "s3"):
            prefix = f"del-{time.time_ns()}"
            extra = dict(store=f"s3://{BUCKET}/{prefix}", s3_endpoint_url=moto.endpoint) if kind == "s3" else {}
            with rig.serving(**extra) as bg, client(bg.target) as c:
                events = list(c.personalize_events(photo, options=c.options(steps=0)))
                job_id, ident = events[0].accepted.job_id, events[-1].identity
                c.generate("ohwx", ident.id, steps=1)  # now in the identity cache too
                c.export_identity(ident.id)
                root = Path(bg.server.repo.store.root) if kind == "local" else None

                def traces(root=root, ident=ident, prefix=prefix, kind=kind) -> list[str]:
                    return _traces(ident.id, root=root, objects=moto.objects(prefix) if kind == "s3" else None)

                before = traces()
                c.delete_identity(ident.id)
                job = c.get_job(job_id)
                cache = [k for k in bg.server.repo._cache if ident.id in k]
                out[kind] = {"traces_before": len(before), "traces_after": traces(),
                             "job_still_shows_identity": job.HasField("identity"),
                             "in_identity_cache": len(cache),
                             "get_after": code_of(lambda ident=ident: c.get_identity(ident.id))[0],
                             "generate_after": code_of(lambda ident=ident: c.generate("ohwx", ident.id, steps=1))[0]}
    return out


def ttl_expiry_deletes(rig: Rig, photo: bytes, ttl_s: float = 1.5) -> dict[str, Any]:
    """Identities with a TTL vanish from each store by themselves (nobody reads them)."""
    out: dict[str, Any] = {}
    with moto_s3() as moto:
        for kind in ("local", "s3"):
            prefix = f"ttl-{time.time_ns()}"
            extra = dict(store=f"s3://{BUCKET}/{prefix}", s3_endpoint_url=moto.endpoint) if kind == "s3" else {}
            with rig.serving(identity_ttl_s=ttl_s, sweep_interval_s=0.25, **extra) as bg, client(bg.target) as c:
                ident = c.personalize(photo, options=c.options(steps=0))
                root = Path(bg.server.repo.store.root) if kind == "local" else None

                def traces(root=root, ident=ident, prefix=prefix, kind=kind) -> list[str]:
                    return _traces(ident.id, root=root, objects=moto.objects(prefix) if kind == "s3" else None)

                present = len(traces())
                t0 = time.monotonic()
                wait_until(lambda: not traces(), 120, f"the {kind} sweeper to delete the expired identity", 0.1)
                out[kind] = {"objects_while_alive": present, "expires_at_set": ident.HasField("expires_at"),
                             "deleted_after_s": round(time.monotonic() - t0, 2), "ttl_s": ttl_s,
                             "get_after": code_of(lambda ident=ident: c.get_identity(ident.id))[0]}
    return out


# ---------------------------------------------------------------------------- logs
PROMPT_MARKER = "zyxwvut-private-prompt-marker"


def log_workload(target: str, keys: dict[str, str], photo: bytes) -> list[str]:
    """Calls that could leak into logs: wrong keys, a distinctive photo and prompt (long enough
    to be truncated by CLIP), bad photos. Returns the secret strings the logs must not hold."""
    wrong = "wrong-key-" + "9f8e7d6c5b4a" * 2
    with client(target, api_key=wrong) as bad:
        code_of(lambda: bad.server_info())
    (tenant, key), = list(keys.items())[:1]
    # > 77 CLIP tokens: the pipeline warns with the truncated tail, where the marker is
    prompt = f"{PROMPT_MARKER} " + " ".join(f"word{k}" for k in range(120)) + f" {PROMPT_MARKER}"
    with client(target, api_key=key) as c:
        ident = c.personalize(photo, options=c.options(steps=1))
        c.generate(prompt, ident.id, steps=1, negative_prompt=f"{PROMPT_MARKER}-negative")
        code_of(lambda: c.personalize(photo[: len(photo) // 2]))
        code_of(lambda: c.personalize(b"GIF89a" + photo[6:200]))
        c.delete_identity(ident.id)
    return [wrong, *keys.values()]


def scan_logs(lines: list[str], secrets: list[str], photo: bytes, rows: list[bytes]) -> dict[str, Any]:
    """Search log lines for keys, prompt text and the photo (raw, hex, base64, latin-1)."""
    text = "".join(lines)
    photo_forms = []
    for chunk in needles(photo, rows):
        photo_forms += [chunk.hex(), base64.b64encode(chunk).decode()[:24], chunk.decode("latin-1"), repr(chunk)[2:40]]
    non_json = [ln for ln in lines if ln.strip() and not ln.startswith("{")]
    return {"lines": len(lines), "api_keys_found": sum(s in text for s in secrets),
            "bearer_found": "Bearer " in text, "prompt_found": PROMPT_MARKER in text,
            "photo_found": any(f in text for f in photo_forms if len(f) >= 16),
            "non_json_lines": len(non_json), "non_json_sample": [ln[:160] for ln in non_json[:3]]}


def logs_clean(rig: Rig, *, log_level: str = "DEBUG", s3: bool = True) -> dict[str, Any]:
    """`hdb serve` (API keys, DEBUG, JSON logs; an S3 store via moto, or with `s3=False`, the
    short mode `make test` runs, a local store) under `log_workload`; scan its stderr."""
    photo, rows = distinctive_photo(seed=11)
    keys = {"alice": "alice-secret-" + "a1b2c3d4e5f6" * 2}
    extra = ["--api-keys", ",".join(f"{t}:{k}" for t, k in keys.items())]
    with contextlib.ExitStack() as stack:
        if s3:
            moto = stack.enter_context(moto_s3())
            store, env = f"s3://{BUCKET}/logs-{time.time_ns()}", {
                k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
            extra += ["--s3-endpoint-url", moto.endpoint]
        else:
            store, env = str(rig.work / f"logs-store-{time.time_ns()}"), {}
        proc = ServerProcess(rig, store=store, log_level=log_level, name="logs", extra=extra, env=env)
        try:
            proc.wait_serving()
            secrets = log_workload(proc.target, keys, photo)
        finally:
            proc.stop()
    res = scan_logs(proc.lines, secrets, photo, rows)
    res["log_level"] = log_level
    res["store"] = "s3" if s3 else "local"
    return res


def run(rig: Rig, photo: bytes) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for name, fn in [("photos_never_touch_disk", lambda: photos_never_touch_disk(rig)),
                     ("delete_leaves_no_trace", lambda: delete_leaves_no_trace(rig, photo)),
                     ("ttl_expiry_deletes", lambda: ttl_expiry_deletes(rig, photo)),
                     ("logs_clean", lambda: logs_clean(rig))]:
        try:
            res[name] = fn()
        except Exception as e:  # noqa: BLE001 - the report shows which check broke
            res[name] = {"error": f"{type(e).__name__}: {e}"}
    return res


__all__ = ["WriteWatcher", "delete_leaves_no_trace", "distinctive_photo", "log_workload", "logs_clean",
           "photos_never_touch_disk", "run", "scan_logs", "ttl_expiry_deletes"]

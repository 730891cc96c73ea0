"""`HdbClient`: a small synchronous Python client for other services, scripts and the CLI.

    from serving.client import HdbClient
    with HdbClient("localhost:50051", api_key="...") as c:
        ident = c.personalize(open("me.jpg", "rb").read(), on_progress=print)
        for img in c.generate("a photo of ohwx person as an astronaut", ident.id, n=2):
            open(f"{img.index}.png", "wb").write(img.data)

Errors are `grpc.RpcError`s: `e.code()` (a grpc.StatusCode) and `e.details()`. "Busy, try
later" (a full queue, a rate limit) is RESOURCE_EXHAUSTED *with* trailing metadata
`retry-after-ms`: `retry_after_ms(e)` returns it, and `is_retryable(e)` is True. A request too
large is INVALID_ARGUMENT naming the field, or, past 4x the server's limit, gRPC's own
RESOURCE_EXHAUSTED without the hint: `is_retryable(e)` is False for both.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.stubs import SERVICE_NAME, pb, pb_grpc
from serving.validation import EXPORT_ENUMS, IMAGE_FORMATS, METHOD_ENUMS

#: One photo (its bytes or a path), or a list/tuple of 1..8 photos of one person.
Photos = bytes | str | Path | list | tuple
_IMAGE_ENUM = {name: value for value, name in IMAGE_FORMATS.items() if value}
#: The largest message this client sends or receives by default: 4x the server's default
#: max_message_bytes (16 MiB), so that a too-large request reaches the server and comes back as
#: INVALID_ARGUMENT naming the field, not as this channel's own RESOURCE_EXHAUSTED.
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


def retry_after_ms(error: grpc.RpcError) -> int | None:
    """The server's retry hint of a RESOURCE_EXHAUSTED error, if it sent one."""
    for key, value in error.trailing_metadata() or ():
        if key == "retry-after-ms":
            return int(value)
    return None


def is_retryable(error: grpc.RpcError) -> bool:
    """True for "busy, try later" (RESOURCE_EXHAUSTED with a `retry-after-ms` hint, or
    UNAVAILABLE); False for everything else, including a message too large (gRPC's own
    RESOURCE_EXHAUSTED carries no hint), which no retry will fix."""
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        return True
    return error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after_ms(error) is not None


class _ImageStream:
    """A Generate call that iterates its images (`GenerateResponse.image`); everything else
    (cancel(), code(), details(), trailing_metadata()...) is the underlying call's."""

    def __init__(self, call):
        self._call = call

    def __iter__(self) -> _ImageStream:
        return self

    def __next__(self) -> pb.GeneratedImage:
        return next(self._call).image

    def __getattr__(self, name: str):
        return getattr(self._call, name)


class HdbClient:
    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        """`api_key` defaults to $HDB_API_KEY; `tls` uses system roots or `root_certificates`."""
        opts = [("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes)]
        if tls or root_certificates:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.secure_channel(target, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(target, options=opts)
        self.stub = pb_grpc.PersonalizationServiceStub(self.channel)
        key = api_key if api_key is not None else os.environ.get("HDB_API_KEY", "")
        self._metadata = (("authorization", f"Bearer {key}"),) if key else ()
        self.timeout = timeout

    def __enter__(self) -> HdbClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _kw(self, timeout: float | None) -> dict:
        return {"metadata": self._metadata, "timeout": timeout if timeout is not None else self.timeout}

    # ------------------------------------------------------------------ personalise
    @staticmethod
    def _photo(photo: bytes | str | Path) -> bytes:
        return photo if isinstance(photo, bytes) else Path(photo).read_bytes()

    @classmethod
    def _photo_fields(cls, photo: Photos) -> dict:
        """One photo -> `photo` (what every server, old ones included, takes); a list or tuple
        of 1..8 photos of one person -> `photos`."""
        if isinstance(photo, (list, tuple)):
            return {"photos": [cls._photo(p) for p in photo]}
        return {"photo": cls._photo(photo)}

    @staticmethod
    def options(steps: int | None = None, rank: int | None = None, seed: int | None = None,
                learning_rate: float | None = None, token: str = "", class_noun: str = "",
                background: bool = False, identity_weight: float | None = None) -> pb.PersonalizeOptions:
        o = pb.PersonalizeOptions(token=token, class_noun=class_noun, background=background)
        for name, value in (("steps", steps), ("rank", rank), ("seed", seed),
                            ("learning_rate", learning_rate), ("identity_weight", identity_weight)):
            if value is not None:
                setattr(o, name, value)
        return o

    def personalize_events(self, photo: Photos, method: str = "hyperdreambooth",
                           options: pb.PersonalizeOptions | None = None,
                           timeout: float | None = None) -> Iterator[pb.PersonalizeResponse]:
        """The raw event stream (accepted, progress..., identity); cancel() it to stop. `photo`:
        one photo (bytes or a path) or a list of 1..8 photos of one person."""
        req = pb.PersonalizeRequest(**self._photo_fields(photo), method=METHOD_ENUMS[method],
                                    options=options)
        return self.stub.Personalize(req, **self._kw(timeout))

    def personalize(self, photo: Photos, method: str = "hyperdreambooth",
                    options: pb.PersonalizeOptions | None = None,
                    on_progress: Callable[[pb.Progress], None] | None = None,
                    timeout: float | None = None) -> pb.Identity:
        """Personalise and wait for the identity (progress events go to `on_progress`)."""
        identity = None
        for ev in self.personalize_events(photo, method, options, timeout):
            if ev.HasField("progress") and on_progress is not None:
                on_progress(ev.progress)
            elif ev.HasField("identity"):
                identity = ev.identity
        assert identity is not None, "the server ended the stream without an identity"
        return identity

    def personalize_and_generate(
        self, photo: Photos, prompts: list[str], method: str = "hyperdreambooth",
        options: pb.PersonalizeOptions | None = None,
        generation: pb.GenerationOptions | None = None,
        on_progress: Callable[[pb.Progress], None] | None = None, timeout: float | None = None,
    ) -> tuple[pb.Identity, list[pb.GeneratedImage]]:
        req = pb.PersonalizeAndGenerateRequest(**self._photo_fields(photo),
                                               method=METHOD_ENUMS[method], options=options,
                                               prompts=prompts, generation=generation)
        identity, images = None, []
        for ev in self.stub.PersonalizeAndGenerate(req, **self._kw(timeout)):
            if ev.HasField("progress") and on_progress is not None:
                on_progress(ev.progress)
            elif ev.HasField("identity"):
                identity = ev.identity
            elif ev.HasField("image"):
                images.append(ev.image)
        assert identity is not None, "the server ended the stream without an identity"
        return identity, images

    def get_job(self, job_id: str, timeout: float | None = None) -> pb.Job:
        return self.stub.GetJob(pb.GetJobRequest(job_id=job_id), **self._kw(timeout)).job

    def watch_job(self, job_id: str, timeout: float | None = None) -> Iterator[pb.WatchJobResponse]:
        """Progress events, then the identity (`.progress` / `.identity`; cancel() to leave)."""
        return self.stub.WatchJob(pb.WatchJobRequest(job_id=job_id), **self._kw(timeout))

    def cancel_job(self, job_id: str, timeout: float | None = None) -> pb.Job:
        return self.stub.CancelJob(pb.CancelJobRequest(job_id=job_id), **self._kw(timeout)).job

    # ------------------------------------------------------------------ generate
    @staticmethod
    def generation(n: int = 1, steps: int = 0, guidance: float | None = None,
                   seed: int | None = None, width: int = 0, height: int = 0,
                   format: str = "PNG", negative_prompt: str = "") -> pb.GenerationOptions:
        o = pb.GenerationOptions(n=n, steps=steps, width=width, height=height,
                                 format=_IMAGE_ENUM[format.upper()], negative_prompt=negative_prompt)
        if guidance is not None:
            o.guidance = guidance
        if seed is not None:
            o.seed = seed
        return o

    def generate_stream(self, prompt: str, identity_id: str = "",
                        options: pb.GenerationOptions | None = None,
                        timeout: float | None = None) -> Iterator[pb.GeneratedImage]:
        req = pb.GenerateRequest(identity_id=identity_id, prompt=prompt, options=options)
        return _ImageStream(self.stub.Generate(req, **self._kw(timeout)))

    def generate(self, prompt: str, identity_id: str = "", timeout: float | None = None,
                 **generation) -> list[pb.GeneratedImage]:
        """All images of one prompt, sorted by index (kwargs: see `generation`)."""
        images = list(self.generate_stream(prompt, identity_id, self.generation(**generation),
                                           timeout))
        return sorted(images, key=lambda i: i.index)

    # ------------------------------------------------------------------ identities
    def get_identity(self, identity_id: str, timeout: float | None = None) -> pb.Identity:
        return self.stub.GetIdentity(pb.GetIdentityRequest(identity_id=identity_id),
                                     **self._kw(timeout)).identity

    def list_identities(self, page_size: int = 0, timeout: float | None = None
                        ) -> Iterator[pb.Identity]:
        """Every identity of this key's tenant, fetching pages as needed."""
        token = ""
        while True:
            resp = self.stub.ListIdentities(
                pb.ListIdentitiesRequest(page_size=page_size, page_token=token),
                **self._kw(timeout))
            yield from resp.identities
            token = resp.next_page_token
            if not token:
                return

    def delete_identity(self, identity_id: str, timeout: float | None = None) -> None:
        self.stub.DeleteIdentity(pb.DeleteIdentityRequest(identity_id=identity_id),
                                 **self._kw(timeout))

    def export_identity(self, identity_id: str, format: str = "",
                        timeout: float | None = None) -> pb.ExportIdentityResponse:
        """The identity as a file: `format` one of "lora_diffusers", "lora_kohya",
        "textual_inversion" ("diffusers"/"kohya" mean the LoRA ones; "": the method's default)."""
        fmt = {"diffusers": "lora_diffusers", "kohya": "lora_kohya"}.get(format, format)
        if fmt and fmt not in EXPORT_ENUMS:
            raise ValueError(f"`format` must be one of {sorted(EXPORT_ENUMS)}, got {format!r}")
        req = pb.ExportIdentityRequest(identity_id=identity_id, format=EXPORT_ENUMS.get(fmt, 0))
        return self.stub.ExportIdentity(req, **self._kw(timeout))

    def server_info(self, timeout: float | None = None) -> pb.ServerInfo:
        return self.stub.GetServerInfo(pb.GetServerInfoRequest(), **self._kw(timeout)).server_info

    def health(self, service: str = SERVICE_NAME, timeout: float | None = 5.0) -> str:
        """"SERVING", "NOT_SERVING", ... of grpc.health.v1 (no API key needed)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

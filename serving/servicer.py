"""`PersonalizationServicer`: protobuf <-> `ServiceCore`, nothing else.

Validation lives in `serving.validation`, errors -> status codes, auth and metrics in
`serving.interceptors`, model work in `serving.core` / `serving.engine`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from hypernet.errors import InvalidInputError
from serving import validation as v
from serving.cancel import CancelToken
from serving.core import FollowUp, GeneratedImage, ServiceCore
from serving.engine import METHODS
from serving.identities import IdentityRecord
from serving.imaging import FORMATS
from serving.jobs import Job, ProgressInfo
from serving.logs import tenant_var
from serving.stubs import pb, pb_grpc

_JOB_STATES = {name: pb.JobState.Value(f"JOB_STATE_{name}") for name in
               ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")}
_IMAGE_FORMATS = {"PNG": pb.IMAGE_FORMAT_PNG, "JPEG": pb.IMAGE_FORMAT_JPEG,
                  "WEBP": pb.IMAGE_FORMAT_WEBP}


def _ts(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    t = Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def identity_pb(r: IdentityRecord) -> pb.Identity:
    return pb.Identity(
        id=r.id, method=v.METHOD_ENUMS[r.method], artifact_bytes=r.artifact_bytes,
        timings=r.timings, created_at=_ts(r.created_at), expires_at=_ts(r.expires_at),
        base_fingerprint=r.base_fingerprint, token=r.token, class_noun=r.class_noun,
    )


def progress_pb(p: ProgressInfo) -> pb.Progress:
    return pb.Progress(stage=p.stage, step=p.step, total=p.total, loss=p.loss)


def accepted_pb(job: Job) -> pb.JobAccepted:
    return pb.JobAccepted(job_id=job.id, method=v.METHOD_ENUMS[job.method],
                          background=job.background, queue_position=job.queue_position)


def job_pb(job: Job) -> pb.Job:
    from serving.interceptors import status_for

    out = pb.Job(id=job.id, method=v.METHOD_ENUMS[job.method], state=_JOB_STATES[job.state],
                 background=job.background, created_at=_ts(job.created_at),
                 finished_at=_ts(job.finished_at))
    if job.progress is not None:
        out.progress.CopyFrom(progress_pb(job.progress))
    if job.record is not None:
        out.identity.CopyFrom(identity_pb(job.record))
    if job.error is not None:  # an INTERNAL error names the id its traceback was logged under
        code, message = status_for(job.error, request_id=job.request_id or None)
        out.error_code, out.error_message = code.name, message
    return out


def image_pb(img: GeneratedImage, prompt_index: int = 0) -> pb.GeneratedImage:
    return pb.GeneratedImage(index=img.index, prompt_index=prompt_index, seed=img.seed,
                             data=img.data, format=_IMAGE_FORMATS[img.format],
                             mime_type=FORMATS[img.format], width=img.width, height=img.height)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    left = context.time_remaining()
    return None if left is None else time.monotonic() + left


#: hypernet.base.arch.Arch -> the proto's BaseArch.
BASE_ARCHS = {"sd15": pb.BASE_ARCH_SD15, "sdxl": pb.BASE_ARCH_SDXL, "sd3": pb.BASE_ARCH_SD3,
              "flux": pb.BASE_ARCH_FLUX}


class PersonalizationServicer(pb_grpc.PersonalizationServiceServicer):
    def __init__(self, core: ServiceCore):
        self.core = core
        self.cfg = core.cfg

    def _base_limits(self) -> v.BaseLimits:
        e = self.core.engine
        return v.BaseLimits(e.native_size, e.size_multiple, e.arch or "sd15")

    # ------------------------------------------------------------------ personalise
    async def _watch(self, job: Job, event_cls) -> AsyncIterator:
        """Stream a job's accepted event, progress and identity; a foreground job is cancelled
        when the stream ends early (client cancel, deadline, error)."""
        try:
            yield event_cls(accepted=accepted_pb(job))
            async for ev in self.core.jobs.watch(job):
                if isinstance(ev, ProgressInfo):
                    yield event_cls(progress=progress_pb(ev))
                else:
                    yield event_cls(identity=identity_pb(ev))
        finally:
            if not job.background and not job.done:
                self.core.cancel(job, "the call ended")

    async def Personalize(self, request: pb.PersonalizeRequest, context
                          ) -> AsyncIterator[pb.PersonalizeResponse]:
        spec = v.personalization(request.photo, request.photos, request.method, request.options,
                                 self.cfg)
        job = await self.core.start_personalize(tenant_var.get(), spec, _deadline(context))
        try:
            async for ev in self._watch(job, pb.PersonalizeResponse):
                yield ev
        finally:
            job.loaded = None  # only PersonalizeAndGenerate uses the in-memory weights

    async def GetJob(self, request: pb.GetJobRequest, context) -> pb.GetJobResponse:
        return pb.GetJobResponse(job=job_pb(self.core.jobs.get(tenant_var.get(), request.job_id)))

    async def WatchJob(self, request: pb.WatchJobRequest, context
                       ) -> AsyncIterator[pb.WatchJobResponse]:
        job = self.core.jobs.get(tenant_var.get(), request.job_id)
        async for ev in self.core.jobs.watch(job):  # watching never cancels the job
            if isinstance(ev, ProgressInfo):
                yield pb.WatchJobResponse(progress=progress_pb(ev))
            else:
                yield pb.WatchJobResponse(identity=identity_pb(ev))

    async def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.CancelJobResponse:
        job = self.core.jobs.get(tenant_var.get(), request.job_id)
        self.core.cancel(job, "cancelled by CancelJob")
        if job.task is not None and not job.done:
            await asyncio.wait([job.task], timeout=min(5.0, context.time_remaining() or 5.0))
        return pb.CancelJobResponse(job=job_pb(job))

    # ------------------------------------------------------------------ generate
    async def Generate(self, request: pb.GenerateRequest, context
                       ) -> AsyncIterator[pb.GenerateResponse]:
        spec = v.generation(request.prompt, request.options, self.cfg, self._base_limits())
        loaded = None
        if request.identity_id:
            _, loaded = await self.core.load_identity(tenant_var.get(), request.identity_id)
        async for img in self.core.generate(spec, loaded, _deadline(context)):
            yield pb.GenerateResponse(image=image_pb(img))

    async def PersonalizeAndGenerate(self, request: pb.PersonalizeAndGenerateRequest, context
                                     ) -> AsyncIterator[pb.PersonalizeAndGenerateResponse]:
        if request.options.background:
            raise InvalidInputError("`options.background` must be false for "
                                    "PersonalizeAndGenerate (use Personalize), got true")
        if not 1 <= len(request.prompts) <= self.cfg.max_prompts:
            raise InvalidInputError(f"`prompts` must hold 1..{self.cfg.max_prompts} prompts, got "
                                    f"{len(request.prompts)}")
        specs = [v.generation(p, request.generation, self.cfg, self._base_limits(),
                              prefix="generation", prompt_field=f"prompts[{k}]")
                 for k, p in enumerate(request.prompts)]
        p_spec = v.fast_method(v.personalization(request.photo, request.photos, request.method,
                                                 request.options, self.cfg))
        follow_up = FollowUp(specs, CancelToken(_deadline(context)))
        try:
            job = await self.core.start_personalize(tenant_var.get(), p_spec, _deadline(context),
                                                    follow_up)
            try:
                async for ev in self._watch(job, pb.PersonalizeAndGenerateResponse):
                    yield ev
            finally:
                job.loaded = None
            async for k, img in self.core.follow_up_images(follow_up):
                yield pb.PersonalizeAndGenerateResponse(image=image_pb(img, prompt_index=k))
        finally:
            follow_up.close(self.core.queue)

    # ------------------------------------------------------------------ identities
    async def GetIdentity(self, request: pb.GetIdentityRequest, context
                          ) -> pb.GetIdentityResponse:
        record = await self.core.store_call(self.core.repo.get, tenant_var.get(),
                                           request.identity_id)
        return pb.GetIdentityResponse(identity=identity_pb(record))

    async def ListIdentities(self, request: pb.ListIdentitiesRequest, context
                             ) -> pb.ListIdentitiesResponse:
        records, token = await self.core.store_call(
            self.core.repo.list, tenant_var.get(), v.page_size(request.page_size),
            request.page_token)
        return pb.ListIdentitiesResponse(identities=[identity_pb(r) for r in records],
                                         next_page_token=token)

    async def DeleteIdentity(self, request: pb.DeleteIdentityRequest, context
                             ) -> pb.DeleteIdentityResponse:
        record = await self.core.delete_identity(tenant_var.get(), request.identity_id)
        return pb.DeleteIdentityResponse(identity_id=record.id)

    async def ExportIdentity(self, request: pb.ExportIdentityRequest, context
                             ) -> pb.ExportIdentityResponse:
        if request.format not in v.EXPORT_FORMATS:
            raise InvalidInputError(f"`format` must be one of {sorted(pb.ExportFormat.keys())}, "
                                    f"got {request.format}")
        data, fmt = await self.core.export(tenant_var.get(), request.identity_id,
                                           v.EXPORT_FORMATS[request.format])
        return pb.ExportIdentityResponse(data=data, format=v.EXPORT_ENUMS[fmt],
                                         filename=f"{request.identity_id}.{fmt}.safetensors")

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context
                            ) -> pb.GetServerInfoResponse:
        c, e = self.cfg, self.core.engine
        available = e.methods()  # only the methods the base's family supports
        identity_term = e.identity_term()[0]
        methods = [
            pb.MethodInfo(method=v.METHOD_ENUMS[name], background=spec.background,
                          available=available[name][0], detail=available[name][1],
                          default_steps=e.default_steps(name),
                          export_formats=[v.EXPORT_ENUMS[f] for f in spec.export_formats],
                          personalize_and_generate=not spec.background,
                          identity_term=name == "hyperdreambooth" and identity_term)
            for name, spec in METHODS.items() if name in available
        ]
        limits = pb.Limits(
            max_message_bytes=c.max_message_bytes, max_pixels=c.max_pixels,
            max_prompt_chars=c.max_prompt_chars, max_images=c.max_images,
            max_prompts=c.max_prompts, max_generate_steps=c.max_generate_steps,
            max_personalize_steps=c.max_personalize_steps, min_size=c.min_size,
            max_size=c.max_size, min_guidance=c.min_guidance, max_guidance=c.max_guidance,
            queue_capacity=c.queue_size, max_batch=c.max_batch, size_multiple=e.size_multiple,
        )
        return pb.GetServerInfoResponse(server_info=pb.ServerInfo(
            base_model=e.base_name, base_fingerprint=e.fingerprint, methods=methods,
            limits=limits, versions=e.versions(), device=e.device, default_size=e.native_size,
            default_generate_steps=c.default_generate_steps,
            auth_required=self.core.auth_required, identity_ttl_seconds=int(c.identity_ttl_s),
            base_arch=BASE_ARCHS.get(e.arch, pb.BASE_ARCH_UNSPECIFIED),
        ))

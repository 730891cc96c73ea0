"""Generating for many identities in one denoiser call, using the adapters' per-sample weights.

Works on every base family (SD 1.x/2.x and SDXL UNets, SD3 and FLUX transformers): the
adapters wrap the denoiser's linear layers wherever they are, and the per-sample weights follow
the batch dimension of the hidden states (FLUX's packed latent tokens included).

The service queues Generate work from many users; requests that agree on steps, guidance, size
and LiDB layout (`batch_key`) run together: sample i of the batch carries identity i's LiDB and
relaxed LoRA (zeros for "no identity"). Each image has its own generator seeded with
`seed + k`, so an image is the same whether it was generated alone or in a batch.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from hypernet.adapters.lidb.config import LiDBSpec
from hypernet.adapters.lidb.model import LiDB
from hypernet.adapters.lora.model import LoRA
from hypernet.base.arch import Arch, default_size, denoiser, pipeline_arch
from hypernet.errors import Cancelled, InvalidInputError
from hypernet.generate import check_generate_args, make_scheduler
from hypernet.identity import Identity

BATCH_LIDB = "batch_lidb"
BATCH_RELAXED = "batch_relaxed"


@dataclass(frozen=True)
class GenRequest:
    """One user's generation: `num_images` images of `identity` (None: the plain base)."""

    prompt: str
    identity: Identity | None = None
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 25
    guidance: float = 7.5
    height: int | None = None
    width: int | None = None
    num_images: int = 1

    def validate(self, arch: Arch = "sd15") -> None:
        """Raise InvalidInputError for an argument a base of `arch` cannot take."""
        check_generate_args(self.prompt, self.negative_prompt, self.steps, self.guidance, self.seed,
                            self.height, self.width, self.num_images, None, arch)

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one denoiser call. The LiDB rank is not part of it: cores
        of different ranks (a subspace-relaxed identity beside a rank-1 one) are zero-padded."""
        spec = _bases_spec(self.identity.spec).to_json() if self.identity else None
        layers = tuple(self.identity.layers) if self.identity else None
        return (self.steps, float(self.guidance), self.height, self.width, spec, layers)


def generate_batch(
    pipe,
    requests: list[GenRequest],
    *,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> list[list[Image.Image]]:
    """Run compatible requests in one pipeline call; returns each request's images in order.

    Identities are attached as per-sample adapters for the call only: whatever happens (even an
    exception or a cancellation), the pipeline is left with no identity active.

    Raises:
        InvalidInputError: bad arguments, or requests with different `batch_key`s.
        Cancelled: `should_stop` returned True at a step boundary.
    """
    if not requests:
        return []
    arch = pipeline_arch(pipe)
    for r in requests:
        r.validate(arch)
    keys = {r.batch_key() for r in requests if r.identity is not None} or {requests[0].batch_key()}
    shape_keys = {r.batch_key()[:4] for r in requests}
    if len(keys) > 1 or len(shape_keys) > 1:
        raise InvalidInputError("requests in one batch must share steps, guidance, size and LiDB spec, got several")
    first = requests[0]
    samples = [(r, r.seed + k) for r in requests for k in range(r.num_images)]
    identities = [r.identity for r, _ in samples]
    adapters = _batch_adapters(pipe, identities)
    try:
        if adapters is not None:
            _load_per_sample(adapters, identities)

        def _step_end(_pipe, step, _t, kwargs):
            if should_stop is not None and should_stop():
                raise Cancelled("generation was cancelled")
            if on_step is not None:
                on_step(step + 1, first.steps)
            return kwargs

        scheduler, pipe.scheduler = pipe.scheduler, make_scheduler(pipe)
        # FLUX has no negative prompt (validated empty): passing one would ask for "true CFG"
        negative = None if arch == "flux" else [r.negative_prompt for r, _ in samples]
        try:
            out = pipe(
                prompt=[r.prompt for r, _ in samples],
                negative_prompt=negative,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance,
                height=first.height or default_size(pipe),
                width=first.width or default_size(pipe),
                generator=[torch.Generator(device="cpu").manual_seed(s) for _, s in samples],
                callback_on_step_end=_step_end,
                output_type="pil",
            ).images
        finally:
            pipe.scheduler = scheduler
    finally:
        if adapters is not None:
            for handle in adapters:
                handle.use(None)
                handle.enable(False)
    result, i = [], 0
    for r in requests:
        result.append(out[i : i + r.num_images])
        i += r.num_images
    return result


_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bases_spec(spec: LiDBSpec) -> LiDBSpec:
    """The spec with its rank dropped (r = 1): what determines the layers and the aux bases."""
    return dataclasses.replace(spec, r=1)


def _batch_adapters(pipe, identities: list[Identity | None]) -> tuple[LiDB, LoRA] | None:
    """The pipeline's persistent batch adapters for this spec (aux bases are built once)."""
    ref = next((i for i in identities if i is not None), None)
    if ref is None:
        return None
    ref.check_base(pipe)
    for ident in identities:
        if ident is not None:
            ident.check_base(pipe)
    key = (_bases_spec(ref.spec).to_json(), tuple(ref.layers))
    net = denoiser(pipe)
    cached = _ATTACHED.get(net)
    if cached is None or cached[0] != key:
        if cached is not None:
            cached[1][0].remove()
            cached[1][1].remove()
        lidb = LiDB(pipe, LiDBSpec.from_json(key[0]), name=BATCH_LIDB, layers=list(key[1]))
        lora = LoRA(pipe, list(key[1]), r=1, name=BATCH_RELAXED)  # rank is set per call via use()
        cached = (key, (lidb, lora))
        _ATTACHED[net] = cached
    lidb, lora = cached[1]
    lidb.enable(True)
    lora.enable(True)
    return lidb, lora


def _load_per_sample(adapters: tuple[LiDB, LoRA], identities: list[Identity | None]) -> None:
    lidb, lora = adapters
    dev, dt = lidb.modules()[0].A_aux.device, lidb.modules()[0].A_aux.dtype
    r = max(i.spec.r for i in identities if i is not None)
    L, s = len(lidb.layer_names), lidb.spec
    A = torch.zeros(len(identities), L, r, s.a, device=dev, dtype=dt)  # (N, L, r, a); zero rows: no delta
    B = torch.zeros(len(identities), L, s.b, r, device=dev, dtype=dt)  # (N, L, b, r)
    for n, ident in enumerate(identities):
        if ident is not None:
            k = ident.spec.r
            A[n, :, :k] = ident.lidb["A_train"]
            B[n, :, :, :k] = ident.lidb["B_train"]
    lidb.use({"A_train": A, "B_train": B})
    R = max((i.relaxed_rank for i in identities if i is not None), default=0)
    if R == 0:
        lora.enable(False)
        return
    per_layer = []
    for li, layer in enumerate(lora.layer_names):
        base = lora.layers[layer].base_layer
        A = torch.zeros(len(identities), R, base.in_features, device=dev, dtype=dt)  # (N, R, n_in)
        B = torch.zeros(len(identities), base.out_features, R, device=dev, dtype=dt)  # (N, n_out, R)
        for n, ident in enumerate(identities):
            if ident is not None and ident.relaxed:
                r = ident.relaxed_rank
                A[n, :r] = ident.relaxed[f"{li}.A"]
                B[n, :, :r] = ident.relaxed[f"{li}.B"]
        per_layer.append((A, B))
    lora.use(per_layer)

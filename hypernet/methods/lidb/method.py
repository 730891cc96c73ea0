"""LiDB trained directly on an identity's photos (the baseline, and stage 1 of pretraining).

`train_lidb` is the per-identity entry point pretraining calls with latents and embeddings it
has already cached; `train` is the photo-in, artifact-out method.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from hypernet.adapters import LiDB, LiDBSpec, default_spec_for, lidb_layers
from hypernet.adapters.lidb.io import LiDBFile, lidb_to_bytes, load_lidb
from hypernet.base import base_fingerprint
from hypernet.errors import InvalidInputError
from hypernet.files import atomic_write_bytes
from hypernet.methods._common import TrainCall, personaliser, unwrap_empty_layers
from hypernet.methods.lidb.config import LiDBMethodConfig
from hypernet.training import TrainConfig, TrainData, build_train_data
from hypernet.training import train as run_training

log = logging.getLogger(__name__)

KIND = "lidb"


def train_lidb(
    pipe,
    latents: torch.Tensor,
    text_emb: torch.Tensor,
    spec: LiDBSpec,
    cfg: TrainConfig,
    *,
    flipped: torch.Tensor | None = None,
    pooled: torch.Tensor | None = None,
    handle: LiDB | None = None,
    init: dict[str, torch.Tensor] | None = None,
    progress=None,
    should_stop=None,
    checkpoint_dir: str | Path | None = None,
    stage: str = "lidb",
) -> tuple[dict[str, torch.Tensor], float]:
    """Fit one identity's LiDB weights to cached latents.

    Args:
        latents: (N, C, h, w) VAE latents of the identity's photos (`encode_images`).
        text_emb: (N or 1, L, D) embeddings of the training prompt (`encode_conditioning`).
        spec: the LiDB parameterisation (layers, a, b, r, aux seed).
        flipped: (N, C, h, w) latents of the mirrored photos, for flip augmentation.
        pooled: (N or 1, P) pooled text embeddings (SDXL, SD3, FLUX; None on SD 1.x).
        handle: an attached LiDB to reuse across identities (saves re-drawing the aux bases);
            it is left attached. None: attach one for this call and remove it afterwards.
        init: packed weights to start from; None starts from the adapter's fresh init
            (random A_train, zero B_train, so the delta is zero) - with `handle` reused, pass the
            `handle.state_dict()` captured right after creating it to restart from scratch.

    Returns:
        (packed weights {"A_train": (L, r, a), "B_train": (L, b, r)} on CPU, final loss), the final
        loss being the mean over the last tenth of the steps (single steps are noisy).
    """
    own = handle is None
    if own:
        handle = LiDB(pipe, spec, name="lidb-train")
    elif handle.spec != spec:
        raise InvalidInputError(f"`handle` must have spec {spec}, got {handle.spec}")
    try:
        if init is not None:
            handle.load_state_dict(init)
        data = TrainData(latents=latents, flipped=flipped, text_emb=text_emb, pooled=pooled)
        result = run_training(
            pipe,
            list(handle.parameters()),
            data,
            cfg,
            progress=progress,
            should_stop=should_stop,
            checkpoint_dir=checkpoint_dir,
            stage=stage,
        )
        weights = {k: v.to("cpu", torch.float32) for k, v in handle.state_dict().items()}
    finally:
        if own:
            handle.remove()
            unwrap_empty_layers(pipe)
    tail = result.losses[-max(1, len(result.losses) // 10) :]
    return weights, float(sum(tail) / max(1, len(tail)))


def _fit(pipe, call: TrainCall, config: LiDBMethodConfig) -> LiDBArtifact:
    """Train a LiDB on photos of one person; the pipeline is left as it was."""
    overrides = {k: getattr(config, k) for k in ("a", "b") if getattr(config, k) is not None}
    spec = default_spec_for(pipe, r=config.r, seed=config.aux_seed, text_encoder=config.text_encoder, **overrides)
    pixels = call.pixels(pipe)  # (N, 3, R, R)
    prompt = call.prompt(config.prompt)
    data = build_train_data(pipe, pixels, prompt, flip=config.train.flip)
    weights, loss = train_lidb(
        pipe,
        data.latents,
        data.text_emb,
        spec,
        config.train,
        flipped=data.flipped,
        pooled=data.pooled,
        progress=call.progress,
        should_stop=call.should_stop,
        checkpoint_dir=call.checkpoint_dir,
    )
    meta = call.metadata(KIND, prompt, loss, config)
    return LiDBArtifact(weights, spec, lidb_layers(pipe, spec), base_fingerprint(pipe), meta)


train = personaliser(LiDBMethodConfig, _fit, KIND)


class LiDBArtifact:
    """Packed LiDB weights + spec + the base fingerprint; ~100 KB at SD 1.5 scale."""

    kind = KIND

    def __init__(
        self,
        weights: dict[str, torch.Tensor],
        spec: LiDBSpec,
        layers: list[str],
        base_fingerprint: str,
        metadata: dict[str, str] | None = None,
    ):
        self.weights, self.spec, self.layers = weights, spec, list(layers)
        self.base_fingerprint = base_fingerprint
        self.metadata = dict(metadata or {})
        self._handles: dict[int, LiDB] = {}

    @property
    def token(self) -> str | None:
        return self.metadata.get("hdb_token")

    def save(self, path: str | Path) -> int:
        extra = {k: v for k, v in self.metadata.items() if k.startswith("hdb_")}
        data = lidb_to_bytes(self.weights, self.spec, self.layers, self.base_fingerprint, extra_meta=extra)
        atomic_write_bytes(path, data)
        return len(data)

    def export_lora(self, fmt: str, shapes: dict[str, tuple[int, int]]) -> bytes:
        """This LiDB as one standard LoRA of rank r, as safetensors bytes ("diffusers" or
        "kohya" keys): per layer A = A_train @ A_aux (r, n_in), B = B_aux @ B_train (n_out, r),
        so B @ A is exactly the LiDB's weight delta.

        Args:
            fmt: "diffusers" or "kohya".
            shapes: (n_in, n_out) of every adapted layer by pipeline-wide name (the frozen aux
                bases are regenerated from them, never stored).

        Raises:
            InvalidInputError: an unknown `fmt`, or `shapes` lacks one of the layers.
        """
        from hypernet.adapters import to_diffusers_lora, to_kohya_lora
        from hypernet.adapters.lidb.layer import aux_bases

        if fmt not in ("diffusers", "kohya"):
            raise InvalidInputError(f"`fmt` must be 'diffusers' or 'kohya', got {fmt!r}")
        missing = [n for n in self.layers if n not in shapes]
        if missing:
            raise InvalidInputError(f"`shapes` must cover every LiDB layer, got none for {missing[:3]}")
        A_train, B_train = self.weights["A_train"].float(), self.weights["B_train"].float()  # (L, r, a), (L, b, r)
        factors = {}
        for i, name in enumerate(self.layers):
            n_in, n_out = shapes[name]
            A_aux, B_aux = aux_bases(self.spec.seed, name, n_in, n_out, self.spec.a, self.spec.b)
            factors[name] = (A_train[i] @ A_aux, B_aux @ B_train[i])  # (r, n_in), (n_out, r)
        sd = (to_diffusers_lora if fmt == "diffusers" else to_kohya_lora)(factors)
        meta = {"source": "hyperdreambooth-lidb", "token": self.token or "",
                "base_fingerprint": self.base_fingerprint}
        return save_safetensors(sd, metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> LiDBArtifact:
        f: LiDBFile = load_lidb(path)
        return cls(f.weights, f.spec, f.layers, f.base_fingerprint, f.metadata)

    def apply(self, pipe) -> None:
        """Attach as an (unmerged) adapter; raises IncompatibleAdapterError on another base."""
        if id(pipe) in self._handles:
            raise InvalidInputError("artifact must not be applied twice to the same pipeline, got a second apply")
        f = LiDBFile(self.weights, self.spec, self.layers, self.base_fingerprint)
        f.check_compatible(base_fingerprint(pipe), lidb_layers(pipe, self.spec))
        handle = LiDB(pipe, self.spec, name=f"lidb-artifact-{id(self):x}")
        handle.load_state_dict(self.weights)
        self._handles[id(pipe)] = handle

    def remove(self, pipe) -> None:
        handle = self._handles.pop(id(pipe), None)
        if handle is not None:
            handle.remove()
            unwrap_empty_layers(pipe)

"""LiDB over a whole pipeline: choose layers, attach, pack weights as two tensors.

Packed weights are the one LiDB weight format, shared by trained adapters, stage-1 targets,
the hypernetwork's output and saved identities:
    {"A_train": (L, r, a), "B_train": (L, b, r)}   one identity, layers in `layers` order
    {"A_train": (N, L, r, a), "B_train": (N, L, b, r)}   one identity per sample
"""

from __future__ import annotations

import torch

from hypernet.adapters.handle import AdapterHandle
from hypernet.adapters.inject import linear_layers
from hypernet.adapters.lidb.config import LiDBSpec
from hypernet.adapters.lidb.layer import LiDBAdapter
from hypernet.errors import InvalidInputError

LiDBWeights = dict[str, torch.Tensor]


def lidb_layers(pipe, spec: LiDBSpec) -> list[str]:
    """The layers `spec` adapts in `pipe`, in module order.

    Raises:
        InvalidInputError: no layer matches, or a/b exceed a layer's width.
    """
    chosen = [(n, m) for n, m in linear_layers(pipe) if spec.selects(n)]
    if not chosen:
        raise InvalidInputError(f"spec must select at least one layer, got none among {spec.patterns}")
    min_in = min(m.in_features for _, m in chosen)
    min_out = min(m.out_features for _, m in chosen)
    if spec.a > min_in:
        raise InvalidInputError(f"`a` must be <= the narrowest adapted input width {min_in}, got {spec.a}")
    if spec.b > min_out:
        raise InvalidInputError(f"`b` must be <= the narrowest adapted output width {min_out}, got {spec.b}")
    return [n for n, _ in chosen]


#: Per base family, the aux sizes (a, b) of the default spec at r = 1. The paper's a = b = 100 where
#: the identity file stays under ~250 KB; SDXL adapts 560 layers (SD 1.5: 128), so a = b = 40
#: keeps its identity at ~220 KB (44,800 parameters; 100 would be 112,000 and ~480 KB).
#: Real-shape figures: benchmarks/bases_scale.py. Every default layer of the real bases is at least
#: 320 wide (SDXL 640, SD3 1536, FLUX 3072), so one a and one b fit every layer.
DEFAULT_AUX: dict[str, tuple[int, int]] = {"sd15": (100, 100), "sdxl": (40, 40), "sd3": (100, 100),
                                           "flux": (100, 100)}


def default_spec_for(pipe, **overrides) -> LiDBSpec:
    """The family's default a, b (`DEFAULT_AUX`), shrunk to the narrowest layer on small bases
    (the tiny bases: 32), plus `overrides`."""
    from hypernet.base.arch import pipeline_arch

    probe = LiDBSpec(a=1, b=1, text_encoder=overrides.get("text_encoder", False))
    chosen = [m for n, m in linear_layers(pipe) if probe.selects(n)]
    if not chosen:
        raise InvalidInputError(f"pipeline must have layers the LiDB spec selects, got none among {probe.patterns}")
    width = min(min(m.in_features, m.out_features) for m in chosen)
    a, b = DEFAULT_AUX[pipeline_arch(pipe)]
    kw = dict(a=min(a, width), b=min(b, width))
    kw.update(overrides)
    return LiDBSpec(**kw)


class LiDB(AdapterHandle):
    """A LiDB adapter attached to a pipeline under `name`."""

    def __init__(self, pipe, spec: LiDBSpec, name: str = "lidb", layers: list[str] | None = None):
        layers = lidb_layers(pipe, spec) if layers is None else layers
        super().__init__(pipe, name, layers)
        self.spec = spec
        for n in self.layer_names:
            base = self.layers[n].base_layer
            w = base.weight
            dtype = w.dtype if w.dtype.is_floating_point else torch.float32
            self.layers[n].adapters[name] = LiDBAdapter(
                n, base.in_features, base.out_features, spec.a, spec.b, spec.r, spec.seed,
                device=w.device, dtype=dtype,
            )

    def state_dict(self) -> LiDBWeights:
        """Packed trained weights (detached copies): A_train (L, r, a), B_train (L, b, r)."""
        mods = self.modules()
        return {
            "A_train": torch.stack([m.A_train.detach() for m in mods]).clone(),
            "B_train": torch.stack([m.B_train.detach() for m in mods]).clone(),
        }

    def load_state_dict(self, weights: LiDBWeights) -> None:
        """Copy packed weights (L, r, a)/(L, b, r) into the adapter's parameters."""
        A, B = self._check(weights, per_sample=False)
        with torch.no_grad():
            for i, m in enumerate(self.modules()):
                m.A_train.copy_(A[i])
                m.B_train.copy_(B[i])

    def use(self, weights: LiDBWeights | None) -> None:
        """Route external weights through the adapter without copying (grads flow to them).

        Accepts one identity (L, r, a)/(L, b, r) or one per sample (N, L, r, a)/(N, L, b, r);
        None goes back to the adapter's own parameters. External weights may have any rank r, not
        only the spec's: the aux bases do not depend on it (a rank-relaxed core, or a batch of
        identities zero-padded to the largest rank).
        """
        if weights is None:
            for m in self.modules():
                m.use_weights(None, None)
            return
        per_sample = weights["A_train"].dim() == 4
        A, B = self._check(weights, per_sample=per_sample, rank=weights["A_train"].shape[-2])
        for i, m in enumerate(self.modules()):
            if per_sample:
                m.use_weights(A[:, i], B[:, i])  # (N, r, a), (N, b, r)
            else:
                m.use_weights(A[i], B[i])

    def _check(self, weights: LiDBWeights, per_sample: bool, rank: int | None = None):
        if set(weights) != {"A_train", "B_train"}:
            raise InvalidInputError(f"LiDB weights must have keys A_train, B_train, got {sorted(weights)}")
        A, B = weights["A_train"], weights["B_train"]
        L, s = len(self.layer_names), self.spec
        r = s.r if rank is None else rank
        lead = (A.shape[0],) if per_sample else ()
        want_A, want_B = (*lead, L, r, s.a), (*lead, L, s.b, r)
        if tuple(A.shape) != want_A or tuple(B.shape) != want_B:
            raise InvalidInputError(
                f"LiDB weights must have shapes A_train {want_A}, B_train {want_B}, "
                f"got {tuple(A.shape)}, {tuple(B.shape)}"
            )
        return A, B

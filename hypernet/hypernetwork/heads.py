"""Output heads sized from a base's LiDB layer spec, on every base family (SD 1.x, SDXL, SD3, FLUX).

One adapter mechanism: the hypernetwork predicts exactly the weights a trained LiDB of that base
saves - {"A_train": (L, r, a), "B_train": (L, b, r)} over the layers `lidb_layers(pipe, spec)`
adapts, in the same order. Its heads are therefore never set by hand; they are read off the base:

    heads = sized_for_base(pipe, HypernetConfig(...))          # default spec of the base's family
    model = HyperNetwork(heads.config)                         # heads (L, d, r*a + b*r)
    LiDB(pipe, heads.spec, layers=heads.layers).use(model(pixels))

L and (a, b) come from the family's default spec (`default_spec_for`: SD 1.5 128 layers at
a = b = 100, SDXL 560 at 40, SD3-medium 191 at 100, FLUX.1 266 at 100, incl. the single-stream
blocks' q/k/v) or from the spec given. The LiDB uses one a and one b for every layer (every default
layer of the real bases is at least 320 wide, see `DEFAULT_AUX`), so one batched head (L, d, P)
covers every layer. `pipe` may be a loaded pipeline or a meta-device namespace
(`hypernet.base.real_configs.meta_base`): sizing needs shapes only.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypernet.adapters.lidb.config import LiDBSpec
from hypernet.hypernetwork.config import HypernetConfig


@dataclass(frozen=True)
class BaseHeads:
    """A hypernetwork architecture sized for one base: its config, the LiDB it predicts, the arch."""

    config: HypernetConfig
    spec: LiDBSpec
    layers: list[str]
    arch: str

    @property
    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per identity: {"A_train": (L, r, a), "B_train": (L, b, r)}, a trained LiDB's shapes."""
        c = self.config
        return {"A_train": (c.num_layers, c.r, c.a), "B_train": (c.num_layers, c.b, c.r)}


def sized_for_base(pipe, model: HypernetConfig, spec: LiDBSpec | None = None) -> BaseHeads:
    """`model` with its heads sized for `pipe`'s LiDB (`spec`, default: the family's default spec).

    Raises:
        InvalidInputError: the spec selects no layer of `pipe`, or a/b exceed a layer's width.
    """
    from hypernet.adapters.lidb.model import default_spec_for, lidb_layers
    from hypernet.base.arch import pipeline_arch

    spec = default_spec_for(pipe) if spec is None else spec
    layers = lidb_layers(pipe, spec)
    cfg = model.for_lidb(len(layers), spec.a, spec.b, spec.r)
    return BaseHeads(cfg, spec, layers, pipeline_arch(pipe))


__all__ = ["BaseHeads", "sized_for_base"]

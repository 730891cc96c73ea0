"""An Identity: a predicted LiDB plus what the rank-relaxed fine-tune trained on top of it, in one file.

It is the artifact of fast personalisation (HyperDreamBooth) and of the service. On disk: one
`.safetensors` of the LiDB file family (format "hdb.identity"), holding
    lidb.A_train (L, r, a), lidb.B_train (L, b, r)      the LiDB core
    relaxed.{i}.A (R, n_in_i), relaxed.{i}.B (n_out_i, R)  the relaxed LoRA (scale folded into B)
plus metadata (spec, layers, layer shapes, base fingerprint, token, class noun, timings, how the
rank was relaxed, how many photos). The two relaxations (`hypernet.personalize`) store differently:
    relax "lora"      lidb = the prediction (r = 1), relaxed = a rank-R LoRA over full layer dims;
    relax "subspace"  lidb = the trained core at rank r = R inside the aux bases (spec.r = R),
                      relaxed = {} - 8x smaller at SD 1.5 scale.
Exports fold everything into one standard LoRA of rank r (+ R) per layer, exactly.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from hypernet.adapters.export import Factors, stack_factors, to_diffusers_lora, to_kohya_lora
from hypernet.adapters.lidb.config import LiDBSpec
from hypernet.adapters.lidb.io import LiDBFile, lidb_from_bytes, lidb_to_bytes
from hypernet.adapters.lidb.layer import aux_bases
from hypernet.adapters.lidb.model import LiDB, lidb_layers
from hypernet.adapters.lora.model import LoRA
from hypernet.base.loading import base_fingerprint
from hypernet.errors import InvalidInputError
from hypernet.files import atomic_write_bytes

FORMAT = "hdb.identity"
LIDB_ADAPTER = "identity"
RELAXED_ADAPTER = "identity_relaxed"


@dataclass
class Identity:
    """One personalised identity, independent of any pipeline until `apply`."""

    spec: LiDBSpec
    layers: list[str]
    shapes: list[tuple[int, int]]  # (n_in, n_out) per layer: exports need no base model
    base_fingerprint: str
    lidb: dict[str, torch.Tensor]  # A_train (L, r, a), B_train (L, b, r)
    relaxed: dict[str, torch.Tensor] = field(default_factory=dict)  # "{i}.A"/"{i}.B", scale folded
    token: str = "ohwx"
    class_noun: str = "person"
    method: str = "hyperdreambooth"
    timings: dict[str, float] = field(default_factory=dict)
    relax: str | None = None  # "lora", "subspace"; None: no fine-tune (hypernetwork only)
    num_photos: int = 1  # photos it was personalised from
    combine: str | None = None  # how several photos' predictions combined ("weights", "embedding")
    kind: str = "identity"

    @property
    def relaxed_rank(self) -> int:
        return int(self.relaxed["0.A"].shape[0]) if self.relaxed else 0

    @property
    def prompt(self) -> str:
        return f"a photo of {self.token} {self.class_noun}"

    # ---- bytes and files -------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        meta = {
            "shapes": ";".join(f"{i},{o}" for i, o in self.shapes),
            "token": self.token,
            "class_noun": self.class_noun,
            "method": self.method,
            "relaxed_rank": str(self.relaxed_rank),
            "timings": json.dumps(self.timings, sort_keys=True),
            "num_photos": str(self.num_photos),
        }
        meta.update({k: v for k, v in (("relax", self.relax), ("combine", self.combine)) if v is not None})
        extra = {f"relaxed.{k}": v for k, v in self.relaxed.items()}
        return lidb_to_bytes(self.lidb, self.spec, self.layers, self.base_fingerprint,
                             extra_tensors=extra, fmt=FORMAT, extra_meta=meta)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<identity>") -> Identity:
        f = lidb_from_bytes(data, source=source, fmt=FORMAT)
        return cls._from_file(f)

    @classmethod
    def _from_file(cls, f: LiDBFile) -> Identity:
        m = f.metadata
        shapes = [tuple(int(x) for x in s.split(",")) for s in m["shapes"].split(";")] if m.get("shapes") else []
        relaxed = {k.removeprefix("relaxed."): v for k, v in f.extra.items() if k.startswith("relaxed.")}
        return cls(
            spec=f.spec, layers=f.layers, shapes=shapes, base_fingerprint=f.base_fingerprint,
            lidb=f.weights, relaxed=relaxed,
            token=m.get("token", "ohwx"), class_noun=m.get("class_noun", "person"),
            method=m.get("method", "hyperdreambooth"), timings=json.loads(m.get("timings", "{}")),
            relax=m.get("relax", "lora" if relaxed else None),  # files before "relax" was recorded
            num_photos=int(m.get("num_photos", "1")), combine=m.get("combine"),
        )

    def save(self, path: str | Path) -> int:
        data = self.to_bytes()
        atomic_write_bytes(path, data)
        return len(data)

    @classmethod
    def load(cls, path: str | Path) -> Identity:
        path = Path(path)
        if not path.is_file():
            raise InvalidInputError(f"`identity` must be an existing .safetensors file, got {str(path)!r}")
        return cls.from_bytes(path.read_bytes(), source=str(path))

    @property
    def nbytes(self) -> int:
        return len(self.to_bytes())

    # ---- math: factors and exports -----------------------------------------------------------
    def factors(self) -> Factors:
        """Per layer the stacked (A (r+R, n_in), B (n_out, r+R)) of LiDB + relaxed LoRA (R = 0 for
        a subspace-relaxed identity, whose LiDB core has rank r = R)."""
        lidb: Factors = {}
        relaxed: Factors = {}
        A_train, B_train = self.lidb["A_train"].float(), self.lidb["B_train"].float()
        for i, (name, (n_in, n_out)) in enumerate(zip(self.layers, self.shapes, strict=True)):
            A_aux, B_aux = aux_bases(self.spec.seed, name, n_in, n_out, self.spec.a, self.spec.b)
            lidb[name] = (A_train[i] @ A_aux, B_aux @ B_train[i])  # (r, n_in), (n_out, r)
            if self.relaxed:
                relaxed[name] = (self.relaxed[f"{i}.A"].float(), self.relaxed[f"{i}.B"].float())
        return stack_factors(lidb, relaxed) if relaxed else lidb

    def export_lora(self, fmt: str = "diffusers") -> bytes:
        """One standard LoRA (rank r + R, or r) as safetensors bytes: "diffusers" or "kohya" keys."""
        if fmt not in ("diffusers", "kohya"):
            raise InvalidInputError(f"`format` must be 'diffusers' or 'kohya', got {fmt!r}")
        sd = (to_diffusers_lora if fmt == "diffusers" else to_kohya_lora)(self.factors())
        meta = {"source": "hyperdreambooth", "token": self.token, "class_noun": self.class_noun,
                "base_fingerprint": self.base_fingerprint}
        return st_save(sd, metadata=meta)

    # ---- applying to a pipeline ----------------------------------------------------------------
    def check_base(self, pipe) -> None:
        """Raise IncompatibleAdapterError unless `pipe` is the base this identity was made for."""
        LiDBFile(self.lidb, self.spec, self.layers, self.base_fingerprint).check_compatible(
            cached_fingerprint(pipe), lidb_layers(pipe, self.spec)
        )

    def apply(self, pipe) -> None:
        """Attach as forward-time adapters (the base weights are not touched)."""
        self.check_base(pipe)
        try:
            lidb = LiDB(pipe, self.spec, name=LIDB_ADAPTER, layers=self.layers)
            lidb.load_state_dict(self.lidb)
            if self.relaxed:
                lora = LoRA(pipe, self.layers, r=self.relaxed_rank, alpha=self.relaxed_rank, name=RELAXED_ADAPTER)
                lora.load_state_dict(self.relaxed)
        except BaseException:
            self.remove(pipe)  # never leave half an identity attached
            raise

    def remove(self, pipe) -> None:
        from hypernet.adapters.inject import delete_adapter

        delete_adapter(pipe, LIDB_ADAPTER)
        delete_adapter(pipe, RELAXED_ADAPTER)


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached_fingerprint(pipe) -> str:
    """`base_fingerprint`, computed once per denoiser object (it is on the per-request hot path)."""
    from hypernet.base.arch import denoiser

    net = denoiser(pipe)
    fp = _FINGERPRINTS.get(net)
    if fp is None:
        fp = _FINGERPRINTS[net] = base_fingerprint(pipe)
    return fp


def layer_shapes(pipe, layers: list[str]) -> list[tuple[int, int]]:
    from hypernet.adapters.inject import linear_layers

    by_name = dict(linear_layers(pipe))
    return [(by_name[n].in_features, by_name[n].out_features) for n in layers]

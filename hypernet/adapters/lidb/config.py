"""LiDB spec: which layers, aux sizes a and b, rank r and the seed of the frozen bases."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from hypernet.errors import InvalidInputError

#: The paper's default: every UNet attention projection (128 layers on SD 1.5, 560 on SDXL).
UNET_ATTENTION = r"^unet\..*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
#: MMDiT joint attention (SD3, FLUX double-stream blocks): the image-stream projections and the
#: context-stream ones (add_*_proj, to_add_out). SD3's last block has no to_add_out; SD3.5's
#: dual-attention blocks add an image-only `attn2`.
MMDIT_ATTENTION = (r"^transformer\.transformer_blocks\.\d+\.attn2?\."
                   r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$")
#: FLUX single-stream blocks: q/k/v over the joined text+image sequence. Their output projection
#: (`proj_out`) mixes attention with the MLP branch (15,360 -> 3,072), so it is not an
#: attention projection and stays out of the default.
FLUX_SINGLE_ATTENTION = r"^transformer\.single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)$"
#: Every base's default: layer names carry the component and block names, so the three patterns
#: never select across families (a UNet has no `transformer.` layers and vice versa).
DENOISER_ATTENTION = (UNET_ATTENTION, MMDIT_ATTENTION, FLUX_SINGLE_ATTENTION)
#: Optional: the CLIP text encoders' attention projections (48 more on SD 1.5). T5's attention
#: (`SelfAttention.q`) is not matched: adapting a 4.7B-parameter T5 is not a LiDB's job.
TEXT_ATTENTION = r"^text_encoder(_2)?\..*\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$"


@dataclass(frozen=True)
class LiDBSpec:
    """Everything that, with a base model, determines the LiDB parameterisation.

    delta_W = B_aux @ B_train @ A_train @ A_aux per adapted layer (n_in -> n_out), where
    A_aux (a, n_in) and B_aux (n_out, b) are frozen, seeded, orthogonal; A_train (r, a) and
    B_train (b, r) train. Defaults are the paper's (a = b = 100, r = 1).
    """

    a: int = field(default=100, metadata={"help": "rows of A_aux; <= every adapted layer's n_in"})
    b: int = field(default=100, metadata={"help": "columns of B_aux; <= every adapted layer's n_out"})
    r: int = field(default=1, metadata={"help": "rank of the trained core (the paper uses 1)"})
    seed: int = field(default=0, metadata={"help": "seed of the frozen aux bases"})
    text_encoder: bool = field(default=False, metadata={"help": "also adapt the CLIP text encoders' attention"})

    def __post_init__(self) -> None:
        for k in ("a", "b", "r"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise InvalidInputError(f"`{k}` must be a positive integer, got {v!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidInputError(f"`seed` must be a non-negative integer, got {self.seed!r}")

    @property
    def patterns(self) -> list[str]:
        return [*DENOISER_ATTENTION] + ([TEXT_ATTENTION] if self.text_encoder else [])

    def selects(self, layer_name: str) -> bool:
        return any(re.match(p, layer_name) for p in self.patterns)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LiDBSpec:
        return cls(**json.loads(text))

"""A plain LoRA over named layers of a pipeline (the rank-relaxed fine-tune's adapter)."""

from __future__ import annotations

import torch

from hypernet.adapters.handle import AdapterHandle
from hypernet.adapters.lora.layer import LoRAAdapter
from hypernet.errors import InvalidInputError


class LoRA(AdapterHandle):
    """LoRA of rank `r` on `layers` under `name`. Weights: {"{i}.A": (r, n_in), "{i}.B": (n_out, r)}
    with i the layer's index in `layers` (short keys: names are stored once, in metadata)."""

    def __init__(self, pipe, layers: list[str], r: int = 4, alpha: float | None = None,
                 name: str = "relaxed", seed: int = 0):
        if not isinstance(r, int) or r < 1:
            raise InvalidInputError(f"`rank` must be a positive integer, got {r!r}")
        super().__init__(pipe, name, layers)
        self.r = r
        self.alpha = float(alpha if alpha is not None else r)
        for n in self.layer_names:
            base = self.layers[n].base_layer
            w = base.weight
            dtype = w.dtype if w.dtype.is_floating_point else torch.float32
            self.layers[n].adapters[name] = LoRAAdapter(
                n, base.in_features, base.out_features, r, self.alpha, seed, device=w.device, dtype=dtype
            )

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, m in enumerate(self.modules()):
            out[f"{i}.A"] = m.A.detach().clone()
            out[f"{i}.B"] = m.B.detach().clone()
        return out

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, m in enumerate(self.modules()):
                try:
                    A, B = weights[f"{i}.A"], weights[f"{i}.B"]
                except KeyError as e:
                    raise InvalidInputError(
                        f"LoRA weights must hold {e.args[0]!r}, got keys like {sorted(weights)[:4]}"
                    ) from e
                if A.shape != m.A.shape or B.shape != m.B.shape:
                    raise InvalidInputError(
                        f"LoRA weights for layer {i} must have shapes {tuple(m.A.shape)}, "
                        f"{tuple(m.B.shape)}, got {tuple(A.shape)}, {tuple(B.shape)}"
                    )
                m.A.copy_(A)
                m.B.copy_(B)

    def use(self, weights: list[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        """External per-layer (A, B), shared or per sample; None -> own parameters."""
        for i, m in enumerate(self.modules()):
            m.use_weights(*(weights[i] if weights is not None else (None, None)))

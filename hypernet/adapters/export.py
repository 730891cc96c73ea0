"""Exporting low-rank factors to standard LoRA files other tools load.

Any sum of adapters on a layer (a LiDB plus a relaxed LoRA, say) is itself a LoRA: stacking the
factors, A = [A_1; A_2] (r1+r2, n_in) and B = [B_1, B_2] (n_out, r1+r2), gives
B @ A = B_1 @ A_1 + B_2 @ A_2 exactly. For LiDB, A_1 = A_train @ A_aux and B_1 = B_aux @ B_train.
"""

from __future__ import annotations

import torch

from hypernet.errors import InvalidInputError

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (A (r, n_in), B (n_out, r))


def stack_factors(*parts: Factors) -> Factors:
    """Concatenate several adapters' factors layer by layer (the sum of their deltas)."""
    layers = list(dict.fromkeys(n for p in parts for n in p))
    out: Factors = {}
    for n in layers:
        As = [p[n][0] for p in parts if n in p]
        Bs = [p[n][1] for p in parts if n in p]
        out[n] = (torch.cat(As, dim=0), torch.cat(Bs, dim=1))
    return out


def to_diffusers_lora(factors: Factors) -> dict[str, torch.Tensor]:
    """peft/diffusers keys ("unet.<path>.lora_A.weight"); alpha = rank, so scale is 1."""
    sd: dict[str, torch.Tensor] = {}
    for name, (A, B) in factors.items():
        sd[f"{name}.lora_A.weight"] = A.detach().to("cpu", torch.float32).contiguous()
        sd[f"{name}.lora_B.weight"] = B.detach().to("cpu", torch.float32).contiguous()
    return sd


_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


def to_kohya_lora(factors: Factors) -> dict[str, torch.Tensor]:
    """kohya-ss keys ("lora_unet_<path_with_underscores>.lora_down.weight", ".alpha" = rank).

    UNet bases only (SD 1.x/2.x, SDXL): kohya's SD3/FLUX files name the original checkpoint's
    fused blocks (`double_blocks_0_img_attn_qkv`), which diffusers' separate q/k/v projections do
    not map to one-to-one; export those bases in the diffusers format.

    Raises:
        InvalidInputError: a layer outside the UNet and the CLIP text encoders.
    """
    sd: dict[str, torch.Tensor] = {}
    for name, (A, B) in factors.items():
        comp, _, path = name.partition(".")
        if comp not in _KOHYA_PREFIX:
            raise InvalidInputError(
                f"kohya export must only hold UNet or CLIP text-encoder layers, got {name!r} "
                "(export SD3/FLUX adapters in the diffusers format)")
        key = _KOHYA_PREFIX[comp] + path.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = A.detach().to("cpu", torch.float32).contiguous()
        sd[f"{key}.lora_up.weight"] = B.detach().to("cpu", torch.float32).contiguous()
        sd[f"{key}.alpha"] = torch.tensor(float(A.shape[0]))
    return sd

"""The hypernetwork's objective (paper eq. 2): alpha * diffusion loss + beta * weight-space L2.

The diffusion term comes from running the base with the *predicted* LiDB routed per sample
through `LiDB.use`, so it is differentiable w.r.t. the prediction; this module only combines
terms and defines the weight-space error used for both training and validation.
"""

from __future__ import annotations

import torch

from hypernet.hypernetwork.model import pack_theta


def weight_mse(pred: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
               reduction: str = "mean") -> torch.Tensor:
    """Squared L2 distance of packed LiDB weights per layer, averaged over layers (and samples).

    The paper's ||theta_hat - theta_pre||^2 sums over every weight; averaging over layers keeps
    the term's scale independent of how many layers a base has (16 on the tiny base, 128 on
    SD 1.5), so one `beta` suits both, while the sum within a layer keeps the paper's geometry.

    Args:
        pred / target: {"A_train": (N, L, r, a), "B_train": (N, L, b, r)}.
        reduction: "mean" -> scalar; "none" -> (N,) per sample.
    """
    diff = pack_theta(pred).float() - pack_theta(target).float()  # (N, L, P)
    per = diff.pow(2).sum(dim=2).mean(dim=1)  # (N,)
    return per.mean() if reduction == "mean" else per


def hypernet_loss(diffusion: torch.Tensor | None, l2: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """alpha * diffusion + beta * l2 (the diffusion term may be skipped when alpha is 0)."""
    loss = beta * l2
    if diffusion is not None and alpha:
        loss = loss + alpha * diffusion
    return loss


def zeros_like_weights(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The zero adapter (delta W = 0) in the same packed shapes."""
    return {k: torch.zeros_like(v) for k, v in w.items()}


__all__ = ["hypernet_loss", "weight_mse", "zeros_like_weights"]

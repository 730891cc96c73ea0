"""The LiDB adapter of one layer: frozen random bases around a tiny trained core."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def layer_seed(seed: int, layer_name: str) -> int:
    """A 63-bit seed from (spec seed, layer name), identical on every machine and device."""
    digest = hashlib.sha256(f"{seed}:{layer_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def orthonormal_rows(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A (rows, cols) fp32 matrix with orthonormal rows (rows <= cols), drawn on CPU.

    QR of a Gaussian matrix with the sign fix on R's diagonal gives a Haar-distributed basis that
    depends only on the generator's state.
    """
    g = torch.randn(cols, rows, generator=generator, dtype=torch.float32)
    q, r = torch.linalg.qr(g)  # q: (cols, rows), orthonormal columns
    q = q * torch.sign(torch.diagonal(r)).clamp(min=0).mul(2).sub(1)  # sign(0) -> +1
    return q.T.contiguous()  # (rows, cols)


def aux_bases(seed: int, layer_name: str, n_in: int, n_out: int, a: int, b: int):
    """(A_aux (a, n_in), B_aux (n_out, b)) for one layer; regenerated, never stored.

    A_aux has orthonormal rows; B_aux has orthonormal columns (its transpose's rows), i.e.
    both map between the layer's space and the small a/b spaces without changing norms.
    """
    gen = torch.Generator(device="cpu").manual_seed(layer_seed(seed, layer_name))
    A_aux = orthonormal_rows(a, n_in, gen)  # (a, n_in)
    B_aux = orthonormal_rows(b, n_out, gen).T.contiguous()  # (n_out, b)
    return A_aux, B_aux


class LiDBAdapter(nn.Module):
    """delta_W = B_aux @ B_train @ A_train @ A_aux for one layer.

    A_train (r, a) and B_train (b, r) are parameters; `use_weights` swaps in external tensors
    instead, either shared (r, a)/(b, r) or per sample (N, r, a)/(N, b, r) - the latter lets one
    batch carry different identities and lets a hypernetwork's prediction stay differentiable.
    A_train starts random and B_train at zero, so a fresh adapter is the identity map.
    """

    def __init__(self, layer_name: str, n_in: int, n_out: int, a: int, b: int, r: int, seed: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        A_aux, B_aux = aux_bases(seed, layer_name, n_in, n_out, a, b)
        # Frozen and regenerable: non-persistent so they never reach a state dict or a file.
        self.register_buffer("A_aux", A_aux.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("B_aux", B_aux.to(device=device, dtype=dtype), persistent=False)
        gen = torch.Generator(device="cpu").manual_seed(layer_seed(seed + 1, layer_name))
        init_A = torch.randn(r, a, generator=gen) / a**0.5
        self.A_train = nn.Parameter(init_A.to(device=device, dtype=dtype))
        self.B_train = nn.Parameter(torch.zeros(b, r, device=device, dtype=dtype))
        self._external: tuple[torch.Tensor, torch.Tensor] | None = None

    def use_weights(self, A_train: torch.Tensor | None, B_train: torch.Tensor | None) -> None:
        """Use external (possibly per-sample, possibly grad-carrying) weights; None -> own params."""
        self._external = None if A_train is None else (A_train, B_train)

    def core(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._external if self._external is not None else (self.A_train, self.B_train)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        A_train, B_train = self.core()
        A = A_train.to(self.A_aux.dtype) @ self.A_aux  # (..., r, a) @ (a, n_in) -> (..., r, n_in)
        B = self.B_aux @ B_train.to(self.B_aux.dtype)  # (n_out, b) @ (..., b, r) -> (..., n_out, r)
        return A, B

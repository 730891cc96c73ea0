"""relax="subspace": the fine-tune relaxes the rank inside the LiDB subspace (A_train R x a, B_train b x R)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hypernet.adapters import default_spec_for, lidb_layers
from hypernet.base import load_pipeline
from hypernet.batch_generate import GenRequest, generate_batch
from hypernet.errors import InvalidInputError
from hypernet.identity import Identity, cached_fingerprint, layer_shapes
from hypernet.personalize import personalize, subspace_init

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _unet_out(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return pipe.unet(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400]),
                         encoder_hidden_states=torch.randn(1, 77, 32, generator=g)).sample


def _subspace_identity(pipe, seed: int, rank: int = 3, scale: float = 0.3) -> Identity:
    """A subspace-relaxed identity with a random rank-`rank` core (no training needed)."""
    spec = dataclasses.replace(default_spec_for(pipe), r=rank)
    layers = lidb_layers(pipe, spec)
    g = torch.Generator().manual_seed(seed)
    L = len(layers)
    lidb = {"A_train": torch.randn(L, rank, spec.a, generator=g) * scale,
            "B_train": torch.randn(L, spec.b, rank, generator=g) * scale}
    return Identity(spec=spec, layers=layers, shapes=layer_shapes(pipe, layers),
                    base_fingerprint=cached_fingerprint(pipe), lidb=lidb, relax="subspace")


def test_init_is_the_prediction_plus_components_that_get_gradient():
    g = torch.Generator().manual_seed(0)
    pred = {"A_train": torch.randn(5, 1, 8, generator=g), "B_train": torch.randn(5, 6, 1, generator=g)}
    init = subspace_init(pred, rank=3, seed=1)
    A, B = init["A_train"], init["B_train"]  # (5, 3, 8), (5, 6, 3)
    assert A.shape == (5, 3, 8) and B.shape == (5, 6, 3)
    assert torch.equal(A[:, :1], pred["A_train"]) and torch.equal(B[:, :, :1], pred["B_train"])
    assert torch.equal(B @ A, pred["B_train"] @ pred["A_train"])  # the start's delta is the prediction's
    assert (A[:, 1:].abs() > 0).all() and (B[:, :, 1:] == 0).all()  # B of extras gets gradient through A
    zero = subspace_init({k: torch.zeros_like(v) for k, v in pred.items()}, 3, 1)
    assert (zero["A_train"].abs() > 0).all()  # the ablation's zero prediction: no dead (A = B = 0) component


def test_subspace_fine_tune_trains_the_core_and_makes_a_small_identity(tiny_pipe, tiny_hypernet, photo_bytes):
    kw = dict(hypernet=tiny_hypernet, steps=4, rank=3, detector="center", lr=1e-2)
    pred = personalize(tiny_pipe, photo_bytes(), steps=0, hypernet=tiny_hypernet, detector="center")
    sub = personalize(tiny_pipe, photo_bytes(), relax="subspace", **kw)
    lora = personalize(tiny_pipe, photo_bytes(), relax="lora", **kw)
    assert sub.relax == "subspace" and sub.relaxed == {} and sub.spec.r == 3 and sub.relaxed_rank == 0
    assert dataclasses.replace(sub.spec, r=1) == pred.spec  # same aux bases
    A, B = sub.lidb["A_train"], sub.lidb["B_train"]
    assert A.shape[1] == 3 and B.shape[2] == 3
    assert B[:, :, 1:].abs().max() > 0  # the extra components trained
    assert (A[:, :1] - pred.lidb["A_train"]).abs().max() > 0  # and so did the predicted one
    back = Identity.from_bytes(sub.to_bytes())
    assert back.relax == "subspace" and back.spec.r == 3 and torch.equal(back.lidb["A_train"], A)
    assert lora.relax == "lora" and Identity.from_bytes(lora.to_bytes()).relax == "lora"
    assert sub.nbytes < lora.nbytes
    # rank = the prediction's (1): the predicted core itself trains, with no extra components (what
    # an old client asking for rank 1, valid for the LoRA relaxation, gets).
    one = personalize(tiny_pipe, photo_bytes(), relax="subspace", **{**kw, "rank": 1})
    assert one.spec == pred.spec and (one.lidb["B_train"] - pred.lidb["B_train"]).abs().max() > 0
    with pytest.raises(InvalidInputError, match=r"`rank` must be in \[1, \d+\] for relax='subspace'"):
        personalize(tiny_pipe, photo_bytes(), relax="subspace", **{**kw, "rank": 256})
    with pytest.raises(InvalidInputError, match="`relax` must be one of"):
        personalize(tiny_pipe, photo_bytes(), relax="full", **kw)
    # The default is the subspace relaxation (measured at least as good, at half the time and size).
    default = personalize(tiny_pipe, photo_bytes(), **kw)
    assert default.relax == "subspace" and torch.equal(default.lidb["A_train"], A)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_subspace_export_reproduces_the_identity_via_stock_loader(tiny_base_dir, tmp_path, fmt):
    pipe = load_pipeline(tiny_base_dir, device="cpu")
    ident = _subspace_identity(pipe, seed=4)
    base_out = _unet_out(pipe)
    ident.apply(pipe)
    want = _unet_out(pipe)
    assert (want - base_out).abs().max() > 1e-3
    (tmp_path / "x.safetensors").write_bytes(ident.export_lora(fmt))
    stock = load_pipeline(tiny_base_dir, device="cpu")
    stock.load_lora_weights(str(tmp_path), weight_name="x.safetensors")
    torch.testing.assert_close(_unet_out(stock), want, atol=1e-5, rtol=1e-5)
    assert ident.factors()[ident.layers[0]][0].shape[0] == 3  # rank R, no LoRA beside it


def test_batch_mixes_subspace_and_lora_identities(tiny_pipe, make_identity):
    sub, lora = _subspace_identity(tiny_pipe, seed=5), make_identity(tiny_pipe, seed=6)
    assert GenRequest("x", sub).batch_key() == GenRequest("x", lora).batch_key()
    reqs = [GenRequest("a photo of ohwx person", sub, seed=1, steps=3),
            GenRequest("a photo of ohwx person", lora, seed=2, steps=3),
            GenRequest("a photo of a person", None, seed=3, steps=3)]
    batched = generate_batch(tiny_pipe, reqs)
    for r, got in zip(reqs, batched, strict=True):
        want = generate_batch(tiny_pipe, [r])[0][0]
        assert np.abs(np.asarray(got[0], dtype=int) - np.asarray(want, dtype=int)).max() <= 2
    plain = generate_batch(tiny_pipe, [GenRequest("a photo of ohwx person", None, seed=1, steps=3)])[0][0]
    assert np.abs(np.asarray(plain, dtype=int) - np.asarray(batched[0][0], dtype=int)).max() > 10


def test_sd15_scale_identity_sizes_on_meta_device(tmp_path):
    """At SD 1.5 shapes: the rank-4 LoRA relaxation's identity is 3.2 MiB, the subspace one 8x smaller."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from hypernet.adapters import LiDBSpec

    cfg = dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        norm_num_groups=32, act_fn="silu",
    )
    with torch.device("meta"):
        model = SimpleNamespace(unet=UNet2DConditionModel(**cfg))
    spec = LiDBSpec(a=100, b=100, r=1)
    layers = lidb_layers(model, spec)
    shapes = layer_shapes(model, layers)
    L, R = len(layers), 4
    pred = {"A_train": torch.zeros(L, 1, 100), "B_train": torch.zeros(L, 100, 1)}
    relaxed = {}
    for i, (n_in, n_out) in enumerate(shapes):
        relaxed[f"{i}.A"], relaxed[f"{i}.B"] = torch.zeros(R, n_in), torch.zeros(n_out, R)
    lora = Identity(spec=spec, layers=layers, shapes=shapes, base_fingerprint="0" * 16, lidb=pred,
                    relaxed=relaxed, relax="lora").save(tmp_path / "lora.safetensors")
    sub = Identity(spec=dataclasses.replace(spec, r=R), layers=layers, shapes=shapes, base_fingerprint="0" * 16,
                   lidb=subspace_init(pred, R, 0), relax="subspace").save(tmp_path / "sub.safetensors")
    assert L == 128 and 3.1 * 2**20 < lora < 3.3 * 2**20, lora
    assert L * R * 200 * 4 < sub < L * R * 200 * 4 + 20_000, sub  # 409,600 bytes of weights + metadata
    assert sub < lora / 7


"""The LiDB adapter: frozen bases, exact merge round trip, per-sample weights, files, export."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from hypernet.adapters import (
    LiDB,
    LiDBSpec,
    default_spec_for,
    load_lidb,
    save_lidb,
    to_diffusers_lora,
    to_kohya_lora,
    uninject,
)
from hypernet.adapters.lidb.layer import aux_bases
from hypernet.base import base_fingerprint
from hypernet.errors import IncompatibleAdapterError, InvalidInputError


def _unet_out(pipe, seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=g)
    text = torch.randn(batch, 77, 32, generator=g)
    with torch.no_grad():
        return pipe.unet(sample, torch.tensor([500] * batch), encoder_hidden_states=text).sample


def _random_weights(lidb: LiDB, seed: int, scale: float = 0.5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in lidb.state_dict().items()}


def test_aux_bases_are_deterministic_orthonormal_and_per_layer():
    A1, B1 = aux_bases(0, "unet.x.to_q", 64, 48, 16, 12)
    A2, B2 = aux_bases(0, "unet.x.to_q", 64, 48, 16, 12)
    A3, _ = aux_bases(0, "unet.y.to_q", 64, 48, 16, 12)
    A4, _ = aux_bases(1, "unet.x.to_q", 64, 48, 16, 12)
    assert A1.shape == (16, 64) and B1.shape == (48, 12) and A1.dtype == torch.float32
    assert torch.equal(A1, A2) and torch.equal(B1, B2)
    assert not torch.allclose(A1, A3) and not torch.allclose(A1, A4)
    torch.testing.assert_close(A1 @ A1.T, torch.eye(16), atol=1e-5, rtol=0)  # orthonormal rows
    torch.testing.assert_close(B1.T @ B1, torch.eye(12), atol=1e-5, rtol=0)  # orthonormal columns
    assert torch.allclose(A1.norm(dim=1), torch.ones(16), atol=1e-5)  # constant row norm


def test_spec_validation(tiny_pipe):
    with pytest.raises(InvalidInputError, match="`r` must be a positive integer"):
        LiDBSpec(r=0)
    with pytest.raises(InvalidInputError, match="`a` must be <= the narrowest adapted input width 32, got 100"):
        LiDB(tiny_pipe, LiDBSpec(a=100, b=16))


def test_fresh_lidb_is_identity_and_never_mutates_base(tiny_pipe):
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    ref = _unet_out(tiny_pipe)
    lidb = LiDB(tiny_pipe, default_spec_for(tiny_pipe))
    assert len(lidb.layer_names) == 32
    assert lidb.num_parameters() == 32 * (1 * 32 + 32 * 1)
    torch.testing.assert_close(_unet_out(tiny_pipe), ref, atol=0, rtol=0)
    lidb.load_state_dict(_random_weights(lidb, 1))
    adapted = _unet_out(tiny_pipe)
    assert (adapted - ref).abs().max() > 1e-3  # the adapter does something
    uninject(tiny_pipe)
    after = tiny_pipe.unet.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(_unet_out(tiny_pipe), ref, atol=0, rtol=0)


def test_merge_matches_forward_and_unmerge_restores_exactly(tiny_pipe):
    lidb = LiDB(tiny_pipe, default_spec_for(tiny_pipe))
    lidb.load_state_dict(_random_weights(lidb, 2))
    base_w = {n: layer.base_layer.weight.clone() for n, layer in lidb.layers.items()}
    unmerged = _unet_out(tiny_pipe)
    lidb.merge()
    merged = _unet_out(tiny_pipe)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert any(not torch.equal(layer.base_layer.weight, base_w[n]) for n, layer in lidb.layers.items())
    lidb.unmerge()
    assert all(torch.equal(layer.base_layer.weight, base_w[n]) for n, layer in lidb.layers.items())
    torch.testing.assert_close(_unet_out(tiny_pipe), unmerged, atol=0, rtol=0)


def test_merge_stack_two_kinds_out_of_order_unmerge_and_removal_while_merged(tiny_pipe):
    """The stack README promises: a LiDB and a LoRA merged on the same layers equal their forward
    terms; unmerging out of order is refused and changes nothing; removing an adapter while
    merged keeps the other's effect; removing both restores the base weights bit-exactly."""
    from hypernet.adapters import LoRA

    base_w = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    lidb = LiDB(tiny_pipe, default_spec_for(tiny_pipe))
    lidb.load_state_dict(_random_weights(lidb, 4))
    lora = LoRA(tiny_pipe, lidb.layer_names, r=2, name="second")
    lora.load_state_dict({k: torch.randn(v.shape, generator=torch.Generator().manual_seed(5)) * 0.3
                          for k, v in lora.state_dict().items()})
    both = _unet_out(tiny_pipe)
    with lidb.disabled():
        only_lora = _unet_out(tiny_pipe)
    assert (both - only_lora).abs().max() > 1e-3 and (only_lora - _base_out(tiny_pipe, lidb, lora)).abs().max() > 1e-3
    first = lidb.layers[lidb.layer_names[0]]

    lidb.merge()
    lora.merge()
    assert first.merged_adapters == ["lidb", "second"] and first.active_adapters() == []
    torch.testing.assert_close(_unet_out(tiny_pipe), both, atol=1e-5, rtol=1e-5)
    merged_w = {n: layer.base_layer.weight.clone() for n, layer in lidb.layers.items()}
    with pytest.raises(InvalidInputError, match="must be the last merged adapter 'second', got 'lidb'"):
        lidb.unmerge()
    assert all(torch.equal(layer.base_layer.weight, merged_w[n]) for n, layer in lidb.layers.items())
    assert first.merged_adapters == ["lidb", "second"]

    lora.unmerge()  # in order: the LoRA's forward term is back, the LiDB stays merged
    assert first.merged_adapters == ["lidb"] and first.active_adapters() == ["second"]
    torch.testing.assert_close(_unet_out(tiny_pipe), both, atol=1e-5, rtol=1e-5)
    lora.merge()

    lidb.remove()  # under the LoRA on the stack: both come off, the LoRA runs unmerged again
    assert all("lidb" not in layer.adapters for layer in lidb.layers.values())
    assert first.merged_adapters == [] and first.active_adapters() == ["second"]
    torch.testing.assert_close(_unet_out(tiny_pipe), only_lora, atol=1e-5, rtol=1e-5)
    lora.remove()
    after = {k.replace("base_layer.", ""): v for k, v in tiny_pipe.unet.state_dict().items()}
    assert all(torch.equal(after[k], base_w[k]) for k in base_w)


def _base_out(pipe, *handles) -> torch.Tensor:
    """The UNet output with every adapter in `handles` disabled."""
    for h in handles:
        h.enable(False)
    try:
        return _unet_out(pipe)
    finally:
        for h in handles:
            h.enable(True)


def test_merge_refuses_non_finite_weights(tiny_pipe):
    lidb = LiDB(tiny_pipe, default_spec_for(tiny_pipe))
    w = _random_weights(lidb, 3)
    w["B_train"][0, 0, 0] = float("nan")
    lidb.load_state_dict(w)
    first = lidb.layers[lidb.layer_names[0]]
    before = first.base_layer.weight.clone()
    with pytest.raises(InvalidInputError, match="finite"):
        lidb.merge()
    assert torch.equal(first.base_layer.weight, before)


def test_per_sample_weights_equal_separate_runs(tiny_pipe):
    lidb = LiDB(tiny_pipe, default_spec_for(tiny_pipe))
    w1, w2 = _random_weights(lidb, 4), _random_weights(lidb, 5)
    zero = {k: torch.zeros_like(v) for k, v in w1.items()}
    singles = []
    for w in (w1, zero, w2):
        lidb.use(w)
        singles.append(_unet_out(tiny_pipe, seed=7, batch=1))
    lidb.use({k: torch.stack([w1[k], zero[k], w2[k]]) for k in w1})  # (3, L, ...)
    g = torch.Generator().manual_seed(7)
    sample = torch.randn(1, 4, 8, 8, generator=g).repeat(3, 1, 1, 1)
    text = torch.randn(1, 77, 32, generator=g).repeat(3, 1, 1)
    with torch.no_grad():
        batched = tiny_pipe.unet(sample, torch.tensor([500] * 3), encoder_hidden_states=text).sample
    for i in range(3):
        torch.testing.assert_close(batched[i : i + 1], singles[i], atol=1e-5, rtol=1e-5)
    assert (singles[0] - singles[2]).abs().max() > 1e-3


def test_per_sample_weights_carry_gradients(tiny_pipe):
    lidb = LiDB(tiny_pipe, default_spec_for(tiny_pipe))
    w = {k: torch.stack([v, v]).requires_grad_(True) for k, v in _random_weights(lidb, 6).items()}
    lidb.use(w)
    out = tiny_pipe.unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 10]),
                         encoder_hidden_states=torch.randn(2, 77, 32)).sample
    out.square().mean().backward()
    assert w["A_train"].grad is not None and w["A_train"].grad.abs().sum() > 0


def test_save_load_round_trip_and_compatibility_checks(tiny_pipe, tmp_path, tiny_base_dir):
    from hypernet.base import load_pipeline, make_tiny_pipeline

    spec = default_spec_for(tiny_pipe, seed=3)
    lidb = LiDB(tiny_pipe, spec)
    w = _random_weights(lidb, 8)
    fp = base_fingerprint(tiny_pipe)
    size = save_lidb(tmp_path / "id.safetensors", w, spec, lidb.layer_names, fp)
    assert size == (tmp_path / "id.safetensors").stat().st_size
    f = load_lidb(tmp_path / "id.safetensors")
    assert f.spec == spec and f.layers == lidb.layer_names and f.base_fingerprint == fp
    assert f.metadata["format_version"] == "1" and f.metadata["a"] == "32"
    assert all(torch.equal(f.weights[k], w[k]) for k in w)
    f.check_compatible(fp, lidb.layer_names)
    other = load_pipeline(make_tiny_pipeline(tmp_path / "other", seed=9), device="cpu")
    with pytest.raises(IncompatibleAdapterError, match="fingerprint"):
        f.check_compatible(base_fingerprint(other), lidb.layer_names)
    with pytest.raises(IncompatibleAdapterError, match="adapted layers"):
        f.check_compatible(fp, lidb.layer_names[:-1])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidInputError, match="junk.safetensors"):
        load_lidb(tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "foreign.safetensors")
    with pytest.raises(InvalidInputError, match="hdb.lidb"):
        load_lidb(tmp_path / "foreign.safetensors")


def test_text_encoder_layers_are_optional(tiny_pipe):
    spec = default_spec_for(tiny_pipe, text_encoder=True)
    lidb = LiDB(tiny_pipe, spec)
    te = [n for n in lidb.layer_names if n.startswith("text_encoder.")]
    assert len(te) == 2 * 4  # 2 CLIP layers x q/k/v/out_proj
    lidb.load_state_dict(_random_weights(lidb, 9))
    ids = tiny_pipe.tokenizer("a photo of ohwx person", return_tensors="pt").input_ids
    with torch.no_grad():
        adapted = tiny_pipe.text_encoder(ids)[0]
        with lidb.disabled():
            plain = tiny_pipe.text_encoder(ids)[0]
    assert (adapted - plain).abs().max() > 1e-4


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_exported_lora_reproduces_lidb_through_stock_diffusers(tiny_base_dir, tmp_path, fmt):
    from hypernet.base import load_pipeline

    pipe = load_pipeline(tiny_base_dir, device="cpu")
    lidb = LiDB(pipe, default_spec_for(pipe))
    lidb.load_state_dict(_random_weights(lidb, 10))
    want = _unet_out(pipe, seed=3)
    sd = (to_diffusers_lora if fmt == "diffusers" else to_kohya_lora)(lidb.factors())
    save_file(sd, tmp_path / "lora.safetensors")

    stock = load_pipeline(tiny_base_dir, device="cpu")
    base_out = _unet_out(stock, seed=3)
    stock.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    got = _unet_out(stock, seed=3)
    assert (want - base_out).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sd15_scale_sizes_on_meta_device(tmp_path):
    """At SD 1.5 shapes (meta device, no memory): 128 layers, 25,600 params, a file <= 140 KB."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    cfg = dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        norm_num_groups=32, act_fn="silu",
    )
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    model = SimpleNamespace(unet=unet)
    lidb = LiDB(model, LiDBSpec(a=100, b=100, r=1))
    assert len(lidb.layer_names) == 128
    assert lidb.num_parameters() == 25_600
    uninject(model)

    spec = LiDBSpec(a=160, b=80, r=1)
    lidb = LiDB(model, spec)
    L = len(lidb.layer_names)
    weights = {"A_train": torch.zeros(L, 1, 160), "B_train": torch.zeros(L, 80, 1)}
    size = save_lidb(tmp_path / "sd15.safetensors", weights, spec, lidb.layer_names, "0" * 16)
    f = load_lidb(tmp_path / "sd15.safetensors")
    assert sum(v.numel() for v in f.weights.values()) == 30_720
    assert 30_720 * 4 < size <= 140_000, size

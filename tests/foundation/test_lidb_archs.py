"""LiDB on the SDXL, SD3 and FLUX layouts (tiny random pipelines): the same guarantees as SD 1.5's
(tests/foundation/test_lidb.py) - identity at init, exact merge/unmerge, per-sample weights equal
to separate runs, files with a fingerprint, and an exported LoRA that the family's stock
`load_lora_weights` loads and that reproduces the LiDB output."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from hypernet.adapters import (
    LiDB,
    default_spec_for,
    load_lidb,
    save_lidb,
    to_diffusers_lora,
    to_kohya_lora,
    uninject,
)
from hypernet.base import base_fingerprint, load_pipeline, make_tiny_pipeline
from hypernet.base.arch import denoiser, pipeline_arch
from hypernet.errors import IncompatibleAdapterError, InvalidInputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARCHS = ("sdxl", "sd3", "flux")
#: Default layers of each tiny layout (see hypernet/base/tiny_archs.py):
#: SDXL 8 transformer blocks x attn1/attn2 x q/k/v/out; SD3 2 joint blocks x 8 projections, the
#: last without to_add_out; FLUX 2 joint blocks x 8 + 2 single-stream blocks x q/k/v.
TINY_LAYERS = {"sdxl": 64, "sd3": 15, "flux": 22}
#: a = b of the default spec: the family default (SDXL 40, SD3/FLUX 100) capped by the narrowest
#: adapted layer (tiny SDXL's attention is 64 wide, SD3/FLUX's 32).
TINY_AUX = {"sdxl": 40, "sd3": 32, "flux": 32}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, object]:
    return {a: make_tiny_pipeline(tmp_path_factory.mktemp(f"tiny-{a}"), seed=0, arch=a) for a in ARCHS}


@pytest.fixture(scope="module")
def loaded(tiny_dirs) -> dict[str, object]:
    return {a: load_pipeline(tiny_dirs[a], device="cpu", dtype="fp32") for a in ARCHS}


def _load(loaded, arch):
    """A fresh copy of the module's pipeline (tests inject adapters; copying beats reloading)."""
    return copy.deepcopy(loaded[arch])


def _inputs(pipe, seed: int, batch: int) -> dict:
    """Random but well-formed denoiser inputs for the pipeline's family (batch `batch`)."""
    g = torch.Generator().manual_seed(seed)
    net, arch = denoiser(pipe), pipeline_arch(pipe)
    c = net.config
    if arch in ("sd15", "sdxl"):
        kw = dict(sample=torch.randn(batch, c.in_channels, 8, 8, generator=g), timestep=torch.tensor([500] * batch),
                  encoder_hidden_states=torch.randn(batch, 77, c.cross_attention_dim, generator=g))
        if arch == "sdxl":
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)}
        return kw
    kw = dict(encoder_hidden_states=torch.randn(batch, 12, c.joint_attention_dim, generator=g),
              pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=g))
    if arch == "sd3":
        return dict(hidden_states=torch.randn(batch, c.in_channels, 8, 8, generator=g),
                    timestep=torch.tensor([500.0] * batch), **kw)
    # FLUX: 16 packed latent tokens (a 4x4 grid of 2x2 patches), timesteps in [0, 1].
    ids = torch.zeros(16, 3)
    ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    return dict(hidden_states=torch.randn(batch, 16, c.in_channels, generator=g), timestep=torch.tensor([0.5] * batch),
                img_ids=ids, txt_ids=torch.zeros(12, 3), **kw)


def _out(pipe, seed: int = 0, batch: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return denoiser(pipe)(**_inputs(pipe, seed, batch)).sample


def _random_weights(lidb: LiDB, seed: int, scale: float = 0.5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in lidb.state_dict().items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_default_layers_per_family(loaded, arch):
    pipe = _load(loaded, arch)
    assert pipeline_arch(pipe) == arch
    lidb = LiDB(pipe, default_spec_for(pipe))
    names = lidb.layer_names
    assert len(names) == TINY_LAYERS[arch]
    aux = TINY_AUX[arch]
    assert (lidb.spec.a, lidb.spec.b, lidb.spec.r) == (aux, aux, 1)
    assert lidb.num_parameters() == len(names) * 2 * aux
    if arch != "sdxl":
        assert all(n.startswith("transformer.") for n in names)
        assert any(n.endswith(".attn.add_q_proj") for n in names)
        assert any(n.endswith(".attn.to_add_out") for n in names)
    if arch == "sd3":  # the last joint block is context-pre-only: no to_add_out there
        assert "transformer.transformer_blocks.1.attn.to_add_out" not in names
    if arch == "flux":
        single = [n for n in names if ".single_transformer_blocks." in n]
        assert len(single) == 2 * 3 and not any(n.endswith("proj_out") for n in single)


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_init_merge_unmerge_exact(loaded, arch):
    pipe = _load(loaded, arch)
    before = {k: v.clone() for k, v in denoiser(pipe).state_dict().items()}
    ref = _out(pipe)
    lidb = LiDB(pipe, default_spec_for(pipe))
    torch.testing.assert_close(_out(pipe), ref, atol=0, rtol=0)  # B_train = 0: the identity map
    lidb.load_state_dict(_random_weights(lidb, 2))
    unmerged = _out(pipe)
    assert (unmerged - ref).abs().max() > 1e-3
    base_w = {n: layer.base_layer.weight.clone() for n, layer in lidb.layers.items()}
    lidb.merge()
    torch.testing.assert_close(_out(pipe), unmerged, atol=1e-5, rtol=1e-5)
    lidb.unmerge()
    assert all(torch.equal(layer.base_layer.weight, base_w[n]) for n, layer in lidb.layers.items())
    torch.testing.assert_close(_out(pipe), unmerged, atol=0, rtol=0)
    uninject(pipe)
    after = denoiser(pipe).state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(_out(pipe), ref, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_per_sample_weights_equal_separate_runs(loaded, arch):
    pipe = _load(loaded, arch)
    lidb = LiDB(pipe, default_spec_for(pipe))
    w1, w2 = _random_weights(lidb, 4), _random_weights(lidb, 5)
    zero = {k: torch.zeros_like(v) for k, v in w1.items()}
    singles = []
    for w in (w1, zero, w2):
        lidb.use(w)
        singles.append(_out(pipe, seed=7, batch=1))
    lidb.use({k: torch.stack([w1[k], zero[k], w2[k]]) for k in w1})  # (3, L, ...)
    one = _inputs(pipe, seed=7, batch=1)
    batched_in = {k: (v.repeat(3, *[1] * (v.dim() - 1)) if k not in ("img_ids", "txt_ids") and torch.is_tensor(v)
                      else v) for k, v in one.items()}
    if "added_cond_kwargs" in one:
        batched_in["added_cond_kwargs"] = {k: v.repeat(3, 1) for k, v in one["added_cond_kwargs"].items()}
    with torch.no_grad():
        batched = denoiser(pipe)(**batched_in).sample
    for i in range(3):
        torch.testing.assert_close(batched[i : i + 1], singles[i], atol=1e-5, rtol=1e-5)
    assert (singles[0] - singles[2]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_file_round_trip_checks_the_fingerprint(loaded, arch, tmp_path):
    pipe = _load(loaded, arch)
    spec = default_spec_for(pipe, seed=3)
    lidb = LiDB(pipe, spec)
    w = _random_weights(lidb, 8)
    fp = base_fingerprint(pipe)
    save_lidb(tmp_path / "id.safetensors", w, spec, lidb.layer_names, fp)
    f = load_lidb(tmp_path / "id.safetensors")
    assert f.spec == spec and f.layers == lidb.layer_names and f.base_fingerprint == fp
    assert all(torch.equal(f.weights[k], w[k]) for k in w)
    f.check_compatible(fp, lidb.layer_names)
    uninject(pipe)
    assert base_fingerprint(pipe) == fp  # the adapter wrappers do not change it
    other = _load(loaded, arch)
    with torch.no_grad():  # another base: one weight of one adapted layer differs
        dict(other.components)["unet" if arch == "sdxl" else "transformer"].get_submodule(
            lidb.layer_names[0].partition(".")[2]).weight[0, 0] += 1.0
    with pytest.raises(IncompatibleAdapterError, match="fingerprint"):
        f.check_compatible(base_fingerprint(other), lidb.layer_names)
    assert len({base_fingerprint(p) for p in loaded.values()}) == len(ARCHS)  # families never collide


@pytest.mark.parametrize("arch,fmt", [("sdxl", "diffusers"), ("sdxl", "kohya"), ("sd3", "diffusers"),
                                      ("flux", "diffusers")])
def test_exported_lora_reproduces_lidb_through_stock_diffusers(loaded, tiny_dirs, tmp_path, arch, fmt):
    pipe = _load(loaded, arch)
    lidb = LiDB(pipe, default_spec_for(pipe))
    lidb.load_state_dict(_random_weights(lidb, 10))
    want = _out(pipe, seed=3)
    sd = (to_diffusers_lora if fmt == "diffusers" else to_kohya_lora)(lidb.factors())
    save_file(sd, tmp_path / "lora.safetensors")

    stock = load_pipeline(tiny_dirs[arch], device="cpu", dtype="fp32")  # a fresh, stock load
    base_out = _out(stock, seed=3)
    stock.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    got = _out(stock, seed=3)
    assert (want - base_out).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_kohya_export_refuses_transformer_layers(loaded, arch):
    pipe = _load(loaded, arch)
    lidb = LiDB(pipe, default_spec_for(pipe))
    with pytest.raises(InvalidInputError, match="diffusers format"):
        to_kohya_lora(lidb.factors())


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_sdxl_text_encoders_export_through_stock_diffusers(loaded, tiny_dirs, tmp_path, fmt):
    """`text_encoder=True` on SDXL adapts both CLIP towers; stock SDXL loads both back."""
    pipe = _load(loaded, "sdxl")
    lidb = LiDB(pipe, default_spec_for(pipe, text_encoder=True))
    te = [n for n in lidb.layer_names if n.startswith("text_encoder")]
    assert len([n for n in te if n.startswith("text_encoder_2.")]) == len(te) // 2 == 2 * 4  # 2 layers x q/k/v/out
    lidb.load_state_dict(_random_weights(lidb, 11))
    ids = pipe.tokenizer("a photo of ohwx person", return_tensors="pt").input_ids
    with torch.no_grad():
        want = [pipe.text_encoder(ids)[0], pipe.text_encoder_2(ids)[0]]
    sd = (to_diffusers_lora if fmt == "diffusers" else to_kohya_lora)(lidb.factors())
    save_file(sd, tmp_path / "lora.safetensors")
    stock = load_pipeline(tiny_dirs["sdxl"], device="cpu", dtype="fp32")
    with torch.no_grad():
        plain = stock.text_encoder_2(ids)[0]
    stock.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    with torch.no_grad():
        got = [stock.text_encoder(ids)[0], stock.text_encoder_2(ids)[0]]
    assert (want[1] - plain).abs().max() > 1e-4
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)

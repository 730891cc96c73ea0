"""Identity files, exports and per-sample batched generation on the tiny base."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hypernet.adapters.inject import adapted_layers
from hypernet.base import load_pipeline, make_tiny_pipeline
from hypernet.batch_generate import GenRequest, generate_batch
from hypernet.errors import Cancelled, IncompatibleAdapterError, InvalidInputError
from hypernet.identity import Identity


def _unet_out(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return pipe.unet(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400]),
                         encoder_hidden_states=torch.randn(1, 77, 32, generator=g)).sample


def _no_identity_active(pipe) -> bool:
    return all(not layer.active_adapters() for layer in adapted_layers(pipe).values())


def test_identity_round_trips_bytes_and_file(tiny_pipe, make_identity, tmp_path):
    ident = make_identity(tiny_pipe, seed=1)
    data = ident.to_bytes()
    back = Identity.from_bytes(data)
    assert back.layers == ident.layers and back.shapes == ident.shapes and back.spec == ident.spec
    assert back.token == "ohwx" and back.timings == {"hypernetwork": 0.01} and back.relaxed_rank == 2
    assert all(torch.equal(back.lidb[k], ident.lidb[k]) for k in ident.lidb)
    assert all(torch.equal(back.relaxed[k], ident.relaxed[k]) for k in ident.relaxed)
    n = ident.save(tmp_path / "me.safetensors")
    assert n == len(data) == (tmp_path / "me.safetensors").stat().st_size
    loaded = Identity.load(tmp_path / "me.safetensors")
    assert loaded.factors().keys() == ident.factors().keys()
    assert all(torch.equal(loaded.relaxed[k], ident.relaxed[k]) for k in ident.relaxed)
    with pytest.raises(InvalidInputError, match="hdb.identity"):
        from hypernet.adapters import save_lidb

        save_lidb(tmp_path / "plain.safetensors", ident.lidb, ident.spec, ident.layers, ident.base_fingerprint)
        Identity.load(tmp_path / "plain.safetensors")


def test_apply_and_remove_restore_base_exactly(tiny_pipe, make_identity):
    ref = _unet_out(tiny_pipe)
    ident = make_identity(tiny_pipe, seed=2)
    ident.apply(tiny_pipe)
    applied = _unet_out(tiny_pipe)
    assert (applied - ref).abs().max() > 1e-3
    ident.remove(tiny_pipe)
    torch.testing.assert_close(_unet_out(tiny_pipe), ref, atol=0, rtol=0)


def test_identity_refuses_another_base(tmp_path, make_identity, tiny_pipe):
    ident = make_identity(tiny_pipe, seed=3)
    other = load_pipeline(make_tiny_pipeline(tmp_path / "other", seed=5), device="cpu")
    with pytest.raises(IncompatibleAdapterError, match="fingerprint"):
        ident.apply(other)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_exported_lora_reproduces_identity_via_stock_loader(tiny_base_dir, tmp_path, make_identity, fmt):
    pipe = load_pipeline(tiny_base_dir, device="cpu")
    ident = make_identity(pipe, seed=4, rank=3)
    ident.apply(pipe)
    want = _unet_out(pipe)
    (tmp_path / "x.safetensors").write_bytes(ident.export_lora(fmt))
    stock = load_pipeline(tiny_base_dir, device="cpu")
    stock.load_lora_weights(str(tmp_path), weight_name="x.safetensors")
    torch.testing.assert_close(_unet_out(stock), want, atol=1e-5, rtol=1e-5)
    A = ident.factors()[ident.layers[0]][0]
    assert A.shape[0] == ident.spec.r + 3  # folded rank 1 + r


def test_batched_generation_equals_one_by_one(tiny_pipe, make_identity):
    a, b = make_identity(tiny_pipe, seed=5), make_identity(tiny_pipe, seed=6, rank=1)
    reqs = [GenRequest("a photo of ohwx person", a, seed=1, steps=4),
            GenRequest("a photo of a person", None, seed=2, steps=4, num_images=2),
            GenRequest("ohwx smiling", b, negative_prompt="blurry", seed=3, steps=4)]
    batched = generate_batch(tiny_pipe, reqs)
    assert [len(x) for x in batched] == [1, 2, 1]
    assert _no_identity_active(tiny_pipe)
    singles = [generate_batch(tiny_pipe, [r])[0] for r in reqs]
    for got, want in zip(batched, singles, strict=True):
        for g_img, w_img in zip(got, want, strict=True):
            diff = np.abs(np.asarray(g_img, dtype=int) - np.asarray(w_img, dtype=int))
            assert diff.max() <= 2, diff.max()
    # the identities really change the images (same seed, same prompt, with and without)
    plain = generate_batch(tiny_pipe, [GenRequest("a photo of ohwx person", None, seed=1, steps=4)])[0][0]
    assert np.abs(np.asarray(plain, dtype=int) - np.asarray(singles[0][0], dtype=int)).max() > 10


def test_cancellation_inside_generation_leaves_pipeline_clean(tiny_pipe, make_identity):
    ident = make_identity(tiny_pipe, seed=7)
    base = generate_batch(tiny_pipe, [GenRequest("a person", None, seed=0, steps=3)])[0][0]
    calls = []

    def stop():
        calls.append(1)
        return len(calls) >= 2

    with pytest.raises(Cancelled):
        generate_batch(tiny_pipe, [GenRequest("a person", ident, seed=0, steps=3)], should_stop=stop)
    assert _no_identity_active(tiny_pipe)
    again = generate_batch(tiny_pipe, [GenRequest("a person", None, seed=0, steps=3)])[0][0]
    assert np.array_equal(np.asarray(base), np.asarray(again))


def test_exception_inside_the_unet_leaves_pipeline_clean(tiny_pipe, make_identity):
    """README: generation never leaves an identity applied, even when it raises. A real error
    mid-UNet (a module raising on the second denoising step, as an OOM would) in `generate_batch`,
    the path the service uses: no adapter active, the scheduler put back, the base image intact."""
    ident = make_identity(tiny_pipe, seed=8)
    base = generate_batch(tiny_pipe, [GenRequest("a person", None, seed=0, steps=3)])[0][0]
    scheduler = tiny_pipe.scheduler
    calls = []

    def fail_on_second_step(module, args, output):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure inside the UNet")

    hook = tiny_pipe.unet.mid_block.register_forward_hook(fail_on_second_step)
    try:
        with pytest.raises(RuntimeError, match="simulated failure inside the UNet"):
            generate_batch(tiny_pipe, [GenRequest("a person", ident, seed=0, steps=3),
                                       GenRequest("a person", None, seed=0, steps=3)])
    finally:
        hook.remove()
    assert len(calls) == 2  # it failed mid-generation, with the identity attached
    assert adapted_layers(tiny_pipe) and _no_identity_active(tiny_pipe)
    assert tiny_pipe.scheduler is scheduler
    again = generate_batch(tiny_pipe, [GenRequest("a person", None, seed=0, steps=3)])[0][0]
    assert np.array_equal(np.asarray(base), np.asarray(again))


@pytest.mark.parametrize("kw,msg", [({"steps": 0}, "`steps`"), ({"guidance": float("nan")}, "`guidance`"),
                                    ({"height": 50}, "`height`"), ({"num_images": 0}, "`num_images`")])
def test_bad_generation_arguments(tiny_pipe, kw, msg):
    with pytest.raises(InvalidInputError, match=msg):
        generate_batch(tiny_pipe, [GenRequest("a person", **kw)])

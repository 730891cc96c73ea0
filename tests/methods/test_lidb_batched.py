"""`train_lidb_batch`: K identities through one UNet call, each fitted as if it were alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hypernet.adapters import LiDB, default_spec_for
from hypernet.errors import InvalidInputError
from hypernet.methods.lidb import LiDBFitData, train_lidb, train_lidb_batch
from hypernet.methods.lidb.batched import clip_per_identity
from hypernet.training import TrainConfig

# Identity 1 (30x larger latents) has gradient norms ~0.001, the others ~0.015: a clip at 0.01
# acts on them but not on it, and clipping the chunk by its joint norm would shrink identity 1's
# steps too. adam_eps near the gradients' elements (~3e-5) keeps AdamW from hiding that scale.
CFG = TrainConfig(steps=6, lr=1e-2, batch_size=2, weight_decay=1e-2, max_grad_norm=0.01, adam_eps=1e-4, seed=0)


@pytest.fixture()
def setup(shared_pipe):
    """A LiDB handle on the shared tiny pipe, its fresh init, 4 identities, a prompt embedding."""
    spec = default_spec_for(shared_pipe)
    handle = LiDB(shared_pipe, spec, name="batched-test")
    init = handle.state_dict()
    g = torch.Generator().manual_seed(0)
    c, s = shared_pipe.unet.config.in_channels, shared_pipe.unet.config.sample_size
    items = [LiDBFitData(torch.randn(3, c, s, s, generator=g), torch.randn(3, c, s, s, generator=g), seed=10 + i)
             for i in range(4)]
    # Identity 1's latents are 30x larger: its gradient norms differ from the others' (see CFG).
    items[1] = LiDBFitData(items[1].latents * 30, items[1].flipped * 30, seed=11)
    emb = torch.randn(1, 77, shared_pipe.text_encoder.config.hidden_size, generator=g)
    yield shared_pipe, spec, handle, init, items, emb
    handle.remove()


def _close(a: dict, b: dict, atol: float = 2e-5) -> None:
    for k in ("A_train", "B_train"):
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4)


def test_chunk_matches_each_identity_fitted_alone(setup):
    pipe, spec, handle, init, items, emb = setup
    before = {k: v.clone() for k, v in handle.state_dict().items()}
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    chunk = train_lidb_batch(pipe, handle, items, emb, CFG, init=init)
    for item, (w, loss) in zip(items, chunk, strict=True):
        alone_w, alone_loss = train_lidb_batch(pipe, handle, [item], emb, CFG, init=init)[0]
        _close(w, alone_w)
        assert loss == pytest.approx(alone_loss, rel=1e-4)
        assert w["B_train"].abs().max() > 1e-3  # trained away from the zero init
    # Same seeds, same chunk: bit-identical (what a restarted stage 1 relies on).
    again = train_lidb_batch(pipe, handle, items, emb, CFG, init=init)
    assert all(torch.equal(a[0][k], b[0][k]) for a, b in zip(chunk, again, strict=True) for k in a[0])
    # The handle's own parameters and the UNet's requires_grad flags are left as they were.
    assert all(torch.equal(before[k], v) for k, v in handle.state_dict().items())
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags


def test_chunk_of_one_reproduces_train_lidb(setup):
    """The same draws, loss, clipping and AdamW as the one training loop (`train_lidb`)."""
    pipe, spec, handle, init, items, emb = setup
    for item in items[:2]:
        ref_w, ref_loss = train_lidb(pipe, item.latents, emb, spec, dataclasses.replace(CFG, seed=item.seed),
                                     flipped=item.flipped, handle=handle, init=init)
        w, loss = train_lidb_batch(pipe, handle, [item], emb, CFG, init=init)[0]
        _close(w, ref_w)
        assert loss == pytest.approx(ref_loss, rel=1e-4)


def test_clip_per_identity_clips_each_row_by_its_own_norm():
    gA = torch.tensor([[3.0, 0.0], [0.3, 0.0]])  # (K=2, 2)
    gB = torch.tensor([[4.0], [0.4]])  # (K=2, 1): norms 5 and 0.5
    clip_per_identity(gA, gB, 1.0)
    norms = torch.cat([gA, gB], 1).norm(dim=1)
    torch.testing.assert_close(norms, torch.tensor([1.0, 0.5]), atol=1e-5, rtol=0)


def test_bad_inputs_are_rejected(setup):
    pipe, spec, handle, init, items, emb = setup
    with pytest.raises(InvalidInputError, match="at least one identity"):
        train_lidb_batch(pipe, handle, [], emb, CFG)
    odd = LiDBFitData(items[0].latents[:, :, :4, :4].contiguous(), None, seed=0)
    with pytest.raises(InvalidInputError, match=r"one \(C, h, w\)"):
        train_lidb_batch(pipe, handle, [items[0], odd], emb, CFG)
    with pytest.raises(InvalidInputError, match="text_emb"):
        train_lidb_batch(pipe, handle, items, emb.expand(2, -1, -1), CFG)
    with pytest.raises(InvalidInputError, match="flipped"):
        LiDBFitData(items[0].latents, items[0].latents[:1], seed=0)


def test_per_item_starts_fit_each_identity_from_its_own_start(setup):
    """Stage 2 fine-tunes every sample from its own prediction: init (K, L, R, a)/(K, L, b, R),
    here at rank 2 against the handle's 1, equals each identity fitted alone from its start."""
    pipe, spec, handle, init, items, emb = setup
    g = torch.Generator().manual_seed(3)
    L, _, a = init["A_train"].shape
    b = init["B_train"].shape[1]
    starts = {"A_train": torch.randn(4, L, 2, a, generator=g) / a**0.5,
              "B_train": torch.randn(4, L, b, 2, generator=g) * 0.01}  # (K, L, 2, a), (K, L, b, 2)
    given = {k: v.clone() for k, v in starts.items()}
    chunk = train_lidb_batch(pipe, handle, items, emb, CFG, init=starts)
    for k, (item, (w, _)) in enumerate(zip(items, chunk, strict=True)):
        assert w["A_train"].shape == (L, 2, a) and w["B_train"].shape == (L, b, 2)
        alone = train_lidb_batch(pipe, handle, [item], emb, CFG, init={n: v[k] for n, v in starts.items()})[0][0]
        _close(w, alone)
    # The first two identities swapped starts: their fits follow their starts, not their slots.
    swapped = {n: v[[1, 0, 2, 3]] for n, v in starts.items()}
    other = train_lidb_batch(pipe, handle, items[:2], emb, CFG, init={n: v[:2] for n, v in swapped.items()})
    assert not torch.allclose(other[0][0]["B_train"], chunk[0][0]["B_train"], atol=1e-4)
    assert all(torch.equal(starts[n], given[n]) for n in starts)  # the caller's tensors are not trained in place
    with pytest.raises(InvalidInputError, match=r"for 4 items"):
        train_lidb_batch(pipe, handle, items, emb, CFG, init={n: v[:3] for n, v in starts.items()})

"""The shared training loop: reproducibility, exact resume, cancellation, losses, restoring state."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hypernet.adapters import LiDB, default_spec_for
from hypernet.errors import IncompatibleAdapterError, InvalidInputError
from hypernet.methods._common import unwrap_empty_layers
from hypernet.training import (
    ProgressEvent,
    TrainConfig,
    TrainingCancelled,
    build_train_data,
    diffusion_loss,
    make_noise_scheduler,
    snr,
    train,
)
from hypernet.training.checkpoint import checkpoint_path

#: Exercises every stateful part: accumulation, flips, min-SNR, a warm-up + cosine schedule.
CFG = TrainConfig(
    steps=4,
    lr=5e-3,
    batch_size=1,
    grad_accum=2,
    lr_scheduler="cosine",
    warmup_steps=1,
    min_snr_gamma=5.0,
    seed=3,
    log_every=0,
)


class _Fresh:
    """A LiDB attached with its deterministic init; removed on exit."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __enter__(self) -> LiDB:
        self.h = LiDB(self.pipe, default_spec_for(self.pipe), name="loop-test")
        return self.h

    def __exit__(self, *exc) -> None:
        self.h.remove()
        unwrap_empty_layers(self.pipe)


def _run(pipe, data, cfg, **kw):
    with _Fresh(pipe) as h:
        result = train(pipe, list(h.parameters()), data, cfg, **kw)
        return result, h.state_dict()


@pytest.fixture(scope="module")
def reference(shared_pipe):
    """The uninterrupted run every other run is compared with (computed once)."""
    g = torch.Generator().manual_seed(0)
    data = build_train_data(shared_pipe, torch.rand(3, 3, 64, 64, generator=g) * 2 - 1, "a ohwx face")
    result, weights = _run(shared_pipe, data, CFG)
    return data, result, weights


def test_same_seed_is_bit_reproducible_and_seed_matters(shared_pipe, reference):
    data, r1, w1 = reference
    r2, w2 = _run(shared_pipe, data, CFG)
    assert r1.losses == r2.losses and len(r1.losses) == CFG.steps
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    r3, w3 = _run(shared_pipe, data, dataclasses.replace(CFG, seed=4))
    assert r3.losses != r1.losses and not torch.equal(w1["B_train"], w3["B_train"])


def test_resume_after_cancel_equals_uninterrupted(shared_pipe, reference, tmp_path):
    data, ref, w_ref = reference
    polls = iter(range(100))
    with pytest.raises(TrainingCancelled) as e:
        _run(shared_pipe, data, CFG, checkpoint_dir=tmp_path, should_stop=lambda: next(polls) >= 2)
    assert e.value.step == 2 and checkpoint_path(tmp_path).is_file()
    # Scramble the global RNG in between: the checkpoint must carry every random state.
    torch.manual_seed(12345)
    resumed, w_res = _run(shared_pipe, data, CFG, checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 2
    assert resumed.losses == ref.losses
    assert all(torch.equal(w_ref[k], w_res[k]) for k in w_ref)
    assert not checkpoint_path(tmp_path).exists()  # a finished run leaves none behind


def test_interrupt_from_progress_callback_checkpoints_last_complete_step(shared_pipe, reference, tmp_path):
    data, ref, w_ref = reference

    def interrupt(ev: ProgressEvent) -> None:
        if ev.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(shared_pipe, data, CFG, checkpoint_dir=tmp_path, progress=interrupt)
    resumed, w_res = _run(shared_pipe, data, CFG, checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 3 and resumed.losses == ref.losses
    assert all(torch.equal(w_ref[k], w_res[k]) for k in w_ref)


def test_periodic_checkpoints_and_config_mismatch_is_refused(shared_pipe, reference, tmp_path):
    data = reference[0]
    cfg = dataclasses.replace(CFG, checkpoint_every=1, steps=2)
    seen: list[int] = []

    def look(ev: ProgressEvent) -> None:  # the periodic save happens before the step's report
        if ev.step >= 1:
            seen.append(torch.load(checkpoint_path(tmp_path), weights_only=True)["step"])

    polls = iter(range(100))
    with pytest.raises(TrainingCancelled):
        _run(shared_pipe, data, cfg, checkpoint_dir=tmp_path, progress=look, should_stop=lambda: next(polls) >= 1)
    assert seen == [1]
    with pytest.raises(IncompatibleAdapterError, match="same config"):
        _run(shared_pipe, data, dataclasses.replace(cfg, lr=1e-3), checkpoint_dir=tmp_path)
    assert not shared_pipe.unet.training  # the refused run left the models as they were


def test_progress_events_and_state_restored(shared_pipe, reference):
    data = reference[0]
    events: list[ProgressEvent] = []
    unet = shared_pipe.unet
    flags = [p.requires_grad for p in unet.parameters()]
    cfg = dataclasses.replace(CFG, steps=2, grad_accum=1, gradient_checkpointing=True)
    result, _ = _run(shared_pipe, data, cfg, progress=events.append, stage="unit")
    assert [(e.stage, e.step, e.total) for e in events] == [("unit", i, 2) for i in range(3)]
    assert events[0].loss is None and [e.loss for e in events[1:]] == result.losses
    assert [p.requires_grad for p in unet.parameters()] == flags
    assert not unet.is_gradient_checkpointing and not unet.training


def test_gradient_checkpointing_gives_the_same_result(shared_pipe, reference):
    data = reference[0]
    cfg = dataclasses.replace(CFG, steps=1, grad_accum=1, min_snr_gamma=None)
    r1, w1 = _run(shared_pipe, data, cfg)
    r2, w2 = _run(shared_pipe, data, dataclasses.replace(cfg, gradient_checkpointing=True))
    torch.testing.assert_close(r1.losses, r2.losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1["B_train"], w2["B_train"], rtol=1e-4, atol=1e-6)


def test_loss_targets_follow_prediction_type(shared_pipe):
    """epsilon -> noise, v_prediction -> velocity; min-SNR weights per the paper's formulas."""
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 4, 8, 8, generator=g)
    emb = torch.randn(2, 77, 32, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    unet = shared_pipe.unet
    for ptype in ("epsilon", "v_prediction"):
        sched = DDPMScheduler.from_config(shared_pipe.scheduler.config, prediction_type=ptype)
        with torch.no_grad():
            pred = unet(sched.add_noise(lat, noise, t), t, encoder_hidden_states=emb).sample
            target = noise if ptype == "epsilon" else sched.get_velocity(lat, noise, t)
            want = ((pred - target) ** 2).mean(dim=(1, 2, 3))
            got = diffusion_loss(unet, sched, lat, emb, g, reduction="none", timesteps=t, noise=noise)
            torch.testing.assert_close(got, want)
            s = snr(sched, t)
            w = torch.clamp(s, max=5.0) / (s if ptype == "epsilon" else s + 1)
            got_snr = diffusion_loss(unet, sched, lat, emb, g, 5.0, reduction="none", timesteps=t, noise=noise)
            torch.testing.assert_close(got_snr, want * w)
    assert make_noise_scheduler(shared_pipe).config.prediction_type == "epsilon"


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(steps=0), "`steps` must be a positive integer"),
        (dict(lr=-1.0), "`lr` must be a positive number"),
        (dict(lr_scheduler="exotic"), "`lr_scheduler` must be one of"),
        (dict(mixed_precision="fp8"), "`mixed_precision` must be"),
        (dict(min_snr_gamma=0.0), "`min_snr_gamma` must be > 0"),
        (dict(grad_accum=True), "`grad_accum` must be a positive integer"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(InvalidInputError, match=match):
        TrainConfig(**kw)


def test_train_needs_parameters_and_matching_data(shared_pipe, reference):
    data = reference[0]
    with pytest.raises(InvalidInputError, match="`params` must hold at least one"):
        train(shared_pipe, [], data, CFG)
    with pytest.raises(InvalidInputError, match="input_ids"):
        train(shared_pipe, [torch.nn.Parameter(torch.zeros(1))], data, CFG, text_encoder_trains=True)

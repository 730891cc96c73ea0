"""Stage-2 building blocks: data order, schedule, EMA, metrics on resume, checkpoint guard."""

from __future__ import annotations

import pytest
import torch

from hypernet.errors import InvalidInputError
from pretrain.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from pretrain.distributed import DistInfo
from pretrain.metrics import MetricsWriter, read_metrics
from pretrain.optim import EMA, cosine_with_warmup
from pretrain.stream import SampleStream


def test_stream_covers_each_epoch_once_across_ranks_and_accum():
    n, world, accum, batch = 12, 2, 2, 3  # one optimizer step = 12 samples = one epoch
    s = SampleStream(n, seed=1, flip=True)
    seen = [p for r in range(world) for m in range(accum) for p in s.micro_batch(0, m, r, world, accum, batch)]
    assert sorted(i for i, _ in seen) == list(range(n))
    nxt = [i for r in range(world) for m in range(accum) for i, _ in s.micro_batch(1, m, r, world, accum, batch)]
    assert sorted(nxt) == list(range(n)) and nxt != [i for i, _ in seen]  # new epoch, new order
    assert SampleStream(n, 1, True).micro_batch(5, 1, 1, world, accum, batch) == s.micro_batch(5, 1, 1, world, accum,
                                                                                              batch)
    assert any(f for _, f in seen) and not any(f for _, f in SampleStream(n, 1, False).micro_batch(0, 0, 0, 1, 1, n))


def test_cosine_schedule_with_warmup():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, warmup=4, total=14, min_ratio=0.1)
    lrs = []
    for _ in range(14):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False)) and sched.get_last_lr()[0] == pytest.approx(0.1)


def test_ema_tracks_and_round_trips():
    m = torch.nn.Linear(2, 2)
    ema = EMA(m, decay=0.5)
    start = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(2.0)
    ema.update(m)
    torch.testing.assert_close(ema.shadow["weight"], start + 1.0)
    other = EMA(torch.nn.Linear(2, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    target = torch.nn.Linear(2, 2)
    other.copy_to(target)
    torch.testing.assert_close(target.weight, start + 1.0)


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path):
    w = MetricsWriter(tmp_path, resume_step=0, enabled=True, tensorboard=False)
    for step in (1, 2, 3):
        w.write(step, {"train/loss": step / 10})
    with (tmp_path / "metrics.csv").open("a") as f:
        f.write("4,train/lo")  # torn by a kill
    MetricsWriter(tmp_path, resume_step=2, enabled=True, tensorboard=False).write(3, {"train/loss": 9.0})
    assert read_metrics(tmp_path / "metrics.csv") == {"train/loss": [(1, 0.1), (2, 0.2), (3, 9.0)]}


def test_checkpoint_is_published_atomically_and_guarded_by_key(tmp_path):
    d = DistInfo(0, 1, 0, torch.device("cpu"))
    (tmp_path / ".step-0000009.tmp").mkdir(parents=True)  # a kill during a save leaves this
    for step in (3, 6, 9):
        save_checkpoint(tmp_path, step, {"key": "k1", "step": step}, d, keep=2)
    assert latest_checkpoint(tmp_path).name == "step-0000009"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000006", "step-0000009"]
    torch.manual_seed(123)
    save_checkpoint(tmp_path, 10, {"key": "k1", "step": 10}, d, keep=2)
    want = torch.rand(3)
    torch.manual_seed(0)
    assert load_checkpoint(tmp_path / "step-0000010", "k1", d)["step"] == 10
    assert torch.equal(torch.rand(3), want)  # RNG restored
    with pytest.raises(InvalidInputError, match="same settings"):
        load_checkpoint(tmp_path / "step-0000010", "other", d)

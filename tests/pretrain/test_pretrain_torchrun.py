"""The whole pipeline under `torchrun --nproc-per-node 2` (gloo): run A goes straight through;
run B reuses A's prepare/stage-1 outputs, is SIGKILLed in the middle of stage 2, is relaunched,
and must end with exactly A's weights and metrics. Then the export is checked from this (fresh)
process: ONNX matches torch, and the hypernetwork fits the base it was trained on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.corpus import lfw_image
from pretrain.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

STEPS, CKPT_EVERY = 12, 4


def torchrun(stage: str, out: Path, base: Path, corpus: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "pretrain", stage, "--config", "tiny-cpu", "--output-dir", str(out),
        "--base", str(base), "--data.corpus", json.dumps([str(corpus)]), "--data.detector", "center",
        "--data.val_fraction", "0.2", "--stage1.train.steps", "6",
        "--stage1.identities_per_call", "3",  # 5 identities per rank: chunks of 3 and 2
        "--stage2.steps", str(STEPS), "--stage2.batch_size", "2", "--stage2.grad_accum", "2",
        "--stage2.warmup_steps", "2", "--stage2.lr", "0.001", "--stage2.ema_decay", "0.5",
        "--stage2.ckpt_every", str(CKPT_EVERY), "--stage2.val_every", "6", "--stage2.log_every", "2",
        "--stage2.model.encoder_kwargs", "{patch_size: 16, depth: 1}", "--stage2.model.depth", "1",
        "--stage2.model.head_init_std", "0.01",
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (torchrun starts workers in their own sessions)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faces")
    for i in range(10):
        (root / f"p{i:02d}").mkdir()
        lfw_image(i).save(root / f"p{i:02d}" / "photo.png")
    (root / "p00" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def test_torchrun_pipeline_resumes_exactly_and_exports(tmp_path, tiny_base_dir, corpus, tiny_pipe):
    a, b = tmp_path / "a", tmp_path / "b"
    # Run A: all four stages, uninterrupted.
    res = subprocess.run(torchrun("all", a, tiny_base_dir, corpus), cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    idx = json.loads((a / "prepared" / "index.json").read_text())
    assert idx["counts"]["skipped"] == 1 and idx["counts"]["val_identities"] == 2

    # Stage 1 sharded over 2 ranks in chunks of 3 = one process fitting one identity per call, up
    # to float round-off: an identity's fit depends neither on its rank nor on its chunk-mates.
    from pretrain.cli import run_stages
    from pretrain.stage1 import load_stage1

    shutil.copytree(a / "prepared", tmp_path / "c" / "prepared")
    run_stages("tiny-cpu", tmp_path / "c", ["stage1"], [
        f"base={tiny_base_dir}", f"data.corpus={json.dumps([str(corpus)])}", "data.detector=center",
        "data.val_fraction=0.2", "stage1.train.steps=6", "stage1.identities_per_call=1"], distributed=False)
    sharded, alone = load_stage1(a / "stage1"), load_stage1(tmp_path / "c" / "stage1")
    assert sorted(sharded.identities) == sorted(alone.identities) == [f"p{i:02d}" for i in range(10)]
    ids = sorted(sharded.identities)
    for k, v in sharded.targets(ids).items():
        torch.testing.assert_close(alone.targets(ids)[k], v, atol=1e-5, rtol=1e-4)

    # Run B: same settings; killed (SIGKILL, every process) once the first checkpoint exists.
    for d in ("prepared", "stage1"):
        shutil.copytree(a / d, b / d)
    log = (tmp_path / "b1.log").open("w")
    proc = subprocess.Popen(torchrun("stage2", b, tiny_base_dir, corpus), cwd=ROOT, env=_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    ckpt = b / "stage2" / "checkpoints" / f"step-{CKPT_EVERY:07d}" / "state.pt"
    deadline = time.monotonic() + 600
    while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in [*_children(proc.pid), proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.is_file(), (tmp_path / "b1.log").read_text()[-4000:]
    assert not (b / "stage2" / "final.safetensors").exists(), "stage 2 finished before the kill"
    # Relaunch: prepare/stage1 are skipped, stage 2 resumes from its newest checkpoint.
    res = subprocess.run(torchrun("all", b, tiny_base_dir, corpus), cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "resumed from" in res.stderr and "prepare: already done" in res.stderr

    wa, wb = load_file(a / "stage2" / "final.safetensors"), load_file(b / "stage2" / "final.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed run must end with identical weights"
    ma, mb = read_metrics(a / "stage2" / "metrics.csv"), read_metrics(b / "stage2" / "metrics.csv")
    assert ma == mb
    # Held-out identities: the prediction beats the zero adapter in weight space and diffusion loss.
    last = {k: v[-1] for k, v in ma.items() if k.startswith("val/")}
    assert last["val/weight_mse"][0] == STEPS
    assert last["val/weight_mse"][1] < last["val/weight_mse_zero"][1]
    assert last["val/diffusion"][1] < last["val/diffusion_zero"][1]

    # Export: ONNX within the bound of torch, loading here (not the process that exported it).
    from hypernet.base import base_fingerprint
    from hypernet.hypernetwork import HypernetRuntime
    from pretrain.cache import PreparedData

    report = json.loads((a / "export" / "report.json").read_text())
    assert report["max_abs_diff"] <= 1e-4
    onnx_rt = HypernetRuntime.load(a / "export", backend="onnx", device="cpu")
    torch_rt = HypernetRuntime.load(a / "export", backend="torch", device="cpu")
    data = PreparedData(a / "prepared")
    x = data.pixels([r for i in data.identities("val") for r in data.rows(i)])  # (2, 3, 64, 64)
    po, pt = onnx_rt.predict(x), torch_rt.predict(x)
    assert max(float((po[k] - pt[k]).abs().max()) for k in po) <= 1e-4
    assert onnx_rt.base_fingerprint == base_fingerprint(tiny_pipe)
    onnx_rt.check_base(tiny_pipe)

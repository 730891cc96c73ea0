"""The pretraining pipeline on the tiny SDXL, SD3 and FLUX pipelines: prepare, stage 1, stage 2, export and
ONNX (checked with onnxruntime) through the family's own objective, then the runtime serving the
result for that base and refusing it for another family. A few steps each: seconds, not minutes."""

from __future__ import annotations

import json

import pytest
import torch

from hypernet.adapters import LiDB, load_lidb
from hypernet.base import load_pipeline, make_tiny_pipeline
from hypernet.errors import IncompatibleAdapterError, InvalidInputError
from hypernet.hypernetwork import HypernetRuntime, read_info
from pretrain.cli import STAGES, run_stages
from pretrain.corpus import lfw_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Per tiny family: adapted layers, a = b, latent channels, conditioning (text tokens, width), pooled width.
TINY = {"sdxl": dict(layers=64, aux=40, channels=4, text=(77, 64), pooled=32),
        "sd3": dict(layers=15, aux=32, channels=16, text=(77 + 256, 64), pooled=64),
        "flux": dict(layers=22, aux=32, channels=16, text=(512, 64), pooled=32)}
#: The shipped tiny config cut to a few steps and a one-block, width-32 hypernetwork.
FAST = ("data.detector=center", "data.val_fraction=0.25", "data.shard_size=4", "stage1.train.steps=2",
        "stage1.train.batch_size=2", "stage1.identities_per_call=4", "stage2.steps=2", "stage2.batch_size=2",
        "stage2.warmup_steps=1", "stage2.val_every=2", "stage2.ckpt_every=2", "stage2.log_every=1",
        "stage2.val_noise_draws=1", "stage2.model.dim=32", "stage2.model.depth=1", "stage2.model.heads=2",
        "stage2.model.iterations=2", "stage2.model.head_init_std=0.05",
        'stage2.model.encoder_kwargs={"patch_size": 16, "depth": 1, "embed_dim": 32, "num_heads": 2}',
        "device=cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """4 identities (one LFW face each; the first also a second photo)."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(4):
        d = root / f"person{i}"
        d.mkdir()
        lfw_image(i).save(d / "front.png")
    lfw_image(10).save(root / "person0" / "other.png")
    return root


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, object]:
    return {a: make_tiny_pipeline(tmp_path_factory.mktemp(f"tiny-{a}"), seed=0, arch=a) for a in TINY}


@pytest.mark.parametrize("arch", sorted(TINY))
def test_every_stage_runs_on_the_tiny_base_and_the_export_serves_it(tmp_path, corpus, bases, arch):
    from pretrain.cache import PreparedData
    from pretrain.metrics import read_metrics

    want = TINY[arch]
    out = run_stages(f"tiny-{arch}-cpu", tmp_path / "run", STAGES,
                     [f"base={bases[arch]}", f'data.corpus=["{corpus}"]', *FAST], distributed=False)
    # prepare: the family's latents (C channels) and conditioning (text states + pooled vector)
    data = PreparedData(out / "prepared")
    assert data.resolution == 64 and data.latents(data.rows("person0")).shape == (2, want["channels"], 8, 8)
    assert data.text_emb().shape == (1, *want["text"]) and data.pooled().shape == (1, want["pooled"])
    # stage 1: one LiDB file per identity over the base's default layers
    idx = json.loads((out / "stage1" / "index.json").read_text())
    assert len(idx["identities"]) == 4 and len(idx["layers"]) == want["layers"]
    f = load_lidb(out / "stage1" / idx["identities"]["person0"]["file"])
    assert f.weights["A_train"].shape == (want["layers"], 1, want["aux"])
    # stage 2: the diffusion loss through the predicted LiDB is the family's objective, finite and non-zero
    m = read_metrics(out / "stage2" / "metrics.csv")
    assert all(0 < v < float("inf") for _, v in m["train/diffusion"]) and "val/diffusion_zero" in m
    # export: the file names the family and the heads are the stage-1 LiDB's geometry; ONNX matches torch
    info = read_info(out / "export" / "hypernet.safetensors")
    assert info.arch == arch and info.layers == idx["layers"]
    assert info.config.output_size == want["layers"] * 2 * want["aux"]
    report = json.loads((out / "export" / "report.json").read_text())
    assert report["max_abs_diff"] <= report["max_abs_diff_bound"]
    # runtime: both backends predict the stage-1 LiDB's shapes on this base; another family is refused
    pipe = load_pipeline(bases[arch], device="cpu", dtype="fp32")
    pix = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    preds = []
    for backend in ("onnx", "torch"):
        rt = HypernetRuntime.load(out / "export", backend=backend, device="cpu")
        rt.check_base(pipe)
        preds.append(rt.predict(pix))
    torch.testing.assert_close(preds[0], preds[1], atol=1e-4, rtol=0)
    assert preds[0]["B_train"].shape == (2, *f.weights["B_train"].shape)
    LiDB(pipe, info.spec, layers=info.layers).use(preds[0])
    other = load_pipeline(bases["flux" if arch == "sdxl" else "sdxl"], device="cpu", dtype="fp32")
    with pytest.raises(IncompatibleAdapterError, match=f"trained for \\('{arch}'"):
        rt.check_base(other)


def test_a_config_for_one_family_refuses_a_base_of_another(tmp_path, corpus, bases):
    with pytest.raises(InvalidInputError, match="`base` must be a 'sdxl' pipeline for this config.*got a 'flux' base"):
        run_stages("tiny-sdxl-cpu", tmp_path / "run", ("prepare",),
                   [f"base={bases['flux']}", f'data.corpus=["{corpus}"]', *FAST], distributed=False)
    assert not (tmp_path / "run" / "prepared" / "index.json").exists()

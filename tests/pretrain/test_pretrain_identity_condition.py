"""Identity-conditioned pretraining: `prepare` caches the face encoder's embeddings once, stage 2
trains from that cache (the encoder never runs per step), and the export's ONNX graph (face encoder
inside) matches torch."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hypernet.errors import EnvironmentProblem
from pretrain.cache import read_shard_meta
from pretrain.corpus import lfw_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("id-corpus")
    for i in range(5):
        (root / f"person{i}").mkdir()
        lfw_image(i).save(root / f"person{i}" / "a.png")
        lfw_image(i + 20).save(root / f"person{i}" / "b.png")
    return root


def overrides(base, corpus, condition: str) -> list[str]:
    return [
        f"base={base}", f'data.corpus=["{corpus}"]', "data.detector=center", "data.val_fraction=0.3",
        "data.shard_size=4", "stage1.train.steps=2", "stage2.steps=3", "stage2.batch_size=2",
        "stage2.warmup_steps=1", "stage2.val_every=3", "stage2.ckpt_every=3", "stage2.log_every=1",
        "stage2.val_noise_draws=1", f"stage2.model.condition={condition}", "stage2.model.depth=1",
        "stage2.model.dim=32", "stage2.model.heads=2", "stage2.model.iterations=2",
        "stage2.model.encoder_kwargs={patch_size: 16, depth: 1, embed_dim: 32, num_heads: 2}",
        "export.check_batch=2", "threads=1",
    ]


def test_identity_pipeline_caches_embeddings_once_and_exports(tmp_path, tiny_base_dir, corpus,
                                                              face_encoder_file, monkeypatch):
    from hypernet.face_alignment import align_face
    from hypernet.face_encoder import FaceEncoder
    from hypernet.hypernetwork import HypernetRuntime
    from pretrain.cache import PreparedData
    from pretrain.cli import run_stages

    ov = overrides(tiny_base_dir, corpus, "both")
    run_stages(None, tmp_path, ["prepare"], ov, distributed=False)
    emb_dir = tmp_path / "prepared" / "face_embeddings"
    shards = sorted(emb_dir.glob("shard-*.safetensors"))
    assert len(shards) == 3  # 10 photos / 4 per shard, row-aligned with the prepared shards
    # A cached row is the encoder's embedding of that photo's aligned face (and of its mirror).
    data = PreparedData(tmp_path / "prepared")
    idx = data.index["identities"]["person2"]
    (s, r), src = idx["rows"][1], idx["sources"][1]
    from hypernet.photos import decode_image

    # Aligned as the runtime aligns (faces_for's "auto"), not as the latents are cropped
    # (data.detector=center here): training and inference must embed the same face.
    face = align_face(decode_image(src), detector="auto").face[None]  # (1, 3, 112, 112)
    assert read_shard_meta(emb_dir / f"shard-{s:05d}.safetensors")["detector"] == "auto"
    enc = FaceEncoder.load(face_encoder_file)
    cached = load_file(str(emb_dir / f"shard-{s:05d}.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(cached["emb"][r], enc(face)[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cached["emb_flip"][r], enc(face.flip(-1))[0], atol=1e-5, rtol=1e-4)

    # Stage 1 + 2 with the encoder made unloadable: training reads the cache only.
    def no_encoder(*a, **k):
        raise EnvironmentProblem("the face encoder must not be loaded during stage 2")

    monkeypatch.setattr(FaceEncoder, "load", no_encoder)
    run_stages(None, tmp_path, ["prepare", "stage1", "stage2"], ov, distributed=False)
    summary = json.loads((tmp_path / "stage2" / "summary.json").read_text())
    assert summary["step"] == 3 and summary["val/weight_mse"] >= 0
    _check_mean_target_baseline(tmp_path, summary)
    monkeypatch.undo()
    _check_probe(tmp_path, ov)
    run_stages(None, tmp_path, ["export"], ov, distributed=False)
    report = json.loads((tmp_path / "export" / "report.json").read_text())
    assert report["config"]["condition"] == "both" and report["max_abs_diff"] <= 1e-4
    rt = HypernetRuntime.load(tmp_path / "export", backend="onnx")
    pred = rt.predict(data.pixels(idx["rows"]), faces=torch.zeros(2, 3, 112, 112))
    assert pred["A_train"].shape[0] == 2
    # the calibrated prediction scale: re-exported into both files (the weights are untouched)
    from hypernet.hypernetwork.export import read_info

    assert read_info(tmp_path / "export" / "hypernet.onnx").prediction_scale == 1.0
    run_stages(None, tmp_path, ["export"], [*ov, "export.prediction_scale=2.5"], distributed=False)
    for name in ("hypernet.safetensors", "hypernet.onnx"):
        assert read_info(tmp_path / "export" / name).prediction_scale == 2.5
    assert json.loads((tmp_path / "export" / "report.json").read_text())["prediction_scale"] == 2.5
    again = HypernetRuntime.load(tmp_path / "export", backend="onnx")
    assert again.prediction_scale == 2.5
    torch.testing.assert_close(again.predict(data.pixels(idx["rows"]), faces=torch.zeros(2, 3, 112, 112)), pred)
    _check_mean_adapter(tmp_path, ov, data)


def _check_mean_adapter(run, ov, data):
    """`mean-adapter`: the control hypernetwork predicts the training mean target for any photo,
    through the exported ONNX graph that `hdb personalize`, the service and `hdb eval` load."""
    from hypernet.hypernetwork import HypernetRuntime
    from pretrain.cli import run_stages
    from pretrain.mean_adapter import MEAN_ADAPTER_DIR
    from pretrain.stage1 import load_stage1

    run_stages(None, run, ["mean-adapter"], ov, distributed=False)
    out = run / MEAN_ADAPTER_DIR
    report = json.loads((out / "report.json").read_text())
    assert report["max_abs_diff"] <= 1e-4 and report["config"]["condition"] == "both"
    s1 = load_stage1(run / "stage1")
    ids = [i for i in data.identities("train") if i in s1.identities]
    mean = {k: v.mean(0) for k, v in s1.targets(ids).items()}
    rows = [r for i in data.identities() for r in data.rows(i)][:3]
    faces = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pred = HypernetRuntime.load(out, backend="onnx").predict(data.pixels(rows), faces=faces)
    for k, v in mean.items():
        torch.testing.assert_close(pred[k], v.expand_as(pred[k]), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(mean["B_train"], torch.zeros_like(mean["B_train"]))
    # Rerun: skipped, files untouched (hdb eval keys cells on the files' mtimes); other settings redo it.
    mtimes = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    run_stages(None, run, ["mean-adapter"], ov, distributed=False)
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == mtimes
    run_stages(None, run, ["mean-adapter"], [*ov, "stage2.seed=1"], distributed=False)
    assert (out / "hypernet.safetensors").stat().st_mtime_ns != mtimes["hypernet.safetensors"]
    # the control takes the same calibrated scale as the hypernetwork it controls for, and keeps its key
    from hypernet.hypernetwork.export import read_info

    run_stages(None, run, ["mean-adapter"], [*ov, "export.prediction_scale=2.5"], distributed=False)
    info = read_info(out / "hypernet.safetensors")
    assert info.prediction_scale == read_info(out / "hypernet.onnx").prediction_scale == 2.5
    assert info.metadata["control"] == "mean_adapter" and info.metadata["control_key"]


def _val_targets(run):
    from hypernet.hypernetwork.losses import weight_mse
    from pretrain.cache import PreparedData
    from pretrain.stage1 import load_stage1

    data, s1 = PreparedData(run / "prepared"), load_stage1(run / "stage1")
    ids = {s: [i for i in data.identities(s) if i in s1.identities] for s in ("train", "val")}
    mean = {k: v.mean(0) for k, v in s1.targets(ids["train"]).items()}
    val = s1.targets(ids["val"])
    photos = torch.tensor([len(data.rows(i)) for i in ids["val"]], dtype=torch.float64)
    per = weight_mse({k: mean[k].expand_as(v) for k, v in val.items()}, val, reduction="none").double()
    return float((per * photos).sum() / photos.sum()), ids


def _check_mean_target_baseline(run, summary):
    """Stage 2's validation scores the training mean target (one adapter for everyone) too."""
    expected, _ = _val_targets(run)
    assert summary["val/weight_mse_mean"] == pytest.approx(expected, rel=1e-5)
    assert summary["val/weight_mse_mean"] < summary["val/weight_mse_zero"]
    assert summary["val/diffusion_mean"] > 0


def _check_probe(run, ov):
    """`probe` on the same run: its mean baseline is stage 2's, ridge is reported per strength, and a
    stage 1 probed against itself agrees perfectly."""
    from pretrain.cli import run_stages
    from pretrain.probe import PROBE_FILE, RIDGE_LAMBDAS

    run_stages(None, run, ["probe"], [*ov, f"probe.against={run / 'stage1'}"], distributed=False)
    res = json.loads((run / PROBE_FILE).read_text())
    expected, ids = _val_targets(run)
    assert res["identities"] == {"train": len(ids["train"]), "val": len(ids["val"])}
    assert res["val_weight_mse"]["mean"] == pytest.approx(expected, rel=1e-5)
    assert sorted(k for k in res["val_weight_mse"] if k.startswith("ridge_")) == sorted(
        f"ridge_{lam:g}" for lam in RIDGE_LAMBDAS)
    # Strong ridge shrinks to the mean: its training error approaches the mean's.
    assert res["train_weight_mse"]["ridge_0.01"] <= res["train_weight_mse"]["ridge_1000"] + 1e-9
    assert res["cross_validated"] and all("best_gain" in r for r in res["cross_validated"].values())
    d = res["delta"]  # the same read-out on B_train @ A_train: the same folds and training sizes
    assert d["cross_validated"].keys() == res["cross_validated"].keys()
    assert 0 <= d["shared_fraction"] <= 1 and 0 <= d["shared_fraction_factors"] <= 1
    g = res["agreement"]["B_train"]
    assert g["same_raw"] == pytest.approx(1.0) and g["same_centred"] == pytest.approx(1.0)
    assert g["different_centred"] < 0.99


def test_pixel_condition_computes_no_embeddings(tmp_path, tiny_base_dir, corpus):
    from pretrain.cli import run_stages

    run_stages(None, tmp_path, ["prepare"], overrides(tiny_base_dir, corpus, "pixels"), distributed=False)
    assert (tmp_path / "prepared" / "index.json").is_file()
    assert not (tmp_path / "prepared" / "face_embeddings").exists()

"""`hdb eval` smoke mode: every condition, two identities, a few steps, on the tiny base."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hdb.cli import main
from hypernet.eval.conditions import CONDITIONS


def _random_hypernet(pipe, path):
    """An untrained hypernetwork export for the tiny base (what pretraining would write)."""
    from hypernet.adapters import default_spec_for, lidb_layers
    from hypernet.hypernetwork.config import HypernetConfig
    from hypernet.hypernetwork.export import HypernetInfo, save_hypernet
    from hypernet.hypernetwork.model import HyperNetwork
    from hypernet.identity import cached_fingerprint

    spec = default_spec_for(pipe)
    layers = lidb_layers(pipe, spec)
    cfg = HypernetConfig(num_layers=len(layers), a=spec.a, b=spec.b, r=spec.r, dim=32, depth=1, heads=2,
                         iterations=2, head_init_std=0.05, encoder_kwargs={"patch_size": 16, "depth": 1})
    torch.manual_seed(0)
    info = HypernetInfo(config=cfg, spec=spec, layers=layers, base_fingerprint=cached_fingerprint(pipe),
                        resolution=pipe.unet.config.sample_size * pipe.vae_scale_factor)
    path.mkdir(parents=True, exist_ok=True)
    save_hypernet(path / "hypernet.safetensors", HyperNetwork(cfg), info)
    return path


@pytest.fixture()
def three_identities(faces_dir, tmp_path):
    from hypernet.eval.corpus import read_manifest

    corpus = read_manifest(faces_dir / "identities.csv")
    lines = ["file,identity"] + [f"{p},{i}" for i in corpus.identities[:3] for p in corpus.photos[i][:3]]
    path = tmp_path / "faces.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


SMOKE_OVERRIDES = [
    "hyperdreambooth.steps=1", "fast-finetune.steps=1", "lidb.steps=1", "lora.steps=1",
    "dreambooth.steps=1", "dreambooth.num_class_images=1", "dreambooth.class_image_steps=1",
    "textual-inversion.steps=1",
]


@pytest.fixture()
def one_thread():
    """--threads 1 changes the process's torch threads: restore them for the tests after us."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.needs_shared
def test_eval_smoke_every_condition_writes_table_json_grids_and_resumes(tiny_pipe, tiny_base_dir, three_identities,
                                                                     tmp_path, one_thread):
    hyper = _random_hypernet(tiny_pipe, tmp_path / "hypernet")
    out = tmp_path / "eval"
    argv = ["eval", "--base", str(tiny_base_dir), "--hypernet", str(hyper), "--corpus", str(three_identities),
            "--out", str(out), "--identities", "2", "--images-per-id", "2", "--gen-steps", "2", "--device", "cpu",
            "--threads", "1", "--detector", "center", "--grid-parts", "all", "--metrics", "dlib"]
    for o in SMOKE_OVERRIDES:
        argv += ["--override", o]
    assert main(argv) == 0

    results = json.loads((out / "results.json").read_text())
    conds = results["conditions"]
    assert list(conds) == [*CONDITIONS, "real-photo"]
    assert results["samples_per_condition"] == 4
    for name, e in conds.items():
        assert set(e["per_identity"]) == set(results["identities"]) and len(results["identities"]) == 2
        assert e["n"] == 2 and set(e["metrics"]) == {"dlib"}
        estimates = [e["metrics"]["dlib"][m] for m in ("face_rec", "margin", "detection")]
        for est in estimates + ([e["heldout_loss"]] if name != "real-photo" else []):
            assert np.isfinite(est["mean"]) and est["lo"] <= est["mean"] <= est["hi"], (name, est)
        assert (out / f"grid_{name}.png").is_file() == (name != "real-photo")
    # the real photos are real faces of the identity: detected, and closer to it than to the others
    real = conds["real-photo"]["metrics"]["dlib"]
    assert real["detection"]["mean"] == 1.0 and real["margin"]["mean"] > 0
    assert conds["base"]["bytes"] == 0 and conds["lora"]["bytes"] > 0
    assert conds["lora"]["seconds_median"] > 0
    # the hypernetwork-only row is exactly the prediction: no fine-tune, smaller than HDB's file
    assert conds["hypernetwork"]["bytes"] < conds["hyperdreambooth"]["bytes"]
    assert "margin_gain_vs_base" in conds["lora"]["metrics"]["dlib"]
    assert "margin_gain_vs_base" not in conds["base"]["metrics"]["dlib"]
    assert [(p["a"], p["b"]) for p in results["paired"]] == [("hypernetwork", "base"),
                                                             ("hyperdreambooth", "fast-finetune"),
                                                             ("hyperdreambooth", "lidb")]
    assert all(p["n"] == 2 and np.isfinite(p["dlib"]["mean"]) for p in results["paired"])
    report = (out / "REPORT.md").read_text()
    assert f"`{SMOKE_OVERRIDES[0]}`" in report  # settings that differ from the defaults are stated
    for label in ("HyperDreamBooth", "Hypernetwork only", "Fast fine-tune", "LiDB", "LoRA", "DreamBooth",
                  "Textual Inversion", "Base", "dlib ResNet", "Paired differences", "Wall time"):
        assert label in report

    # a rerun reuses matching cells (the base's, never regenerated, even without the hypernetwork, which only
    # the hypernet conditions depend on), rescores them from their saved images with a metric added
    # later (FaceNet), and reruns changed ones (lora's)
    i = argv.index("--hypernet")
    argv = argv[:i] + argv[i + 2:]
    j = argv.index("--metrics")
    argv = argv[:j] + argv[j + 2:]  # and without "--metrics dlib": both metrics
    lora_cell = out / "cells" / "lora" / f"{results['identities'][0]}.json"
    base_cell = out / "cells" / "base" / f"{results['identities'][0]}.json"
    base_image = out / "cells" / "base" / results["identities"][0] / "seed0000.png"
    lora_before, image_before = lora_cell.stat().st_mtime_ns, base_image.stat().st_mtime_ns
    old_key, base_before = json.loads(lora_cell.read_text())["key"], json.loads(base_cell.read_text())
    assert main([*argv, "--conditions", "lora,base", "--identities", "1", "--override", "lora.steps=2"]) == 0
    base_after = json.loads(base_cell.read_text())
    assert base_image.stat().st_mtime_ns == image_before and base_after["key"] == base_before["key"]
    assert base_after["scores"]["dlib"] == base_before["scores"]["dlib"] and "facenet" in base_after["scores"]
    assert lora_cell.stat().st_mtime_ns != lora_before and json.loads(lora_cell.read_text())["key"] != old_key
    results = json.loads((out / "results.json").read_text())
    assert list(results["conditions"]) == ["lora", "base", "real-photo"]
    real = results["conditions"]["real-photo"]["metrics"]["facenet"]  # FaceNet also finds the real face, and
    assert real["detection"]["mean"] == 1.0 and real["margin"]["mean"] > 0  # puts it closer to its person
    assert "FaceNet" in (out / "REPORT.md").read_text()


@pytest.mark.needs_shared
def test_eval_on_a_merged_corpus_interleaves_parts_subsets_slow_methods_and_grids_only_shown_parts(
        tiny_base_dir, faces_dir, tmp_path, one_thread):
    """Labels `part:id`: the first N people come from every part, the slow methods run on a subset
    that the report states, the margin compares within a part, and grids show only `--grid-parts`."""
    from hypernet.eval.corpus import read_manifest

    corpus = read_manifest(faces_dir / "identities.csv")
    ids = corpus.identities[:4]
    labels = {ids[0]: "lfw:a", ids[1]: "lfw:b", ids[2]: "caltech:c", ids[3]: "caltech:d"}
    lines = ["file,identity"] + [f"{p},{labels[i]}" for i in ids for p in corpus.photos[i][:3]]
    (tmp_path / "merged.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval"
    assert main(["eval", "--base", str(tiny_base_dir), "--corpus", str(tmp_path / "merged.csv"), "--out", str(out),
                 "--conditions", "lora,base", "--slow-methods-people", "2", "--override", "lora.steps=1",
                 "--images-per-id", "1", "--gen-steps", "1", "--device", "cpu", "--threads", "1",
                 "--detector", "center", "--metrics", "dlib"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["identities"] == ["caltech:c", "lfw:a", "caltech:d", "lfw:b"]  # round-robin over parts
    conds = results["conditions"]
    assert list(conds["lora"]["per_identity"]) == ["caltech:c", "lfw:a"] and conds["base"]["n"] == 4
    gain = conds["lora"]["metrics"]["dlib"]["margin_gain_vs_base_by_part"]
    assert gain["lfw"]["n"] == 1 and gain["caltech"]["n"] == 1
    cell = conds["base"]["per_identity"]["lfw:a"]["scores"]["dlib"]
    assert cell["margin"] == pytest.approx(cell["face_rec"] - cell["other_sim"])
    report = (out / "REPORT.md").read_text()
    assert "**Subset:** LoRA ran on the first 2" in report and "2 caltech, 2 lfw" in report
    assert "by corpus part" in report
    # grids: Caltech's people only (one row each: lora ran on one of them, base on both)
    from PIL import Image

    base_grid, lora_grid = Image.open(out / "grid_base.png"), Image.open(out / "grid_lora.png")
    r = (base_grid.width - 8) // 2  # columns: the input photo, then the one sample
    assert base_grid.height == 2 * r and lora_grid.height == r


@pytest.mark.needs_shared
def test_hypernet_rows_differ_as_documented(tiny_pipe, faces_dir, tmp_path, one_thread):
    """hypernetwork = the prediction alone; fast-finetune = the same fine-tune from a zero prediction."""
    from hypernet.errors import InvalidInputError
    from hypernet.eval.conditions import personalise
    from hypernet.hypernetwork.runtime import HypernetRuntime

    torch.set_num_threads(1)
    runtime = HypernetRuntime.load(_random_hypernet(tiny_pipe, tmp_path / "hypernet"))
    photo = faces_dir / "image_0001.jpg"
    hn = personalise(tiny_pipe, "hypernetwork", photo, runtime=runtime, detector="center")
    ff = personalise(tiny_pipe, "fast-finetune", photo, runtime=runtime, detector="center",
                     overrides={"steps": 1, "relax": "lora"})  # lora: the zero prediction stays visible
    assert not hn.artifact.relaxed and any(v.abs().sum() > 0 for v in hn.artifact.lidb.values())
    assert ff.artifact.relaxed and all(v.abs().sum() == 0 for v in ff.artifact.lidb.values())
    assert 0 < hn.nbytes < ff.nbytes and hn.seconds > 0
    with pytest.raises(InvalidInputError, match="overrides of 'lora' must be among"):
        personalise(tiny_pipe, "lora", photo, overrides={"nope": 1})
    with pytest.raises(InvalidInputError, match="must be given a hypernetwork"):
        personalise(tiny_pipe, "hyperdreambooth", photo)
    assert personalise(tiny_pipe, "base", photo).artifact is None


@pytest.mark.needs_shared
def test_per_identity_sample_seeds_give_each_person_their_own_noise(tiny_base_dir, three_identities, tmp_path,
                                                                     one_thread):
    """Shared seeds: the base draws the very same images for everyone. Per-identity: each person's
    own seeds (named in the image files), the base's images differ between people, and the cells
    are keyed apart from the shared run's, so neither reuses the other's."""
    from PIL import Image

    from hypernet.eval.runner import first_sample_seed

    common = ["--base", str(tiny_base_dir), "--corpus", str(three_identities), "--conditions", "base",
              "--images-per-id", "2", "--gen-steps", "2", "--device", "cpu", "--threads", "1",
              "--detector", "center", "--metrics", "dlib", "--identities", "2"]
    out = tmp_path / "eval"
    images = {}
    for scheme in ("shared", "per-identity"):
        assert main(["eval", "--out", str(out), "--sample-seeds", scheme, *common]) == 0
        ids = json.loads((out / "results.json").read_text())["identities"]
        images[scheme] = {}
        for ident in ids:
            first = first_sample_seed(0, ident, scheme)
            f = out / "cells" / "base" / ident / f"seed{first:04d}.png"
            images[scheme][ident] = np.asarray(Image.open(f))
        keys = {json.loads((out / "cells" / "base" / f"{i}.json").read_text())["key"] for i in ids}
        images[scheme]["keys"] = keys
    a, b = [images["shared"][i] for i in ids]
    assert np.array_equal(a, b)  # the same noise for everyone
    a, b = [images["per-identity"][i] for i in ids]
    assert not np.array_equal(a, b)
    assert {first_sample_seed(0, i, "per-identity") for i in ids} != {0}
    assert first_sample_seed(7, ids[0], "per-identity") == first_sample_seed(0, ids[0], "per-identity") + 7
    assert images["shared"]["keys"].isdisjoint(images["per-identity"]["keys"])
    assert "seeds of each person's own" in (out / "REPORT.md").read_text()


def test_caches_written_by_two_processes_sharing_out_stay_readable(tmp_path):
    """Conditions split over two `hdb eval` processes with the same --out write the reference-embedding
    cache at the same moment: each writes through a temporary file of its own, so neither renames the
    other's away (a shared temporary name made one of them crash), and the cache is always whole."""
    from concurrent.futures import ThreadPoolExecutor

    from hypernet.eval.runner import _save_npz

    path = tmp_path / "reference_embeddings.npz"

    def write(k: int) -> None:
        for _ in range(5):
            _save_npz(path, {"emb": np.full((256, 512), float(k), dtype=np.float32)})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(8)))  # raises if any writer failed
    emb = np.load(path)["emb"]
    assert emb.shape == (256, 512) and len(np.unique(emb)) == 1 and 0 <= emb[0, 0] < 8
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


@pytest.mark.needs_shared
def test_margins_do_not_depend_on_how_many_people_a_run_evaluates(tiny_base_dir, faces_dir, tmp_path, one_thread):
    """Regression: the margin compared against the *evaluated* held-out people, so a run on the
    first 2 scored the same images differently from a run on all 3, and cells copied between
    such runs (the key did not say) mixed two definitions. With a split, every held-out person is
    compared against; a cell scored against other references is rescored from its saved images."""
    import os

    from hypernet.eval.corpus import IdentitySplit, read_manifest

    corpus = read_manifest(faces_dir / "identities.csv")
    ids = corpus.identities[:5]
    (tmp_path / "faces.csv").write_text(
        "\n".join(["file,identity"] + [f"{p},{i}" for i in ids for p in corpus.photos[i][:3]]) + "\n")
    base = tmp_path / "base"
    base.mkdir()
    for entry in tiny_base_dir.iterdir():
        os.symlink(entry, base / entry.name)
    IdentitySplit(train=ids[3:], holdout=ids[:3], seed=0).save(base / "split.json")
    common = ["--base", str(base), "--corpus", str(tmp_path / "faces.csv"), "--conditions", "base",
              "--images-per-id", "1", "--gen-steps", "1", "--device", "cpu", "--threads", "1",
              "--detector", "center", "--metrics", "dlib"]

    def margins(out):
        cells = json.loads((out / "results.json").read_text())["conditions"]["base"]["per_identity"]
        return {i: c["scores"]["dlib"]["margin"] for i, c in cells.items()}

    assert main(["eval", "--out", str(tmp_path / "two"), "--identities", "2", *common]) == 0
    assert main(["eval", "--out", str(tmp_path / "three"), "--identities", "3", *common]) == 0
    two, three = margins(tmp_path / "two"), margins(tmp_path / "three")
    assert len(two) == 2 and len(three) == 3
    for i, m in two.items():
        assert three[i] == pytest.approx(m, abs=1e-6)

    # a cell scored against other references: rescored from its image, not regenerated
    cell_file = tmp_path / "three" / "cells" / "base" / f"{ids[0]}.json"
    image = next((tmp_path / "three" / "cells" / "base" / ids[0]).glob("*.png"))
    before = image.stat().st_mtime_ns
    cell = json.loads(cell_file.read_text())
    cell["refs"], cell["scores"]["dlib"]["margin"] = "other", 9.0
    cell_file.write_text(json.dumps(cell))
    assert main(["eval", "--out", str(tmp_path / "three"), "--identities", "3", *common]) == 0
    assert margins(tmp_path / "three")[ids[0]] == pytest.approx(three[ids[0]], abs=1e-6)
    assert json.loads(cell_file.read_text())["refs"] != "other" and image.stat().st_mtime_ns == before


@pytest.mark.needs_shared
def test_fine_tune_from_zero_cells_survive_a_re_exported_hypernetwork(tiny_pipe, tiny_base_dir, three_identities,
                                                                     tmp_path, one_thread):
    """The fine-tune from zero uses only the hypernetwork's geometry (spec, layers, resolution), so a
    re-exported file (another prediction_scale, a retrained stage 2) reuses its cells while the
    conditions that use the prediction rerun; another geometry reruns it too."""
    import os

    from hypernet.adapters import default_spec_for, lidb_layers
    from hypernet.hypernetwork.export import read_info, save_hypernet
    from hypernet.hypernetwork.model import HyperNetwork

    hn = _random_hypernet(tiny_pipe, tmp_path / "hn")
    out = tmp_path / "out"
    argv = ["eval", "--base", str(tiny_base_dir), "--hypernet", str(hn), "--corpus", str(three_identities),
            "--out", str(out), "--conditions", "fast-finetune,hypernetwork", "--identities", "1",
            "--images-per-id", "1", "--gen-steps", "1", "--device", "cpu", "--threads", "1",
            "--detector", "center", "--metrics", "dlib", "--override", "fast-finetune.steps=1"]
    assert main(argv) == 0
    ident = json.loads((out / "results.json").read_text())["identities"][0]

    def stamp(cond):
        return next((out / "cells" / cond / ident).glob("*.png")).stat().st_mtime_ns

    ff, hn_cell = stamp("fast-finetune"), stamp("hypernetwork")
    file = hn / "hypernet.safetensors"
    st = file.stat()
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # "re-exported": same geometry, new file
    assert main(argv) == 0
    assert stamp("fast-finetune") == ff and stamp("hypernetwork") != hn_cell

    # a hypernetwork of another geometry (the aux bases' seed), in another folder: the fine-tune from
    # zero trains in other bases and reruns
    info = read_info(file)
    info.spec = default_spec_for(tiny_pipe, seed=info.spec.seed + 1)
    assert lidb_layers(tiny_pipe, info.spec) == info.layers
    (tmp_path / "hn2").mkdir()
    save_hypernet(tmp_path / "hn2" / "hypernet.safetensors", HyperNetwork(info.config), info)
    argv[argv.index("--hypernet") + 1] = str(tmp_path / "hn2")
    assert main(argv) == 0
    assert stamp("fast-finetune") != ff

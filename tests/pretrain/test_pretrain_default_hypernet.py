"""`default_hypernet_path()`: built once by the pipeline, cached, then reused."""

from __future__ import annotations

import hdb.defaults as defaults


def test_default_hypernet_is_built_once_and_loads(monkeypatch, tiny_pipe):
    from hypernet.hypernetwork import HypernetRuntime

    # The real default (tiny-cpu cut down, ~1-2 min) is the same code with bigger numbers.
    monkeypatch.setattr(defaults, "DEFAULT_HYPERNET_OVERRIDES", (
        'data.corpus=["skimage:lfw_subset"]', "data.lfw_count=5", "data.detector=center",
        "data.val_fraction=0.2", "stage1.train.steps=1", "stage2.steps=2", "stage2.warmup_steps=1",
        "stage2.model.encoder_kwargs={patch_size: 16, depth: 1}", "stage2.model.depth=1",
        "stage2.model.iterations=1", "device=cpu",
    ))
    path = defaults.default_hypernet_path()
    assert sorted(p.name for p in path.iterdir()) == ["hypernet.onnx", "hypernet.safetensors", "report.json"]
    assert not list(path.parent.glob(".tiny-hypernet-*"))  # the build folder is gone
    stamp = (path / "hypernet.safetensors").stat().st_mtime_ns
    assert defaults.default_hypernet_path() == path  # second call: cached, not rebuilt
    assert (path / "hypernet.safetensors").stat().st_mtime_ns == stamp
    rt = HypernetRuntime.load(path, device="cpu")
    rt.check_base(tiny_pipe)  # built on the embedded tiny base, which the fixture also is (seed 0)

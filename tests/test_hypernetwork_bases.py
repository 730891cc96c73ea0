"""The hypernetwork on every base family: heads sized from the base's LiDB spec, at real shape on the
meta device and on the tiny SDXL/FLUX pipelines, and a runtime that refuses another family's base."""

from __future__ import annotations

import copy

import pytest
import torch

from hypernet.adapters import LiDB, default_spec_for, lidb_layers
from hypernet.base import base_fingerprint, load_pipeline, make_tiny_pipeline
from hypernet.errors import IncompatibleAdapterError, InvalidInputError
from hypernet.hypernetwork import HypernetConfig, HypernetInfo, HypernetRuntime, HyperNetwork, save_hypernet
from hypernet.hypernetwork.heads import sized_for_base

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Real bases (hypernet.base.real_configs) -> (LiDB layers, a = b, hypernetwork parameters with its
#: family's GPU config: ViT-H/14 encoder (630,766,080) + decoder dim 1024 x 2 blocks + heads).
REAL = {
    "sd15": (128, 100, 683_849_216),
    "sdxl-base-1.0": (560, 40, 703_848_704),
    "sd3-medium": (191, 100, 696_828_728),
    "flux.1-dev": (266, 100, 712_280_528),
}
GPU_CONFIG = {"sd15": "sd15-gpu", "sdxl": "sdxl-gpu", "sd3": "sd3-gpu", "flux": "flux-gpu"}


def small_model(**kw) -> HypernetConfig:
    """A few-thousand-parameter architecture; its heads are sized by `sized_for_base`."""
    base = dict(encoder_kwargs={"patch_size": 16, "depth": 1, "embed_dim": 32, "num_heads": 2}, image_size=64,
                dim=32, depth=1, heads=2, iterations=2)
    base.update(kw)
    return HypernetConfig(**base)


@pytest.mark.parametrize("name", sorted(REAL))
def test_heads_at_real_shape_on_meta(name):
    """Each real base: the family's GPU config, heads sized from the default LiDB spec; the meta-device
    forward returns exactly a trained LiDB's packed shapes, and the parameter count is the reported one."""
    from hypernet.base.real_configs import arch_of, meta_base
    from pretrain.config import load_config

    layers, aux, params = REAL[name]
    arch = arch_of(name)
    ns = meta_base(name)
    heads = sized_for_base(ns, load_config(GPU_CONFIG[arch]).stage2.model)
    c = heads.config
    assert (heads.arch, c.num_layers, c.a, c.b, c.r) == (arch, layers, aux, aux, 1)
    assert heads.layers == lidb_layers(ns, default_spec_for(ns)) and c.output_size == layers * 2 * aux
    with torch.device("meta"):
        model = HyperNetwork(c)
        out = model(torch.zeros(2, 3, c.image_size, c.image_size))
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (2, *s) for k, s in heads.output_shapes.items()}
    assert tuple(model.head_weight.shape) == (layers, 1024, 2 * aux)
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, object]:
    """Tiny SDXL and FLUX pipelines (seed 0), loaded once."""
    return {a: load_pipeline(make_tiny_pipeline(tmp_path_factory.mktemp(f"tiny-{a}"), seed=0, arch=a),
                             device="cpu", dtype="fp32") for a in ("sdxl", "flux")}


def _export(pipe, path, seed: int = 0):
    heads = sized_for_base(pipe, small_model(head_init_std=0.05))
    torch.manual_seed(seed)
    model = HyperNetwork(heads.config)
    info = HypernetInfo(heads.config, heads.spec, heads.layers, base_fingerprint(pipe), 64, arch=heads.arch)
    save_hypernet(path, model, info)
    return model, heads


@pytest.mark.parametrize("arch,layers", [("sdxl", 64), ("flux", 22)])
def test_tiny_prediction_is_what_a_lidb_of_that_base_holds(tiny, tmp_path, arch, layers):
    """On tiny SDXL / FLUX: the prediction has the keys and shapes of the base's own LiDB state dict,
    drives that LiDB per sample, and the saved file says which family it is for."""
    pipe = copy.deepcopy(tiny[arch])
    model, heads = _export(pipe, tmp_path / "h.safetensors")
    lidb = LiDB(pipe, heads.spec, layers=heads.layers)
    own = lidb.state_dict()
    pred = model(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert len(heads.layers) == layers
    assert {k: tuple(v.shape[1:]) for k, v in pred.items()} == {k: tuple(v.shape) for k, v in own.items()}
    lidb.use(pred)  # accepted as per-sample weights (N, L, r, a) / (N, L, b, r)
    rt = HypernetRuntime.load(tmp_path / "h.safetensors", backend="torch", device="cpu")
    assert rt.arch == arch
    rt.check_base(pipe)  # its own base: accepted


def test_runtime_refuses_a_hypernetwork_of_another_family(tiny, tmp_path):
    from hypernet.personalize import load_runtime, personalize
    from pretrain.corpus import lfw_image

    _export(tiny["sdxl"], tmp_path / "sdxl.safetensors")
    rt = load_runtime(str(tmp_path / "sdxl.safetensors"), backend="torch", device="cpu")
    with pytest.raises(IncompatibleAdapterError, match=r"family it was trained for \('sdxl'.*got a 'flux' base"):
        rt.check_base(tiny["flux"])
    with pytest.raises(IncompatibleAdapterError, match="got a 'flux' base"):
        personalize(tiny["flux"], lfw_image(0), hypernet=tmp_path / "sdxl.safetensors", steps=0)


def test_same_family_other_weights_is_refused_by_fingerprint(tiny, tmp_path):
    """Another SDXL (other seed): the family matches, the fingerprint does not."""
    other = load_pipeline(make_tiny_pipeline(tmp_path / "sdxl-1", seed=1, arch="sdxl"), device="cpu", dtype="fp32")
    _export(other, tmp_path / "h.safetensors")
    with pytest.raises(IncompatibleAdapterError, match="fingerprint"):
        HypernetRuntime.load(tmp_path / "h.safetensors", backend="torch", device="cpu").check_base(tiny["sdxl"])


def test_files_without_arch_are_sd15_and_unknown_arch_is_rejected(tmp_path):
    from hypernet.adapters import LiDBSpec
    from hypernet.hypernetwork import read_info

    cfg = small_model(num_layers=2, a=4, b=4, r=1)
    info = HypernetInfo(cfg, LiDBSpec(a=4, b=4), ["unet.x", "unet.y"], "f" * 16, 64)
    meta = info.to_metadata()
    assert meta["arch"] == "sd15"
    del meta["arch"]  # a file written before other families existed
    assert HypernetInfo.from_metadata(meta, "old").arch == "sd15"
    with pytest.raises(InvalidInputError, match="`arch` must be one of"):
        save_hypernet(tmp_path / "x.safetensors", HyperNetwork(cfg), HypernetInfo(cfg, info.spec, info.layers, "f" * 16,
                                                                                    64, arch="sd9"))
    save_hypernet(tmp_path / "y.safetensors", HyperNetwork(cfg), HypernetInfo(cfg, info.spec, info.layers, "f" * 16,
                                                                                64, arch="flux"))
    assert read_info(tmp_path / "y.safetensors").arch == "flux"

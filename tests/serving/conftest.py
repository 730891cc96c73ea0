"""Serving fixtures: real servers on loopback ports (port 0), real channels, tiny models.

`make_server(**cfg)` starts an `HdbServer` on its own loop thread (`BackgroundServer`) with a
fresh `Engine` on the session's tiny base and tiny random hypernetwork, and stops it after the
test. Servers skip warm-up unless asked: loading the tiny base takes well under a second.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch


def random_hypernet_dir(base_dir: Path, out: Path) -> Path:
    """An untrained hypernetwork export for the base at `base_dir` (any family; weights random
    but fixed), written into `out`."""
    from hypernet.base import load_pipeline
    from hypernet.base.arch import default_size
    from hypernet.hypernetwork import HypernetConfig, HypernetInfo, HyperNetwork, save_hypernet
    from hypernet.hypernetwork.heads import sized_for_base
    from hypernet.identity import cached_fingerprint

    pipe = load_pipeline(base_dir, device="cpu", dtype="fp32")
    heads = sized_for_base(pipe, HypernetConfig(dim=32, depth=1, heads=2, iterations=2, head_init_std=0.05,
                                                encoder_kwargs={"patch_size": 16, "depth": 1}))
    torch.manual_seed(0)
    info = HypernetInfo(config=heads.config, spec=heads.spec, layers=heads.layers,
                        base_fingerprint=cached_fingerprint(pipe), resolution=default_size(pipe),
                        arch=heads.arch)
    save_hypernet(out / "hypernet.safetensors", HyperNetwork(heads.config), info)
    return out


@pytest.fixture(scope="session")
def tiny_hypernet_dir(tiny_base_dir, tmp_path_factory) -> Path:
    """An untrained hypernetwork export for the tiny base (weights random but fixed)."""
    return random_hypernet_dir(tiny_base_dir, tmp_path_factory.mktemp("hypernet"))


@pytest.fixture(scope="session")
def photo_bytes() -> bytes:
    """A 96x80 PNG 'photo' (a smooth gradient: decodes everywhere, no face needed)."""
    from PIL import Image

    x = torch.linspace(0, 255, 96).to(torch.uint8)
    y = torch.linspace(255, 0, 80).to(torch.uint8)
    rgb = torch.stack([x.expand(80, 96), y[:, None].expand(80, 96), (x[None] // 2).expand(80, 96)],
                      dim=-1)
    buf = io.BytesIO()
    Image.fromarray(rgb.numpy()).save(buf, format="PNG")
    return buf.getvalue()


class ServerFactory:
    """`factory(**config_overrides) -> BackgroundServer`; `close()` stops them all."""

    def __init__(self, base_dir: Path, hypernet_dir: Path, tmp: Path):
        self.base_dir, self.hypernet_dir, self.tmp = base_dir, hypernet_dir, tmp
        self.started = []

    def engine(self):
        from serving.engine import Engine

        return Engine(str(self.base_dir), str(self.hypernet_dir), "cpu", "fp32")

    def __call__(self, engine=None, store_obj=None, wait_ready=True, **overrides):
        from serving.config import ServeConfig
        from serving.server import BackgroundServer

        torch.set_num_threads(1)
        base = dict(host="localhost", port=0, metrics_port=-1, warmup=False, no_auth=True,
                    store=str(self.tmp / f"store{len(self.started)}"), log_format="text",
                    sweep_interval_s=3600.0, grace_s=5.0)
        base.update(overrides)
        bg = BackgroundServer(ServeConfig(**base), engine=engine or self.engine(), store=store_obj,
                              wait_ready=wait_ready)
        self.started.append(bg)
        return bg

    def close(self) -> None:
        for bg in self.started:
            bg.close(grace=0.0)


@pytest.fixture()
def make_server(tiny_base_dir, tiny_hypernet_dir, tmp_path):
    factory = ServerFactory(tiny_base_dir, tiny_hypernet_dir, tmp_path)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def make_module_server(tiny_base_dir, tiny_hypernet_dir, tmp_path_factory):
    factory = ServerFactory(tiny_base_dir, tiny_hypernet_dir, tmp_path_factory.mktemp("srv"))
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def make_server_on(tmp_path_factory):
    """`make_server_on(base_dir, hypernet_dir)` -> a `ServerFactory` on another base (the tiny
    SDXL or FLUX; `hypernet_dir` "" for none), its servers stopped after the module."""
    factories = []

    def make(base_dir: Path, hypernet_dir: Path | str) -> ServerFactory:
        factory = ServerFactory(base_dir, hypernet_dir, tmp_path_factory.mktemp("srv"))
        factories.append(factory)
        return factory

    yield make
    for factory in factories:
        factory.close()


@pytest.fixture()
def client_for():
    """Factory: `client_for(server, api_key=None) -> HdbClient` (closed after the test)."""
    from serving.client import HdbClient

    clients = []

    def make(bg, api_key: str | None = "", **kw):
        c = HdbClient(bg.target, api_key=api_key, **kw)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()

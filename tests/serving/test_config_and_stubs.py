"""Settings layering (file < env < flags), validation, and generated-stub drift."""

from __future__ import annotations

import argparse
import filecmp

import pytest

from hypernet.errors import InvalidInputError
from serving import proto_build
from serving.config import ServeConfig, add_arguments, load_config


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_defaults_serve_the_embedded_model_on_localhost():
    cfg = load_config(_parse([]), environ={})
    assert (cfg.host, cfg.port, cfg.max_message_bytes) == ("localhost", 50051, 16 << 20)
    assert cfg.base == "" and cfg.hypernet == "" and not cfg.no_auth and cfg.binds_loopback_only()


def test_file_then_env_then_flags(tmp_path):
    f = tmp_path / "serve.yaml"
    f.write_text("port: 6000\nmax-batch: 2\nmax_wait_ms: 3\nlog_format: text\n")
    env = {"HDB_CONFIG": str(f), "HDB_MAX_BATCH": "5", "HDB_NO_AUTH": "true"}
    cfg = load_config(_parse(["--port", "7000"]), environ=env)
    assert (cfg.port, cfg.max_batch, cfg.max_wait_ms, cfg.no_auth) == (7000, 5, 3.0, True)
    assert cfg.log_format == "text"
    cfg = load_config(_parse(["--config", str(f), "--no-auth", "--no-warmup"]), environ={})
    assert (cfg.port, cfg.no_auth, cfg.warmup) == (6000, True, False)


@pytest.mark.parametrize("env,field", [
    ({"HDB_PORT": "70000"}, "port"),
    ({"HDB_PORT": "eighty"}, "port"),
    ({"HDB_MAX_BATCH": "0"}, "max_batch"),
    ({"HDB_TLS_CERT": "c.pem"}, "tls_key"),
    ({"HDB_MAX_GUIDANCE": "nan"}, "max_guidance"),
    ({"HDB_NO_AUTH": "maybe"}, "no_auth"),
    ({"HDB_MIN_SIZE": "60"}, "max_size"),
])
def test_bad_settings_name_the_setting(env, field):
    with pytest.raises(InvalidInputError, match=f"`{field}`"):
        load_config(_parse([]), environ=env)


def test_unknown_file_keys_are_refused(tmp_path):
    f = tmp_path / "serve.yaml"
    f.write_text("prot: 1\n")
    with pytest.raises(InvalidInputError, match="prot"):
        load_config(_parse(["--config", str(f)]), environ={})


def test_bind_address_and_loopback():
    assert ServeConfig(host="::1", port=1).bind_address == "[::1]:1"
    assert ServeConfig(host="::1").binds_loopback_only()
    assert not ServeConfig(host="0.0.0.0").binds_loopback_only()
    assert not ServeConfig(host="[::]").binds_loopback_only()


def test_stubs_match_the_proto(tmp_path):
    """The stubs in use are exactly what the .proto generates (they are never hand-edited)."""
    from serving.stubs import pb  # noqa: F401  (ensures serving/_proto is built)

    proto_build.generate(tmp_path)
    ours = sorted(p.relative_to(proto_build.OUT_DIR) for p in proto_build.OUT_DIR.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert ours == fresh
    _, mismatch, errors = filecmp.cmpfiles(proto_build.OUT_DIR, tmp_path,
                                          [str(p) for p in fresh], shallow=False)
    assert not mismatch and not errors


def test_stale_stubs_are_regenerated(tmp_path):
    out = tmp_path / "_proto"
    proto_build.build(out)
    assert proto_build.is_current(out)
    (out / proto_build.STAMP).write_text("stale\n")
    stub = out / "hyperdreambooth" / "v1" / "service_pb2.py"
    stub.write_text("# hand edit\n")
    assert not proto_build.is_current(out)
    proto_build.build(out)
    assert proto_build.is_current(out) and "hand edit" not in stub.read_text()

"""deploy/docker: the Dockerfile's claims, checked without a Docker engine.

- its structure: CUDA base = torch's CUDA, uv = the Makefile's, non-root, ports and volumes =
  the server's settings, the `gpu` and `cpu` stages identical below FROM;
- .dockerignore: the context holds the package and lock file, and no venv, data or runs;
- the builder stage's own `uv` commands, run in order on a copy of the build context into a
  temp venv (offline, from uv's cache: skipped with the reason when the cache lacks a wheel);
- the HEALTHCHECK command against a live server, with this venv and with the one just built.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest
from hdb_deploy_helpers import (
    ROOT,
    build_context,
    dockerignore_rules,
    duration_s,
    healthcheck,
    parse_dockerfile,
    run_flags_stripped,
)

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RUNTIME_STAGES = ("gpu", "cpu")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", name, maxsplit=1)[0]).lower()


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile()


# --------------------------------------------------------------------------- structure
def test_stages_and_base_images(dockerfile):
    import torch

    stages = list(dockerfile.stages)
    assert set(RUNTIME_STAGES) <= set(stages) and "builder" in stages
    assert stages[-1] == "gpu", "a build without --target must give the GPU image"
    cuda_base = dockerfile.resolve(dockerfile.stages["gpu"].base)
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(base|runtime)-ubuntu\d+\.\d+", cuda_base)
    assert m, f"gpu stage must start FROM an nvidia/cuda base/runtime image, got {cuda_base}"
    assert torch.version.cuda == f"{m.group(1)}.{m.group(2)}", \
        f"CUDA {m.group(1)}.{m.group(2)} base but the locked torch is built for {torch.version.cuda}"
    makefile_uv = re.search(r"^UV_VERSION := (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert dockerfile.global_args["UV_VERSION"] == makefile_uv
    assert dockerfile.resolve(dockerfile.stages["uv"].base).endswith(f"uv:{makefile_uv}")


def test_runtime_stages_stay_identical(dockerfile):
    """`# Copied from` for Dockerfiles: the two flavours differ only in their FROM line."""
    gpu, cpu = (dockerfile.stages[s] for s in RUNTIME_STAGES)
    assert [(i.cmd, i.value) for i in gpu.instructions] == [(i.cmd, i.value) for i in cpu.instructions]


def test_python_and_uv_install_from_the_lock(dockerfile):
    builder = dockerfile.stages["builder"]
    env = builder.env()
    python = env["UV_PYTHON"]
    req = PYPROJECT["project"]["requires-python"]  # ">=3.11,<3.12"
    lo, hi = re.fullmatch(r">=(\d+\.\d+),<(\d+\.\d+)", req).groups()
    assert tuple(map(int, lo.split("."))) <= tuple(map(int, python.split("."))) < \
        tuple(map(int, hi.split("."))), f"UV_PYTHON {python} outside requires-python {req}"
    steps = [(i.cmd, run_flags_stripped(i.value) if i.cmd == "RUN" else i.value)
             for i in builder.instructions if i.cmd in ("COPY", "RUN")]
    syncs = [n for n, (cmd, v) in enumerate(steps) if cmd == "RUN" and v.startswith("uv sync")]
    assert len(syncs) >= 2
    for n in syncs:
        flags = shlex.split(steps[n][1])
        assert "--frozen" in flags and "--no-dev" in flags, f"{steps[n][1]}: lock only, no dev group"
        assert not {"--all-groups", "--dev", "--extra", "--all-extras", "--upgrade"} & set(flags)
    first = syncs[0]
    assert "--no-install-project" in shlex.split(steps[first][1])
    assert steps[first - 1] == ("COPY", "pyproject.toml uv.lock ./"), \
        "the dependency layer must depend on the lock file only (cache hit on source edits)"
    assert ("COPY", ". .") in steps[first:], "then the source"
    assert shlex.split(steps[syncs[-1]][1]) == ["uv", "sync", "--frozen", "--no-dev"], \
        "the last sync is exact, so build-only groups (protoc) leave the image"
    for cmd in (steps[n][1] for n in syncs):
        toks = shlex.split(cmd)
        for i, t in enumerate(toks):
            if t == "--group":  # a build-only group (protoc), never the dev tools
                assert toks[i + 1] in PYPROJECT["dependency-groups"] and toks[i + 1] != "dev"


def test_runtime_env_ports_volumes_user(dockerfile):
    from dataclasses import fields

    from serving.config import ENV_PREFIX, ServeConfig, load_config

    known = {ENV_PREFIX + f.name.upper() for f in fields(ServeConfig)} | {"HDB_CACHE_DIR"}
    for name in RUNTIME_STAGES:
        stage = dockerfile.stages[name]
        env = stage.env()
        assert {k for k in env if k.startswith(ENV_PREFIX)} <= known
        cfg = load_config(None, {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)})
        (expose,) = stage.all("EXPOSE")
        assert sorted(int(p) for p in expose.value.split()) == sorted([cfg.port, cfg.metrics_port])
        assert not cfg.binds_loopback_only(), "published ports must reach the server"
        volumes = json.loads(stage.all("VOLUME")[0].value)
        assert "/models" in volumes
        for path in (cfg.store, env["HDB_CACHE_DIR"]):
            assert any(PurePosixPath(path).is_relative_to(v) for v in volumes), path
        (user,) = stage.all("USER")
        assert user.value.split(":")[0] not in ("0", "root"), "run as a non-root user"
        entry = stage.json_args("ENTRYPOINT")
        assert entry == ["hdb"] and "hdb" in PYPROJECT["project"]["scripts"]
        assert stage.json_args("CMD") == ["serve"]
        assert "/opt/venv/bin" in env["PATH"].split(":")[0]


def test_healthcheck_is_the_grpc_health_script(dockerfile):
    from serving.stubs import SERVICE_NAME

    sys.path.insert(0, str(ROOT / "deploy" / "docker"))
    try:
        import healthcheck as hc
    finally:
        sys.path.pop(0)
    assert hc.SERVICE == SERVICE_NAME
    opts, cmd = healthcheck(dockerfile.stages["gpu"])
    assert cmd[0] == "python" and cmd[1].startswith("/app/")
    assert (ROOT / cmd[1].removeprefix("/app/")).is_file()
    assert duration_s(opts["start-period"]) >= 300, "SD 1.5 loading must not count as unhealthy"
    assert duration_s(opts["timeout"]) > 3.0  # > the script's own RPC deadline


# --------------------------------------------------------------------------- context
def test_build_context_keeps_the_package_and_drops_data():
    ctx = set(build_context())
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    package = {p for p in tracked if p.split("/")[0] in (*wheel["packages"], "proto")}
    assert package and package <= ctx, f"excluded package files: {sorted(package - ctx)[:5]}"
    assert {"pyproject.toml", "uv.lock", "README.md", "deploy/docker/healthcheck.py"} <= ctx
    for bad in (".venv/", ".git/", "serving/_proto/", "tests/", "runs/", "data/"):
        assert not any(p.startswith(bad) for p in ctx), bad
    size = sum((ROOT / p).stat().st_size for p in ctx)
    assert size < 20 * 2**20, f"build context {size / 2**20:.1f} MiB: data is leaking in"
    assert dockerignore_rules()


# --------------------------------------------------------------------------- builder commands
def _uv() -> list[str] | None:
    for cand in ([sys.executable, "-m", "uv"], ["python3", "-m", "uv"], [shutil.which("uv") or ""]):
        if cand[0] and subprocess.run([*cand, "--version"], capture_output=True).returncode == 0:
            return cand
    return None


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory, dockerfile) -> Path:
    """Replay the builder stage's COPY/RUN steps on the build context; returns the venv."""
    uv = _uv()
    if uv is None:
        pytest.skip("uv is not installed (make setup installs it)")
    tmp = tmp_path_factory.mktemp("image")
    app, venv = tmp / "app", tmp / "venv"
    builder = dockerfile.stages["builder"]
    image_env = builder.env()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_PYTHON_INSTALL_DIR")}
    env.update(image_env)
    env.update(UV_PROJECT_ENVIRONMENT=str(venv), UV_PYTHON=sys._base_executable,
               UV_PYTHON_PREFERENCE="only-system", UV_LINK_MODE="hardlink", UV_COMPILE_BYTECODE="0",
               UV_OFFLINE="1", PATH=os.pathsep.join([str(Path(uv[0]).parent), env["PATH"]]))
    context = build_context()
    for ins in builder.instructions:
        if ins.cmd == "WORKDIR":
            assert ins.value == "/app"
            app.mkdir(parents=True, exist_ok=True)
        elif ins.cmd == "COPY" and not ins.value.startswith("--from"):
            *srcs, dest = shlex.split(ins.value)
            assert dest in ("./", "."), "COPY into WORKDIR"
            files = context if srcs == ["."] else srcs
            for rel in files:
                assert rel in context, f"COPY {rel}: not in the build context (.dockerignore?)"
                (app / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, app / rel)
        elif ins.cmd == "RUN":
            cmd = run_flags_stripped(ins.value)
            if cmd.startswith("uv python install"):
                # Downloads a managed CPython; here the system 3.11 stands in for it.
                assert cmd.split()[-1] == image_env["UV_PYTHON"]
                continue
            cmd = cmd.replace(image_env["UV_PROJECT_ENVIRONMENT"], str(venv))
            argv = shlex.split(cmd)
            if argv[0] == "uv":
                argv = [*uv, *argv[1:]]
            out = subprocess.run(argv, cwd=app, env=env, capture_output=True, text=True, timeout=600)
            if out.returncode and "network was disabled" in out.stderr:
                pytest.skip(f"`{cmd}` needs wheels missing from uv's cache (offline): "
                            f"{out.stderr.strip().splitlines()[-1]}")
            assert out.returncode == 0, f"line {ins.lineno}: `{cmd}` failed:\n{out.stderr[-3000:]}"
    return venv


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def test_builder_commands_install_the_locked_runtime_only(image_venv):
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps(sorted({d.metadata['Name'] for d in m.distributions()})))")
    out = subprocess.run([_venv_python(image_venv), "-c", code], capture_output=True, text=True, check=True)
    installed = {_norm(n) for n in json.loads(out.stdout)}
    wanted = {_norm(d) for d in PYPROJECT["project"]["dependencies"]} | {"hyperdreambooth"}
    assert wanted <= installed, f"missing: {sorted(wanted - installed)}"
    build_only = {_norm(d) for g, deps in PYPROJECT["dependency-groups"].items() for d in deps}
    leaked = (build_only - wanted) & installed
    assert not leaked, f"dev/build-only packages in the image: {sorted(leaked)}"
    eval_extra = {_norm(d) for d in PYPROJECT["project"]["optional-dependencies"]["eval"]}
    assert not eval_extra & installed
    assert (image_venv / "bin" / "hdb").is_file()
    # The stubs were generated at build time and are current: nothing is rebuilt at run time.
    check = ("import serving.proto_build as b, serving.stubs as s; "
             "assert b.is_current(); print(s.SERVICE_NAME, b.OUT_DIR)")
    out = subprocess.run([_venv_python(image_venv), "-c", check], cwd="/", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert str(image_venv.parent / "app") in out.stdout, "the project runs from the copied context"


# --------------------------------------------------------------------------- HEALTHCHECK
@pytest.fixture(scope="module")
def live_server(tiny_base_dir, tmp_path_factory):
    """A real server on a free loopback port (tiny base, no hypernetwork: health needs neither)."""
    import torch

    from serving.config import ServeConfig
    from serving.engine import Engine
    from serving.server import BackgroundServer

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("serve")
    cfg = ServeConfig(host="localhost", port=0, metrics_port=-1, warmup=False, no_auth=True,
                      store=str(tmp / "store"), log_format="text", sweep_interval_s=3600.0, grace_s=1.0)
    bg = BackgroundServer(cfg, engine=Engine(str(tiny_base_dir), str(tmp / "no-hypernet"), "cpu", "fp32"))
    yield bg
    bg.close()


def _run_healthcheck(dockerfile, python: Path | str, port: int) -> subprocess.CompletedProcess:
    """The HEALTHCHECK CMD as the image runs it: `python` from PATH, /app = the project."""
    _, cmd = healthcheck(dockerfile.stages["gpu"])
    argv = [str(python), *(str(ROOT / a.removeprefix("/app/")) if a.startswith("/app/") else a
                           for a in cmd[1:])]
    env = {**os.environ, "HDB_PORT": str(port)}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("interpreter", ["dev-venv", "image-venv"])
def test_healthcheck_follows_the_servers_health(request, dockerfile, live_server, interpreter):
    from grpc_health.v1 import health_pb2

    from serving.stubs import SERVICE_NAME

    python = sys.executable if interpreter == "dev-venv" else \
        _venv_python(request.getfixturevalue("image_venv"))
    ok = _run_healthcheck(dockerfile, python, live_server.port)
    assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING"), ok.stderr
    # Draining (what stop() does first): NOT_SERVING -> unhealthy.
    live_server.call(live_server.server.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING))
    try:
        bad = _run_healthcheck(dockerfile, python, live_server.port)
        assert (bad.returncode, bad.stdout.strip()) == (1, "NOT_SERVING")
    finally:
        live_server.call(live_server.server.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING))


def test_healthcheck_fails_when_nothing_listens(dockerfile):
    import socket

    # Held bound but never listening while the check runs: connections are refused, and nothing
    # else can take the port meanwhile (a port released first may be reused by then).
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
        out = _run_healthcheck(dockerfile, sys.executable, port)
    assert out.returncode == 1 and "UNAVAILABLE" in out.stderr

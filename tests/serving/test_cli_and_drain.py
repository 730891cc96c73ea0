"""`hdb client ...` against a real server, and `hdb serve` in a subprocess drained by SIGTERM."""

from __future__ import annotations

import argparse
import json
import signal

import grpc
import pytest
from hdb_serving_helpers import rpc_code, start_serve_process, wait_until

import serving.cli
from serving.client import HdbClient

pytestmark = pytest.mark.timeout(240)


def run_cli(argv: list[str]) -> int:
    """`hdb` with only the serving subcommands registered (the real parser and handlers)."""
    parser = argparse.ArgumentParser(prog="hdb")
    parser.add_argument("-v", "--verbose", action="store_true")
    serving.cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_hdb_registers_serve_and_client():
    from hdb.cli import SUBCOMMAND_MODULES, build_parser

    assert serving.cli in SUBCOMMAND_MODULES
    serve = build_parser().parse_args(["serve"])
    assert serve.func.__module__ == "serving.cli"
    assert serve.default_hypernet.__module__ == "hdb.defaults"  # the app supplies the embedded default


def test_client_cli_round_trip(make_server, photo_bytes, tmp_path, capsys):
    bg = make_server()
    photo = tmp_path / "me.png"
    photo.write_bytes(photo_bytes)
    out = tmp_path / "out"
    target = ["client", "--target", bg.target]
    assert run_cli([*target, "personalize", str(photo), "--steps", "1", "--prompt",
                    "a photo of ohwx person", "--n", "2", "--gen-steps", "1", "--out",
                    str(out)]) == 0
    identity_id = capsys.readouterr().out.strip()
    meta = json.loads((out / f"{identity_id}.json").read_text())
    assert meta["id"] == identity_id and meta["method"] == "METHOD_HYPERDREAMBOOTH"
    assert len(list(out.glob("p0-*.png"))) == 2

    assert run_cli([*target, "generate", "--identity", identity_id, "--prompt", "ohwx",
                    "--gen-steps", "1", "--format", "jpeg", "--out", str(out / "gen")]) == 0
    assert len(list((out / "gen").glob("*.jpg"))) == 1
    assert run_cli([*target, "export", identity_id, "--format", "kohya", "--out",
                    str(tmp_path / "x.safetensors")]) == 0
    assert (tmp_path / "x.safetensors").stat().st_size > 0
    capsys.readouterr()
    assert run_cli([*target, "list"]) == 0
    assert identity_id in capsys.readouterr().out
    assert run_cli([*target, "delete", identity_id]) == 0
    capsys.readouterr()

    assert run_cli([*target, "delete", identity_id]) == 1  # a rejected call
    assert capsys.readouterr().err.startswith("NOT_FOUND: ")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert run_cli([*target, "personalize", str(bad), "--out", str(out)]) == 1
    assert capsys.readouterr().err.startswith("INVALID_ARGUMENT: ")
    assert run_cli([*target, "health"]) == 0


def test_sigterm_drains_without_losing_accepted_calls(tmp_path, tiny_base_dir,
                                                      tiny_hypernet_dir, photo_bytes):
    proc, port, logs = start_serve_process(tmp_path, tiny_base_dir, tiny_hypernet_dir)
    try:
        client = HdbClient(f"localhost:{port}")
        # Startup loads the models in a subprocess: on a loaded 2-core machine it took over 120 s.
        wait_until(lambda: _health(client) == "SERVING" or proc.poll() is not None, timeout=600, what="SERVING")
        assert _health(client) == "SERVING", "".join(logs[-20:])

        personalize = client.personalize_events(photo_bytes, options=client.options(steps=60))
        events = iter(personalize)
        next(events)  # accepted: it is the server's now
        gens = [client.generate_stream(f"prompt {k}", options=client.generation(steps=2, seed=k))
                for k in range(3)]
        for g in gens:
            g.initial_metadata()  # each call has reached the server's handler

        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: _health(client) != "SERVING", timeout=30, what="NOT_SERVING")
        err = rpc_code(client.generate, "too late", steps=1, timeout=30)
        assert err.code() == grpc.StatusCode.UNAVAILABLE

        rest = list(events)  # every accepted call completes
        assert rest[-1].WhichOneof("event") == "identity"
        assert [len(list(g)) for g in gens] == [1, 1, 1]
        assert proc.wait(timeout=120) == 0
        identity_id = rest[-1].identity.id
        assert (tmp_path / "store" / "meta" / "dev" / f"{identity_id}.json").is_file()
        msgs = [json.loads(line)["msg"] for line in logs if line.startswith("{")]
        assert "draining" in msgs and "stopped" in msgs
        assert any(line.startswith("{") and '"request_id"' in line and '"rpc"' in line
                   for line in logs)
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _health(client: HdbClient) -> str:
    try:
        return client.health(timeout=5)
    except grpc.RpcError as e:
        return e.code().name

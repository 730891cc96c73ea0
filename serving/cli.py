"""`hdb serve` and `hdb client ...`: run the service, or call one.

    hdb serve                                   # embedded tiny base on localhost:50051 (dev)
    hdb serve --host 0.0.0.0 --keys-file keys.txt --store s3://bucket/ids --tls-cert c --tls-key k
    hdb client personalize me.jpg [me2.jpg ...] --target localhost:50051 --prompt "a photo of ohwx person" --out out/
    hdb client generate --identity ID --prompt "ohwx person as a knight" --n 2 --out out/
    hdb client delete ID

A rejected call prints the gRPC status code name and details to stderr and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
from pathlib import Path

DEFAULT_TARGET = "localhost:50051"


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="run the gRPC personalisation service",
                                  description=__doc__.splitlines()[0])
    from serving.config import add_arguments

    add_arguments(serve)
    # The app (hdb.cli) sets `default_hypernet`: the folder to use when --hypernet is unset.
    serve.set_defaults(func=_serve, default_hypernet=None)

    client = subparsers.add_parser("client", help="call a running service")
    _connection_args(client, DEFAULT_TARGET, None, False, None, None)
    # The same options after the call's name (`hdb client health --target H:P`): there they
    # default to SUPPRESS, so a value given before the call's name is kept unless repeated.
    conn = argparse.ArgumentParser(add_help=False)
    s = argparse.SUPPRESS
    _connection_args(conn, s, s, s, s, s)
    sub = client.add_subparsers(dest="client_command", metavar="CALL", required=True)

    p = sub.add_parser("personalize", parents=[conn],
                       help="personalise from 1 to 8 photos of one person (and generate)")
    p.add_argument("photo", type=Path, nargs="+", help="photos of the same person (at most 8)")
    p.add_argument("--method", default="hyperdreambooth",
                   choices=["hyperdreambooth", "lidb", "lora", "textual_inversion", "dreambooth"])
    p.add_argument("--steps", type=int, default=None, help="personalisation steps")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--token", default="", help="rare token (default ohwx)")
    p.add_argument("--class-noun", default="", help="class noun (default person)")
    p.add_argument("--background", action="store_true", help="run as a background job")
    p.add_argument("--identity-weight", type=float, default=None,
                   help="HYPERDREAMBOOTH: weight of the fine-tune's identity term (0 = off, the server's "
                   "default; GetServerInfo's MethodInfo.identity_term says whether the server has it)")
    p.add_argument("--prompt", action="append", default=[],
                   help="generate this prompt afterwards (repeatable)")
    _gen_args(p)
    p.add_argument("--out", type=Path, default=Path("out"), help="output folder")
    p.set_defaults(func=_personalize)

    g = sub.add_parser("generate", parents=[conn], help="generate images of an identity (or the base)")
    g.add_argument("--identity", default="", help="identity id (empty: the base model)")
    g.add_argument("--prompt", required=True)
    _gen_args(g)
    g.add_argument("--out", type=Path, default=Path("out"), help="output folder")
    g.set_defaults(func=_generate)

    d = sub.add_parser("delete", parents=[conn], help="delete an identity")
    d.add_argument("identity")
    d.set_defaults(func=_delete)

    ls = sub.add_parser("list", parents=[conn], help="list this key's identities")
    ls.set_defaults(func=_list)

    e = sub.add_parser("export", parents=[conn], help="export an identity (a LoRA or an embedding file)")
    e.add_argument("identity")
    e.add_argument("--format", default="", choices=["", "lora_diffusers", "lora_kohya",
                                                    "textual_inversion", "diffusers", "kohya"],
                   help="default: the identity's method's first format (GetServerInfo)")
    e.add_argument("--out", type=Path, default=None, help="file (default ID.FORMAT.safetensors)")
    e.set_defaults(func=_export)

    i = sub.add_parser("info", parents=[conn], help="server info (base, methods, limits, versions)")
    i.set_defaults(func=_info)

    h = sub.add_parser("health", parents=[conn], help="grpc.health.v1 status")
    h.set_defaults(func=_health)


def _connection_args(p: argparse.ArgumentParser, target, api_key, tls, ca_cert, timeout) -> None:
    p.add_argument("--target", default=target, help=f"HOST:PORT of the service (default {DEFAULT_TARGET})")
    p.add_argument("--api-key", default=api_key, help="API key (default: $HDB_API_KEY)")
    p.add_argument("--tls", action="store_true", default=tls, help="connect with TLS (system roots)")
    p.add_argument("--ca-cert", type=Path, default=ca_cert, help="PEM root certificate (TLS)")
    p.add_argument("--timeout", type=float, default=timeout, help="deadline per call, seconds")


def _gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--gen-steps", type=int, default=0, help="denoising steps (0: server default)")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--gen-seed", type=int, default=None, help="image seed (image i: seed + i)")
    p.add_argument("--size", type=int, default=0, help="width = height in pixels (0: native)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--format", default="PNG", choices=["PNG", "JPEG", "WEBP"], type=str.upper)


# ---------------------------------------------------------------------- serve
def _serve(args) -> int:
    from serving.config import load_config
    from serving.logs import configure_logging
    from serving.server import run

    cfg = load_config(args)
    configure_logging(cfg.log_format, "DEBUG" if args.verbose else cfg.log_level)
    rc = asyncio.run(run(cfg, default_hypernet=args.default_hypernet))
    if any(t.name.startswith("hdb-model") and t.is_alive() for t in threading.enumerate()):
        # Stopped mid model load or mid step: exit now rather than tearing torch down under a
        # running thread (the work is abandoned by design; nothing half-written is kept).
        logging.shutdown()
        sys.stderr.flush()
        os._exit(rc)
    return rc


# ---------------------------------------------------------------------- client
def _call(fn):
    """Run a client call; a gRPC error prints `CODE: details` and exits 1."""
    def wrapped(args) -> int:
        import grpc

        from serving.client import HdbClient

        ca = args.ca_cert.read_bytes() if args.ca_cert else None
        try:
            with HdbClient(args.target, api_key=args.api_key, tls=args.tls, root_certificates=ca,
                           timeout=args.timeout) as client:
                return fn(client, args)
        except grpc.RpcError as e:
            print(f"{e.code().name}: {e.details()}", file=sys.stderr)
            return 1

    return wrapped


def _generation(client, args):
    size = args.size
    return client.generation(n=args.n, steps=args.gen_steps, guidance=args.guidance,
                             seed=args.gen_seed, width=size, height=size, format=args.format,
                             negative_prompt=args.negative_prompt)


def _save_image(out: Path, img, prefix: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    ext = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}[img.mime_type]
    path = out / f"{prefix}{img.index}-seed{img.seed}.{ext}"
    path.write_bytes(img.data)
    return path


def _identity_json(ident) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(ident)


@_call
def _personalize(client, args) -> int:
    opts = client.options(steps=args.steps, seed=args.seed, token=args.token,
                          class_noun=args.class_noun, background=args.background,
                          identity_weight=args.identity_weight)

    def progress(p) -> None:
        loss = f" loss {p.loss:.4f}" if p.HasField("loss") else ""
        print(f"  {p.stage} {p.step}/{p.total}{loss}", file=sys.stderr)

    # One file goes in the single `photo` field (old servers take it too); several in `photos`.
    photo = args.photo[0].read_bytes() if len(args.photo) == 1 else [p.read_bytes() for p in args.photo]
    if args.prompt:
        ident, images = client.personalize_and_generate(
            photo, args.prompt, args.method, opts, _generation(client, args), on_progress=progress)
    else:
        ident, images = client.personalize(photo, args.method, opts, on_progress=progress), []
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{ident.id}.json").write_text(json.dumps(_identity_json(ident), indent=2) + "\n")
    for img in images:
        print(_save_image(args.out, img, f"p{img.prompt_index}-"), file=sys.stderr)
    print(ident.id)
    return 0


@_call
def _generate(client, args) -> int:
    for img in client.generate_stream(args.prompt, args.identity, _generation(client, args)):
        print(_save_image(args.out, img, ""))
    return 0


@_call
def _delete(client, args) -> int:
    client.delete_identity(args.identity)
    print(f"deleted {args.identity}")
    return 0


@_call
def _list(client, args) -> int:
    for ident in client.list_identities():
        print(json.dumps(_identity_json(ident)))
    return 0


@_call
def _export(client, args) -> int:
    resp = client.export_identity(args.identity, args.format)
    path = args.out or Path(resp.filename)
    path.write_bytes(resp.data)
    print(path)
    return 0


@_call
def _info(client, args) -> int:
    from google.protobuf.json_format import MessageToJson

    print(MessageToJson(client.server_info()))
    return 0


@_call
def _health(client, args) -> int:
    status = client.health()
    print(status)
    return 0 if status == "SERVING" else 1

"""Generate the Python gRPC stubs from `proto/` into `serving/_proto/` (gitignored).

The stubs are build output, never edited by hand: `make proto` runs this module, and
`serving.stubs` runs it on import when `serving/_proto` is missing or older than the `.proto`
sources (a stamp file holds the sources' hash), so a fresh clone or an edited `.proto` heals
itself. `tests/serving/test_stubs.py` regenerates into a temp dir and fails on any drift.

    python -m serving.proto_build            # (re)generate serving/_proto
    python -m serving.proto_build --out DIR  # generate elsewhere (the drift test)
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from hypernet.errors import EnvironmentProblem

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
OUT_DIR = Path(__file__).resolve().parent / "_proto"
STAMP = "SOURCES.sha256"
#: Generated modules import each other as `hyperdreambooth.v1.x`; we rewrite that to a relative
#: import so the package works wherever it sits (serving/_proto or a temp dir).
_ABS_IMPORT = "from hyperdreambooth.v1 import "


def proto_files() -> list[Path]:
    """Every `.proto` under proto/, sorted (the stamp and the protoc call depend on the order)."""
    return sorted(PROTO_ROOT.rglob("*.proto"))


def sources_hash() -> str:
    """sha256 over the relative paths and contents of every `.proto` source."""
    h = hashlib.sha256()
    for p in proto_files():
        h.update(str(p.relative_to(PROTO_ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def is_current(out_dir: Path = OUT_DIR) -> bool:
    """True when `out_dir` holds stubs generated from the current `.proto` sources."""
    stamp = out_dir / STAMP
    return stamp.is_file() and stamp.read_text().strip() == sources_hash()


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) on every `.proto` into `out_dir` (created, not cleared).

    Returns:
        The generated files.

    Raises:
        EnvironmentProblem: grpcio-tools is not installed, or protoc fails.
    """
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as e:  # grpcio-tools is a dev/build dependency
        raise EnvironmentProblem(
            "generating gRPC stubs needs grpcio-tools (`make setup` installs it), got "
            f"ImportError: {e}"
        ) from e
    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}",
        f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *files,
    ]
    if protoc.main(args) != 0:
        raise EnvironmentProblem(f"protoc must compile {files}, got a non-zero exit (see stderr)")
    generated = sorted(p for p in out_dir.rglob("*.py*") if p.is_file())
    for p in generated:
        text = p.read_text()
        if _ABS_IMPORT in text:
            p.write_text(text.replace(_ABS_IMPORT, "from . import "))
    for d in {out_dir, *(p.parent for p in generated)}:
        while True:  # every folder from out_dir down is a package
            (d / "__init__.py").touch()
            if d == out_dir:
                break
            d = d.parent
    (out_dir / STAMP).write_text(sources_hash() + "\n")
    return sorted(p for p in out_dir.rglob("*") if p.is_file())


def build(out_dir: Path = OUT_DIR, force: bool = False) -> Path:
    """Make `out_dir` current: generate aside, then swap it in (safe across processes)."""
    with open(PROTO_ROOT / "hyperdreambooth" / "v1" / "service.proto", "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be generating right now
        if not force and is_current(out_dir):
            return out_dir
        tmp = Path(tempfile.mkdtemp(prefix=".proto-", dir=out_dir.parent))
        try:
            generate(tmp)
            old = out_dir.with_name(f".{out_dir.name}-old-{os.getpid()}")
            if out_dir.exists():
                out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output dir (default serving/_proto)")
    args = parser.parse_args(argv)
    if args.out is None:
        out = build(force=True)
    else:
        generate(args.out)
        out = args.out
    print(f"generated gRPC stubs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

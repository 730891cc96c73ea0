"""`hdb`: the command-line entry point.

Each subcommand lives in its own module exposing `register(subparsers)`, which adds a parser
whose `func(args) -> int` runs it. Library errors map to exit codes in one place
(`hypernet.exit_codes`, shared with `python -m pretrain`):
    2  bad input or arguments (InvalidInputError, argparse)
    3  a model/file not found (ModelNotFoundError, NotFoundError)
    4  the environment lacks something (EnvironmentProblem)
    1  anything else (with the traceback in the log)
"""

from __future__ import annotations

import argparse
import logging
import sys

import pretrain.cli
import serving.cli
import serving.loadtest
from hdb import base, generate, personalize, train
from hdb import eval as evaluate
from hdb.defaults import default_hypernet_path
from hypernet.exit_codes import run_with_exit_codes

__all__ = ["SUBCOMMAND_MODULES", "build_parser", "main", "run_with_exit_codes"]

log = logging.getLogger("hdb")

#: Modules contributing subcommands, in `--help` order. Imported statically (each imports only
#: argparse-level config at module level; the work imports the heavy stack), so import-linter
#: sees every arrow from the app.
SUBCOMMAND_MODULES = [
    base,
    personalize,
    train,
    generate,
    serving.cli,
    pretrain.cli,
    serving.loadtest,
    evaluate,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hdb",
        description="HyperDreamBooth: personalise text-to-image models to a face from one photo.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in SUBCOMMAND_MODULES:
        mod.register(sub)
    # The app wires the embedded default in: `hdb serve` without --hypernet asks for it (the
    # service itself only takes paths; building the default runs the pretraining pipeline).
    sub.choices["serve"].set_defaults(default_hypernet=default_hypernet_path)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run_with_exit_codes(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""`hdb`: the command-line entry point.

Each subcommand lives in its own module exposing `register(subparsers)`, which adds a parser
whose `func(args) -> int` runs it. Library errors map to exit codes here, in one place:
    2  bad input or arguments (InvalidInputError, argparse)
    3  a model/file not found (ModelNotFoundError, NotFoundError)
    4  the environment lacks something (EnvironmentProblem)
    1  anything else (with the traceback in the log)
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

from hypernet.errors import EnvironmentProblem, InvalidInputError, ModelNotFoundError, NotFoundError

log = logging.getLogger("hdb")

#: Modules contributing subcommands, in `--help` order.
SUBCOMMAND_MODULES = [
    "hypernet.recipes.base",
    "hypernet.recipes.personalize",
    "hypernet.recipes.train",
    "hypernet.recipes.generate",
    "serving.cli",
    "pretrain.cli",
    "hypernet.recipes.loadtest",
    "hypernet.recipes.eval",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hdb",
        description="HyperDreamBooth: personalise text-to-image models to a face from one photo.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in SUBCOMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run_with_exit_codes(lambda: args.func(args))


def run_with_exit_codes(fn: Callable[[], int | None]) -> int:
    """Run a command; our library errors become one `error: ...` line and the exit codes of
    every `hdb` entry point: 2 bad input, 3 not found, 4 environment, 130 interrupted."""
    try:
        return int(fn() or 0)
    except InvalidInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ModelNotFoundError, NotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except EnvironmentProblem as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The exit codes of every command-line entry point (`hdb`, `python -m pretrain`), in one place.

The library's errors map to them here, so the app (`hdb.cli`) and `python -m pretrain` (which
torchrun starts without the app) answer the same codes without importing each other:
    2  bad input or arguments (InvalidInputError, argparse)
    3  a model/file not found (ModelNotFoundError, NotFoundError)
    4  the environment lacks something (EnvironmentProblem)
    130 interrupted; 1 anything else (with the traceback)
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from hypernet.errors import EnvironmentProblem, InvalidInputError, ModelNotFoundError, NotFoundError


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

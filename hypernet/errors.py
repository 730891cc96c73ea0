"""Exceptions raised by the library.

Edges map them: the CLI to exit codes (`hypernet.exit_codes`), the service to gRPC status codes
(`serving`). Messages follow "`x` must be ..., got ..." and say what to do.
"""

from __future__ import annotations


class HdbError(Exception):
    """Base class of every error this project raises on purpose."""


class InvalidInputError(HdbError, ValueError):
    """A caller-supplied value (argument, file, image, prompt) is wrong. -> INVALID_ARGUMENT."""


class ImageDecodeError(InvalidInputError):
    """Bytes or a file that are not a decodable, acceptable image."""


class ImageTooLargeError(InvalidInputError):
    """An image over the pixel limit (decompression bomb). -> RESOURCE_EXHAUSTED at the edge."""


class ModelNotFoundError(HdbError, FileNotFoundError):
    """A model path that does not exist or lacks what a model directory must hold."""


class IncompatibleAdapterError(InvalidInputError):
    """An adapter built for another base model, layer set or format version."""


class NotFoundError(HdbError, KeyError):
    """A named thing (identity, job) that does not exist. -> NOT_FOUND."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0]) if self.args else ""


class EnvironmentProblem(HdbError, RuntimeError):
    """The environment lacks something (a GPU asked for, a package, disk space)."""


class Cancelled(HdbError):
    """Work stopped because its caller asked (cancel, deadline, disconnect). -> CANCELLED."""

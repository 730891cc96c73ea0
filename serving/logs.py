"""Structured logs: one JSON object per line, with the request id and tenant of the current call.

The request id comes from the caller's `x-request-id` metadata (when well-formed) or is made
up, is echoed back in the response metadata, and is set in a contextvar by the interceptor, so
every log line written while serving that call carries it. Logs never hold image bytes, prompts
or API keys: handlers log sizes and ids only.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import time

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
tenant_var: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="")

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
#: Libraries that install their own stderr handler (bypassing ours) and whose per-call warnings
#: echo prompt text (diffusers: "The following part of your input was truncated because CLIP
#: ..."; found by the reliability log scan): routed through our handler, errors only.
QUIET_LIBRARIES = ("diffusers", "transformers")


class ContextFilter(logging.Filter):
    """Copies the current call's request id and tenant onto every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        record.tenant = tenant_var.get()
        return True


def _extras(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _STD and v not in ("", None)}


class TextFormatter(logging.Formatter):
    """Human-readable lines; structured fields appended as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = _extras(record)
        return line + "".join(f" {k}={v}" for k, v in extra.items()) if extra else line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_extras(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(fmt: str = "json", level: str = "INFO") -> None:
    """Route root logging to stderr in `fmt` ("json" or "text"), replacing earlier handlers."""
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in QUIET_LIBRARIES:
        # Not imported yet (the usual case: models load after the port is bound): the library
        # reads its default level from the environment when it first logs.
        os.environ.setdefault(f"{name.upper()}_VERBOSITY", "error")
        lib = logging.getLogger(name)
        for h in list(lib.handlers):
            lib.removeHandler(h)
        lib.propagate = True
        lib.setLevel(logging.ERROR)

"""`ServeConfig`: every server setting, from defaults < a YAML/JSON file < `HDB_*` env < flags.

One dataclass is the single source of truth: its fields' `help` metadata builds the `hdb serve`
flags, its types parse env strings, and `__post_init__` validates the result, whichever layer a
value came from. A field `max_batch` is set by `max_batch: 4` in the file, `HDB_MAX_BATCH=4` in
the environment or `--max-batch 4` on the command line.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from hypernet.errors import InvalidInputError

ENV_PREFIX = "HDB_"
MiB = 1 << 20


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class ServeConfig:
    # --- network
    host: str = _f("localhost", "address to bind; `0.0.0.0`/`[::]` for every interface")
    port: int = _f(50051, "gRPC port (0 picks a free one, logged at start)")
    metrics_host: str = _f("", "address of the Prometheus /metrics HTTP server (default: host)")
    metrics_port: int = _f(9464, "Prometheus port (0 picks a free one, -1 disables metrics HTTP)")
    tls_cert: str = _f("", "PEM certificate chain; with tls_key the server speaks TLS only")
    tls_key: str = _f("", "PEM private key of tls_cert")
    # --- auth
    keys_file: str = _f("", "API keys file: lines `tenant:key` (or YAML/JSON {tenant: [keys]})")
    api_keys: str = _f("", "API keys inline as `tenant:key,tenant:key` (prefer HDB_API_KEYS env)")
    no_auth: bool = _f(False, "dev mode: no API keys, every caller is tenant `dev`")
    # --- models
    base: str = _f("", "base model dir or .safetensors (default: the embedded tiny base)")
    base_config_dir: str = _f("", "for a single-file base: a local diffusers dir of its "
                                  "architecture's configs")
    hypernet: str = _f("", "hypernetwork path (default: the embedded tiny hypernetwork)")
    device: str = _f("", "cpu, cuda, cuda:1 ... (default: CUDA when present)")
    dtype: str = _f("", "fp32, fp16, bf16 (default: fp16 on CUDA, fp32 on CPU)")
    warmup: bool = _f(True, "run one generation before reporting SERVING")
    # --- store
    store: str = _f("", "identity store: a directory, file:///dir or s3://bucket/prefix "
                        "(default: <cache>/identities)")
    s3_endpoint_url: str = _f("", "S3-compatible endpoint (MinIO, R2, moto ...); default AWS")
    s3_region: str = _f("", "S3 region (default from the AWS environment, else us-east-1)")
    identity_ttl_s: float = _f(0.0, "delete identities this many seconds after creation (0: never)")
    sweep_interval_s: float = _f(60.0, "how often expired identities and orphans are deleted")
    rate_limit_rps: float = _f(0.0, "requests per second per tenant (0: no limit); over it -> "
                                    "RESOURCE_EXHAUSTED with retry-after-ms")
    rate_limit_burst: int = _f(20, "requests a tenant may send at once before the rate applies")
    # --- work scheduling
    queue_size: int = _f(32, "bounded work queue (images + personalisations); full -> "
                             "RESOURCE_EXHAUSTED at once")
    max_batch: int = _f(8, "most images sharing one UNet call")
    max_wait_ms: float = _f(10.0, "how long a partial batch waits for compatible work")
    retry_after_ms: int = _f(1000, "retry hint sent with RESOURCE_EXHAUSTED when the queue is full")
    job_retention_s: float = _f(3600.0, "how long finished jobs stay visible to GetJob/WatchJob")
    max_jobs: int = _f(1000, "most jobs remembered (oldest finished ones are forgotten first)")
    grace_s: float = _f(30.0, "SIGTERM: seconds in-flight calls get to finish")
    # --- limits
    max_message_bytes: int = _f(16 * MiB, "largest request/response message")
    max_pixels: int = _f(40_000_000, "largest decoded photo (width*height); bigger -> rejected")
    max_prompt_chars: int = _f(1000, "longest prompt / negative prompt, in characters")
    max_images: int = _f(8, "most images per prompt (n)")
    max_prompts: int = _f(8, "most prompts per PersonalizeAndGenerate")
    max_generate_steps: int = _f(150, "most denoising steps")
    max_personalize_steps: int = _f(2000, "most optimisation steps of a personalisation")
    min_size: int = _f(32, "smallest width/height in pixels")
    max_size: int = _f(1024, "largest width/height in pixels")
    min_guidance: float = _f(0.0, "smallest guidance scale")
    max_guidance: float = _f(30.0, "largest guidance scale")
    default_generate_steps: int = _f(25, "denoising steps when a request leaves them unset")
    # --- logs
    log_format: str = _f("json", "json (one object per line) or text")
    log_level: str = _f("INFO", "DEBUG, INFO, WARNING, ERROR")

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise InvalidInputError(f"`{name}` must be {what}, got {getattr(self, name)!r}")

        need(0 <= self.port <= 65535, "port", "0..65535")
        need(-1 <= self.metrics_port <= 65535, "metrics_port", "-1 (off) or 0..65535")
        need(bool(self.tls_cert) == bool(self.tls_key), "tls_key",
             "set together with tls_cert (both or neither)")
        need(self.identity_ttl_s >= 0 and math.isfinite(self.identity_ttl_s), "identity_ttl_s",
             "a finite number >= 0")
        need(self.sweep_interval_s > 0, "sweep_interval_s", "> 0")
        for name in ("queue_size", "max_batch", "max_jobs", "max_pixels", "max_prompt_chars",
                     "max_images", "max_prompts", "max_generate_steps", "max_personalize_steps",
                     "default_generate_steps", "retry_after_ms"):
            need(getattr(self, name) >= 1, name, ">= 1")
        need(self.rate_limit_rps >= 0 and math.isfinite(self.rate_limit_rps), "rate_limit_rps",
             "a finite number >= 0")
        need(self.rate_limit_burst >= 1, "rate_limit_burst", ">= 1")
        need(self.max_message_bytes >= 1024, "max_message_bytes", ">= 1024")
        need(self.max_wait_ms >= 0, "max_wait_ms", ">= 0")
        need(self.grace_s >= 0, "grace_s", ">= 0")
        need(self.job_retention_s >= 0, "job_retention_s", ">= 0")
        need(8 <= self.min_size <= self.max_size, "min_size", "8 <= min_size <= max_size")
        need(self.min_size % 8 == 0 and self.max_size % 8 == 0, "max_size",
             "a multiple of 8 (as min_size)")
        need(math.isfinite(self.min_guidance) and math.isfinite(self.max_guidance)
             and self.min_guidance <= self.max_guidance, "max_guidance",
             "finite and >= min_guidance")
        need(self.default_generate_steps <= self.max_generate_steps, "default_generate_steps",
             "<= max_generate_steps")
        need(self.log_format in ("json", "text"), "log_format", "json or text")
        need(self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "log_level",
             "DEBUG, INFO, WARNING or ERROR")

    # ------------------------------------------------------------------ derived
    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def bind_address(self) -> str:
        host = self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    def binds_loopback_only(self) -> bool:
        """True when only this machine can reach the server (dev mode may be implied)."""
        host = self.host.strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


_FIELDS = {f.name: f for f in fields(ServeConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Parse `value` (a string from env/flags, or a YAML scalar) as field `name`'s type."""
    typ = _FIELDS[name].type
    try:
        if typ == "bool":
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(s)
        if typ == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"`{name}` must be a {typ}, got {value!r}") from None


def read_file(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML or JSON file (a mapping of field names; `-` and `_` both accepted)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"`config` must be an existing YAML/JSON file, got {str(path)!r}")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidInputError(f"`config` must hold a mapping of settings, got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS:
            raise InvalidInputError(
                f"config key must be one of {sorted(_FIELDS)}, got {key!r} in {str(path)!r}"
            )
        out[name] = _coerce(name, value)
    return out


def read_env(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Settings from `HDB_<FIELD>` environment variables (e.g. HDB_PORT, HDB_API_KEYS)."""
    environ = os.environ if environ is None else environ
    return {
        name: _coerce(name, environ[ENV_PREFIX + name.upper()])
        for name in _FIELDS
        if ENV_PREFIX + name.upper() in environ
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field (`--max-batch`), defaulting to None so only given flags override."""
    parser.add_argument("--config", default=None, help="YAML/JSON settings file (env: HDB_CONFIG)")
    for f in fields(ServeConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        help_ = f"{f.metadata['help']} (default {default!r}; env {ENV_PREFIX}{f.name.upper()})"
        if f.type == "bool" and f.name.startswith("no_"):  # `--no-auth`: a switch, never negated
            parser.add_argument(flag, dest=f.name, default=None, action="store_const",
                                const=True, help=help_)
        elif f.type == "bool":
            parser.add_argument(flag, dest=f.name, default=None,
                                action=argparse.BooleanOptionalAction, help=help_)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.type.upper(),
                                help=help_)


def load_config(
    args: argparse.Namespace | None = None,
    environ: dict[str, str] | None = None,
    **overrides: Any,
) -> ServeConfig:
    """Merge defaults < file (`--config` / HDB_CONFIG) < env < flags < `overrides`.

    Raises:
        InvalidInputError: a bad file, key or value (the message names the setting).
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_path = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    if config_path:
        values.update(read_file(config_path))
    values.update(read_env(environ))
    if args is not None:
        for name in _FIELDS:
            v = getattr(args, name, None)
            if v is not None:
                values[name] = _coerce(name, v)
    values.update(overrides)
    return ServeConfig(**values)


__all__ = ["ServeConfig", "add_arguments", "load_config", "read_env", "read_file", "replace"]

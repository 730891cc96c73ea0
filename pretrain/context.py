"""What every stage shares: the config, the output folder layout, this rank, the base pipeline."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hypernet.errors import InvalidInputError
from hypernet.files import atomic_write_bytes
from pretrain.config import PretrainConfig, dump_config
from pretrain.distributed import DistInfo

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """One rank's view of a pretraining run in `out` (the `--output-dir`)."""

    cfg: PretrainConfig
    out: Path
    dist: DistInfo
    _pipe: object = field(default=None, repr=False)
    _fp: str | None = field(default=None, repr=False)

    @property
    def prepared_dir(self) -> Path:
        return self.out / "prepared"

    @property
    def stage1_dir(self) -> Path:
        return self.out / "stage1"

    @property
    def stage2_dir(self) -> Path:
        return self.out / "stage2"

    @property
    def export_dir(self) -> Path:
        return self.out / "export"

    @property
    def base_path(self) -> Path:
        if self.cfg.base:
            return Path(self.cfg.base)
        from hypernet.defaults import default_base_dir

        return default_base_dir()

    def already_done(self, stage: str, index: Path, key: str) -> bool:
        """Whether `index` (a stage's JSON index) records `key`, i.e. the stage already ran with
        these settings; logged once, so a rerun of the whole chain says what it skips."""
        done = index.is_file() and json.loads(index.read_text()).get("key") == key
        if done and self.dist.is_main:
            log.info("%s: already done for these settings (%s), skipping", stage, index)
        return done

    def pipe(self):
        """The frozen base on this rank's device, fp32 (bf16 comes from autocast on GPU)."""
        if self._pipe is None:
            from hypernet.base import load_pipeline

            self._pipe = load_pipeline(self.base_path, device=self.dist.device, dtype="fp32")
            for m in self._pipe.components.values():  # denoiser, VAE, every text encoder
                if isinstance(m, torch.nn.Module):
                    m.requires_grad_(False).eval()
            self._check_arch()
        return self._pipe

    def arch(self) -> str:
        """The base's family: "sd15", "sdxl", "sd3" or "flux" (`hypernet.base.arch`)."""
        from hypernet.base.arch import pipeline_arch

        return pipeline_arch(self.pipe())

    def _check_arch(self) -> None:
        from hypernet.base.arch import pipeline_arch

        want, got = self.cfg.arch, pipeline_arch(self._pipe)
        if want is not None and want != got:
            raise InvalidInputError(
                f"`base` must be a {want!r} pipeline for this config (its `arch`), got a {got!r} base at "
                f"{self.base_path}; use the {got} config or another --base"
            )

    def fingerprint(self) -> str:
        """The base's fingerprint (cached: adapters attached later do not change it)."""
        if self._fp is None:
            from hypernet.base import base_fingerprint

            self._fp = base_fingerprint(self.pipe())
        return self._fp

    def resolution(self) -> int:
        """The training/prediction size: configured, else the base's native one."""
        if self.cfg.data.resolution:
            return self.cfg.data.resolution
        from hypernet.methods._common import pipe_resolution  # every family (FLUX: the VAE's size)

        return pipe_resolution(self.pipe())

    def write_config(self) -> None:
        """Record the resolved config next to the outputs (rank 0)."""
        if self.dist.is_main:
            atomic_write_bytes(self.out / "config.yaml", dump_config(self.cfg).encode())

    def autocast(self):
        """bf16 autocast on CUDA only; CPU stays fp32 (CPU bf16 is slower and less exact)."""
        dev = self.dist.device.type
        return torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=dev == "cuda")


__all__ = ["RunContext"]

"""Stage `export`: the trained hypernetwork as `.safetensors` (+ config) and ONNX, cross-checked.

The ONNX graph is run with onnxruntime (CPU provider: the check is about the graph, not the
device) on held-out photos and compared with torch (an identity-conditioned model: its graph
includes the face encoder and takes aligned faces too; the check feeds seeded noise faces); the
max abs difference goes to `export/report.json` and the stage fails when it exceeds `export.max_abs_diff`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from hypernet.errors import EnvironmentProblem
from hypernet.files import atomic_write_bytes
from hypernet.hypernetwork.export import ONNX_NAME, SAFETENSORS_NAME, export_onnx, load_hypernet, save_hypernet
from pretrain.cache import PreparedData
from pretrain.context import RunContext
from pretrain.distributed import barrier
from pretrain.stage2 import FINAL

log = logging.getLogger(__name__)


def run_export(ctx: RunContext) -> None:
    if ctx.dist.is_main:
        src = ctx.stage2_dir / FINAL
        if not src.is_file():
            raise EnvironmentProblem(f"stage2 output {src} must exist before `export`: run `stage2` first")
        export_files(ctx, src, ctx.export_dir)
    barrier()


def export_files(ctx: RunContext, src: Path, out: Path) -> None:
    """The hypernetwork file `src` as `out/hypernet.safetensors` (+ ONNX, cross-checked) and report.json."""
    cfg = ctx.cfg.export
    model, info = load_hypernet(src)
    if info.prediction_scale != cfg.prediction_scale or src.resolve() != (out / SAFETENSORS_NAME).resolve():
        own = info.to_metadata()
        extra = {k: v for k, v in info.metadata.items() if k not in own}  # e.g. the control's key
        info.prediction_scale = cfg.prediction_scale
        save_hypernet(out / SAFETENSORS_NAME, model, info, extra_meta=extra)
    model, info = load_hypernet(out / SAFETENSORS_NAME)  # proves it loads from the file alone
    report = {"safetensors": SAFETENSORS_NAME, "bytes": (out / SAFETENSORS_NAME).stat().st_size,
              "base_fingerprint": info.base_fingerprint, "resolution": info.resolution,
              "layers": len(info.layers), "config": json.loads(info.config.to_json()),
              "prediction_scale": info.prediction_scale}
    if cfg.onnx:
        export_onnx(model, info, out / ONNX_NAME, opset=cfg.opset, exporter=cfg.exporter)
        pixels = _check_pixels(ctx, cfg.check_batch, info.resolution)
        faces = None
        if info.config.uses_identity:
            g = torch.Generator().manual_seed(1)
            faces = torch.rand(pixels.shape[0], 3, 112, 112, generator=g) * 2 - 1  # (n, 3, 112, 112)
        diff = onnx_max_abs_diff(model, out / ONNX_NAME, pixels, faces)
        report.update(onnx=ONNX_NAME, onnx_bytes=(out / ONNX_NAME).stat().st_size, exporter=cfg.exporter,
                      check_batch=int(pixels.shape[0]), max_abs_diff=diff, max_abs_diff_bound=cfg.max_abs_diff)
        log.info("export: ONNX vs torch max abs difference %.3g on %d photos (bound %.1g)", diff,
                 pixels.shape[0], cfg.max_abs_diff)
        if not diff <= cfg.max_abs_diff:
            atomic_write_bytes(out / "report.json", json.dumps(report, indent=1).encode())
            raise RuntimeError(f"ONNX export must match torch within {cfg.max_abs_diff}, got max abs diff {diff}")
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=1).encode())
    log.info("export: wrote %s", out)


def _check_pixels(ctx: RunContext, n: int, res: int) -> torch.Tensor:
    """Held-out photos when there are enough, topped up with seeded uniform noise in [-1, 1]."""
    data = PreparedData(ctx.prepared_dir)
    rows = [r for i in data.identities("val") for r in data.rows(i)][:n]
    real = data.pixels(rows) if rows else torch.zeros(0, 3, res, res)  # (k, 3, R, R)
    g = torch.Generator().manual_seed(0)
    fill = torch.rand(n - real.shape[0], 3, res, res, generator=g) * 2 - 1
    return torch.cat([real, fill])


def onnx_max_abs_diff(model, onnx_path, pixels: torch.Tensor, faces: torch.Tensor | None = None) -> float:
    """max |torch - onnxruntime| over both outputs for `pixels` (N, 3, R, R) (+ aligned `faces`
    (N, 3, 112, 112) for an identity-conditioned model: torch embeds them with the face encoder)."""
    from hypernet.hypernetwork.runtime import HypernetRuntime

    rt = HypernetRuntime.load(onnx_path, backend="onnx", device="cpu")
    got = rt.predict(pixels, faces=faces)
    cfg = model.cfg
    with torch.no_grad():
        identity = None
        if cfg.uses_identity:
            from hypernet.face_encoder import FaceEncoder

            identity = FaceEncoder.load()(faces)  # (N, 512)
        ref = model.to("cpu").eval()(pixels if cfg.uses_pixels else None, identity)
    return max(float((got[k] - ref[k]).abs().max()) for k in ("A_train", "B_train"))


__all__ = ["export_files", "onnx_max_abs_diff", "run_export"]

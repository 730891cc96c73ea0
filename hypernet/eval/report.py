"""Aggregate evaluation cells into REPORT.md (a Table-1-shaped table), results.json and grids."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hypernet.eval.stats import bootstrap_mean, paired_difference
from hypernet.files import atomic_write_bytes

__all__ = ["summarise", "write_report"]

_LABELS = {
    "hyperdreambooth": "HyperDreamBooth (hypernet + fast fine-tune)",
    "hypernetwork": "Hypernetwork only",
    "fast-finetune": "Fast fine-tune only (from zero)",
    "lidb": "LiDB from scratch",
    "lora": "LoRA",
    "dreambooth": "DreamBooth",
    "textual-inversion": "Textual Inversion",
    "base": "Base, no personalisation",
    "real-photo": "*Real input photo (ceiling)*",
}
_METRICS = ("face_rec", "margin", "detection", "heldout_loss")


def summarise(cells, conditions, identities, n_boot: int = 2000, seed: int = 0) -> dict:
    """Per condition: bootstrap estimates of every metric, the margin gain over the base
    (paired by identity), median seconds and bytes; plus the per-identity values."""
    by = {(c.condition, c.identity): c for c in cells}
    out: dict = {}
    for cond in conditions:
        rows = [by[(cond, i)] for i in identities if (cond, i) in by]
        if not rows:
            continue
        entry = {m: bootstrap_mean([getattr(r, m) for r in rows], n_boot=n_boot, seed=seed).as_dict() for m in _METRICS}
        if "base" in conditions and cond not in ("base", "real-photo"):
            paired = [(by[(cond, i)].margin, by[("base", i)].margin) for i in identities
                      if (cond, i) in by and ("base", i) in by]
            if paired:
                a, b = zip(*paired, strict=True)
                entry["margin_gain_vs_base"] = paired_difference(a, b, n_boot=n_boot, seed=seed).as_dict()
        entry["seconds_median"] = float(np.median([r.seconds for r in rows]))
        entry["bytes"] = int(np.median([r.nbytes for r in rows]))
        entry["per_identity"] = {r.identity: asdict(r) for r in rows}
        out[cond] = entry
    return out


def _fmt(d: dict | None, digits: int = 3) -> str:
    if not d or not np.isfinite(d["mean"]):
        return "n/a"
    return f"{d['mean']:.{digits}f} [{d['lo']:.{digits}f}, {d['hi']:.{digits}f}]"


def _size(n: int) -> str:
    if n <= 0:
        return "0"
    for unit, k in (("MB", 1e6), ("KB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def _grid(ev, cond: str) -> Path | None:
    """Rows = identities: the input photo, then the first `grid_images` samples."""
    from hypernet.photos import decode_image, preprocess, to_pil

    cfg, rows = ev.cfg, []
    for ident in ev.eval_ids:
        folder = cfg.out / "cells" / cond / ident
        samples = sorted(folder.glob("seed*.png"))[: cfg.grid_images]
        if not samples:
            continue
        photo = to_pil(preprocess(decode_image(ev.corpus.photos[ident][0]), ev.resolution, detector=cfg.detector))
        rows.append([photo] + [Image.open(s).convert("RGB") for s in samples])
    if not rows:
        return None
    r = ev.resolution
    cols = max(len(row) for row in rows)
    grid = Image.new("RGB", (cols * r + 8, len(rows) * r), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im.resize((r, r)), (x * r + (8 if x else 0), y * r))  # gap after the input
    path = cfg.out / f"grid_{cond}.png"
    grid.save(path)
    return path


def write_report(ev) -> Path:
    """Write results.json, grid_<condition>.png and REPORT.md into the evaluation's `out`."""
    cfg = ev.cfg
    from hypernet.eval.conditions import REAL_PHOTO

    summary = summarise(ev.cells, (*cfg.conditions, REAL_PHOTO), ev.eval_ids, n_boot=cfg.n_boot, seed=cfg.seed)
    grids = {c: _grid(ev, c) for c in summary if c != REAL_PHOTO}
    results = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "identities": ev.eval_ids,
        "samples_per_condition": len(ev.eval_ids) * cfg.images_per_id,
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                    "device": str(ev.pipe.device)},
        "conditions": summary,
    }
    atomic_write_bytes(cfg.out / "results.json", json.dumps(results, indent=1, default=str).encode())
    lines = [
        "# Identity quality on held-out identities",
        "",
        f"Base `{cfg.base}`, hypernetwork `{cfg.hypernet}`, corpus `{cfg.corpus}`.",
        f"{len(ev.eval_ids)} held-out identities ({', '.join(ev.eval_ids)}), one input photo each; "
        f"{cfg.images_per_id} images per identity and method from \"{cfg.prompt}\" "
        f"(seeds {cfg.seed}..{cfg.seed + cfg.images_per_id - 1}, {cfg.gen_steps} DPM-Solver++ steps, "
        f"guidance {cfg.guidance}). Mean [95% bootstrap CI over identities].",
        "",
        "Method settings: each method's library defaults"
        + (", except " + ", ".join(f"`{c}.{k}={v}`" for c, kv in cfg.overrides.items() for k, v in kv.items())
           if cfg.overrides else "") + ".",
        "",
        "| Method | Face Rec. ↑ | Identity margin ↑ | Margin gain vs base | Face detected ↑ | "
        "Held-out loss ↓ | Time (s, median) | Size |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cond, e in summary.items():
        lines.append(
            f"| {_LABELS.get(cond, cond)} | {_fmt(e['face_rec'])} | {_fmt(e['margin'])} | "
            f"{_fmt(e.get('margin_gain_vs_base'))} | {_fmt(e['detection'], 2)} | {_fmt(e['heldout_loss'], 4)} | "
            f"{e['seconds_median']:.1f} | {_size(e['bytes'])} |".replace("| 0.0 | 0 |", "| - | - |")
        )
    lines += [
        "",
        "Face Rec.: cosine similarity of dlib ResNet face descriptors between generated images and the "
        "identity's other photos. Identity margin: Face Rec. minus the similarity to other identities' "
        "photos (~0 for a method that only learned \"a face\"). Held-out loss: diffusion loss on the "
        "identity's reference photos (never shown to the method) with the artifact applied. Time: wall "
        "seconds of personalisation on this machine; size: bytes of the saved artifact.",
        "",
        "## Sample grids (left: the input photo; right: generated images)",
        "",
    ]
    lines += [f"- {_LABELS.get(c, c)}: ![{c}]({p.name})" for c, p in grids.items() if p is not None]
    path = cfg.out / "REPORT.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path

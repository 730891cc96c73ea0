"""Aggregate evaluation cells into REPORT.md (Table-1-shaped tables, one per face metric),
results.json and grids (of the corpus parts whose faces may be shown: never LFW's)."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hypernet.eval.conditions import REAL_PHOTO, SLOW_CONDITIONS
from hypernet.eval.corpus import part_of
from hypernet.eval.stats import bootstrap_mean, paired_difference
from hypernet.files import atomic_write_bytes

__all__ = ["PAIRS", "paired_rows", "summarise", "write_report"]

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
    "mean-adapter": "*Control: one adapter for everyone (mean stage-1 target)*",
    "hyperdreambooth-mean-adapter": "*Control: HyperDreamBooth from the mean adapter*",
}
_METRIC_LABELS = {"dlib": "dlib ResNet (128-d)", "facenet": "FaceNet Inception-ResNet-v1 (512-d)"}
_SCORES = ("face_rec", "margin", "detection")

#: Paired comparisons (a - b, per identity, same seeds): what the hypernetwork adds.
PAIRS = (
    ("hypernetwork", "base", "Hypernetwork only − base"),
    ("hypernetwork", "mean-adapter", "Hypernetwork only − one adapter for everyone (what it knows of the person)"),
    ("mean-adapter", "base", "One adapter for everyone − base"),
    ("hyperdreambooth", "fast-finetune", "HyperDreamBooth − fine-tune from zero (same steps and lr)"),
    ("hyperdreambooth", "hyperdreambooth-mean-adapter",
     "HyperDreamBooth − the same fine-tune from one adapter for everyone"),
    ("hyperdreambooth", "lidb", "HyperDreamBooth − LiDB from scratch"),
    ("hypernetwork-3photos", "hypernetwork", "3 photos − 1, hypernetwork only (predictions averaged)"),
    ("hypernetwork-3photos-embedding", "hypernetwork", "3 photos − 1, hypernetwork only (embeddings averaged)"),
    ("hyperdreambooth-3photos", "hyperdreambooth", "3 photos − 1, HyperDreamBooth"),
    ("hyperdreambooth-3photos-batch3", "hyperdreambooth",
     "3 photos − 1, HyperDreamBooth, all 3 photos in every fine-tune step (batch_size=3)"),
    ("hyperdreambooth-3photos-ft1", "hyperdreambooth",
     "3 photos − 1, HyperDreamBooth, prediction from 3, fine-tune on the first (finetune_photos=1)"),
    ("hyperdreambooth-3photos-eachnorm", "hyperdreambooth",
     "3 photos − 1, HyperDreamBooth, each photo fine-tuned alone, the deltas averaged at their norm (3x the time)"),
    ("hyperdreambooth-1photo-x3-eachnorm", "hyperdreambooth",
     "Control: the 1 photo fine-tuned 3 times (other seeds), averaged at their norm − 1 photo once"),
    ("hyperdreambooth-3photos-eachnorm", "hyperdreambooth-1photo-x3-eachnorm",
     "3 photos − the 1 photo 3 times, both fine-tuned alone and averaged at their norm (what the photos add)"),
    ("hyperdreambooth-identity", "fast-finetune-identity",
     "HyperDreamBooth − fine-tune from zero, both with the identity term"),
    ("hyperdreambooth-3photos-identity", "hyperdreambooth-identity", "3 photos − 1, HyperDreamBooth with the term"),
    ("hyperdreambooth-3photos-ft1-identity", "hyperdreambooth-identity",
     "3 photos − 1, HyperDreamBooth with the term, fine-tune on the first (finetune_photos=1), target all 3"),
    ("hyperdreambooth", "hyperdreambooth-relax-lora",
     "HyperDreamBooth, default relaxation (LiDB subspace) − relaxed as a full-width LoRA"),
    ("hyperdreambooth-relax-lora", "fast-finetune-relax-lora",
     "HyperDreamBooth − fine-tune from zero, both relaxed as a full-width LoRA"),
)


def _paired(by: dict, a: str, b: str, identities, metric: str, n_boot: int, seed: int, value="margin") -> dict | None:
    """Paired bootstrap of a - b over the identities both conditions ran on; None when none did."""
    pairs = [(by[(a, i)].scores[metric][value], by[(b, i)].scores[metric][value]) for i in identities
             if (a, i) in by and (b, i) in by and metric in by[(a, i)].scores and metric in by[(b, i)].scores]
    if not pairs:
        return None
    x, y = zip(*pairs, strict=True)
    return paired_difference(x, y, n_boot=n_boot, seed=seed).as_dict()


def summarise(cells, conditions, identities, metrics=("dlib",), n_boot: int = 2000, seed: int = 0) -> dict:
    """Per condition: the number of people; per metric, bootstrap estimates of every score and the
    margin gain over the base (paired by identity), overall and per corpus part; the held-out loss,
    median seconds and bytes, total wall seconds; plus the per-identity values."""
    by = {(c.condition, c.identity): c for c in cells}
    parts = sorted({part_of(i) for i in identities})
    out: dict = {}
    for cond in conditions:
        rows = [by[(cond, i)] for i in identities if (cond, i) in by]
        if not rows:
            continue
        entry: dict = {"n": len(rows), "metrics": {}}
        for m in metrics:
            e = {s: bootstrap_mean([r.scores[m][s] for r in rows if m in r.scores], n_boot=n_boot, seed=seed).as_dict()
                 for s in _SCORES}
            if "base" in conditions and cond not in ("base", "real-photo"):
                e["margin_gain_vs_base"] = _paired(by, cond, "base", identities, m, n_boot, seed)
                e["margin_gain_vs_base_by_part"] = {
                    p: _paired(by, cond, "base", [i for i in identities if part_of(i) == p], m, n_boot, seed)
                    for p in parts}
            entry["metrics"][m] = e
        entry["heldout_loss"] = bootstrap_mean([r.heldout_loss for r in rows], n_boot=n_boot, seed=seed).as_dict()
        entry["seconds_median"] = float(np.median([r.seconds for r in rows]))
        entry["wall_seconds_total"] = float(sum(r.wall_seconds for r in rows))
        entry["bytes"] = int(np.median([r.nbytes for r in rows]))
        entry["per_identity"] = {r.identity: asdict(r) for r in rows}
        out[cond] = entry
    return out


def paired_rows(cells, identities, metrics, n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """`PAIRS` whose two conditions both ran: {a, b, label, n, <metric>: margin difference estimate}."""
    by = {(c.condition, c.identity): c for c in cells}
    rows = []
    for a, b, label in PAIRS:
        diffs = {m: _paired(by, a, b, identities, m, n_boot, seed) for m in metrics}
        if any(d is not None for d in diffs.values()):
            n = max(d["n"] for d in diffs.values() if d is not None)
            rows.append({"a": a, "b": b, "label": label, "n": n, **diffs})
    return rows


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


def _hours(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min"


def grid_people(identities, grid_parts) -> list[str]:
    """The identities a grid may show: those of `grid_parts` ('all' in it: everyone)."""
    return [i for i in identities if "all" in grid_parts or part_of(i) in grid_parts]


def _grid(ev, cond: str) -> Path | None:
    """Rows = identities of the shown parts: the input photo, then the first `grid_images` samples."""
    from hypernet.photos import decode_image, preprocess, to_pil

    cfg, rows = ev.cfg, []
    for ident in grid_people(ev.eval_ids, cfg.grid_parts):
        folder = cfg.out / "cells" / cond / ident
        samples = sorted(folder.glob("seed*.png"))[: cfg.grid_images]
        if not samples:
            continue
        photo = to_pil(preprocess(decode_image(ev.corpus.photos[ident][0]), ev.resolution, detector=cfg.detector))
        rows.append([photo] + [Image.open(s).convert("RGB") for s in samples])
    path = cfg.out / f"grid_{cond}.png"
    if not rows:
        path.unlink(missing_ok=True)  # a stale grid of an earlier run may show people not to be shown
        return None
    r = ev.resolution
    cols = max(len(row) for row in rows)
    grid = Image.new("RGB", (cols * r + 8, len(rows) * r), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im.resize((r, r)), (x * r + (8 if x else 0), y * r))  # gap after the input
    grid.save(path)
    return path


def _header(ev, summary: dict) -> list[str]:
    cfg = ev.cfg
    counts: dict[str, int] = {}
    for i in ev.eval_ids:
        counts[part_of(i) or "corpus"] = counts.get(part_of(i) or "corpus", 0) + 1
    lines = [
        "# Identity quality on held-out identities",
        "",
        f"Base `{cfg.base}`, hypernetwork `{cfg.hypernet}`, "
        + (f"control (one adapter for everyone) `{cfg.mean_adapter}`, " if cfg.mean_adapter else "")
        + f"corpus `{cfg.corpus}`.",
        f"{len(ev.eval_ids)} held-out people ({', '.join(f'{n} {p}' for p, n in counts.items())}; "
        + ("held out by the base's split.json" if ev.train_ids else
           "**the base has no split.json: they are not known to be held out**")
        + f"), one input photo each; {cfg.images_per_id} images "
        f"per person and method from \"{cfg.prompt}\" ("
        + (f"seeds {cfg.seed}..{cfg.seed + cfg.images_per_id - 1} for everyone, " if cfg.sample_seeds == "shared"
           else f"{cfg.images_per_id} seeds of each person's own, the same for every method, ")
        + f"{cfg.gen_steps} DPM-Solver++ steps, guidance {cfg.guidance}). Mean [95% bootstrap CI over people].",
        "",
        "Method settings: each method's library defaults"
        + (", except " + ", ".join(f"`{c}.{k}={v}`" for c, kv in cfg.overrides.items() for k, v in kv.items())
           if cfg.overrides else "") + ".",
    ]
    slow = [c for c in cfg.conditions if c in SLOW_CONDITIONS and c in summary]
    if cfg.slow_methods_people is not None and slow:
        lines += ["", f"**Subset:** {', '.join(_LABELS[c] for c in slow)} ran on the first "
                      f"{min(cfg.slow_methods_people, len(ev.eval_ids))} of these people only (taken in turn from "
                      "each corpus part); column n gives each row's count, and paired numbers pair only those."]
    ff, hdb = cfg.overrides.get("fast-finetune", {}), cfg.overrides.get("hyperdreambooth", {})
    if any(ff.get(k) != hdb.get(k) for k in ("steps", "lr", "rank")):
        lines += ["", "**Warning:** HyperDreamBooth and the fine-tune from zero ran with different steps, lr or "
                      "rank, so their paired difference is not the hypernetwork's contribution alone."]
    lines += [
        "",
        "Two independent face metrics score every image: dlib's ResNet and FaceNet (different architectures, "
        "training sets and detectors). Neither conditions the hypernetwork, whose face encoder is "
        "MobileFaceNet (or, in older exports, a timm ViT): a score from the conditioning network would reward "
        "imitating that network rather than likeness. All three were trained on research-only face data.",
    ]
    return lines


def _metric_tables(summary: dict, metrics) -> list[str]:
    lines = []
    for m in metrics:
        lines += ["", f"### {_METRIC_LABELS.get(m, m)}", "",
                  "| Method | n | Face Rec. ↑ | Identity margin ↑ | Margin gain vs base ↑ | Face detected ↑ |",
                  "|---|---|---|---|---|---|"]
        for cond, e in summary.items():
            s = e["metrics"][m]
            lines.append(f"| {_LABELS.get(cond, cond)} | {e['n']} | {_fmt(s['face_rec'])} | {_fmt(s['margin'])} | "
                         f"{_fmt(s.get('margin_gain_vs_base'))} | {_fmt(s['detection'], 2)} |")
    return lines


def _part_table(summary: dict, metrics, parts) -> list[str]:
    if len(parts) < 2:
        return []
    cols = [(p, m) for p in parts for m in metrics]
    rows = [f"| {_LABELS.get(cond, cond)} | " + " | ".join(
        _fmt(e["metrics"][m]["margin_gain_vs_base_by_part"].get(p)) for p, m in cols) + " |"
        for cond, e in summary.items() if "margin_gain_vs_base_by_part" in e["metrics"][metrics[0]]]
    if not rows:
        return []
    return ["", "### Margin gain vs base, by corpus part", "",
            "| Method | " + " | ".join(f"{p} ({m})" for p, m in cols) + " |", "|---|" + "---|" * len(cols), *rows]


def write_report(ev) -> Path:
    """Write results.json, grid_<condition>.png and REPORT.md into the evaluation's `out`."""
    cfg = ev.cfg
    summary = summarise(ev.cells, (*cfg.conditions, REAL_PHOTO), ev.eval_ids, cfg.metrics, cfg.n_boot, cfg.seed)
    pairs = paired_rows(ev.cells, ev.eval_ids, cfg.metrics, cfg.n_boot, cfg.seed)
    grids = {c: _grid(ev, c) for c in summary if c != REAL_PHOTO}
    cell_seconds = sum(e["wall_seconds_total"] for e in summary.values())
    results = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "identities": ev.eval_ids,
        "samples_per_condition": len(ev.eval_ids) * cfg.images_per_id,
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                    "device": str(ev.pipe.device)},
        "wall_seconds": {"cells_total": cell_seconds, "this_run": getattr(ev, "run_seconds", float("nan"))},
        "conditions": summary,
        "paired": pairs,
    }
    atomic_write_bytes(cfg.out / "results.json", json.dumps(results, indent=1, default=str).encode())
    lines = _header(ev, summary) + _metric_tables(summary, cfg.metrics)
    lines += _part_table(summary, cfg.metrics, sorted({part_of(i) for i in ev.eval_ids}))
    if pairs:
        lines += ["", "### Paired differences of the identity margin (per person, same seeds)", "",
                  "| Comparison | n | " + " | ".join(_METRIC_LABELS.get(m, m) for m in cfg.metrics) + " |",
                  "|---|---|" + "---|" * len(cfg.metrics)]
        lines += [f"| {p['label']} | {p['n']} | " + " | ".join(_fmt(p[m]) for m in cfg.metrics) + " |" for p in pairs]
    lines += ["", "### Cost and held-out loss", "",
              "| Method | n | Held-out loss ↓ | Time (s, median) | Size |", "|---|---|---|---|---|"]
    for cond, e in summary.items():
        lines.append(f"| {_LABELS.get(cond, cond)} | {e['n']} | {_fmt(e['heldout_loss'], 4)} | "
                     f"{e['seconds_median']:.1f} | {_size(e['bytes'])} |".replace("| 0.0 | 0 |", "| - | - |"))
    lines += [
        "",
        "Face Rec.: cosine similarity of face embeddings between generated images and the person's other "
        "photos. Identity margin: Face Rec. minus the similarity to other people's photos of the same corpus "
        "part (~0 for a method that only learned \"a face\"). Held-out loss: diffusion loss on the person's "
        "reference photos (never shown to the method) with the artifact applied. Time: wall seconds of "
        "personalisation on this machine; size: bytes of the saved artifact.",
        "",
        f"Wall time: {_hours(cell_seconds)} of cells in all (personalise + generate + score, summed over every "
        f"cell, including those computed by earlier runs and reused); this run took "
        f"{_hours(getattr(ev, 'run_seconds', 0.0))}. Machine: {results['machine']['device']}, "
        f"{results['machine']['torch_threads']} torch threads.",
    ]
    shown = [c for c, p in grids.items() if p is not None]
    if shown:
        parts = "every corpus part" if "all" in cfg.grid_parts else "corpus part(s) " + ", ".join(cfg.grid_parts)
        lines += ["", f"## Sample grids (left: the input photo; right: generated images; people of {parts} only)",
                  ""]
        lines += [f"- {_LABELS.get(c, c)}: ![{c}]({grids[c].name})" for c in shown]
    path = cfg.out / "REPORT.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path

"""`hdb pretrain compare`: two stage-2 runs' validation after the fine-tune, photo by photo.

Stage 2's validation (`stage2.val_finetune_steps`) writes every held-out photo's loss after the
fine-tune from the prediction and from zero to `stage2/val_finetuned/step-N.json`. Two runs on
the same prepared data scored the same photos on the same noise, so their difference is read
photo by photo, with standard errors across photos and clustered by person (DIAGNOSIS.md
section 12 reads its variants this way). Writes OUTPUT/compare.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hypernet.errors import InvalidInputError
from hypernet.files import atomic_write_bytes
from pretrain.cache import PreparedData
from pretrain.context import RunContext
from pretrain.validation import paired_difference, prediction_gap

COMPARE = "compare.json"

log = logging.getLogger("pretrain.compare")


def val_finetuned_file(stage2_dir: Path, step: int | None) -> Path:
    """The per-photo file of validation `step` (None: the last one) under `stage2_dir`.

    Raises:
        InvalidInputError: the run has no such validation.
    """
    from pretrain.stage2 import VAL_FINETUNED

    folder = Path(stage2_dir) / VAL_FINETUNED
    files = sorted(folder.glob("step-*.json"))
    if step is not None:
        files = [f for f in files if f.name == f"step-{step:06d}.json"]
    if not files:
        which = "any validation" if step is None else f"a validation at step {step}"
        raise InvalidInputError(
            f"`{folder}` must hold {which}'s per-photo scores, got none: run stage 2 with "
            f"stage2.val_finetune_steps > 0 (and a val_every that reaches that step)"
        )
    return files[-1]


def photo_people(data: PreparedData) -> dict[str, str]:
    """{"shard:row": person} of every held-out photo: the keys `validate_hypernet` writes."""
    return {f"{s}:{r}": ident for ident in data.identities("val") for s, r in data.rows(ident)}


def run_compare(ctx: RunContext) -> dict:
    """Read both runs' per-photo scores, write OUTPUT/compare.json, log; -> the result dict."""
    cfg = ctx.cfg.compare
    people = photo_people(PreparedData(ctx.prepared_dir))
    mine = val_finetuned_file(ctx.stage2_dir, cfg.step)
    a = json.loads(mine.read_text())
    res: dict = {"run": {"file": str(mine), "gap": prediction_gap(a, people)}}
    if cfg.against is not None:
        other = val_finetuned_file(Path(cfg.against) / ctx.stage2_dir.name, cfg.step)
        b = json.loads(other.read_text())
        if set(a) != set(b):
            log.warning("the runs scored different photos (%d and %d, %d shared): compare on the same prepared data",
                        len(a), len(b), len(set(a) & set(b)))
        res["against"] = {"file": str(other), "gap": prediction_gap(b, people)}
        res["difference"] = paired_difference(a, b, people)
    atomic_write_bytes(ctx.out / COMPARE, (json.dumps(res, indent=1) + "\n").encode())
    for name in ("run", "against"):
        if name in res:
            g = res[name]["gap"]
            log.info("%s: prediction - zero after the fine-tune %+.5f ± %.5f (people %.5f), %d photos of %d people",
                     name, g["mean"], g["se"], g["se_person"], g["n"], g["people"])
    if "difference" in res:
        d = res["difference"]
        log.info("run - against: %+.5f ± %.5f (people %.5f) over %d shared photos (below 0: this run's "
                 "prediction ends the fine-tune better)", d["mean"], d["se"], d["se_person"], d["n"])
    log.info("wrote %s", ctx.out / COMPARE)
    return res


__all__ = ["COMPARE", "photo_people", "run_compare", "val_finetuned_file"]

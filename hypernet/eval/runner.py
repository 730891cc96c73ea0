"""`hdb eval`: the paper's Table 1 in miniature, on identities held out from every training step.

For each held-out identity, its first photo is the one input (its first 3 when a 3-photo variant
is among the conditions; see `EvalConfig.inputs`) and its other photos are the references. Each
condition (`hypernet.eval.conditions`) personalises from the input, timed; then
`images_per_id` images are generated with fixed seeds (the same seeds for every condition, so
comparisons are paired; with `sample_seeds="per-identity"` each person gets their own seeds, so
the run samples people x images noise draws instead of the same few for everyone) from
"a photo of ohwx person", and scored by each face metric
(`hypernet.eval.faces.FACE_METRICS`: dlib's ResNet and FaceNet, two independent networks):

    Face Rec.   mean cosine similarity of generated faces to the identity's reference photos
    margin      Face Rec. minus the mean similarity to other people's photos (of the same corpus
                part, e.g. LFW or Caltech, so photo style cancels): a method that only learned
                "a face" scores ~0
    detection   share of generated images where the metric's detector finds a face
    loss        the diffusion loss on the reference photos (held out from personalisation) with
                the artifact applied, at fixed timesteps and noise
    time, size  wall seconds of personalisation; bytes of the saved artifact

Every (condition, identity) cell is written to OUT/cells/ as it finishes, so a killed run resumes;
a cell that lacks a metric (one added later) is rescored from its saved images, not rerun.
Identities are labelled `part:name` in a merged corpus (`hypernet.eval.corpus.merge_corpora`);
they are evaluated interleaved part by part, so the first N of them cover every part.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hypernet.errors import InvalidInputError
from hypernet.eval.conditions import (
    ALL_CONDITIONS,
    CONDITIONS,
    CONTROLS,
    EVAL_PROMPT_TEMPLATE,
    REAL_PHOTO,
    SLOW_CONDITIONS,
    finetune_of,
    input_photos,
    needs_control,
    needs_hypernet,
    personalise,
    uses_prediction,
)
from hypernet.eval.corpus import FaceCorpus, IdentitySplit, interleave_parts, part_of, read_manifest
from hypernet.eval.faces import FACE_METRICS, FaceMetric, cosine, load_face_metric
from hypernet.files import atomic_write, atomic_write_bytes
from hypernet.photos import to_pil

log = logging.getLogger(__name__)

__all__ = ["REAL_PHOTO", "EvalConfig", "Evaluation", "run_evaluation"]


#: How sampling seeds are assigned to people (`EvalConfig.sample_seeds`).
SAMPLE_SEEDS = ("shared", "per-identity")


def first_sample_seed(seed: int, identity: str, scheme: str) -> int:
    """The seed of `identity`'s first generated image (the rest follow it): `seed` when shared;
    else a block of 100 seeds picked by a hash of the name, stable across runs, machines and the
    number of people evaluated, so cells stay reusable and every condition gets the same noise."""
    if scheme == "shared":
        return seed
    return seed + 100 * (zlib.crc32(identity.encode()) % 1_000_000)


@dataclass
class EvalConfig:
    """What to evaluate and how much; defaults give >= 64 samples per condition on 7 identities."""

    base: Path = field(metadata={"help": "base pipeline directory (its split.json names the held-out ids)"})
    corpus: Path = field(metadata={"help": "`file,identity` manifest"})
    out: Path = field(metadata={"help": "output folder (REPORT.md, results.json, grids, cells/)"})
    hypernet: Path | None = field(default=None, metadata={"help": "hypernetwork export for the HDB rows"})
    mean_adapter: Path | None = field(default=None, metadata={
        "help": "the control hypernetwork (`hdb pretrain mean-adapter`: one adapter for everyone) for the "
                "mean-adapter and hyperdreambooth-mean-adapter rows"})
    identities: int | None = field(default=None, metadata={"help": "evaluate the first N held-out ids"})
    images_per_id: int = field(default=10, metadata={"help": "generated images per identity and condition"})
    conditions: tuple[str, ...] = field(default=CONDITIONS, metadata={"help": "conditions to run"})
    overrides: dict = field(default_factory=dict, metadata={"help": "{condition: {config field: value}}"})
    gen_steps: int = field(default=25, metadata={"help": "sampling steps (DPM-Solver++)"})
    guidance: float = field(default=5.0, metadata={"help": "classifier-free guidance scale"})
    token: str = field(default="ohwx", metadata={"help": "identifier token"})
    class_noun: str = field(default="person", metadata={"help": "class noun"})
    loss_timesteps: int = field(default=10, metadata={"help": "fixed timesteps per reference photo (loss)"})
    other_photos_per_id: int = field(default=3, metadata={"help": "photos per other identity (margin)"})
    grid_images: int = field(default=6, metadata={"help": "samples per identity in each grid"})
    seed: int = field(default=0, metadata={"help": "seed of training, sampling and the loss noise"})
    n_boot: int = field(default=2000, metadata={"help": "bootstrap resamples"})
    device: str | None = field(default=None, metadata={"help": "cpu / cuda (default: auto)"})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's)"})
    detector: str = field(default="auto", metadata={"help": "face crop of input/reference photos (auto/center)"})
    metrics: tuple[str, ...] = field(default=tuple(FACE_METRICS), metadata={"help": "face metrics that score"})
    slow_methods_people: int | None = field(default=None, metadata={
        "help": "run DreamBooth, LoRA and Textual Inversion on only the first N evaluated people"})
    other_train_ids: int = field(default=64, metadata={
        "help": "training identities per part (seeded sample) that the margin compares against, next to "
                "every other held-out identity of the part"})
    people: dict = field(default_factory=dict, metadata={
        "help": "{condition: N}: run that condition on only the first N evaluated people (expensive "
                "conditions on a subset; the report's n column and paired rows say so)"})
    held_inputs: int | None = field(default=None, metadata={
        "help": "photos held back as inputs per identity (default: the most any listed condition takes); "
                "give the same N to runs of different condition lists so that their cells stay paired"})
    sample_seeds: str = field(default="shared", metadata={
        "help": "'shared': every person's images use seeds seed..seed+images_per_id-1; 'per-identity': "
                "each person's own block of seeds (from a hash of the name), the same for every condition. "
                "Shared seeds condition every result on a few noise draws (seeds 0..9 give dlib-detectable "
                "faces far less often than others on face world v2: DIAGNOSIS.md)"})
    grid_parts: tuple[str, ...] = field(default=("caltech",), metadata={
        "help": "corpus parts whose people appear in grids ('all': everyone); LFW's faces must not be committed"})

    def __post_init__(self) -> None:
        self.base, self.corpus, self.out = Path(self.base), Path(self.corpus), Path(self.out)
        self.hypernet = Path(self.hypernet) if self.hypernet else None
        self.mean_adapter = Path(self.mean_adapter) if self.mean_adapter else None
        self.conditions, self.metrics, self.grid_parts = tuple(self.conditions), tuple(self.metrics), \
            tuple(self.grid_parts)
        if self.sample_seeds not in SAMPLE_SEEDS:
            raise InvalidInputError(f"`sample_seeds` must be one of {list(SAMPLE_SEEDS)}, got {self.sample_seeds!r}")
        bad_metrics = [m for m in self.metrics if m not in FACE_METRICS]
        if bad_metrics or not self.metrics:
            raise InvalidInputError(f"`metrics` must be a non-empty subset of {list(FACE_METRICS)}, "
                                    f"got {bad_metrics or '[]'}")
        bad = [c for c in self.conditions if c not in ALL_CONDITIONS]
        if bad or not self.conditions:
            raise InvalidInputError(
                f"`conditions` must be a non-empty subset of {list(ALL_CONDITIONS)}, got {bad or '[]'}")
        if needs_hypernet(self.conditions) and self.hypernet is None:
            raise InvalidInputError(
                "`hypernet` must be given for the hyperdreambooth/hypernetwork/fast-finetune conditions, got None"
            )
        if needs_control(self.conditions) and self.mean_adapter is None:
            raise InvalidInputError(
                f"`mean_adapter` must be given for the {'/'.join(CONTROLS)} conditions, got None "
                "(write it with `hdb pretrain mean-adapter`)")
        for name in ("images_per_id", "gen_steps", "loss_timesteps", "n_boot"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        bad_people = {c: n for c, n in self.people.items()
                      if c not in self.conditions or not isinstance(n, int) or n < 1}
        if bad_people:
            raise InvalidInputError(f"`people` must map listed conditions to counts >= 1, got {bad_people}")
        for name in ("identities", "slow_methods_people", "held_inputs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InvalidInputError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.other_train_ids < 0:
            raise InvalidInputError(f"`other_train_ids` must be >= 0, got {self.other_train_ids}")

    @property
    def prompt(self) -> str:
        return EVAL_PROMPT_TEMPLATE.format(token=self.token, class_noun=self.class_noun)

    @property
    def inputs(self) -> int:
        """Photos held back as inputs per identity: the most any condition takes (the rest are
        references, the same for every condition so that comparisons stay paired), or
        `held_inputs` when that is more: runs of other condition lists then score against the
        same references and reuse each other's cells."""
        return max(self.held_inputs or 1, *(input_photos(c) for c in self.conditions))

    def cell_key(self, condition: str, models: str = "") -> str:
        """What a cached cell depends on (settings + `models`, the weights' identity): a change reruns it.

        The hypernetwork is part of the key only for the conditions that use it, so the baselines'
        cells survive a retrained hypernetwork (and can be computed before it exists).
        """
        # The fine-tunes from zero depend only on the hypernetwork's geometry (in `models`), not its file.
        hypernet = str(self.hypernet) if uses_prediction(condition) else None
        if condition in CONTROLS:
            hypernet = str(self.mean_adapter)
        d = dict(models=models, hypernet=hypernet, n=self.images_per_id, det=self.detector,
                 steps=self.gen_steps, guidance=self.guidance, prompt=self.prompt, seed=self.seed,
                 loss_t=self.loss_timesteps, overrides=self.overrides.get(condition, {}))
        if self.inputs > 1:  # other references: other cells (1 keeps the keys of earlier runs)
            d["inputs"] = self.inputs
        if self.sample_seeds != "shared":  # shared keeps the keys of earlier runs
            d["sample_seeds"] = self.sample_seeds
        ft = finetune_of(condition, self.overrides.get(condition))
        if ft is not None:  # the training's rate (and relaxation): a changed library default reruns the cell
            if "relax" in ft:
                d["relax"] = ft["relax"]
            d["overrides"] = {"lr": ft["lr"], **d["overrides"]}  # an override naming it: the same cell
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Cell:
    """One condition on one identity: `scores[metric]` holds face_rec, other_sim, margin, detection."""

    condition: str
    identity: str
    scores: dict[str, dict[str, float]]
    heldout_loss: float
    seconds: float
    nbytes: int
    key: str = ""
    wall_seconds: float = 0.0  # personalisation + generation + scoring
    #: The references its scores were computed against (`Evaluation.references_key`): a cell
    #: scored against others is rescored from its saved images, never retrained.
    refs: str = ""

    @classmethod
    def from_json(cls, d: dict) -> Cell:
        """A cell file; one written before there were several metrics holds dlib's scores flat."""
        d = dict(d)
        if "scores" not in d:
            d["scores"] = {"dlib": {k: d.pop(k) for k in ("face_rec", "other_sim", "margin", "detection")}}
        return cls(**d)


def score(emb: np.ndarray, detected: np.ndarray, own: np.ndarray, others: np.ndarray) -> dict[str, float]:
    """Scores of (K, D) embeddings against (n, D) own references and (m, D) other people's photos."""
    face_rec = float(cosine(emb, own).mean())
    other = float(cosine(emb, others).mean())
    return {"face_rec": face_rec, "other_sim": other, "margin": face_rec - other,
            "detection": float(np.mean(detected))}


class Evaluation:
    """setup -> run (cells, resumable) -> report."""

    def __init__(self, cfg: EvalConfig) -> None:
        self.cfg = cfg
        self.cells: list[Cell] = []

    # 1. Setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        import hypernet.base.taef2  # noqa: F401  (registers TAEF2: face-world bases load through diffusers)
        from hypernet.base.loading import load_pipeline

        cfg = self.cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.corpus: FaceCorpus = read_manifest(cfg.corpus)
        self.eval_ids, self.train_ids, self.heldout_ids = self._choose_identities()
        self.pipe = load_pipeline(cfg.base, device=cfg.device)
        self.resolution = int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)
        self.runtime = self.control_runtime = None
        if needs_hypernet(cfg.conditions) or needs_control(cfg.conditions):
            from hypernet.personalize import load_runtime

            if needs_hypernet(cfg.conditions):
                self.runtime = load_runtime(str(cfg.hypernet))
            if needs_control(cfg.conditions):
                self.control_runtime = load_runtime(str(cfg.mean_adapter))
        self.embedders: dict[str, FaceMetric] = {m: load_face_metric(m) for m in cfg.metrics}
        from hypernet.base.loading import base_fingerprint

        self.base_id = base_fingerprint(self.pipe)
        self.hypernet_id = self._hypernet_id()
        self.control_id = self._hypernet_id(self.cfg.mean_adapter)
        self._setup_references()

    def _hypernet_id(self, path: Path | None = None) -> str:
        """The hypernetwork files' names, sizes and mtimes ("" without one): a retrained one reruns its
        cells. `path`: another hypernetwork (the control) instead of `cfg.hypernet`."""
        path = self.cfg.hypernet if path is None else path
        if path is None or not path.exists():
            return ""
        files = [path] if path.is_file() else sorted(path.iterdir())
        return "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file())

    def _models_id(self, condition: str) -> str:
        """The weights a cell depends on: the base's fingerprint, plus the hypernetwork's if it uses one."""
        if condition in CONTROLS:
            return self.base_id + "|" + self.control_id
        if needs_hypernet((condition,)) and not uses_prediction(condition):
            return self.base_id + "|" + self.geometry_id
        return self.base_id + ("|" + self.hypernet_id if needs_hypernet((condition,)) else "")

    @property
    def geometry_id(self) -> str:
        """What a fine-tune from zero takes from the hypernetwork: its LiDB spec, adapted layers and
        input resolution ("" without one)."""
        if self.runtime is None:
            return ""
        rt = self.runtime
        return "geometry:" + hashlib.sha256(
            json.dumps([rt.spec.to_json(), list(rt.layers), rt.resolution]).encode()).hexdigest()[:16]

    def _choose_identities(self) -> tuple[list[str], list[str], list[str]]:
        """(the evaluated people, the training people, every held-out person): with a split, the
        margin compares against all held-out people whatever `identities` evaluates, so a run on
        the first 24 scores a cell exactly as a run on all 55 does."""
        split_file = self.cfg.base / "split.json"
        if split_file.is_file():
            split = IdentitySplit.load(split_file)
            missing = [i for i in split.holdout if i not in self.corpus.photos]
            if missing:
                raise InvalidInputError(f"`corpus` must contain the base's held-out identities, missing {missing}")
            held, train = list(split.holdout), list(split.train)
        else:
            log.warning("%s has no split.json: evaluating every identity with >= 3 photos; none is "
                        "known to be held out from the base's training", self.cfg.base)
            held, train = [i for i in self.corpus.identities if len(self.corpus.photos[i]) >= 3], []
        held = interleave_parts([i for i in held if len(self.corpus.photos[i]) >= self.cfg.inputs + 1])
        evaluated = held if self.cfg.identities is None else held[: self.cfg.identities]
        if not evaluated:
            raise InvalidInputError(f"`corpus` must have at least one held-out identity with >= "
                                    f"{self.cfg.inputs + 1} photos, got none")
        # Without a split every person with enough photos is a candidate: compare against the
        # evaluated ones only (embedding a whole corpus's references would take hours).
        return evaluated, train, (held if split_file.is_file() else evaluated)

    def _comparison_ids(self) -> list[str]:
        """The people the margin compares against: every held-out one (evaluated or not), plus per
        part a seeded sample of `other_train_ids` others (a merged corpus holds thousands: embedding
        them all would take hours)."""
        held = set(self.heldout_ids)
        rest = [i for i in self.corpus.identities if i not in held]
        by_part: dict[str, list[str]] = {}
        for i in rest:
            by_part.setdefault(part_of(i), []).append(i)
        rng = random.Random(self.cfg.seed)
        sample = [i for ids in by_part.values() for i in rng.sample(ids, min(self.cfg.other_train_ids, len(ids)))]
        return self.heldout_ids + sorted(sample, key=rest.index)

    @torch.no_grad()
    def _setup_references(self) -> None:
        """Embed reference photos with every metric (eval ids: all but the input; others: a few)."""
        from hypernet.photos import decode_image, preprocess

        cache_file = self.cfg.out / "reference_embeddings.npz"
        cache = dict(np.load(cache_file)) if cache_file.is_file() else {}
        self.cfg.out.mkdir(parents=True, exist_ok=True)
        new = 0
        comparison = self._comparison_ids()
        held = set(self.heldout_ids)
        self.references_key = hashlib.sha256(json.dumps(
            [comparison, self.cfg.inputs, self.cfg.other_photos_per_id, self.resolution, self.cfg.detector]
        ).encode()).hexdigest()[:16]
        self.ref_emb: dict[str, dict[str, np.ndarray]] = {m: {} for m in self.cfg.metrics}  # metric -> id -> (n, D)
        self.ref_pixels: dict[str, torch.Tensor] = {}
        for ident in comparison:
            photos = self.corpus.photos[ident]
            refs = photos[self.cfg.inputs:] if ident in held else photos[: self.cfg.other_photos_per_id]
            pix = [preprocess(decode_image(p), self.resolution, detector=self.cfg.detector) for p in refs]  # (3, R, R)
            for m, embedder in self.embedders.items():
                embs = []
                for p, x in zip(refs, pix, strict=True):
                    key = f"{m}|{p}|{self.resolution}"
                    if key not in cache:
                        cache[key] = embedder(to_pil(x)).embedding
                        new += 1
                        if new % 200 == 0:  # a merged corpus has ~1,000 references: keep them across a kill
                            _save_npz(cache_file, cache)
                    embs.append(cache[key])
                self.ref_emb[m][ident] = np.stack(embs)  # (n_ref, D)
            if ident in self.eval_ids:
                self.ref_pixels[ident] = torch.stack(pix)  # (n_ref, 3, R, R)
        _save_npz(cache_file, cache)

    def _others(self, metric: str, ident: str) -> np.ndarray:
        """(m, D) embeddings of the other people of `ident`'s corpus part."""
        part = part_of(ident)
        return np.concatenate([e for i, e in self.ref_emb[metric].items() if i != ident and part_of(i) == part])

    def _score_all(self, images: list[Image.Image], ident: str, metrics) -> dict[str, dict[str, float]]:
        out = {}
        for m in metrics:
            emb, detected = self.embedders[m].embed_many(images)  # (K, D), (K,)
            out[m] = score(emb, detected, self.ref_emb[m][ident], self._others(m, ident))
        return out

    def people_for(self, condition: str) -> list[str]:
        """The evaluated people of `condition`: all, the first `people[condition]`, or the first
        `slow_methods_people` for a slow one."""
        if condition in self.cfg.people:
            return self.eval_ids[: self.cfg.people[condition]]
        if condition in SLOW_CONDITIONS and self.cfg.slow_methods_people is not None:
            return self.eval_ids[: self.cfg.slow_methods_people]
        return self.eval_ids

    # 2. Run -------------------------------------------------------------------------------------
    def run(self) -> list[Cell]:
        t0 = time.perf_counter()
        for condition in self.cfg.conditions:
            for ident in self.people_for(condition):
                self.cells.append(self._cell(condition, ident))
        self.cells += [self._real_photo_cell(ident) for ident in self.eval_ids]
        self.run_seconds = time.perf_counter() - t0
        return self.cells

    def _real_photo_cell(self, ident: str) -> Cell:
        """The upper bound: the real input photo itself scored like a generated image."""
        from hypernet.photos import decode_image, preprocess

        x = preprocess(decode_image(self.corpus.photos[ident][0]), self.resolution, detector=self.cfg.detector)
        return Cell(REAL_PHOTO, ident, self._score_all([to_pil(x)], ident, self.cfg.metrics), float("nan"), 0.0, 0)

    def _cell(self, condition: str, ident: str) -> Cell:
        cfg = self.cfg
        folder = cfg.out / "cells" / condition
        cell_file = folder / f"{ident}.json"
        key = cfg.cell_key(condition, self._models_id(condition))
        if cell_file.is_file():
            cached = Cell.from_json(json.loads(cell_file.read_text()))
            if cached.key == key:
                return self._rescore(cached, folder / ident)
        t0 = time.perf_counter()
        photos = self.corpus.photos[ident][: input_photos(condition)]
        runtime = self.control_runtime if condition in CONTROLS else self.runtime
        done = personalise(self.pipe, condition, photos, runtime=runtime, token=cfg.token,
                           class_noun=cfg.class_noun, overrides=cfg.overrides.get(condition), seed=cfg.seed,
                           detector=cfg.detector)
        images = self._generate(done.artifact, ident)
        loss = self._heldout_loss(done.artifact, ident)
        scores = self._score_all(images, ident, cfg.metrics)
        cell = Cell(condition, ident, scores, loss, done.seconds, done.nbytes, key, time.perf_counter() - t0,
                    self.references_key)
        (folder / ident).mkdir(parents=True, exist_ok=True)
        first = first_sample_seed(cfg.seed, ident, cfg.sample_seeds)
        for i, im in enumerate(images):
            im.save(folder / ident / f"seed{first + i:04d}.png")
        atomic_write_bytes(cell_file, json.dumps(asdict(cell), indent=1).encode())
        log.info("%s / identity %s: %s; loss %.4f (%.0f s train, %.0f s total)", condition, ident,
                 "; ".join(f"{m} face rec {s['face_rec']:.3f} margin {s['margin']:+.3f} detect {s['detection']:.2f}"
                           for m, s in scores.items()), loss, done.seconds, cell.wall_seconds)
        return cell

    def _rescore(self, cell: Cell, image_dir: Path) -> Cell:
        """From its saved images (no retraining): add the scores of metrics the cached cell lacks,
        or rescore every metric when it was scored against other references (another corpus,
        `--inputs`, or a cell from before the comparison set stopped depending on `--identities`)."""
        stale = cell.refs != self.references_key
        missing = list(self.cfg.metrics) if stale else [m for m in self.cfg.metrics if m not in cell.scores]
        if not missing:
            return cell
        first = first_sample_seed(self.cfg.seed, cell.identity, self.cfg.sample_seeds)
        files = [image_dir / f"seed{first + i:04d}.png" for i in range(self.cfg.images_per_id)]
        if not all(f.is_file() for f in files):
            raise InvalidInputError(f"cell {cell.condition}/{cell.identity} must keep its images to be rescored "
                                    f"with {missing}, got none in {str(image_dir)!r}: delete the cell to rerun it")
        images = [Image.open(f).convert("RGB") for f in files]
        cell.scores.update(self._score_all(images, cell.identity, missing))
        cell.refs = self.references_key
        atomic_write_bytes(self.cfg.out / "cells" / cell.condition / f"{cell.identity}.json",
                           json.dumps(asdict(cell), indent=1).encode())
        log.info("%s / identity %s: rescored with %s from its saved images%s", cell.condition, cell.identity,
                 missing, " (other references)" if stale else "")
        return cell

    def _generate(self, artifact, ident: str) -> list[Image.Image]:
        from hypernet.generate import MAX_IMAGES, generate

        cfg, images = self.cfg, []
        first = first_sample_seed(cfg.seed, ident, cfg.sample_seeds)
        for start in range(0, cfg.images_per_id, MAX_IMAGES // 2):
            n = min(MAX_IMAGES // 2, cfg.images_per_id - start)
            images += generate(self.pipe, cfg.prompt, artifact=artifact, steps=cfg.gen_steps,
                               guidance=cfg.guidance, seed=first + start, height=self.resolution,
                               width=self.resolution, num_images=n)
        return images

    @torch.no_grad()
    def _heldout_loss(self, artifact, ident: str) -> float:
        """Plain (unweighted) diffusion loss on the reference photos at fixed timesteps and noise."""
        from hypernet.training import diffusion_loss, encode_images, encode_prompts, make_noise_scheduler

        cfg, pipe = self.cfg, self.pipe
        if artifact is not None:
            artifact.apply(pipe)
        try:
            latents = encode_images(pipe, self.ref_pixels[ident].to(pipe.vae.device, pipe.vae.dtype))  # (n, C, h, w)
            sched = make_noise_scheduler(pipe)
            n_t = sched.config.num_train_timesteps
            t = torch.linspace(0, n_t - 1, cfg.loss_timesteps + 2)[1:-1].round().long()  # (T,) interior
            lat = latents.repeat_interleave(len(t), 0)  # (n*T, C, h, w)
            ts = t.repeat(len(latents))  # (n*T,)
            emb = encode_prompts(pipe, cfg.prompt).expand(len(lat), -1, -1)  # (n*T, 77, D)
            gen = torch.Generator().manual_seed(cfg.seed)
            losses = [
                diffusion_loss(pipe.unet, sched, lat[i : i + 16], emb[i : i + 16], gen,
                               reduction="none", timesteps=ts[i : i + 16])
                for i in range(0, len(lat), 16)
            ]
            return float(torch.cat(losses).mean())
        finally:
            if artifact is not None:
                artifact.remove(pipe)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez through a temporary file of its own: a kill mid-write leaves the previous cache
    readable, and two processes sharing OUT (conditions split over cores) never rename each
    other's file away."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def run_evaluation(cfg: EvalConfig) -> Path:
    """Run every cell (resuming finished ones) and write the report; returns REPORT.md's path."""
    from hypernet.eval.report import write_report

    ev = Evaluation(cfg)
    ev.setup()
    ev.run()
    return write_report(ev)

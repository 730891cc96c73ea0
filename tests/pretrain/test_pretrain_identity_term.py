"""Stage 2's identity term (`stage2.identity_weight`, pretrain/identity_term.py) on the tiny base:
it is the objective it says it is, at the prediction and after the fine-tune, it trains the
hypernetwork, validation reports it, and runs made without it keep their key."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from hypernet.errors import InvalidInputError
from pretrain.config import load_config
from pretrain.context import RunContext
from pretrain.corpus import lfw_image
from pretrain.distributed import DistInfo

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FT = ["stage2.finetune_steps=2", "stage2.finetune_lr=0.02", "stage2.finetune_rank=2", "stage2.val_finetune_steps=2"]
ID = ["stage2.identity_weight=1", "stage2.identity_t_min=0.2", "stage2.identity_t_max=0.6"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("idterm-corpus")
    for i in range(5):
        (root / f"person{i}").mkdir()
        lfw_image(i).save(root / f"person{i}" / "a.png")
        if i < 3:
            lfw_image(i + 10).save(root / f"person{i}" / "b.png")
    return root


def make_ctx(out, base, corpus, *extra):
    cfg = load_config("tiny-cpu", [
        f"base={base}", f'data.corpus=["{corpus}"]', "data.detector=center", "data.val_fraction=0.4",
        "stage1.train.steps=2", "stage2.steps=2", "stage2.batch_size=2", "stage2.val_every=2",
        "stage2.val_noise_draws=1", "stage2.model.depth=1", "stage2.model.dim=32", "stage2.model.heads=2",
        "stage2.model.iterations=2",
        "stage2.model.encoder_kwargs={patch_size: 16, depth: 1, embed_dim: 32, num_heads: 2}",
        *extra,
    ])
    return RunContext(cfg, out, DistInfo(0, 1, 0, torch.device("cpu")))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_base_dir, corpus, face_encoder_file):
    """prepare + stage 1 (+ the face embeddings the term's targets come from) once."""
    from pretrain.face_embeddings import ensure_face_embeddings
    from pretrain.prepare import run_prepare
    from pretrain.stage1 import run_stage1

    out = tmp_path_factory.mktemp("idterm-run")
    ctx = make_ctx(out, tiny_base_dir, corpus, *ID)
    run_prepare(ctx)
    run_stage1(ctx)
    ensure_face_embeddings(ctx)  # the pixel condition needs them only for the identity term
    return out


def _recipe(out, base, corpus, *extra):
    from pretrain.stage2 import Stage2Recipe

    recipe = Stage2Recipe(make_ctx(out, base, corpus, *extra))
    recipe.setup()
    return recipe


def test_the_term_is_one_minus_cos_of_the_decoded_x0_to_the_persons_mean_embedding(prepared, tiny_base_dir, corpus):
    from pretrain.face_embeddings import FaceEmbeddings, embeddings_key

    recipe = _recipe(prepared, tiny_base_dir, corpus, "stage2.alpha=0", "stage2.beta=0", *ID)
    try:
        term = recipe.identity
        # Targets: each person's unit mean embedding over their photos.
        emb = FaceEmbeddings(recipe.ctx.prepared_dir, embeddings_key(recipe.ctx))
        j = next(j for j, rows in enumerate(recipe.rows_of["train"]) if len(rows) > 1)
        want = F.normalize(emb.get(recipe.rows_of["train"][j]).mean(0), dim=-1)
        torch.testing.assert_close(term.targets["train"][j], want)
        # Timesteps in [t_min, t_max) of the schedule.
        t, noise = term.draw(torch.Size((64, 4, 8, 8)), torch.Generator().manual_seed(0), False)
        assert t.min() >= 200 and t.max() < 600 and t.dtype == torch.long and noise.shape == (64, 4, 8, 8)
        # The loss step's value is the term (alpha = beta = 0), by hand from its parts.
        loss, parts = recipe._loss_step(0)
        assert parts["diffusion"] == 0.0 and loss.item() == pytest.approx(parts["identity"], rel=1e-5)
        assert 0 < parts["identity"] < 2
        pairs = recipe.stream.micro_batch(0, 0, 0, 1, 1, recipe.cfg.batch_size)
        from pretrain.stream import step_seed

        gen = torch.Generator().manual_seed(step_seed(recipe.cfg.seed, 0, 0, 0))
        pix, lat, _, ident = recipe._batch(pairs)
        ids = torch.tensor([recipe.samples["train"][i][0] for i, _ in pairs])
        with torch.no_grad():
            pred = recipe.predict(recipe.model, pix, ident)
            t, noise = term.draw(lat.shape, gen, False)
            recipe.lidb.use(pred)
            x0 = recipe.objective.denoise_x0(recipe.net, lat, noise, t, *recipe.cond(len(pairs)))
            recipe.lidb.use(None)
            e = term.scorer.embed(x0)
        by_hand = 1 - (e * term.targets["train"][ids]).sum(-1)
        assert by_hand.mean().item() == pytest.approx(parts["identity"], rel=1e-4)
        # It trains the hypernetwork, with nothing else on.
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in recipe.model.parameters())
        assert all(p.grad is None for p in term.scorer.parameters())  # encoder and decoder frozen
    finally:
        recipe.cleanup()


def test_after_the_fine_tune_the_term_is_first_order_on_the_tuned_weights(prepared, tiny_base_dir, corpus):
    recipe = _recipe(prepared, tiny_base_dir, corpus, "stage2.alpha=0", "stage2.beta=0", *FT, *ID,
                     "stage2.identity_at=finetuned", "stage2.finetune_weight=0", "stage2.identity_weight=3")
    try:
        loss, parts = recipe._loss_step(0)
        assert "identity" not in parts and "finetuned" not in parts  # only the term after the fine-tune
        assert loss.item() == pytest.approx(3 * parts["identity_finetuned"], rel=1e-5)
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in recipe.model.parameters())
    finally:
        recipe.cleanup()


def test_stage2_with_the_term_reports_it_and_keeps_old_keys(prepared, tiny_base_dir, corpus, tmp_path):
    from pretrain.metrics import read_metrics
    from pretrain.stage2 import run_stage2, stage2_key

    def run(name, *extra):
        out = tmp_path / name
        shutil.copytree(prepared, out, ignore=shutil.ignore_patterns("stage2"))
        ctx = make_ctx(out, tiny_base_dir, corpus, *FT, "stage2.finetune_steps=0", *extra)
        run_stage2(ctx)
        from hypernet.hypernetwork.export import load_hypernet

        return ctx, load_hypernet(ctx.stage2_dir / "final.safetensors")[0].state_dict(), \
            read_metrics(ctx.stage2_dir / "metrics.csv")

    off_ctx, off, off_m = run("off")
    on_ctx, on, on_m = run("on", *ID, "stage2.identity_weight=5")
    small_ctx, small, small_m = run("small", *ID, "stage2.identity_weight=0.5")
    assert any(not torch.allclose(off[k], on[k], atol=1e-6) for k in off)  # it changes what is learned
    assert "train/identity" in on_m and "train/identity" not in off_m
    last = {k: v[-1][1] for k, v in on_m.items()}
    for k in ("val/identity", "val/identity_zero", "val/identity_finetuned", "val/identity_finetuned_zero",
              "val/identity_finetuned_gap", "val/identity_finetuned_gap_se"):
        assert k in last and k not in off_m
    assert last["val/identity_finetuned_gap"] == pytest.approx(
        last["val/identity_finetuned"] - last["val/identity_finetuned_zero"], rel=1e-4, abs=1e-9)
    # The base and the fine-tune from zero do not depend on the hypernetwork: the same draws give
    # the same numbers in both runs; from the prediction they differ.
    for k in ("val/identity_zero", "val/identity_finetuned_zero"):
        assert small_m[k][-1][1] == pytest.approx(last[k], rel=1e-6)
    assert small_m["val/identity"][-1][1] != pytest.approx(last["val/identity"], rel=1e-7)
    # Keys: off leaves the key of runs made before the term existed, whatever its other settings;
    # on, the weight, the place and the timesteps count.
    plain = make_ctx(tmp_path, tiny_base_dir, corpus, *FT, "stage2.finetune_steps=0")
    idle = make_ctx(tmp_path, tiny_base_dir, corpus, *FT, "stage2.finetune_steps=0", "stage2.identity_t_max=0.9")
    assert stage2_key(off_ctx) == stage2_key(plain) == stage2_key(idle)
    assert len({stage2_key(off_ctx), stage2_key(on_ctx), stage2_key(small_ctx)}) == 3
    moved = make_ctx(tmp_path, tiny_base_dir, corpus, *FT, "stage2.finetune_steps=0", *ID,
                     "stage2.identity_weight=5", "stage2.identity_t_max=0.9")
    assert stage2_key(moved) != stage2_key(on_ctx)


@pytest.mark.parametrize("settings, match", [
    (["stage2.identity_weight=-1"], r"`stage2.identity_weight` must be >= 0, got -1"),
    (["stage2.identity_at=middle"], r"`stage2.identity_at` must be 'prediction' or 'finetuned', got 'middle'"),
    (["stage2.identity_weight=1", "stage2.identity_at=finetuned"],
     r"`stage2.finetune_steps` must be > 0 with stage2.identity_at 'finetuned'"),
    (["stage2.identity_t_min=0.7", "stage2.identity_t_max=0.3"], r"must satisfy 0 <= min < max <= 1, got 0.7, 0.3"),
    (["stage2.alpha=0", "stage2.beta=0"], r"not both 0 \(unless"),
])
def test_bad_identity_settings_are_named(settings, match):
    with pytest.raises(InvalidInputError, match=match):
        load_config("tiny-cpu", settings)


def test_the_term_alone_may_be_the_objective():
    cfg = load_config("tiny-cpu", ["stage2.alpha=0", "stage2.beta=0", "stage2.identity_weight=1"])
    assert cfg.stage2.identity_weight == 1 and cfg.stage2.alpha == cfg.stage2.beta == 0

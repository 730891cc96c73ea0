"""Stage 2 trained through the fine-tune that follows it (`stage2.finetune_steps`), and the
validation read-out after that fine-tune (`stage2.val_finetune_steps`), on the tiny base."""

from __future__ import annotations

import json

import pytest
import torch

from hypernet.errors import InvalidInputError
from hypernet.personalize import finetune
from hypernet.personalize_config import PersonalizeConfig
from pretrain.config import load_config
from pretrain.context import RunContext
from pretrain.corpus import lfw_image
from pretrain.distributed import DistInfo

FT = ["stage2.finetune_steps=3", "stage2.finetune_lr=0.02", "stage2.finetune_rank=2", "stage2.val_finetune_steps=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """5 identities, the first three with two photos (the fine-tune's loss goes to the other one)."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(5):
        d = root / f"person{i}"
        d.mkdir()
        lfw_image(i).save(d / "front.png")
        if i < 3:
            lfw_image(i + 10).save(d / "other.png")
    return root


def make_ctx(out, base, corpus, *extra):
    cfg = load_config("tiny-cpu", [
        f"base={base}", f'data.corpus=["{corpus}"]', "data.detector=center", "data.val_fraction=0.4",
        "stage1.train.steps=2", "stage2.steps=2", "stage2.batch_size=2", "stage2.val_every=2",
        "stage2.val_noise_draws=2", *extra,
    ])
    return RunContext(cfg, out, DistInfo(0, 1, 0, torch.device("cpu")))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_base_dir, corpus):
    """prepare + stage 1 once; stage-2 runs copy nothing and write their own stage2/ folders."""
    from pretrain.prepare import run_prepare
    from pretrain.stage1 import run_stage1

    out = tmp_path_factory.mktemp("run")
    ctx = make_ctx(out, tiny_base_dir, corpus)
    run_prepare(ctx)
    run_stage1(ctx)
    return out


def _recipe(out, base, corpus, *extra):
    from pretrain.stage2 import Stage2Recipe

    recipe = Stage2Recipe(make_ctx(out, base, corpus, *extra))
    recipe.setup()
    return recipe


def test_the_fine_tune_stage2_trains_through_is_personalizes_and_its_gradient_lands_on_the_prediction(
        prepared, tiny_base_dir, corpus):
    from hypernet.personalize import subspace_init
    from hypernet.training.data import build_train_data
    from pretrain.through_finetune import finetune_batch, post_finetune_term

    recipe = _recipe(prepared, tiny_base_dir, corpus, *FT, "stage2.cross_photo=true")
    try:
        c, r = recipe.cfg, recipe.s1.spec.r
        assert r < c.finetune_rank  # the relaxed fine-tune has components the prediction does not
        i, (_, row) = next((i, s) for i, s in enumerate(recipe.samples["train"])
                           if len(recipe.rows_of["train"][s[0]]) > 1)
        pix, lat, _, ident = recipe._batch([(i, False)], gen=torch.Generator().manual_seed(5))  # lat: another photo
        pred = {k: v.detach().requires_grad_(True) for k, v in recipe.predict(recipe.model, pix, ident).items()}
        one = {k: v[0].detach() for k, v in pred.items()}  # (L, r, a) / (L, b, r)
        seed = 123  # the fine-tune's draws
        term, after = post_finetune_term(recipe, pred, [row], [False], lat, torch.Generator().manual_seed(9), [seed])
        assert term.item() == pytest.approx(after, rel=1e-6)
        term.backward()

        # 1. The fine-tune is `hdb personalize`'s: the library's `finetune` from the same photo,
        # prediction, steps, lr, rank and seed ends at the same weights.
        pcfg = PersonalizeConfig(steps=c.finetune_steps, lr=c.finetune_lr, rank=c.finetune_rank, seed=seed)
        identity, _ = finetune(recipe.pipe, recipe.data.pixels([row]), recipe.s1.spec, one,
                               layers=recipe.s1.layers, config=pcfg)
        data = build_train_data(recipe.pipe, recipe.data.pixels([row]), pcfg.prompt)
        torch.testing.assert_close(data.latents, recipe.data.latents([row]), atol=1e-5, rtol=1e-4)

        def tuned(init_seed):
            start = {k: v[None] for k, v in subspace_init(one, c.finetune_rank, init_seed).items()}
            return finetune_batch(recipe, start, data.latents, data.flipped, [seed], c.finetune_steps)

        mine = tuned(seed)
        for k in ("A_train", "B_train"):  # AdamW's steps are 2e-2 each: 1e-4 is round-off, not a different fit
            torch.testing.assert_close(mine[k][0], identity.lidb[k], atol=1e-4, rtol=1e-3)

        # 2. The prediction's gradient is the loss-after-the-fine-tune's gradient at the fine-tuned
        # weights (the extra components initialised as `personalize`'s default seed 0 does), on
        # the prediction's own r components.
        theta = {k: v.detach().clone().requires_grad_(True) for k, v in tuned(PersonalizeConfig().seed).items()}
        emb, pooled = recipe.cond(1)
        recipe.lidb.use(theta)
        loss = recipe.objective.loss(recipe.net, lat, emb, torch.Generator().manual_seed(9), c.min_snr_gamma,
                                     pooled=pooled)
        recipe.lidb.use(None)
        assert loss.item() == pytest.approx(after, rel=1e-5)
        gA, gB = torch.autograd.grad(loss, [theta["A_train"], theta["B_train"]])
        torch.testing.assert_close(pred["A_train"].grad, gA[:, :, :r], atol=1e-7, rtol=1e-4)
        torch.testing.assert_close(pred["B_train"].grad, gB[..., :r], atol=1e-7, rtol=1e-4)
        assert pred["B_train"].grad.abs().max() > 0
    finally:
        recipe.cleanup()


def test_training_through_the_fine_tune_changes_what_stage2_learns_and_reports_it(prepared, tiny_base_dir, corpus,
                                                                                  tmp_path):
    import shutil

    from pretrain.metrics import read_metrics
    from pretrain.stage2 import run_stage2, stage2_key

    def run(name, *extra):
        out = tmp_path / name
        shutil.copytree(prepared, out, ignore=shutil.ignore_patterns("stage2"))
        ctx = make_ctx(out, tiny_base_dir, corpus, *extra)
        run_stage2(ctx)
        from hypernet.hypernetwork.export import load_hypernet

        model, _ = load_hypernet(ctx.stage2_dir / "final.safetensors")
        return ctx, model.state_dict(), read_metrics(ctx.stage2_dir / "metrics.csv")

    off_ctx, off, off_m = run("off")
    on_ctx, on, on_m = run("on", *FT)
    zero_ctx, zero, zero_m = run("weight0", *FT, "stage2.finetune_weight=0")
    # Weight 0: the same updates as off (the term draws after the diffusion loss, so nothing else moves).
    assert all(torch.allclose(off[k], zero[k], atol=1e-6) for k in off)
    # Weight 1: the loss after the fine-tune trains the hypernetwork.
    assert any(not torch.allclose(off[k], on[k], atol=1e-6) for k in off)
    assert "train/finetuned" in on_m and "train/finetuned" not in off_m
    # Validation after the fine-tune: from zero does not depend on the hypernetwork, from the prediction does.
    for m in (on_m, zero_m):
        assert {"val/diffusion_finetuned", "val/diffusion_finetuned_zero", "val/diffusion_finetuned_gap",
                "val/diffusion_finetuned_gap_se"} <= set(m)
        # The paired gap is the difference of the two means; its standard error is of photos that differ.
        last = {k: v[-1][1] for k, v in m.items()}
        assert last["val/diffusion_finetuned_gap"] == pytest.approx(
            last["val/diffusion_finetuned"] - last["val/diffusion_finetuned_zero"], rel=1e-4, abs=1e-9)
        assert 0 < last["val/diffusion_finetuned_gap_se"] < float("inf")
    assert on_m["val/diffusion_finetuned_zero"][-1][1] == pytest.approx(zero_m["val/diffusion_finetuned_zero"][-1][1],
                                                                        rel=1e-6)
    assert on_m["val/diffusion_finetuned"][-1][1] != pytest.approx(zero_m["val/diffusion_finetuned"][-1][1], rel=1e-6)
    assert "val/diffusion_finetuned" not in off_m
    # Per photo: the file of the last validation holds every held-out photo's two scores, their
    # means are the logged ones, and two runs compare photo by photo.
    from pretrain.validation import paired_difference

    def photos(ctx):
        files = sorted((ctx.stage2_dir / "val_finetuned").glob("step-*.json"))
        assert files, "every validation with val_finetune_steps writes its per-photo scores"
        return json.loads(files[-1].read_text())

    on_p, zero_p = photos(on_ctx), photos(zero_ctx)
    assert set(on_p) == set(zero_p) and len(on_p) >= 2
    assert sum(v[0] for v in on_p.values()) / len(on_p) == pytest.approx(on_m["val/diffusion_finetuned"][-1][1],
                                                                         rel=1e-5)
    assert all(on_p[k][1] == pytest.approx(zero_p[k][1], rel=1e-6) for k in on_p)  # from zero: the same in both
    d = paired_difference(on_p, zero_p)
    assert d["n"] == len(on_p)
    assert d["mean"] == pytest.approx(on_m["val/diffusion_finetuned"][-1][1] - zero_m["val/diffusion_finetuned"][-1][1],
                                      rel=1e-4, abs=1e-9)
    assert not (off_ctx.stage2_dir / "val_finetuned").exists()
    # `hdb pretrain compare`, as a user runs it: the same difference, with each run's own gap and
    # standard errors clustered by person, in OUTPUT/compare.json.
    from hdb.cli import main as hdb_main

    (on_ctx.out / "config.yaml").write_text("the run's own record\n")
    assert hdb_main(["pretrain", "compare", "--config", "tiny-cpu", "--output-dir", str(on_ctx.out),
                     "--set", f"compare.against={zero_ctx.out}"]) == 0
    assert (on_ctx.out / "config.yaml").read_text() == "the run's own record\n"  # not overwritten by a read-out
    report = json.loads((on_ctx.out / "compare.json").read_text())
    assert report["difference"]["mean"] == pytest.approx(d["mean"], rel=1e-9)
    assert report["difference"]["n"] == d["n"] and report["difference"]["people"] <= d["n"]
    assert report["run"]["gap"]["mean"] == pytest.approx(on_m["val/diffusion_finetuned_gap"][-1][1], rel=1e-4,
                                                         abs=1e-9)
    assert report["against"]["gap"]["mean"] == pytest.approx(zero_m["val/diffusion_finetuned_gap"][-1][1],
                                                             rel=1e-4, abs=1e-9)
    # `compare.step` reads that validation in both runs; a step that never validated is exit code 2.
    last = int(sorted((on_ctx.stage2_dir / "val_finetuned").glob("step-*.json"))[-1].stem.split("-")[1])
    assert hdb_main(["pretrain", "compare", "--config", "tiny-cpu", "--output-dir", str(on_ctx.out),
                     "--set", f"compare.against={zero_ctx.out}", "--set", f"compare.step={last}"]) == 0
    assert json.loads((on_ctx.out / "compare.json").read_text())["difference"] == report["difference"]
    assert hdb_main(["pretrain", "compare", "--config", "tiny-cpu", "--output-dir", str(on_ctx.out),
                     "--set", f"compare.step={last + 1}"]) == 2
    # A run whose stage 2 validated no fine-tune has nothing to compare: exit code 2, the setting named.
    assert hdb_main(["pretrain", "compare", "--config", "tiny-cpu", "--output-dir", str(off_ctx.out)]) == 2
    # Keys: off by default leaves the key of runs made before these settings existed; the
    # fine-tune's settings only count when it runs; the val read-out never changes weights.
    assert stage2_key(on_ctx) != stage2_key(off_ctx) != stage2_key(zero_ctx)
    same = make_ctx(tmp_path, tiny_base_dir, corpus, "stage2.finetune_lr=0.5", "stage2.val_finetune_steps=4")
    assert stage2_key(same) == stage2_key(off_ctx)


@pytest.mark.parametrize("setting, match", [
    ("stage2.finetune_steps=-1", r"`stage2.finetune_steps` must be an integer in \[0, 1000\], got -1"),
    ("stage2.finetune_rank=0", r"`stage2.finetune_rank` must be an integer in \[1, 256\], got 0"),
    ("stage2.finetune_lr=2", r"`stage2.finetune_lr` must be in \(0, 1\)"),
    ("stage2.finetune_weight=-1", r"`stage2.finetune_weight` must be >= 0"),
    ("stage2.val_finetune_steps=true", r"`stage2.val_finetune_steps` must be an integer"),
])
def test_bad_fine_tune_settings_are_named(setting, match):
    with pytest.raises(InvalidInputError, match=match):
        load_config("tiny-cpu", [setting])


def test_the_loss_after_the_fine_tune_can_be_the_whole_objective(prepared, tiny_base_dir, corpus):
    """alpha = beta = 0 is refused unless the term after the fine-tune is on; then it is the loss."""
    with pytest.raises(InvalidInputError, match=r"`stage2.alpha`/`stage2.beta` must be >= 0 and not both 0"):
        load_config("tiny-cpu", ["stage2.alpha=0", "stage2.beta=0"])
    with pytest.raises(InvalidInputError, match=r"not both 0 \(unless"):
        load_config("tiny-cpu", ["stage2.alpha=0", "stage2.beta=0", *FT, "stage2.finetune_weight=0"])
    recipe = _recipe(prepared, tiny_base_dir, corpus, "stage2.alpha=0", "stage2.beta=0", *FT,
                     "stage2.finetune_weight=3")
    try:
        loss, parts = recipe._loss_step(0)
        assert parts["diffusion"] == 0.0 and parts["l2"] > 0  # l2 is logged, not trained on
        assert loss.item() == pytest.approx(3 * parts["finetuned"], rel=1e-5)
        loss.backward()  # and it reaches the hypernetwork
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in recipe.model.parameters())
    finally:
        recipe.cleanup()


def test_stage2_init_starts_from_another_runs_weights_and_rejects_another_geometry(prepared, tiny_base_dir, corpus,
                                                                                 tmp_path):
    """`stage2.init`: a regression-trained hypernetwork trained on through the fine-tune starts where it ended."""
    import shutil

    from pretrain.stage2 import run_stage2, stage2_key

    first = tmp_path / "first"
    shutil.copytree(prepared, first, ignore=shutil.ignore_patterns("stage2"))
    ctx = make_ctx(first, tiny_base_dir, corpus)
    run_stage2(ctx)
    final = ctx.stage2_dir / "final.safetensors"
    from hypernet.hypernetwork.export import load_hypernet

    trained = load_hypernet(final)[0].state_dict()
    fresh = _recipe(prepared, tiny_base_dir, corpus)
    warm = _recipe(prepared, tiny_base_dir, corpus, f"stage2.init={final}", *FT)
    try:
        assert all(torch.equal(warm.model.state_dict()[k], v) for k, v in trained.items())
        assert any(not torch.equal(fresh.model.state_dict()[k], v) for k, v in trained.items())
        assert stage2_key(warm.ctx) != stage2_key(make_ctx(prepared, tiny_base_dir, corpus, *FT))
    finally:
        fresh.cleanup()
        warm.cleanup()
    with pytest.raises(InvalidInputError, match=r"`stage2.init` must be a hypernetwork with this run's architecture"):
        _recipe(prepared, tiny_base_dir, corpus, f"stage2.init={final}", "stage2.model.depth=1")


def test_paired_difference_pairs_photos_and_needs_two():
    from pretrain.validation import paired_difference

    a = {"0:1": [0.50, 0.9], "0:2": [0.70, 0.9], "1:0": [0.40, 0.9], "only_a": [9.0, 9.0]}
    b = {"0:1": [0.49, 0.1], "0:2": [0.68, 0.1], "1:0": [0.37, 0.1], "only_b": [0.0, 0.0]}
    d = paired_difference(a, b)  # differences 0.01, 0.02, 0.03 on the shared photos
    assert d["n"] == 3
    assert d["mean"] == pytest.approx(0.02)
    assert d["se"] == pytest.approx(0.01 / 3 ** 0.5)
    with pytest.raises(InvalidInputError, match="at least 2 validation photos, got 1"):
        paired_difference({"x": [1.0, 1.0]}, {"x": [2.0, 2.0]})


def test_person_clustered_standard_error_counts_a_person_once():
    from pretrain.validation import paired_difference, paired_stats, prediction_gap

    diffs = {"0:0": 0.01, "0:1": 0.03, "1:0": 0.02, "1:1": 0.06}
    alone = paired_stats(diffs, {k: k for k in diffs})  # everyone their own person: the photo SE
    assert alone["people"] == 4
    assert alone["se_person"] == pytest.approx(alone["se"], rel=1e-9)
    # Two people, two photos each: centred sums -0.02 + 0.0 and -0.01 + 0.03, scaled by G/(G-1) = 2.
    two = paired_stats(diffs, {"0:0": "ann", "0:1": "ann", "1:0": "bob", "1:1": "bob"})
    assert two["people"] == 2 and two["mean"] == pytest.approx(0.03)
    assert two["se_person"] == pytest.approx(((0.02 ** 2 + 0.02 ** 2) * 2) ** 0.5 / 4, rel=1e-9)
    runs = {"0:0": [0.5, 0.4], "0:1": [0.6, 0.7]}
    assert prediction_gap(runs)["mean"] == pytest.approx(0.0)
    assert paired_difference(runs, runs)["mean"] == 0.0
    with pytest.raises(InvalidInputError, match="`people` must name every photo's person"):
        paired_stats(diffs, {"0:0": "ann"})

"""The evaluation's instruments: dlib embeddings separate identities; bootstrap intervals; overrides."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hypernet.errors import InvalidInputError
from hypernet.eval.conditions import parse_overrides
from hypernet.eval.stats import bootstrap_mean, paired_difference


@pytest.mark.needs_shared
def test_dlib_embeddings_are_closer_within_an_identity_than_across(faces_dir):
    from hypernet.eval.corpus import read_manifest
    from hypernet.eval.faces import FaceEmbedder, cosine
    from hypernet.photos import decode_image, preprocess, to_pil

    corpus = read_manifest(faces_dir / "identities.csv")
    fe = FaceEmbedder()
    embs = {}
    for ident in corpus.identities[:2]:
        imgs = [to_pil(preprocess(decode_image(p), 128, detector="center")) for p in corpus.photos[ident][:2]]
        emb, detected = fe.embed_many(imgs)  # (2, 128), (2,)
        assert detected.all()  # real 128 px face crops are found after the upscale
        assert np.allclose(np.linalg.norm(emb, axis=1), 1)
        embs[ident] = emb
    a, b = embs.values()
    same = (cosine(a, a)[0, 1] + cosine(b, b)[0, 1]) / 2
    across = cosine(a, b).mean()
    assert same > across + 0.05, (same, across)
    blank = fe(Image.new("RGB", (128, 128), "grey"))
    assert not blank.detected and blank.embedding.shape == (128,)


@pytest.mark.needs_shared
def test_facenet_is_a_second_independent_metric_that_separates_identities(faces_dir):
    """FaceNet (cv2.dnn, 512-d) puts one person's photos closer than two people's, finds real faces,
    not a blank image, and disagrees with dlib's similarities (another network, not a copy of it)."""
    from hypernet.eval.corpus import read_manifest
    from hypernet.eval.faces import cosine, load_face_metric
    from hypernet.photos import decode_image, preprocess, to_pil

    corpus = read_manifest(faces_dir / "identities.csv")
    facenet, dlib = load_face_metric("facenet"), load_face_metric("dlib")
    imgs = [to_pil(preprocess(decode_image(p), 128, detector="center"))
            for i in corpus.identities[:2] for p in corpus.photos[i][:2]]  # a, a, b, b
    emb, detected = facenet.embed_many(imgs)  # (4, 512), (4,)
    assert emb.shape == (4, 512) and detected.all() and np.allclose(np.linalg.norm(emb, axis=1), 1)
    sim = cosine(emb, emb)  # (4, 4)
    same, across = (sim[0, 1] + sim[2, 3]) / 2, sim[:2, 2:].mean()
    assert same > across + 0.2, (same, across)  # FaceNet separates far more than dlib's 0.05 above
    dlib_sim = cosine(dlib.embed_many(imgs)[0], dlib.embed_many(imgs)[0])
    assert not np.allclose(sim, dlib_sim, atol=0.05)
    blank = facenet(Image.new("RGB", (128, 128), "grey"))
    assert not blank.detected and blank.embedding.shape == (512,)
    with pytest.raises(InvalidInputError, match="face metric must be one of"):
        load_face_metric("arcface")


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_identities():
    rng = np.random.default_rng(0)
    small = bootstrap_mean(rng.normal(0.5, 0.1, 5))
    large = bootstrap_mean(rng.normal(0.5, 0.1, 200))
    assert small.lo <= small.mean <= small.hi and large.lo <= large.mean <= large.hi
    assert (large.hi - large.lo) < (small.hi - small.lo)
    assert abs(large.mean - 0.5) < 0.03
    assert bootstrap_mean([np.nan, 1.0]).n == 1 and np.isnan(bootstrap_mean([]).mean)
    diff = paired_difference([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])
    assert diff.mean == pytest.approx(0.5) and diff.lo == pytest.approx(0.5)
    with pytest.raises(InvalidInputError, match="`level`"):
        bootstrap_mean([1.0], level=1.5)


def test_overrides_parse_typed_values_and_reject_unknown_conditions():
    o = parse_overrides(["lora.steps=100", "lora.lr=1e-4", "dreambooth.prior_preservation=false", "lidb.prompt=x"])
    assert o == {"lora": {"steps": 100, "lr": 1e-4}, "dreambooth": {"prior_preservation": False},
                 "lidb": {"prompt": "x"}}
    with pytest.raises(InvalidInputError, match="condition must be one of"):
        parse_overrides(["nope.steps=1"])
    with pytest.raises(InvalidInputError, match="CONDITION.KEY=VALUE"):
        parse_overrides(["steps=1"])

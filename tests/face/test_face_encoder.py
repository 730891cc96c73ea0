"""The frozen face encoder: the converted MobileFaceNet equals the original ONNX model, embeds a
batch at once, never trains, and is found / fetched / refused as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hypernet.errors import InvalidInputError, ModelNotFoundError
from hypernet.face_encoder import (
    FACE_ENCODER_ENV,
    FaceEncoder,
    face_encoder_candidates,
    find_face_encoder,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def encoder(face_encoder_file) -> FaceEncoder:
    return FaceEncoder.load(face_encoder_file)


def _faces(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 112, 112, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_batch_equals_the_original_onnx_model_run_one_by_one(encoder, face_encoder_file):
    """onnxruntime on the untouched file (batch fixed at 1, its own (x-127)/128 input) vs the torch
    module on a batch of 3: same unit embeddings."""
    import onnxruntime as ort

    faces = _faces(3)
    with torch.no_grad():
        got = encoder(faces)  # (3, 512)
    assert got.shape == (3, 512)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))
    sess = ort.InferenceSession(str(face_encoder_file), providers=["CPUExecutionProvider"])
    x = (((faces + 1) * 127.5 - 127.0) / 128.0).numpy()
    ref = np.concatenate([sess.run(None, {"input": x[i : i + 1]})[0] for i in range(3)])  # (3, 512)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)


def test_encoder_is_frozen_and_batch_independent(encoder):
    assert not any(p.requires_grad for p in encoder.parameters())
    faces = _faces(2, seed=1)
    with torch.no_grad():
        a = encoder(faces)
        torch.testing.assert_close(encoder(faces[:1]), a[:1])  # per-sample: the batch changes nothing
    emb = encoder(faces.requires_grad_(True))
    emb.sum().backward()
    assert faces.grad is not None and faces.grad.abs().sum() > 0  # gradients still reach the input
    with pytest.raises(InvalidInputError, match=r"`faces` must have shape \(N, 3, 112, 112\)"):
        encoder(torch.zeros(1, 3, 64, 64))


def test_a_different_file_is_refused_and_a_missing_one_explains_how_to_fetch(tmp_path, face_encoder_file,
                                                                              monkeypatch):
    bad = tmp_path / "fr_feature.onnx"
    data = bytearray(face_encoder_file.read_bytes())
    data[-1] ^= 1
    bad.write_bytes(bytes(data))
    with pytest.raises(InvalidInputError, match="sha256"):
        FaceEncoder.load(bad)
    monkeypatch.setenv(FACE_ENCODER_ENV, str(bad))
    assert face_encoder_candidates()[0] == bad and find_face_encoder() == bad  # the env var wins
    monkeypatch.setenv(FACE_ENCODER_ENV, str(tmp_path / "missing.onnx"))
    monkeypatch.setattr("hypernet.face_encoder.default_face_encoder_dir", lambda: tmp_path / "none")
    with pytest.raises(ModelNotFoundError, match="make setup"):
        find_face_encoder()


@pytest.mark.needs_shared
def test_aligned_real_faces_separate_identities(encoder, faces_dir):
    """Two photos each of two Caltech people: same-person cosine well above cross-person."""
    import csv

    from hypernet.face_alignment import align_faces
    from hypernet.photos import decode_image

    rows = list(csv.DictReader((faces_dir / "identities.csv").open()))
    by_id: dict[str, list[str]] = {}
    for r in rows:
        by_id.setdefault(r["identity"], []).append(r["file"])
    people = sorted(by_id)[:2]
    files = [f for p in people for f in sorted(by_id[p])[:2]]
    with torch.no_grad():
        e = encoder(align_faces([decode_image(faces_dir / f) for f in files]))  # (4, 512)
    sim = e @ e.T
    same = torch.stack([sim[0, 1], sim[2, 3]])
    cross = torch.stack([sim[0, 2], sim[0, 3], sim[1, 2], sim[1, 3]])
    assert same.min() > cross.max() + 0.2, sim

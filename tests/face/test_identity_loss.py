"""The identity loss (hypernet.training.identity_loss): latents -> decoded image -> aligned face
-> frozen face embedding -> 1 - cos to the person. With the real TAEF2 and real photos it tells
people apart, and its gradient reaches the latents."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from hypernet.errors import InvalidInputError
from hypernet.face_alignment import grid_theta, to_tensor, warp_face
from hypernet.training.identity_loss import FaceIdentityLoss, face_identity_loss, square_transform

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CROP = 128


def test_square_transform_maps_the_whole_image_onto_the_template():
    M = square_transform(CROP)
    corners = np.array([[-0.5, -0.5, 1.0], [CROP - 0.5, CROP - 0.5, 1.0]])  # pixel edges, centres at integers
    np.testing.assert_allclose(corners @ M.T, [[-0.5, -0.5], [111.5, 111.5]], atol=1e-9)


@pytest.mark.needs_shared("faces", "taef2")
def test_decoded_real_faces_are_closer_to_their_person_and_the_gradient_reaches_the_latents(
        faces_dir, taef2_dir, face_encoder_file):
    from hypernet.base.taef2 import load_taef2
    from hypernet.face_alignment import align_face
    from hypernet.face_encoder import FaceEncoder
    from hypernet.photos import decode_image, detect_landmarks

    rows = list(csv.DictReader((faces_dir / "identities.csv").open()))
    by_id: dict[str, list[str]] = {}
    for r in rows:
        by_id.setdefault(r["identity"], []).append(r["file"])
    people = sorted(by_id, key=int)[:3]
    # Training crops as the corpus holds them: aligned photos, the face in about the same place.
    crops, refs = [], []
    for p in people:
        a, b = (decode_image(faces_dir / f) for f in sorted(by_id[p])[:2])
        crops.append(warp_face(a, detect_landmarks(a), size=CROP))  # (CROP, CROP) aligned crop
        refs.append(align_face(b).face)  # another photo of the person, as prepare embeds it
    encoder = FaceEncoder.load(face_encoder_file)
    vae = load_taef2(taef2_dir)
    loss = face_identity_loss(vae, encoder, crops)
    # The mean landmarks of aligned crops put the decoded face where the template wants it.
    want = grid_theta(square_transform(CROP), (CROP, CROP))
    torch.testing.assert_close(loss.theta, want, atol=0.05, rtol=0)
    with torch.no_grad():
        targets = encoder(torch.stack(refs))  # (3, 512) each person's other photo
        lat = vae.encode(torch.stack([to_tensor(c) for c in crops])).latent_dist.mean  # (3, 32, 16, 16)
    lat.requires_grad_(True)
    own = loss(lat, targets)  # (3,)
    other = loss(lat, targets.roll(1, 0))
    assert own.shape == (3,) and (own < other - 0.1).all(), (own, other)
    own.sum().backward()
    assert lat.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.parameters())  # the encoder and decoder stay frozen
    with pytest.raises(InvalidInputError, match=r"`target` must have shape \(3, D\)"):
        loss(lat, targets[:2])


def test_theta_must_be_one_affine_matrix():
    with pytest.raises(InvalidInputError, match=r"`theta` must have shape \(2, 3\)"):
        FaceIdentityLoss(torch.nn.Linear(1, 1), torch.nn.Identity(), torch.zeros(3, 3))



@pytest.mark.needs_shared("faces")
def test_one_photo_with_a_face_is_aligned_by_its_landmarks(faces_dir):
    """The fast fine-tune has one photo: its landmarks must align the decoded face (the whole-square
    fallback would shrink the face to about half the encoder's frame)."""
    from PIL import Image

    from hypernet.face_alignment import ARCFACE_TEMPLATE
    from hypernet.photos import decode_image, detect_landmarks
    from hypernet.training.identity_loss import mean_face_transform

    img = decode_image(faces_dir / "image_0001.jpg")
    crop = warp_face(img, detect_landmarks(img), size=CROP)  # its landmarks sit on the template at CROP px
    M = mean_face_transform([crop])
    assert M is not None
    on_template = (ARCFACE_TEMPLATE * CROP / 112) @ M[:, :2].T + M[:, 2]  # (5, 2) in the encoder's frame
    np.testing.assert_allclose(on_template, ARCFACE_TEMPLATE, atol=3.0)
    blank = Image.new("RGB", (CROP, CROP), (128, 128, 128))
    assert mean_face_transform([blank]) is None  # no face: the caller falls back to the whole square
    np.testing.assert_allclose(mean_face_transform([crop, blank, blank]), M)  # the photos with a face align
    assert mean_face_transform([blank, blank, blank, crop]) is None  # 1 of 4 is too few to trust


@pytest.mark.parametrize("n_found, n, aligned", [(1, 1, True), (0, 1, False), (1, 3, True), (1, 4, False),
                                                 (2, 4, True), (3, 8, True), (2, 8, False)])
def test_landmark_transform_trusts_one_face_in_up_to_3_photos_and_half_of_more(n_found, n, aligned):
    from hypernet.face_alignment import ARCFACE_TEMPLATE
    from hypernet.training.identity_loss import landmark_transform

    points = ARCFACE_TEMPLATE * 0.5 + 10.0  # (5, 2): a face at half the template's scale
    M = landmark_transform([points] * n_found, n)
    assert (M is not None) == aligned
    if aligned:
        np.testing.assert_allclose(points @ M[:, :2].T + M[:, 2], ARCFACE_TEMPLATE, atol=1e-6)


@pytest.mark.parametrize("name", ["sd15", "sdxl-base-1.0", "sd3-medium", "flux.1-dev"])
def test_decoded_faces_at_real_shape_reach_the_encoders_template(name):
    """The scale-dependent half of the term at each real base's shape (meta device: no weights):
    native latents through that base's VAE decoder and the warp give the encoder's 112 x 112
    input, and gradients reach the latents. (The encoder's input never depends on the base.)"""
    from diffusers import AutoencoderKL

    from hypernet.base.real_configs import BASES

    _, _, _, vae_cfg, _ = BASES[name]
    with torch.device("meta"):
        vae = AutoencoderKL(**vae_cfg)
    side = vae_cfg["sample_size"]  # the native image size; latents are 8x smaller
    scorer = FaceIdentityLoss(vae, torch.nn.Identity(), grid_theta(square_transform(side), (side, side)))
    latents = torch.randn(1, vae_cfg["latent_channels"], side // 8, side // 8, device="meta", requires_grad=True)
    faces = scorer.faces(latents)
    assert faces.shape == (1, 3, 112, 112) and faces.device.type == "meta"
    (grad,) = torch.autograd.grad(faces.sum(), [latents])
    assert grad.shape == latents.shape

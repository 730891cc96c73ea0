"""The probe's math: ridge read-out, target (un)flattening and two-run agreement, on synthetic data
whose answer is known (no model involved)."""

from __future__ import annotations

import pytest
import torch

from hypernet.errors import InvalidInputError
from pretrain.probe import agreement, flatten_targets, ridge_fit, ridge_predict, unflatten_targets


def _targets(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"A_train": torch.randn(n, 3, 1, 5, generator=gen), "B_train": torch.randn(n, 3, 4, 1, generator=gen)}


def test_flatten_round_trips_and_checks_width():
    gen = torch.Generator().manual_seed(0)
    t = _targets(4, gen)
    y = flatten_targets(t)
    assert y.shape == (4, 3 * 5 + 3 * 4) and y.dtype == torch.float64
    back = unflatten_targets(y, t)
    for k in t:
        torch.testing.assert_close(back[k], t[k])
    with pytest.raises(InvalidInputError, match="`y` must have 27 columns, got 26"):
        unflatten_targets(y[:, :-1], t)


def test_ridge_recovers_a_linear_map_and_beats_the_mean_only_when_there_is_one():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 8, generator=gen, dtype=torch.float64)
    w_true = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    y = x @ w_true + 3.0 + 0.01 * torch.randn(200, 6, generator=gen, dtype=torch.float64)
    w, mx, my = ridge_fit(x[:150], y[:150], lam=1e-3)
    torch.testing.assert_close(w, w_true, atol=5e-3, rtol=0)
    err = (ridge_predict(w, mx, my, x[150:]) - y[150:]).pow(2).mean()
    err_mean = (y[:150].mean(0) - y[150:]).pow(2).mean()
    assert err < 1e-3 < err_mean

    # Targets unrelated to x: the read-out cannot beat the training mean by more than noise.
    y_noise = torch.randn(200, 6, generator=gen, dtype=torch.float64)
    w, mx, my = ridge_fit(x[:150], y_noise[:150], lam=10.0)
    err = (ridge_predict(w, mx, my, x[150:]) - y_noise[150:]).pow(2).mean()
    err_mean = (y_noise[:150].mean(0) - y_noise[150:]).pow(2).mean()
    assert err > 0.95 * err_mean


def test_ridge_refuses_bad_arguments():
    x, y = torch.zeros(3, 2), torch.zeros(3, 4)
    with pytest.raises(InvalidInputError, match="`lam` must be > 0, got 0"):
        ridge_fit(x, y, 0)
    with pytest.raises(InvalidInputError, match="same number"):
        ridge_fit(x, y[:2], 1.0)


def test_agreement_tells_reproducible_fits_from_unrelated_ones():
    gen = torch.Generator().manual_seed(2)
    shared = 5.0 * torch.randn(1, 50, generator=gen)  # common to every identity (like a shared init)
    person = torch.randn(20, 50, generator=gen)
    x = shared + person + 0.1 * torch.randn(20, 50, generator=gen)
    y = shared + person + 0.1 * torch.randn(20, 50, generator=gen)
    g = agreement(x, y)
    # The shared part makes everyone look alike raw; centring removes it and leaves the person.
    assert g["same_raw"] > 0.95 and g["different_raw"] > 0.8
    assert g["same_centred"] > 0.95 and abs(g["different_centred"]) < 0.15

    z = shared + torch.randn(20, 50, generator=gen)  # a second run that learned nothing of the person
    g = agreement(x, z)
    assert abs(g["same_centred"] - g["different_centred"]) < 0.2

    with pytest.raises(InvalidInputError, match=">= 2 rows"):
        agreement(x[:1], y[:1])


def test_ridge_curve_grows_with_data_only_when_the_targets_are_predictable():
    from pretrain.probe import ridge_curve

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(160, 16, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(16, 10, generator=gen, dtype=torch.float64) + torch.randn(160, 10, generator=gen,
                                                                               dtype=torch.float64)
    curve = ridge_curve(x, y, [8, 32, 1000], lams=(0.1, 10.0))
    assert sorted(curve) == [8, 32, 128]  # 1000 is capped at the 4 other folds' 128 rows
    gains = [curve[n]["best_gain"] for n in (8, 32, 128)]
    assert gains[0] < gains[1] < gains[2] and gains[2] > 0.8
    assert curve[128]["mean"] > curve[128]["ridge_0.1"]

    noise = torch.randn(160, 10, generator=gen, dtype=torch.float64)
    assert ridge_curve(x, noise, [128], lams=(10.0,))[128]["best_gain"] < 0.05

    with pytest.raises(InvalidInputError, match="`folds` must be >= 2"):
        ridge_curve(x[:3], y[:3], [2], folds=5)


def test_gram_ridge_curve_is_ridge_curve_in_kernel_form():
    """The delta read-out scores predictions through the targets' Gram matrix: on explicit targets
    it must give ridge_curve's numbers exactly, predictable or not."""
    from pretrain.probe import gram_ridge_curve, ridge_curve

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(60, 8, generator=gen, dtype=torch.float64)
    for y in (x @ torch.randn(8, 7, generator=gen, dtype=torch.float64),
              torch.randn(60, 7, generator=gen, dtype=torch.float64)):
        want = ridge_curve(x, y, [10, 48], lams=(0.1, 10.0))
        got = gram_ridge_curve(y @ y.T, x, [10, 48], lams=(0.1, 10.0))
        assert want.keys() == got.keys()
        for n in want:
            for k in want[n]:
                assert got[n][k] == pytest.approx(want[n][k], rel=1e-9, abs=1e-12)
    with pytest.raises(InvalidInputError, match=r"`gram` must have shape \(60, 60\)"):
        gram_ridge_curve(torch.eye(5, dtype=torch.float64), x, [10])


def test_delta_gram_is_the_gram_of_the_layer_products():
    from pretrain.probe import delta_gram, shared_fraction

    gen = torch.Generator().manual_seed(6)
    A = torch.randn(5, 3, 2, 4, generator=gen, dtype=torch.float64)  # (n, L, r, a)
    B = torch.randn(5, 3, 6, 2, generator=gen, dtype=torch.float64)  # (n, L, b, r)
    delta = B @ A  # (n, L, b, a)
    want = torch.einsum("ilba,jlba->ij", delta, delta) / 3
    torch.testing.assert_close(delta_gram(A, B), want)
    # (A, B) and (-A, -B) are the same adapter: the same row of the delta Gram, not of the factors'
    torch.testing.assert_close(delta_gram(-A, -B), want)
    same = delta_gram(A[:1].expand(4, -1, -1, -1), B[:1].expand(4, -1, -1, -1))
    assert shared_fraction(same) == pytest.approx(1.0)  # one adapter for all carries everything
    assert shared_fraction(delta_gram(torch.cat([A[:1], -A[:1]]), torch.cat([B[:1], B[:1]]))) == pytest.approx(0.0)
    with pytest.raises(InvalidInputError, match="must agree on n, L and r"):
        delta_gram(A, B[:, :2])

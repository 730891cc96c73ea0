"""Stage `probe`: can a photo's condition predict its stage-1 target at all? Run it after stage 1.

Stage 2 regresses a photo's condition onto its identity's stage-1 LiDB. That can only generalise
to new people if the targets are a function of the person, and of what the condition sees. Stage 2
costs hours and its validation loss cannot tell "not trained enough" from "nothing to learn". The
probe answers that in seconds, on stage 2's own train/val split of the identities:

    mean         the training identities' mean LiDB: one adapter for everyone, i.e. a hypernetwork
                 that ignores its input. A trained hypernetwork must beat it, not just the zero adapter.
    ridge        closed-form ridge regression from the identity embedding (the face encoder's,
                 averaged over the identity's photos, from prepare's cache) to the target, at
                 several strengths: the best linear read-out of the embedding. On stage 2's split,
                 and 5-fold over every identity at doubling training sizes (a learning curve:
                 whether more identities would make the targets predictable).
    delta        the same mean and 5-fold ridge read-out, scored on the adapter's *effect* rather than
                 its factors: the per-layer product B_train @ A_train (b x a; the weight change up to
                 the frozen aux bases), whose Frobenius error no sign or scale symmetry of the
                 factors can hide. Kernel form (Gram matrices of the products), so the b x a
                 products are never stored. `shared_fraction` = ||mean||^2 / mean ||y||^2 says how
                 much of the targets one adapter for everyone could carry, in each space.
    agreement    with `probe.against` (another stage-1 run of the same identities: another noise
                 seed, or other photos of the same people), the cosine of the two fits of one
                 identity against that of two different identities, raw and centred on the
                 identities' mean. Same-seed-different-noise agreement says whether the fit is
                 reproducible; other-photos agreement says whether it is about the person or the photo.

Writes `probe.json` in the run folder and logs a summary.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from hypernet.errors import InvalidInputError
from hypernet.files import atomic_write_bytes
from hypernet.hypernetwork.losses import weight_mse
from pretrain.cache import PreparedData
from pretrain.context import RunContext
from pretrain.stage1 import load_stage1

log = logging.getLogger(__name__)

PROBE_FILE = "probe.json"
#: ridge strengths tried (on centred embeddings of unit-ish norm); reported all, none chosen on val.
RIDGE_LAMBDAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def flatten_targets(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """{"A_train": (n, L, r, a), "B_train": (n, L, b, r)} -> (n, P) float64, A's entries then B's."""
    return torch.cat([t["A_train"].flatten(1), t["B_train"].flatten(1)], dim=1).double()


def unflatten_targets(y: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `flatten_targets` for rows `y` (m, P), shaped as `like`'s entries (any n)."""
    a_shape, b_shape = like["A_train"].shape[1:], like["B_train"].shape[1:]
    na = a_shape.numel()
    if y.shape[1] != na + b_shape.numel():
        raise InvalidInputError(f"`y` must have {na + b_shape.numel()} columns, got {y.shape[1]}")
    return {"A_train": y[:, :na].reshape(-1, *a_shape).float(), "B_train": y[:, na:].reshape(-1, *b_shape).float()}


def ridge_fit(x: torch.Tensor, y: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ridge regression y ~ (x - mx) @ w + my in closed form.

    Args: x (n, d), y (n, P), lam > 0. Returns (w (d, P), mx (d,), my (P,)), float64.
    """
    if not lam > 0:
        raise InvalidInputError(f"`lam` must be > 0, got {lam!r}")
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise InvalidInputError(f"`x` and `y` must have the same number (>= 2) of rows, got {x.shape[0]}, {y.shape[0]}")
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    xc = x - mx  # (n, d)
    gram = xc.T @ xc + lam * torch.eye(x.shape[1], dtype=torch.float64)  # (d, d)
    w = torch.linalg.solve(gram, xc.T @ (y - my))  # (d, P)
    return w, mx, my


def ridge_predict(w: torch.Tensor, mx: torch.Tensor, my: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(m, d) -> (m, P)."""
    return (x.double() - mx) @ w + my


def ridge_curve(x: torch.Tensor, y: torch.Tensor, sizes: list[int], lams=RIDGE_LAMBDAS, folds: int = 5,
                seed: int = 0) -> dict[int, dict[str, float]]:
    """K-fold cross-validated read-out error at several training-set sizes (a learning curve).

    Stage 2's own validation split is small (3% of the identities); the curve uses every identity:
    rows are shuffled (seeded) into `folds` folds; each fold is predicted from the first n rows of
    the others, for every n in `sizes` (capped at what the other folds hold).

    Args: x (N, d), y (N, P). Returns {n: {"mean": mse, "ridge_<lam>": mse, ..., "best_gain": 1 -
    best ridge / mean}}, mse = squared error summed over P, averaged over the held-out rows.
    """

    def fold_errors(train: torch.Tensor, held: torch.Tensor) -> dict[str, float]:
        yt, yh = y[train].double(), y[held].double()
        errs = {"mean": float((yt.mean(0) - yh).pow(2).sum(1).sum())}
        for lam in lams:
            pred = ridge_predict(*ridge_fit(x[train], yt, lam), x[held])
            errs[f"ridge_{lam:g}"] = float((pred - yh).pow(2).sum(1).sum())
        return errs

    return _cross_validate(x.shape[0], sizes, folds, seed, fold_errors)


def _cross_validate(n_all: int, sizes: list[int], folds: int, seed: int, fold_errors) -> dict[int, dict[str, float]]:
    """The learning curve's folds, shared by `ridge_curve` and `gram_ridge_curve`: rows shuffled
    (seeded) into `folds` folds; each fold scored by `fold_errors(train_rows, held_rows)` -> summed
    squared errors by name, from the first n rows of the other folds for every n in `sizes`."""
    if folds < 2 or n_all < folds:
        raise InvalidInputError(f"`folds` must be >= 2 and <= the {n_all} rows, got {folds}")
    order = torch.randperm(n_all, generator=torch.Generator().manual_seed(seed))
    parts = order.chunk(folds)
    out: dict[int, dict[str, float]] = {}
    for n in sizes:
        sums: dict[str, float] = {}
        for k, held in enumerate(parts):
            train = torch.cat([p for j, p in enumerate(parts) if j != k])[:n]
            if len(train) < 2:
                raise InvalidInputError(f"`sizes` must be >= 2, got {n}")
            for key, e in fold_errors(train, held).items():
                sums[key] = sums.get(key, 0.0) + e
        row = {key: v / n_all for key, v in sums.items()}
        row["best_gain"] = 1 - min(v for key, v in row.items() if key.startswith("ridge_")) / row["mean"]
        out[min(n, n_all - len(parts[0]))] = row
    return out


def delta_gram(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Gram matrix of the identities' per-layer products B_train @ A_train, averaged over layers.

    Args: A (n, L, r, a), B (n, L, b, r). Returns G (n, n) float64 with G[i, j] = mean over layers
    of <B_i A_i, B_j A_j>_F = sum_rs (B_i^T B_j)_rs (A_i A_j^T)_rs: no (n, L, b, a) tensor is built.
    """
    if A.dim() != 4 or B.dim() != 4 or A.shape[:3] != (B.shape[0], B.shape[1], B.shape[3]):
        raise InvalidInputError(f"`A` (n, L, r, a) and `B` (n, L, b, r) must agree on n, L and r, got "
                                f"{tuple(A.shape)} and {tuple(B.shape)}")
    n, L = A.shape[:2]
    G = torch.zeros(n, n, dtype=torch.float64)
    for layer in range(L):
        bb = torch.einsum("ibr,jbs->ijrs", B[:, layer].double(), B[:, layer].double())  # (n, n, r, r)
        aa = torch.einsum("ira,jsa->ijrs", A[:, layer].double(), A[:, layer].double())  # (n, n, r, r)
        G += (bb * aa).sum((2, 3))
    return G / L


def gram_ridge_curve(gram: torch.Tensor, x: torch.Tensor, sizes: list[int], lams=RIDGE_LAMBDAS, folds: int = 5,
                     seed: int = 0) -> dict[int, dict[str, float]]:
    """`ridge_curve` for targets known only through their Gram matrix (n, n): the same folds, means
    and ridge fits (every prediction is a weighted sum of training rows, so its squared error is a
    quadratic form in the Gram matrix). `ridge_curve(x, y, ...)` == `gram_ridge_curve(y @ y.T, x, ...)`."""
    n_all = x.shape[0]
    if gram.shape != (n_all, n_all):
        raise InvalidInputError(f"`gram` must have shape ({n_all}, {n_all}), got {tuple(gram.shape)}")
    G, x = gram.double(), x.double()

    def fold_errors(train: torch.Tensor, held: torch.Tensor) -> dict[str, float]:
        nt = len(train)
        g_tt, g_ht, g_hh = G[train][:, train], G[held][:, train], G[held, held].sum()  # G[held, held]: diagonal
        errs = {"mean": _gram_error(torch.full((len(held), nt), 1 / nt, dtype=torch.float64), g_tt, g_ht, g_hh)}
        mx = x[train].mean(0)
        xc, xh = x[train] - mx, x[held] - mx  # (nt, d), (h, d)
        for lam in lams:
            alpha = xh @ torch.linalg.solve(xc.T @ xc + lam * torch.eye(x.shape[1], dtype=torch.float64), xc.T)
            w = alpha + (1 - alpha.sum(1, keepdim=True)) / nt  # ybar + alpha (Y - ybar) as weights on Y
            errs[f"ridge_{lam:g}"] = _gram_error(w, g_tt, g_ht, g_hh)
        return errs

    return _cross_validate(n_all, sizes, folds, seed, fold_errors)


def _gram_error(w: torch.Tensor, g_tt: torch.Tensor, g_ht: torch.Tensor, g_hh: torch.Tensor) -> float:
    """Summed squared error of predictions w @ Y_train (w (h, nt)) of held-out rows, from Gram blocks:
    sum_h ||w_h Y_t - y_h||^2 = sum(w G_tt * w) - 2 sum(w * G_ht) + sum(diag G_hh)."""
    return float((w @ g_tt * w).sum() - 2 * (w * g_ht).sum() + g_hh)


def shared_fraction(gram: torch.Tensor) -> float:
    """||mean of the rows||^2 / mean ||row||^2 from their Gram matrix: what one adapter for all carries."""
    return float(gram.mean() / gram.diagonal().mean())


def agreement(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Row i of `x` and of `y` are two fits of identity i (n >= 2 rows, P columns).

    -> mean cosine of the same identity's two fits and of different identities' fits (every
    ordered pair i != j of x_i, y_j), raw and after subtracting each run's mean over identities
    (the shared part: init and what every person has in common).
    """
    n = x.shape[0]
    if n < 2 or y.shape != x.shape:
        raise InvalidInputError(f"`x` and `y` must have the same shape with >= 2 rows, got {tuple(x.shape)}, "
                                f"{tuple(y.shape)}")

    def cos_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = torch.nn.functional.normalize(a.double(), dim=1)
        b = torch.nn.functional.normalize(b.double(), dim=1)
        return a @ b.T  # (n, n)

    off = ~torch.eye(n, dtype=torch.bool)
    out = {}
    for name, (a, b) in {"raw": (x, y), "centred": (x - x.mean(0), y - y.mean(0))}.items():
        c = cos_matrix(a, b)
        out[f"same_{name}"] = float(c.diagonal().mean())
        out[f"different_{name}"] = float(c[off].mean())
    return out


def _photo_weights(data: PreparedData, ids: list[str]) -> torch.Tensor:
    """(n,) photos per identity: stage 2 validates per photo, so the probe weights identities alike."""
    return torch.tensor([len(data.rows(i)) for i in ids], dtype=torch.float64)


def _weighted_mse(pred: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor], w: torch.Tensor) -> float:
    per = weight_mse(pred, tgt, reduction="none").double()  # (n,)
    return float((per * w).sum() / w.sum())


def run_probe(ctx: RunContext) -> dict:
    """Measure, write probe.json, log; -> the result dict."""
    data = PreparedData(ctx.prepared_dir)
    s1 = load_stage1(ctx.stage1_dir)
    ids = {s: s1.fitted(data.identities(s)) for s in ("train", "val")}
    if len(ids["train"]) < 2 or not ids["val"]:
        raise InvalidInputError(
            f"probe must have >= 2 training and >= 1 validation identities with stage-1 targets, got "
            f"{len(ids['train'])} and {len(ids['val'])}: run `stage1` on more identities (or raise data.val_fraction)"
        )
    tgt = {s: s1.targets(v) for s, v in ids.items()}
    y = {s: flatten_targets(t) for s, t in tgt.items()}  # (n, P)
    w_val = _photo_weights(data, ids["val"])
    zero = {k: torch.zeros_like(v) for k, v in tgt["val"].items()}
    mean = unflatten_targets(y["train"].mean(0, keepdim=True).expand(len(ids["val"]), -1), tgt["val"])
    res: dict = {
        "identities": {s: len(v) for s, v in ids.items()},
        "val_weight_mse": {"zero": _weighted_mse(zero, tgt["val"], w_val),
                           "mean": _weighted_mse(mean, tgt["val"], w_val)},
        "train_weight_mse": {},
    }
    if ctx.cfg.stage2.model.uses_identity:
        from pretrain.face_embeddings import FaceEmbeddings, embeddings_key, ensure_face_embeddings

        ensure_face_embeddings(ctx)
        fe = FaceEmbeddings(ctx.prepared_dir, embeddings_key(ctx))
        x = {s: torch.stack([fe.get(data.rows(i)).double().mean(0) for i in v]) for s, v in ids.items()}  # (n, 512)
        w_train = _photo_weights(data, ids["train"])
        for lam in RIDGE_LAMBDAS:
            fit = ridge_fit(x["train"], y["train"], lam)
            for s, wts, out in (("val", w_val, res["val_weight_mse"]), ("train", w_train, res["train_weight_mse"])):
                pred = unflatten_targets(ridge_predict(*fit, x[s]), tgt[s])
                out[f"ridge_{lam:g}"] = _weighted_mse(pred, tgt[s], wts)
        # Every identity, 5-fold, at doubling training sizes: does predictability grow with the corpus?
        x_all, y_all = torch.cat([x["train"], x["val"]]), torch.cat([y["train"], y["val"]])
        sizes = [n for n in (2 ** k for k in range(5, 20)) if n < len(y_all) * 4 // 5] + [len(y_all)]
        folds = min(5, len(y_all))  # >= 3: the split above has >= 2 train and >= 1 val identities
        res["cross_validated"] = {str(n): r for n, r in ridge_curve(x_all, y_all, sizes, folds=folds).items()}
        t_all = {k: torch.cat([tgt["train"][k], tgt["val"][k]]) for k in ("A_train", "B_train")}
        g_delta = delta_gram(t_all["A_train"], t_all["B_train"])
        res["delta"] = {"shared_fraction": shared_fraction(g_delta),
                        "shared_fraction_factors": shared_fraction(y_all @ y_all.T),
                        "cross_validated": {str(n): r for n, r in
                                            gram_ridge_curve(g_delta, x_all, sizes, folds=folds).items()}}
    else:
        res["ridge"] = "skipped: the pixel condition has no cached identity embedding"
    against = ctx.cfg.probe.against
    if against:
        other = load_stage1(Path(against))
        both = sorted(set(s1.identities) & set(other.identities))
        if len(both) < 2:
            raise InvalidInputError(f"`probe.against` must share >= 2 identities with this run's stage 1, got "
                                    f"{len(both)} in {against}")
        a, b = s1.targets(both), other.targets(both)
        res["agreement"] = {"against": str(against), "identities": len(both),
                            **{k: agreement(a[k].flatten(1), b[k].flatten(1)) for k in ("A_train", "B_train")}}
    atomic_write_bytes(ctx.out / PROBE_FILE, json.dumps(res, indent=1).encode())
    v = res["val_weight_mse"]
    ridge = {k: m for k, m in v.items() if k.startswith("ridge_")}
    best = min(ridge.items(), key=lambda kv: kv[1]) if ridge else None
    log.info("probe: val weight MSE zero %.4f, training mean %.4f%s (%d train / %d val identities)",
             v["zero"], v["mean"], f", best ridge {best[1]:.4f} ({best[0]})" if best else "",
             len(ids["train"]), len(ids["val"]))
    if best and best[1] >= v["mean"] * 0.99:
        log.warning("probe: the identity embedding predicts the held-out targets no better than their mean "
                    "(best ridge %.4f vs mean %.4f): stage 2's weight loss can only teach the mean", best[1], v["mean"])
    for n, r in res.get("cross_validated", {}).items():
        log.info("probe: 5-fold, %s training identities: best ridge %.3f%% below the training mean", n,
                 100 * r["best_gain"])
    if "delta" in res:
        dl = res["delta"]
        last = list(dl["cross_validated"].items())[-1]
        log.info("probe: delta space (B_train @ A_train): the mean carries %.1f%% of the targets' energy (factors: "
                 "%.1f%%); 5-fold, %s identities: best ridge %.3f%% below the mean", 100 * dl["shared_fraction"],
                 100 * dl["shared_fraction_factors"], last[0], 100 * last[1]["best_gain"])
    if "agreement" in res:
        g = res["agreement"]["B_train"]
        log.info("probe: B_train cosine, same identity %.3f vs different %.3f (centred %.3f vs %.3f) against %s",
                 g["same_raw"], g["different_raw"], g["same_centred"], g["different_centred"], against)
    log.info("probe: wrote %s", ctx.out / PROBE_FILE)
    return res


__all__ = ["PROBE_FILE", "RIDGE_LAMBDAS", "agreement", "delta_gram", "flatten_targets", "gram_ridge_curve",
           "ridge_curve", "ridge_fit", "ridge_predict", "run_probe", "shared_fraction", "unflatten_targets"]

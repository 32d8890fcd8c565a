"""Evaluation metrics for attribution scores: the linear datamodeling score and AUC.

The linear datamodeling score (LDS, paper Sec. 3 "Evaluation Metric") asks how well the
additive prediction ``Σ_{j∈S} I[t, j]`` ranks the true test losses of models retrained on
random training subsets ``S``. This module draws the subsets, scores a method, and
estimates the best score any additive (linear datamodel) prediction could reach on the
same subsets. The retraining itself is model specific and lives elsewhere (for linear
regression, :func:`iif_ref.linear.subset_test_losses`).

Sign: scores follow ``docs/conventions.md`` (``I > 0`` pushes the test loss up), so a
good method has a *positive* LDS: subsets holding many opponents have high test loss.
"""
from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.linalg import cho_factor, cho_solve
from scipy.stats import ConstantInputWarning

from iif_ref._optional import require
from iif_ref._validation import (as_float_array, as_generator, check_nonnegative_real,
                                 check_positive_int)

__all__ = [
    "random_subset_masks",
    "subset_size",
    "lds",
    "lds_ceiling",
    "DatamodelCeiling",
    "auc",
]


def _check_fraction(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (0.0 < value < 1.0):
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value}")
    return value


def subset_size(n_train, alpha):
    """Number of samples in each random subset: ``alpha * n_train`` rounded, halves up.

    Parameters
    ----------
    n_train : int
        Size of the training set (>= 2).
    alpha : float
        Subset fraction, ``0 < alpha < 1``.

    Returns
    -------
    int
        ``floor(alpha * n_train + 1/2)``, which must lie in ``[1, n_train - 1]``: an empty
        subset has no model, and the full set makes every subset equal (no ranking).
    """
    n_train = check_positive_int(n_train, "n_train")
    alpha = _check_fraction(alpha, "alpha")
    size = int(np.floor(alpha * n_train + 0.5))
    if not 1 <= size <= n_train - 1:
        raise ValueError(
            f"alpha={alpha} with n_train={n_train} gives subsets of {size} sample(s); "
            f"need between 1 and n_train - 1 = {n_train - 1}")
    return size


def random_subset_masks(n_train, n_subsets, *, alpha=0.5, seed):
    """Draw random training subsets of a fixed size, as boolean masks.

    Parameters
    ----------
    n_train : int
        Number of training samples.
    n_subsets : int
        Number of subsets (the paper uses 5000).
    alpha : float, default 0.5
        Fraction of the training set in each subset. Every subset holds exactly
        :func:`subset_size` ``(n_train, alpha)`` samples (``alpha * n_train`` rounded to the
        nearest integer, halves up), so no subset is empty.
    seed : int or numpy.random.Generator
        Randomness; the same int gives the same masks.

    Returns
    -------
    masks : ndarray of bool, shape (n_subsets, n_train)
        ``masks[s, j]`` is True when training sample ``j`` is in subset ``s``. Subsets are
        drawn independently, uniformly among all subsets of that size.

    Examples
    --------
    >>> m = random_subset_masks(10, 4, alpha=0.3, seed=0)
    >>> m.shape, m.sum(axis=1).tolist()
    ((4, 10), [3, 3, 3, 3])
    """
    n_train = check_positive_int(n_train, "n_train")
    n_subsets = check_positive_int(n_subsets, "n_subsets")
    size = subset_size(n_train, alpha)
    rng = as_generator(seed)
    base = np.zeros(n_train, dtype=bool)
    base[:size] = True
    # An independent uniform permutation of the same row per subset: exact size, uniform.
    return rng.permuted(np.broadcast_to(base, (n_subsets, n_train)), axis=1)


def _check_masks(masks, name="masks"):
    arr = np.asarray(masks)
    if arr.dtype != np.bool_:
        if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise TypeError(f"{name} must be a boolean array, got dtype {arr.dtype}")
        if not np.all((arr == 0) | (arr == 1)):
            raise ValueError(f"{name} must hold only 0/1 or True/False")
        arr = arr.astype(bool)
    if arr.ndim != 2:
        raise ValueError(f"{name} must have 2 dimensions (n_subsets, n_train), got shape {arr.shape}")
    if arr.shape[0] < 2 or arr.shape[1] < 1:
        raise ValueError(f"{name} needs at least 2 subsets and 1 training sample, "
                         f"got shape {arr.shape}")
    return arr


def _check_lds_inputs(scores, masks, subset_losses):
    masks = _check_masks(masks)
    n_subsets, n_train = masks.shape
    scores = as_float_array(scores, "scores", ndim=(2, 3))
    subset_losses = as_float_array(subset_losses, "subset_losses", ndim=2)
    if scores.shape[-1] != n_train:
        raise ValueError(f"scores has shape {scores.shape} but masks has {n_train} training "
                         f"columns; scores must be ([n_methods,] n_test, {n_train})")
    if subset_losses.shape[0] != n_subsets:
        raise ValueError(f"subset_losses has shape {subset_losses.shape} but masks has "
                         f"{n_subsets} subsets; subset_losses must be ({n_subsets}, n_test)")
    if subset_losses.shape[1] != scores.shape[-2]:
        raise ValueError(f"scores has {scores.shape[-2]} test rows but subset_losses has "
                         f"{subset_losses.shape[1]} test columns")
    return scores, masks, subset_losses


def _check_subset_index(subset_index, n_subsets):
    if subset_index is None:
        return slice(None)
    idx = np.asarray(subset_index)
    if idx.dtype == np.bool_:
        if idx.shape != (n_subsets,):
            raise ValueError(f"boolean subset_index must have shape ({n_subsets},), got {idx.shape}")
        idx = np.flatnonzero(idx)
    elif not np.issubdtype(idx.dtype, np.integer) or idx.ndim != 1:
        raise TypeError(f"subset_index must be a 1-D integer or boolean array, got dtype "
                        f"{idx.dtype} and shape {idx.shape}")
    if idx.size < 2:
        raise ValueError(f"subset_index selects {idx.size} subset(s); a rank correlation needs >= 2")
    if idx.min() < -n_subsets or idx.max() >= n_subsets:
        raise ValueError(f"subset_index out of range for {n_subsets} subsets")
    return idx


def _average_ranks(a):
    """Ranks (1-based, ties get their average rank) along the last axis of ``a``.

    Equal to ``scipy.stats.rankdata(a, method="average", axis=-1)`` (tested), about twice
    as fast on (n_test, n_subsets) blocks: one argsort per row, tie groups found on the
    sorted values, and a flat scatter back. LDS ranks thousands of such blocks.
    """
    n = a.shape[-1]
    flat = a.reshape(-1, n)
    order = np.argsort(flat, axis=-1)
    sorted_vals = np.take_along_axis(flat, order, axis=-1)
    new_group = sorted_vals[:, 1:] != sorted_vals[:, :-1]
    if new_group.all():
        ranks_sorted = np.broadcast_to(np.arange(1.0, n + 1.0), flat.shape)
    else:
        pos = np.arange(n)
        starts = np.ones(flat.shape, dtype=bool)
        starts[:, 1:] = new_group
        ends = np.ones(flat.shape, dtype=bool)
        ends[:, :-1] = new_group
        first = np.maximum.accumulate(np.where(starts, pos, 0), axis=-1)
        last = np.minimum.accumulate(np.where(ends, pos, n)[:, ::-1], axis=-1)[:, ::-1]
        ranks_sorted = (first + last) / 2.0 + 1.0
    out = np.empty(flat.shape)
    # Scatter through flat indices: cheaper than fancy 2-D indexing or put_along_axis.
    out.ravel()[(order + n * np.arange(flat.shape[0])[:, None]).ravel()] = ranks_sorted.ravel()
    return out.reshape(a.shape)


def _centred(r):
    r = r - r.mean(axis=-1, keepdims=True)
    return r, np.einsum("...i,...i->...", r, r)


def _rank_correlation(target, predicted, *, what):
    """Spearman correlation along the last axis of ``target`` (n_test, n) and
    ``predicted`` (..., n_test, n).

    Pearson of average ranks — the definition ``scipy.stats.spearmanr`` uses. The target
    is ranked once for every stack of predictions. A row that is constant in either has
    no rank correlation: its entry is NaN and a ``ConstantInputWarning`` names it.
    """
    rt, st = _centred(_average_ranks(target))
    rp, sp = _centred(_average_ranks(predicted))
    num = np.einsum("...ti,ti->...t", rp, rt)
    den = np.sqrt(sp * st)
    constant = den == 0.0
    out = np.divide(num, den, out=np.full(num.shape, np.nan), where=~constant)
    if constant.any():
        bad = np.unique(np.nonzero(constant)[-1])
        shown = ", ".join(map(str, bad[:20])) + (" ..." if bad.size > 20 else "")
        warnings.warn(
            f"{what}: {bad.size} test point(s) have constant subset losses or constant "
            f"predicted losses over the subsets, so their rank correlation is undefined "
            f"and returned as NaN; test indices: {shown}",
            ConstantInputWarning, stacklevel=3)
    # Rounding can push |r| a hair above 1; clip so downstream code sees a correlation.
    return np.clip(out, -1.0, 1.0)


def lds(scores, masks, subset_losses, *, subset_index=None):
    """Linear datamodeling score of attribution scores, one value per test point.

    Parameters
    ----------
    scores : array_like, shape (n_test, n_train) or (n_methods, n_test, n_train)
        Attribution scores ``I[t, j]`` (``docs/conventions.md`` sign: positive pushes the
        test loss up). A stack of several methods' scores is scored against the same
        subsets, ranking the subset losses once.
    masks : array_like of bool, shape (n_subsets, n_train)
        Training subsets, e.g. from :func:`random_subset_masks`.
    subset_losses : array_like, shape (n_subsets, n_test)
        Test loss ``L_test(ẑ_t; θ_S)`` of the model retrained on each subset.
    subset_index : array_like of int or bool, optional
        Score only these subsets (e.g. the held-out half returned by
        :func:`lds_ceiling`, so a method and the ceiling are compared on the same subsets).

    Returns
    -------
    lds : ndarray, shape (n_test,) or (n_methods, n_test)
        ``lds[t] = spearman_s( subset_losses[s, t], Σ_{j∈S_s} scores[t, j] )``.
        Where the subset losses or the predictions are constant over the subsets the
        correlation is undefined: that entry is NaN *and* a
        ``scipy.stats.ConstantInputWarning`` names the test indices. Average with
        ``np.nanmean`` and report how many were NaN.

    Notes
    -----
    Implements the LDS of the paper's Sec. 3 ("Evaluation Metric"): the Spearman rank
    correlation between ``p_s = L_test(z, θ_{S_s})`` and ``q_s = Σ_{j∈S_s} I(j)``. Ranks use
    average ties, as ``scipy.stats.spearmanr`` does; the computation is vectorised over
    test points (and methods).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> m = random_subset_masks(20, 200, seed=1)
    >>> w = rng.normal(size=(3, 20))
    >>> losses = 5.0 + (m @ w.T) ** 3      # monotone in the additive prediction
    >>> np.allclose(lds(w, m, losses), 1.0)
    True
    """
    scores, masks, subset_losses = _check_lds_inputs(scores, masks, subset_losses)
    idx = _check_subset_index(subset_index, masks.shape[0])
    m = masks[idx].astype(np.float64)
    # (..., n_test, n_subsets): subsets on the contiguous axis, where the ranking runs.
    predicted = scores @ m.T
    target = np.ascontiguousarray(subset_losses[idx].T)
    return _rank_correlation(target, predicted, what="lds")


@dataclass(frozen=True)
class DatamodelCeiling:
    """An estimate of the best LDS an additive prediction reaches on given subsets.

    Attributes
    ----------
    ceiling : ndarray, shape (n_test,)
        Held-out Spearman correlation of the fitted linear datamodel (NaN, with a warning,
        where it is undefined — see :func:`lds`).
    eval_index : ndarray of int, shape (n_eval,)
        The held-out subsets the ceiling was scored on; pass it to
        ``lds(..., subset_index=eval_index)`` to score a method on the same subsets.
    fit_index : ndarray of int, shape (n_fit,)
        The subsets the datamodel was fitted on.
    weights : ndarray, shape (n_test, n_train)
        Fitted per-sample datamodel weights ``w[t, j]`` (same sign convention as scores).
        When every subset has the same size (as :func:`random_subset_masks` draws them)
        the weights are identified only up to a common shift ``w + c`` (absorbed by the
        intercept); the ridge picks the smallest-norm one. Rankings do not depend on it.
    intercept : ndarray, shape (n_test,)
        Fitted intercepts ``b[t]``.
    ridge : float
        The ridge penalty used.
    """

    ceiling: np.ndarray
    eval_index: np.ndarray
    fit_index: np.ndarray
    weights: np.ndarray
    intercept: np.ndarray
    ridge: float


def lds_ceiling(masks, subset_losses, *, fit_fraction=0.5, ridge=1e-3, seed):
    """Estimate the LDS ceiling with a linear datamodel fitted on part of the subsets.

    Fits ``subset_losses[s, t] ≈ b[t] + Σ_j masks[s, j] w[t, j]`` by ridge regression on a
    random ``fit_fraction`` of the subsets, then scores the fitted ``w`` like attribution
    scores (Spearman, as in :func:`lds`) on the remaining, held-out subsets.

    Parameters
    ----------
    masks : array_like of bool, shape (n_subsets, n_train)
    subset_losses : array_like, shape (n_subsets, n_test)
    fit_fraction : float, default 0.5
        Fraction of the subsets used for fitting (rounded to the nearest integer, halves
        up); the rest are held out. At least 2 subsets must fall on each side.
    ridge : float, default 1e-3
        Penalty on ``‖w‖²`` (the intercept is not penalised), in units of the summed
        squared loss over fitted subsets. With centred masks the normal matrix has diagonal
        ``≈ n_fit · α(1 − α)``, so the default is negligible whenever the problem is
        over-determined (``n_fit > n_train``) and merely makes it solvable otherwise.
    seed : int or numpy.random.Generator
        Randomness of the fit/held-out split.

    Returns
    -------
    DatamodelCeiling
        ``.ceiling`` (n_test,) plus the split (``.eval_index``) so methods can be scored on
        the same held-out subsets.

    Notes
    -----
    This is an *estimate*, not a bound. The datamodel is fitted from finitely many noisy
    subsets, so with few subsets (or ``n_fit`` not much larger than ``n_train``) it is
    itself noisy and can score *below* a good attribution method — an exact method such
    as leave-one-out in linear regression can beat it. It is scored on half the subsets,
    so compare methods against it with ``lds(..., subset_index=result.eval_index)``,
    not with their LDS on all subsets (those two differ only by subset sampling noise).
    """
    masks = _check_masks(masks)
    subset_losses = as_float_array(subset_losses, "subset_losses", ndim=2)
    n_subsets, n_train = masks.shape
    if subset_losses.shape[0] != n_subsets:
        raise ValueError(f"subset_losses has shape {subset_losses.shape} but masks has "
                         f"{n_subsets} subsets")
    fit_fraction = _check_fraction(fit_fraction, "fit_fraction")
    ridge = check_nonnegative_real(ridge, "ridge")
    rng = as_generator(seed)
    n_fit = int(np.floor(fit_fraction * n_subsets + 0.5))
    if n_fit < 2 or n_subsets - n_fit < 2:
        raise ValueError(f"fit_fraction={fit_fraction} of {n_subsets} subsets leaves "
                         f"{n_fit} to fit and {n_subsets - n_fit} to hold out; need >= 2 each")
    perm = rng.permutation(n_subsets)
    fit_index = np.sort(perm[:n_fit])
    eval_index = np.sort(perm[n_fit:])

    M = masks[fit_index].astype(np.float64)
    L = subset_losses[fit_index]
    m_mean = M.mean(axis=0)
    l_mean = L.mean(axis=0)
    Mc = M - m_mean
    # Centring removes the intercept from the penalised problem. With fixed-size subsets
    # the centred masks are exactly rank deficient along the all-ones direction, where
    # the normal matrix has eigenvalue `ridge`: its condition number is ≈ n_fit/(4 ridge)
    # (≈ 6e5 at the defaults and 2500 fitted subsets), harmless for a float64 Cholesky.
    if ridge > 0:
        gram = Mc.T @ Mc
        gram[np.diag_indices_from(gram)] += ridge
        W = cho_solve(cho_factor(gram), Mc.T @ (L - l_mean))        # (n_train, n_test)
    else:
        W, *_ = np.linalg.lstsq(Mc, L - l_mean, rcond=None)         # minimum norm
    intercept = l_mean - m_mean @ W
    ceiling = lds(W.T, masks, subset_losses, subset_index=eval_index)
    return DatamodelCeiling(ceiling=ceiling, eval_index=eval_index, fit_index=fit_index,
                            weights=W.T.copy(), intercept=intercept, ridge=ridge)


def auc(scores_for_positive, is_positive):
    """Area under the ROC curve of scores that should be high for the positive class.

    Parameters
    ----------
    scores_for_positive : array_like, shape (n,)
        Higher means "more likely positive" (for mislabel detection pass e.g. the
        self-influence oriented so that mislabelled samples score high).
    is_positive : array_like of bool, shape (n,)
        Ground truth; both classes must be present.

    Returns
    -------
    float
        ``sklearn.metrics.roc_auc_score(is_positive, scores_for_positive)``; 0.5 is chance.
    """
    scores = as_float_array(scores_for_positive, "scores_for_positive", ndim=1)
    labels = np.asarray(is_positive)
    if labels.dtype != np.bool_:
        if not np.issubdtype(labels.dtype, np.number) or not np.all((labels == 0) | (labels == 1)):
            raise TypeError(f"is_positive must be boolean (or 0/1), got dtype {labels.dtype}")
        labels = labels.astype(bool)
    if labels.shape != scores.shape:
        raise ValueError(f"is_positive has shape {labels.shape} but scores_for_positive has "
                         f"shape {scores.shape}")
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        raise ValueError(f"is_positive must contain both classes, got {n_pos} positive of "
                         f"{labels.size}")
    metrics = require("sklearn.metrics", "iif_ref.metrics.auc")   # lazy: optional ([data])
    return float(metrics.roc_auc_score(labels, scores))

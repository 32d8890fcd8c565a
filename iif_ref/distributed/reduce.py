"""Reductions over the feature store: projected Fisher, its factors, blockwise scores.

For each path step ``s`` (Eq. 10, 17, 31), with ``Phi_s``, ``Psi_s`` of shape
``(n_train, P)`` in the store and ``Gamma_s`` of shape ``(n_test, P)``:

1. ``F_s = Σ_chunks Phi_s[c]ᵀ Phi_s[c] + lam_d,s I`` — a tree reduction of per-chunk
   Gram matrices, accumulated in float64;
2. one Cholesky factorisation of ``F_s`` per step, on the driver (``P × P``);
3. ``W_s = F_s⁻¹ Gamma_sᵀ`` (``P × n_test``), broadcast to the workers;
4. scores block by block, ``I[test_block, chunk] = −Σ_s (Psi_s[chunk] W_s[:, test_block])ᵀ``,
   so a worker holds one ``(test_block × chunk_rows)`` block at a time;
5. per test point, the ``k`` most negative (proponents) and most positive (opponents)
   scores and the score sums, merged as a tree across chunks without materialising the
   score matrix.

This equals :func:`iif_ref.kernels.projected_scores` on the concatenated features; only
the summation order of the Gram (tree vs. one GEMM) and of the solve differs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from iif_ref.distributed import _executor
from iif_ref.kernels import FisherFactor, factor_fisher

__all__ = ["FisherFactors", "fisher_grams", "factor_fishers", "score_blocks", "topk_merge"]


# --------------------------------------------------------------------------- Gram
def _gram_chunk(store, chunk):
    """Worker task: ``(S, P, P)`` float64 Grams ``Phi_s[c]ᵀ Phi_s[c]`` of one chunk."""
    out = np.empty((len(store.steps), store.proj_dim, store.proj_dim))
    for s in range(len(store.steps)):
        phi = store.read(s, "Phi", chunk).astype(np.float64)
        out[s] = phi.T @ phi
    return out


def _sum(parts):
    total = np.array(parts[0], dtype=np.float64, copy=True)
    for p in parts[1:]:
        total += p
    return total


def fisher_grams(client, store, *, fan_in=4):
    """Undamped projected Fishers ``Σ_i Phi_s[i]ᵀ Phi_s[i]`` of every step.

    Parameters
    ----------
    client : distributed.Client or None
    store : FeatureStore
        Complete (every chunk written).
    fan_in : int
        Partial sums combined per reduction task.

    Returns
    -------
    ndarray, shape (n_steps, proj_dim, proj_dim), float64

    Notes
    -----
    Implements the Fisher of Eq. (31) in the projected space of Eq. (17). Each chunk's
    Gram is a float64 GEMM; the tree adds ``ceil(log_fan_in n_chunks)`` levels of
    float64 sums, so its rounding differs from one GEMM over all rows by
    ``O(log(n_chunks) eps64 Σ_i ‖Phi_i‖²)`` entrywise.
    """
    parts = [_executor.submit(client, _gram_chunk, store, c, name=f"gram-{c}")
             for c in range(store.n_chunks)]
    total = _executor.tree_reduce(client, parts, _sum, fan_in=fan_in, name="gram-sum")
    return _executor.gather(client, [total])[0]


# --------------------------------------------------------------------------- factor
@dataclass(frozen=True)
class FisherFactors:
    """Cholesky factors of the damped projected Fishers, one per step.

    Attributes
    ----------
    factor : iif_ref.kernels.FisherFactor
        The factored ``F_s = Gram_s + lam_d,s I`` of every step (lower Cholesky
        ``L_s``, ``F_s = L_s L_sᵀ``; ``factor.lower(s)``).
    damping : ndarray, shape (n_steps,)
        Absolute damping ``lam_d,s`` used per step.
    condition : ndarray, shape (n_steps,)
        LAPACK's 1-norm condition estimate of each ``F_s`` (from its Cholesky factor).
    """

    factor: FisherFactor
    damping: np.ndarray
    condition: np.ndarray

    def solve(self, s, rhs):
        """``F_s⁻¹ rhs`` for ``rhs`` of shape ``(P, k)``."""
        return self.factor.solve(rhs, index=s)


def factor_fishers(grams, *, damping=None):
    """Damp and factor each step's Fisher once.

    Parameters
    ----------
    grams : ndarray, shape (n_steps, P, P)
        From :func:`fisher_grams`.
    damping : float, None or callable
        Absolute ``lam_d >= 0`` for every step; None for the kernels' relative
        default ``RELATIVE_DAMPING * tr(Gram_s) / P`` per step (``tr(Phi_sᵀ Phi_s)`` is the
        Gram's trace, so this is the same number :func:`iif_ref.kernels.projected_scores`
        uses on the same features); or ``damping(trace, P) -> lam_d`` called per step
        (how a caller applies its own rule, e.g. the torch side's ``"auto"``).

    Returns
    -------
    FisherFactors

    Raises
    ------
    iif_ref.errors.NotPositiveDefiniteError
        A damped Fisher is not positive definite to float64 working precision (the
        kernels' own test and error, from :func:`iif_ref.kernels.factor_fisher`); the
        error names every failing step and a damping that fixes them.
    """
    if not (damping is None or callable(damping)):
        try:
            ok = np.isfinite(float(damping)) and float(damping) >= 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"damping must be finite and >= 0, got {damping!r}")
    grams = np.asarray(grams, dtype=np.float64)
    factor = factor_fisher(gram=grams, damping=damping)
    # The estimate comes from the Cholesky factor that solves: no second factorisation.
    return FisherFactors(factor=factor, damping=factor.damping.copy(),
                         condition=factor.condition.copy())


# --------------------------------------------------------------------------- top-k
def _select(vals, idx, k, largest):
    """Per row, the ``k`` smallest (or largest) values; ties broken by lower index.

    Exact and deterministic: candidates are every value up to the k-th (ties included)
    and those are fully sorted by (value, index), so the result does not depend on how
    the training set was chunked.
    """
    T, n = vals.shape
    k_eff = min(k, n)
    key = -vals if largest else vals
    out_v = np.empty((T, k_eff))
    out_i = np.empty((T, k_eff), dtype=np.int64)
    for t in range(T):
        row = key[t]
        if n > k_eff:
            kth = np.partition(row, k_eff - 1)[k_eff - 1]
            cand = np.flatnonzero(row <= kth)
        else:
            cand = np.arange(n)
        order = np.lexsort((idx[t, cand], row[cand]))[:k_eff]
        out_v[t] = vals[t, cand[order]]
        out_i[t] = idx[t, cand[order]]
    return out_v, out_i


def topk_merge(parts, *, k):
    """Merge partial results ``{"sum", "neg": (v, i), "pos": (v, i)}`` of one test block."""
    total = parts[0]["sum"].copy()
    for p in parts[1:]:
        total = total + p["sum"]
    out = {"sum": total}
    for side, largest in (("neg", False), ("pos", True)):
        v = np.concatenate([p[side][0] for p in parts], axis=1)
        i = np.concatenate([p[side][1] for p in parts], axis=1)
        out[side] = _select(v, i, k, largest)
    return out


def _without_block(part):
    return {key: value for key, value in part.items() if key != "block"}


class _Merge:
    """Picklable ``combine`` for the tree reduction of top-k partials."""

    def __init__(self, k):
        self.k = k

    def __call__(self, parts):
        return topk_merge(parts, k=self.k)


# --------------------------------------------------------------------------- scores
def _score_block(store, chunk, W, k, keep_block):
    """Worker task: scores of one (test block × train chunk) and its top-k partials.

    ``W`` has shape ``(S, P, T_block)``; the block is ``−Σ_s (Psi_s[chunk] W_s)ᵀ``.
    """
    rows = store.chunk_slice(chunk)
    block = np.zeros((W.shape[2], rows.stop - rows.start))
    for s in range(len(store.steps)):
        psi = store.read(s, "Psi", chunk).astype(np.float64)
        block -= (psi @ W[s]).T
    idx = np.broadcast_to(np.arange(rows.start, rows.stop), block.shape)
    out = {"sum": block.sum(axis=1), "neg": _select(block, idx, k, False),
           "pos": _select(block, idx, k, True)}
    if keep_block:
        out["block"] = block
    return out


def score_blocks(client, store, factors, Gamma, *, top_k=10, test_block=256,
                 return_scores=True, fan_in=4):
    """Blockwise scores, score sums and top-k proponents/opponents per test point.

    Parameters
    ----------
    client : distributed.Client or None
    store : FeatureStore
    factors : FisherFactors
    Gamma : ndarray, shape (n_steps, n_test, P)
        Projected test gradients of each step, in store step order.
    top_k : int
        Number of proponents and of opponents kept per test point (capped at n_train).
    test_block : int
        Test points per block; a worker holds ``test_block × chunk_rows`` scores.
    return_scores : bool
        Assemble and return the full ``(n_test, n_train)`` matrix on the driver.
    fan_in : int

    Returns
    -------
    dict
        ``scores`` (ndarray or None), ``score_sums`` (n_test,), ``proponents`` and
        ``opponents`` (n_test, k) int64 indices, ``proponent_scores`` and
        ``opponent_scores`` (n_test, k) — proponents in increasing score (most negative
        first), opponents in decreasing score.

    Notes
    -----
    Implements ``I[t, i] = −Σ_s Gamma_s[t] F_s⁻¹ Psi_s[i]ᵀ`` (Eq. 10 with Eq. 17, 31).
    """
    n_steps, n_test, P = Gamma.shape
    scores = np.empty((n_test, store.n_train)) if return_scores else None
    merged = {}
    for t0 in range(0, n_test, test_block):
        tb = slice(t0, min(t0 + test_block, n_test))
        W = np.stack([factors.solve(s, Gamma[s, tb].T) for s in range(n_steps)])
        W_f = _executor.scatter(client, W)
        blocks = [_executor.submit(client, _score_block, store, c, W_f, top_k,
                                   return_scores, name=f"score-{t0}-{c}")
                  for c in range(store.n_chunks)]
        if return_scores:
            # The small partials go to the merge tree; blocks are copied into the matrix
            # as they complete and their futures dropped, so a finished block waits on
            # its worker only until the driver fetches it.
            partials = [_executor.submit(client, _without_block, b, name=f"strip-{t0}")
                        for b in blocks]
            for c, part in _executor.completed(client, blocks):
                scores[tb, store.chunk_slice(c)] = part["block"]
                blocks[c] = part = None
            blocks = partials
        merged[t0] = _executor.tree_reduce(client, blocks, _Merge(top_k), fan_in=fan_in,
                                           name=f"topk-{t0}")
        del blocks
    results = _executor.gather(client, [merged[t0] for t0 in sorted(merged)])
    return {
        "scores": scores,
        "score_sums": np.concatenate([r["sum"] for r in results]),
        "proponents": np.concatenate([r["neg"][1] for r in results]),
        "proponent_scores": np.concatenate([r["neg"][0] for r in results]),
        "opponents": np.concatenate([r["pos"][1] for r in results]),
        "opponent_scores": np.concatenate([r["pos"][0] for r in results]),
    }

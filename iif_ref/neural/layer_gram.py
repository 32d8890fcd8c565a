"""Inner products of per-sample Jacobian rows from layer factors, never the rows themselves.

A row ``b = J_iᵀ v`` of a Linear stack is, per layer ``l``, the outer product of the
gradient ``g^l(v)`` at the layer's output and its input ``a_i^l`` (the weight block) and
``g^l(v)`` itself (the bias block), so two rows have the inner product (the layer-wise
neural-tangent-kernel identity)::

    ⟨J_iᵀ v, J_jᵀ w⟩ = Σ_l (a_i^l · a_j^l + 1) (g_i^l(v) · g_j^l(w)),

the ``+ 1`` only for layers with a bias. With ``r`` rows per sample (the ``n_out − 1``
rows of a cross-entropy Gauss–Newton factor) the input products ``a_i · a_j`` are formed
once per pair of *samples* and broadcast over the ``r × r`` row pairs, so a Gram of
``N = n · r`` rows costs ``N² · Σ_l out_l + n² · Σ_l in_l`` flops and ``N · Σ_l out_l +
n · Σ_l in_l`` numbers of storage instead of the ``N × n_params`` rows.

The factors come from :meth:`~iif_ref.neural.functional.FunctionalModel.per_sample_vjp_factors`;
a parameter it returns as a plain row block (not a ``(g, a)`` pair, and not the bias of
a pair) enters as its own term ``g_i · g_j``.
"""
from __future__ import annotations

import numpy as np
import torch

from iif_ref.neural.functional import chunks

__all__ = ["LayerFactors", "fill_gram_upper", "cross_products"]

#: Scratch bytes of one row block of a Gram (the products of one layer and their
#: absolute values): the blocks are sized to this, whatever the Gram's size.
BLOCK_BYTES = 256 * 2**20


class LayerFactors:
    """Rows ``b_k = J_{i(k)}ᵀ v_k``, ``r`` per sample (row ``i r + j`` is sample ``i``),
    held as per-layer factors in float64.

    Attributes
    ----------
    groups : list of (g, inputs, n_bias)
        One entry per distinct output gradient: ``g`` of shape ``(n r, out)``, the
        per-sample inputs ``a`` of the weights that share it, each ``(n, in)``, and how
        many plain blocks equal ``g`` itself (a bias: 1).
    keys : tuple
        Parameter names of each group (two sets of factors multiply only when equal).
    n_samples, rows_per_sample : int
    """

    def __init__(self, groups, keys, n_samples, rows_per_sample):
        self.groups, self.keys = groups, tuple(keys)
        self.n_samples, self.rows_per_sample = int(n_samples), int(rows_per_sample)

    @property
    def n_rows(self):
        return self.n_samples * self.rows_per_sample

    @property
    def nbytes(self):
        return sum(g.numel() * g.element_size()
                   + sum(a.numel() * a.element_size() for a in inputs)
                   for g, inputs, _ in self.groups)

    @classmethod
    def from_model(cls, fm, params, X, W, *, chunk_size):
        """Factors of the rows ``J_iᵀ W[i, j]`` of a model, chunk by chunk of samples.

        Parameters
        ----------
        fm : FunctionalModel
            In float64 (the factors are not converted).
        params : dict of str -> tensor
        X : tensor, shape (n, ...)
        W : tensor, shape (n, r, n_out)
        chunk_size : int

        Returns
        -------
        LayerFactors or None
            None where the model gives no factors (not a Linear stack), or factors of
            another shape than ``(n r, out)`` with an input shared by a sample's rows.
        """
        n, r = W.shape[0], W.shape[1]
        per_chunk, keys = [], None
        for s, e in chunks(n, chunk_size):
            with torch.no_grad():
                factors = fm.per_sample_vjp_factors(params, X[s:e], W[s:e])
            parsed = _group(fm.names, factors, e - s, r)
            if parsed is None:
                return None
            if keys is None:
                keys = parsed[1]
            elif parsed[1] != keys:            # structure must not change between chunks
                return None
            per_chunk.append(parsed[0])
        if not per_chunk:
            return None
        groups = []
        for j, (_, inputs, n_bias) in enumerate(per_chunk[0]):
            g = torch.cat([c[j][0] for c in per_chunk])
            a = [torch.cat([c[j][1][m] for c in per_chunk]) for m in range(len(inputs))]
            groups.append((g, a, n_bias))
        return cls(groups, keys, n, r)

    def samples(self, start, stop):
        """The factors of samples ``start..stop-1`` (views, no copy)."""
        r = self.rows_per_sample
        groups = [(g[start * r:stop * r], [a[start:stop] for a in inputs], n_bias)
                  for g, inputs, n_bias in self.groups]
        return LayerFactors(groups, self.keys, stop - start, r)

    def squared_norms(self):
        """``‖b_k‖²`` for every row, shape ``(n r,)``: the diagonal of the Gram."""
        r = self.rows_per_sample
        out = torch.zeros(self.n_rows, dtype=torch.float64)
        for g, inputs, n_bias in self.groups:
            coef = torch.full((self.n_samples,), float(n_bias), dtype=torch.float64)
            for a in inputs:
                coef += (a * a).sum(1)
            out += (g * g).sum(1) * coef.repeat_interleave(r)
        return out

    def products_into(self, other, out):
        """Write ``⟨b_k, c_m⟩`` for rows ``b_k`` of self and ``c_m`` of ``other`` into
        ``out``, a float64 tensor of shape ``(self.n_rows, other.n_rows)`` (a view of a
        larger array is fine). Scratch: one product of ``out``'s size per layer."""
        if self.keys != other.keys:
            raise ValueError(f"factors of different parameter groups: {self.keys} and "
                             f"{other.keys}")
        n, r, m, q = self.n_samples, self.rows_per_sample, other.n_samples, \
            other.rows_per_sample
        for j, ((g, inputs, n_bias), (h, other_inputs, _)) in enumerate(
                zip(self.groups, other.groups)):
            coef = None
            for a, b in zip(inputs, other_inputs):
                coef = a @ b.T if coef is None else coef.addmm_(a, b.T)
            if coef is None:
                coef = torch.full((n, m), float(n_bias), dtype=torch.float64)
            elif n_bias:
                coef += float(n_bias)
            prod = g @ h.T
            prod.view(n, r, m, q).mul_(coef[:, None, :, None])
            if j == 0:
                out.copy_(prod)
            else:
                out.add_(prod)
        return out


def _group(names, factors, n, r):
    """``(groups, keys)`` of one chunk's factors, or None if they do not fit."""
    if factors is None:
        return None
    by_id, order = {}, []
    for name, f in zip(names, factors):
        g = f[0] if isinstance(f, tuple) else f
        if g.ndim != 2 or g.shape[0] != n * r:
            return None
        if id(g) not in by_id:
            by_id[id(g)] = [g.to(torch.float64), [], 0, []]
            order.append(id(g))
        entry = by_id[id(g)]
        entry[3].append(name)
        if not isinstance(f, tuple):
            entry[2] += 1
            continue
        a = f[1]
        if a.ndim != 2 or a.shape[0] != n * r:
            return None
        per_sample = a.reshape(n, r, -1)[:, 0]
        # The identity needs one input per sample (rows of a sample differ only in v).
        if r > 1 and not torch.equal(a.reshape(n, r, -1), per_sample[:, None].expand(
                n, r, a.shape[1])):
            return None
        entry[1].append(per_sample.to(torch.float64))
    groups = [(by_id[i][0], by_id[i][1], by_id[i][2]) for i in order]
    keys = tuple(tuple(by_id[i][3]) for i in order)
    return groups, keys


def block_samples(factors, n_columns):
    """Samples per row block so that a block's scratch stays within :data:`BLOCK_BYTES`."""
    per_sample = 2 * 8 * factors.rows_per_sample * max(int(n_columns), 1)
    return max(1, min(factors.n_samples, BLOCK_BYTES // per_sample))


def fill_gram_upper(factors, out):
    """The Gram ``K = BBᵀ`` of the rows, formed block of rows by block of rows.

    Parameters
    ----------
    factors : LayerFactors
        ``N = n r`` rows.
    out : ndarray, shape (N, N), float64, C-contiguous
        Receives the upper triangle and the diagonal blocks of ``K`` (row block ``I``,
        columns from the start of ``I`` on). The strictly lower triangle outside the
        diagonal blocks is not written: ``out.T`` (Fortran order, no copy) holds ``K``
        in its lower triangle, which is what LAPACK's ``potrf(uplo="L")`` reads.

    Returns
    -------
    norm1 : float
        ``‖K‖₁``, the largest absolute column sum, accumulated from the blocks.
    """
    N = factors.n_rows
    if out.shape != (N, N) or out.dtype != np.float64 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float64 array of shape ({N}, {N}), "
                         f"got {out.dtype} {out.shape}")
    r, n = factors.rows_per_sample, factors.n_samples
    abs_sums = torch.zeros(N, dtype=torch.float64)
    step = block_samples(factors, N)
    for s in range(0, n, step):
        e = min(n, s + step)
        block = torch.from_numpy(out[s * r:e * r, s * r:])
        factors.samples(s, e).products_into(factors.samples(s, n), block)
        # Row sums of the block, and (off the diagonal block) the column sums that stand
        # for the rows of the lower triangle by symmetry.
        magnitude = block.abs()
        abs_sums[s * r:e * r] += magnitude.sum(1)
        abs_sums[e * r:] += magnitude[:, (e - s) * r:].sum(0)
        del magnitude
    return float(abs_sums.max()) if N else 0.0


def cross_products(left, right):
    """``⟨b_k, c_m⟩`` for every row of ``left`` and of ``right``: an ndarray of shape
    ``(left.n_rows, right.n_rows)``, formed in row blocks of ``left``."""
    out = np.empty((left.n_rows, right.n_rows))
    step = block_samples(left, right.n_rows)
    r = left.rows_per_sample
    for s, e in chunks(left.n_samples, step):
        left.samples(s, e).products_into(right, torch.from_numpy(out[s * r:e * r]))
    return out

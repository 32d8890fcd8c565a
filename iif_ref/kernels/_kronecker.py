"""Kronecker-factored projection of Linear layers' per-sample gradients (docs/kernels.md).

The per-sample gradient of a Linear layer ``z = W a + b`` (``W`` of shape
``(d_out, d_in)``) is the outer product ``g ãᵀ`` of the output gradient ``g`` and the
augmented input ``ã = [a; 1]`` (the last column is the bias gradient; without a bias
``ã = a``). It is projected as

    Phi_l = vec( (S_outᵀ g) (S_inᵀ ã)ᵀ ) [:b_l] / sqrt(b_l)

with ±1 factor matrices ``S_out (d_out, p_out)`` and ``S_in (d_in + 1, p_in)`` drawn from
the Philox streams of docs/rng.md ("Kronecker factors"), ``vec`` row-major (column
``c = q p_in + r``), and the first ``b_l <= p_out p_in`` columns kept. This is the product
``G A`` with a fixed matrix ``A`` whose rows are indexed by the flat parameter index:
``A[(o, i), c] = S_out[o, q] S_in[i, r] / sqrt(b_l)``, ``E[A Aᵀ] = I`` (every column is a
product of independent signs), computed in ``O(d_in p_in + d_out p_out + b_l)`` per sample
from the factors ``(g, a)`` instead of ``O(d_out d_in b_l)``.

Parameters outside the Linear layers (the *rest*) form one more block of ``b_rest``
columns projected by the dense Rademacher matrix of docs/rng.md (rows = their flat
indices). ``proj_dim`` is split over the blocks equally, a block never getting more
columns than it has parameters (the excess goes to the others); see :func:`split_columns`.

The arithmetic is written once with ``@``, ``*``, ``reshape`` and indexing, so it runs on
NumPy arrays and on torch tensors alike (this module imports neither torch nor numba).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

__all__ = ["LinearBlock", "KroneckerLayout", "split_columns", "factor_shape"]


@dataclass(frozen=True)
class LinearBlock:
    """Where a Linear layer's parameters sit in the flat parameter vector.

    Parameters
    ----------
    weight : int
        Flat index of ``W[0, 0]``; ``W`` (``d_out × d_in``) is stored row-major, so
        ``W[o, i]`` is at ``weight + o d_in + i``.
    d_out, d_in : int
    bias : int or None
        Flat index of ``b[0]`` (``b[o]`` at ``bias + o``), or None for a layer without a
        (trainable) bias.
    """

    weight: int
    d_out: int
    d_in: int
    bias: int | None = None

    @property
    def width(self):
        """Columns of the augmented gradient ``g ãᵀ``: ``d_in + 1`` with a bias."""
        return self.d_in + (self.bias is not None)

    @property
    def n_params(self):
        return self.d_out * self.width

    def ranges(self):
        out = [(self.weight, self.weight + self.d_out * self.d_in)]
        if self.bias is not None:
            out.append((self.bias, self.bias + self.d_out))
        return out


def split_columns(total, capacities):
    """Split ``total`` columns over blocks of the given capacities (parameters).

    Equal shares, the first ``total mod k`` blocks one more; a block whose capacity is
    below its share gets its capacity and the rest is shared again among the others
    (a block cannot use more columns than it has parameters).

    Raises
    ------
    ValueError
        ``total`` exceeds the sum of the capacities, or is smaller than the number of
        blocks (a block would get no column and its gradient would be dropped).
    """
    if total > sum(capacities):
        raise ValueError(f"proj_dim={total} exceeds the {sum(capacities)} parameters of the "
                         f"Kronecker blocks")
    if total < len(capacities):
        raise ValueError(f"proj_dim={total} is smaller than the number of Kronecker blocks "
                         f"({len(capacities)}: one per Linear layer, plus one for the other "
                         f"parameters); every block needs a column")
    shares = [0] * len(capacities)
    open_blocks = list(range(len(capacities)))
    remaining = total
    while open_blocks:
        equal = remaining // len(open_blocks)
        small = [g for g in open_blocks if capacities[g] <= equal]
        if not small:
            extra = remaining - equal * len(open_blocks)
            for j, g in enumerate(open_blocks):
                shares[g] = equal + (j < extra)
            break
        for g in small:
            shares[g] = capacities[g]
            remaining -= capacities[g]
            open_blocks.remove(g)
    return shares


def factor_shape(b, d_out, width):
    """``(p_out, p_in)`` for a block of ``b <= d_out width`` columns: the grid closest to
    square with ``p_out <= d_out``, ``p_in <= width`` and ``p_out p_in >= b``.

    ``p_out = clamp(ceil(sqrt b), ceil(b / width), d_out)``, ``p_in = ceil(b / p_out)``.
    """
    root = math.isqrt(b - 1) + 1          # ceil(sqrt(b)) for b >= 1
    p_out = min(d_out, max(root, -(-b // width)))
    return p_out, -(-b // p_out)


@dataclass(frozen=True)
class _Group:
    layer: LinearBlock | None     # None: the rest block
    start: int                    # its columns start .. start + size of Phi
    size: int
    p_out: int = 0
    p_in: int = 0


class KroneckerLayout:
    """The column blocks of a Kronecker projection of ``n_params`` parameters to ``proj_dim``.

    Parameters
    ----------
    n_params : int
    layers : sequence of LinearBlock
        Disjoint, inside ``[0, n_params)``.
    proj_dim : int

    Attributes
    ----------
    groups : list
        One per layer, in the given order, then the rest block (if any parameter is
        outside every layer); each with its columns ``start .. start + size``.
    rest_index : ndarray of int64
        Flat indices of the rest parameters, ascending.
    """

    def __init__(self, n_params, layers, proj_dim):
        layers = list(layers)
        if not layers:
            raise ValueError("layers is empty: the Kronecker projection needs at least one "
                             "Linear layer")
        covered = np.zeros(n_params, dtype=bool)
        for layer in layers:
            if not isinstance(layer, LinearBlock):
                raise TypeError(f"layers must hold LinearBlock, got {type(layer).__name__}")
            for name in ("weight", "d_out", "d_in"):
                v = getattr(layer, name)
                if not isinstance(v, numbers.Integral) or v < (0 if name == "weight" else 1):
                    raise ValueError(f"LinearBlock.{name} must be a "
                                     f"{'non-negative' if name == 'weight' else 'positive'} "
                                     f"integer, got {v!r}")
            for lo, hi in layer.ranges():
                if lo < 0 or hi > n_params:
                    raise ValueError(f"layer {layer} reaches outside the {n_params} parameters")
                if covered[lo:hi].any():
                    raise ValueError(f"layer {layer} overlaps another layer")
                covered[lo:hi] = True
        self.n_params, self.proj_dim, self.layers = n_params, proj_dim, layers
        self.rest_index = np.flatnonzero(~covered).astype(np.int64)
        capacities = [layer.n_params for layer in layers]
        if self.rest_index.size:
            capacities.append(int(self.rest_index.size))
        shares = split_columns(proj_dim, capacities)
        groups, start = [], 0
        for layer, b in zip(layers, shares):
            p_out, p_in = factor_shape(b, layer.d_out, layer.width)
            groups.append(_Group(layer, start, b, p_out, p_in))
            start += b
        if self.rest_index.size:
            groups.append(_Group(None, start, shares[-1]))
        self.groups = groups

    def __repr__(self):
        parts = [f"{g.layer.d_out}x{g.layer.width}->{g.p_out}x{g.p_in}[:{g.size}]"
                 if g.layer is not None else f"rest {self.rest_index.size}->{g.size}"
                 for g in self.groups]
        return f"KroneckerLayout({', '.join(parts)})"

    # ------------------------------------------------------------------ the factors
    def factors(self, generate, seed, dtype):
        """``[(S_out, S_in)]`` per layer and the rest block's rows of ``A`` (or None).

        ``generate(seed, row_start, n_rows, n_cols, kind, dtype)`` is a backend's
        generator (registry protocol). ``S_in`` rows are ``m = weight + i`` (``i < d_in + 1``)
        of the ``"kronecker_in"`` stream, ``S_out`` rows ``m = weight + o`` of
        ``"kronecker_out"``; the rest rows are the dense Rademacher ``A`` with ``b_rest``
        columns at the rest parameters' own flat indices.
        """
        pairs, rest = [], None
        for g in self.groups:
            if g.layer is None:
                rest = np.concatenate([
                    generate(seed, int(lo), int(hi - lo), g.size, "rademacher", dtype)
                    for lo, hi in _runs(self.rest_index)])
                continue
            layer = g.layer
            pairs.append((generate(seed, layer.weight, layer.d_out, g.p_out, "kronecker_out",
                                   dtype),
                          generate(seed, layer.weight, layer.width, g.p_in, "kronecker_in",
                                   dtype)))
        return pairs, rest

    def scale(self, group, dtype):
        """``fl_dtype(1 / sqrt(b_l))`` as a Python float, the magnitude of every entry of the
        block (``dtype`` a NumPy or torch float dtype; the value is exact in it)."""
        single = str(dtype).endswith("float32")
        return float((np.float32 if single else np.float64)(1.0 / np.sqrt(group.size)))

    def matrix(self, generate, seed, dtype):
        """The materialised ``A`` (``n_params × proj_dim``): the slow exact twin."""
        pairs, rest = self.factors(generate, seed, np.float64)
        A = np.zeros((self.n_params, self.proj_dim), dtype=dtype)
        for (S_out, S_in), g in zip(pairs, self.groups):
            layer = g.layer
            K = np.kron(S_out, S_in)[:, :g.size] * float(self.scale(g, dtype))
            K = K.reshape(layer.d_out, layer.width, g.size)
            cols = slice(g.start, g.start + g.size)
            A[layer.weight:layer.weight + layer.d_out * layer.d_in, cols] = \
                K[:, :layer.d_in].reshape(-1, g.size)
            if layer.bias is not None:
                A[layer.bias:layer.bias + layer.d_out, cols] = K[:, layer.d_in]
        if rest is not None:
            A[self.rest_index, self.groups[-1].start:] = rest
        return A

    # ------------------------------------------------------------------ projections
    def project_blocks(self, blocks, offsets, pairs, rest, out):
        """Add ``G A`` to ``out`` from column blocks of ``G`` (parameter tensors).

        ``blocks[j]`` holds columns ``offsets[j] .. offsets[j] + width_j`` of the flat
        ``G``; each must be a whole weight, a whole bias, or lie in the rest parameters.
        NumPy arrays or torch tensors (``pairs``, ``rest`` and ``out`` alike).
        """
        weights = {g.layer.weight: (g, p) for g, p in zip(self.groups, pairs)}
        biases = {g.layer.bias: (g, p) for g, p in zip(self.groups, pairs)
                  if g.layer.bias is not None}
        for block, offset in zip(blocks, offsets):
            n, width = block.shape
            if offset in weights and width == weights[offset][0].layer.d_out * \
                    weights[offset][0].layer.d_in:
                g, (S_out, S_in) = weights[offset]
                layer = g.layer
                Y = block.reshape(n, layer.d_out, layer.d_in) @ S_in[:layer.d_in]
                Z = S_out.T @ Y                                  # (n, p_out, p_in)
            elif offset in biases and width == biases[offset][0].layer.d_out:
                g, (S_out, S_in) = biases[offset]
                Z = (block @ S_out)[:, :, None] * S_in[g.layer.d_in][None, None, :]
            else:
                pos = int(np.searchsorted(self.rest_index, offset))
                if rest is None or pos + width > self.rest_index.size or \
                        int(self.rest_index[pos]) != offset or \
                        int(self.rest_index[pos + width - 1]) != offset + width - 1:
                    raise ValueError(f"columns {offset}..{offset + width} are neither a "
                                     f"whole Linear weight or bias nor rest parameters")
                g = self.groups[-1]
                out[:, g.start:] += block @ rest[pos:pos + width]
                continue
            cols = slice(g.start, g.start + g.size)
            out[:, cols] += Z.reshape(n, -1)[:, :g.size] * self.scale(g, out.dtype)
        return out

    def project_factors(self, factors, offsets, pairs, rest, out):
        """Add ``G A`` to ``out`` from per-parameter factors in flat order.

        ``factors[j]`` is ``(g, a)`` (``(n, d_out)``, ``(n, d_in)``) for a weight, whose
        rows are ``g aᵀ``; a bias's entry is its rows ``g`` (the same tensor as its
        weight's ``g`` folds into one outer product with ``ã = [a; 1]``); anything else is a
        plain ``(n, width)`` block. Cost ``O(d_out p_out + d_in p_in + b_l)`` per row.
        """
        weights = {g.layer.weight: (g, p) for g, p in zip(self.groups, pairs)}
        folded = set()
        plain, plain_offsets = [], []
        for j, (factor, offset) in enumerate(zip(factors, offsets)):
            if j in folded:
                continue
            if not isinstance(factor, tuple):
                plain.append(factor)
                plain_offsets.append(offset)
                continue
            g_rows, a_rows = factor
            group, (S_out, S_in) = weights[offset]
            layer = group.layer
            v = a_rows @ S_in[:layer.d_in]
            nxt = j + 1
            if layer.bias is not None and nxt < len(factors) and offsets[nxt] == layer.bias \
                    and factors[nxt] is g_rows:
                v = v + S_in[layer.d_in]
                folded.add(nxt)
            u = (g_rows @ S_out) * self.scale(group, out.dtype)
            n = u.shape[0]
            cols = slice(group.start, group.start + group.size)
            out[:, cols] += (u[:, :, None] * v[:, None, :]).reshape(n, -1)[:, :group.size]
        if plain:
            self.project_blocks(plain, plain_offsets, pairs, rest, out)
        return out

    def parameter_blocks(self):
        """``(offset, width)`` of the whole weights, biases and rest runs, in flat order:
        the column blocks a flat ``G`` is cut into by :meth:`project_flat`."""
        spans = [r for layer in self.layers for r in layer.ranges()]
        spans += [(int(lo), int(hi)) for lo, hi in _runs(self.rest_index)]
        return sorted((lo, hi - lo) for lo, hi in spans)

    def project_flat(self, G, pairs, rest, out):
        """Add ``G A`` to ``out`` for a flat ``(n, n_params)`` ``G``."""
        spans = self.parameter_blocks()
        return self.project_blocks([G[:, lo:lo + w] for lo, w in spans],
                                   [lo for lo, _ in spans], pairs, rest, out)


def _runs(index):
    """Maximal runs ``(lo, hi)`` of consecutive integers in the sorted ``index``."""
    if index.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [index.size]])
    return [(int(index[a]), int(index[b - 1]) + 1) for a, b in zip(starts, stops)]

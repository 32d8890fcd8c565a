"""Per-step featurisation: per-sample gradients, directions and test gradients, projected.

For one path step ``k`` (parameters θ_k, targets ``ρ(t_{k−1}) → ρ(t_k)``):

* ``Phi = U A``, ``u_i = ∇θ l(f(x_i; θ_k), ρ_i(t_k))`` (the Fisher factor, Eq. 31);
* ``Psi = D A``, ``d_i = ∇θ l(f(x_i; θ_k), ρ_i(t_k)) − ∇θ l(f(x_i; θ_k), ρ_i(t_{k−1}))``
  — ``J_i(t_k) Δy^(k)`` exactly for a target-linear loss (Eq. 23–24);
* ``Gamma = G A``, ``g_t = ∇θ l(f(x̂_t; θ_k), ŷ_t)`` (Eq. 7).

All are per-sample VJPs of the network output with an output-space weight, computed
with ``torch.func`` one chunk of samples at a time and handed to a
:class:`iif_ref.kernels.Projector` as NumPy arrays, so the ``(n, n_params)`` gradient
matrix never exists (only one ``(chunk, 2, n_params)`` block does, or
``(chunk + n_test, n_params)`` in :func:`step_features`). The chunk holds at most
``chunk_size`` samples and at most what :data:`FEATURE_MEMORY_BUDGET` allows for that
block, so memory grows with ``n·P`` (the features) and not with ``n·n_params``. One
projector serves every chunk of a call (and, passed as ``projector=``, every path step):
``A`` is generated once when it fits the projector's budget. ``A`` is the
counter-based matrix of docs/rng.md: its row ``m`` is the flat parameter index of
:class:`~iif_ref.neural.functional.FunctionalModel`, so the features do not depend on
the chunk size, and shards computed elsewhere (e.g. by a distributed engine) concatenate.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from iif_ref._defaults import DEFAULT_PROJ_DIM
from iif_ref._validation import check_positive_int
from iif_ref.errors import ProjectionDimensionWarning
from iif_ref.kernels import LinearBlock, Projector
from iif_ref.kernels._numpy_backend import countsketch_hash
from iif_ref.neural.functional import (FunctionalModel, as_inputs, as_targets, chunks,
                                       output_weights)
from iif_ref.neural.losses import TargetLinearLoss, resolve_loss

__all__ = ["train_features", "test_features", "step_features", "gradient_features",
           "project_rows", "make_projector", "TorchProjector", "chunk_rows",
           "FEATURE_MEMORY_BUDGET", "MIN_CHUNK_ROWS", "PROJECTION_MEMORY_BUDGET",
           "DEFAULT_PROJ_DIM"]

#: Bytes that one chunk's per-sample gradient block ``(chunk, 2, n_params)`` may take by
#: default (16 MiB; 32 MiB cost IIF 38 MiB more peak memory at the same speed on the
#: digits MLP): the chunk size is capped at ``budget // (2 n_params itemsize)``.
FEATURE_MEMORY_BUDGET = 16 * 2**20

#: Fewest samples per chunk, whatever the budget: a chunk's projection GEMM reads all
#: of ``A`` for ``2 · chunk`` flops per entry, which stays compute-bound (not bound by
#: reading ``A`` from memory) from about 64 rows. The block is then at most ``2·64/P``
#: of ``A``'s size (a quarter at P = 512), so the floor only binds for models above
#: ~33,000 parameters (float32), whose ``A`` is larger still.
MIN_CHUNK_ROWS = 64

#: Bytes of ``A`` that one call's projector holds whole (256 MiB): the paper's MNIST MLP
#: (784-128-64-10, 109,386 parameters) needs 214 MiB at P = 512 in float32. Above
#: the budget ``A`` is regenerated block by block for every chunk, which cost that MLP
#: ten times its projection GEMMs.
PROJECTION_MEMORY_BUDGET = 256 * 2**20


def chunk_rows(chunk_size, n_params, itemsize, *, memory_budget=None):
    """Samples per chunk: ``chunk_size`` capped by the memory budget of the gradient block,
    but at least :data:`MIN_CHUNK_ROWS` (or ``chunk_size`` if smaller).

    Parameters
    ----------
    chunk_size : int or None
        Upper limit set by the caller; None: the budget alone decides.
    n_params, itemsize : int
        Parameters of the model and bytes per entry of its compute dtype.
    memory_budget : int, optional
        Bytes of one ``(chunk, 2, n_params)`` block; default :data:`FEATURE_MEMORY_BUDGET`.

    Returns
    -------
    int, >= 1
        The features do not depend on it (rows are projected independently).
    """
    budget = FEATURE_MEMORY_BUDGET if memory_budget is None else memory_budget
    cap = max(MIN_CHUNK_ROWS, int(budget) // (2 * int(n_params) * int(itemsize)))
    return cap if chunk_size is None else min(int(chunk_size), cap)


def make_projector(fm, proj_dim, *, seed, kind, backend):
    """The projector of ``fm``'s flat parameters in its compute dtype (None for
    ``proj_dim=None``), to be shared by every projection of one call: a
    :class:`TorchProjector`.

    Warns
    -----
    ProjectionDimensionWarning
        ``proj_dim`` exceeds ``fm.n_params``: the projection reduces no dimension, and
        ``proj_dim=None`` (the exact curvature) is cheaper.
    """
    if proj_dim is None:
        return None
    if proj_dim > fm.n_params:
        warnings.warn(
            f"proj_dim={proj_dim} exceeds the model's {fm.n_params} trainable parameters: "
            f"the projection (Eq. 17) reduces no dimension and costs more than the exact "
            f"curvature; pass proj_dim=None for the exact curvature, or a proj_dim below "
            f"{fm.n_params}", ProjectionDimensionWarning, stacklevel=2)
    options = {"memory_budget": PROJECTION_MEMORY_BUDGET}
    if backend is not None:
        options["backend"] = backend
    if kind == "kronecker":
        options["layers"] = linear_blocks(fm)
    dtype = np.float32 if fm.dtype == torch.float32 else np.float64
    return TorchProjector(fm.n_params, proj_dim, seed=seed, kind=kind, dtype=dtype,
                          **options)


def linear_blocks(fm):
    """Where each ``nn.Linear`` of ``fm.model`` with a trainable weight sits in the flat
    parameter index (:class:`iif_ref.kernels.LinearBlock`), for the Kronecker projection."""
    offsets = dict(zip(fm.names, np.cumsum([0] + fm.numels[:-1]).tolist()))
    blocks = []
    for name, module in fm.model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, torch.nn.Linear) and prefix + "weight" in offsets:
            blocks.append(LinearBlock(offsets[prefix + "weight"], module.out_features,
                                      module.in_features, offsets.get(prefix + "bias")))
    if not blocks:
        raise ValueError("kind='kronecker' projects nn.Linear layers, and the model has no "
                         "nn.Linear with a trainable weight; use kind='rademacher'")
    return blocks


class TorchProjector(Projector):
    """A :class:`iif_ref.kernels.Projector` that also projects CPU torch rows in torch.

    When ``A`` is held, a torch view of it (no copy) multiplies torch rows in torch's
    own thread pool, the one the per-sample gradients were computed in. Handing the rows
    to NumPy's BLAS instead puts a second thread pool beside torch's; on a shared
    2-core machine the two contend (measured: the same ``(256, 17226) x (17226, 512)``
    float32 product took 0.1 s in torch and 0.8-1.0 s in two-thread OpenBLAS right
    after torch work). The product is the same up to float rounding (another GEMM
    kernel); ``A`` is the same matrix bit for bit.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._A_torch = self._structure = None
        if self.A is not None:
            with warnings.catch_warnings():
                # A is read-only on the NumPy side; the view is only ever read.
                warnings.simplefilter("ignore", UserWarning)
                self._A_torch = torch.from_numpy(self.A)
        elif self.kind == "countsketch":
            bucket, negative = countsketch_hash(self.seed, 0, self.n_params, self.proj_dim)
            self._structure = (torch.from_numpy(bucket),
                               torch.from_numpy(np.where(negative == 0, 1.0, -1.0)
                                                .astype(self.dtype)))
        elif self.layout is not None:
            self._structure = ([(torch.from_numpy(a), torch.from_numpy(b))
                                for a, b in self.factor_pairs],
                               None if self.rest_rows is None
                               else torch.from_numpy(self.rest_rows))

    def _project_structured(self, blocks, offsets, factors=False):
        # CountSketch: scatter-add each block's signed columns into their buckets, O(n M);
        # Kronecker: the layout's factored products (docs/kernels.md).
        n = blocks[0][0].shape[0] if isinstance(blocks[0], tuple) else blocks[0].shape[0]
        out = torch.zeros((n, self.proj_dim), dtype=self._torch_dtype)
        if self.layout is not None:
            pairs, rest = self._structure
            method = self.layout.project_factors if factors else self.layout.project_blocks
            return method(blocks, offsets, pairs, rest, out).numpy()
        bucket, sign = self._structure
        for block, offset in zip(blocks, offsets):
            cols = slice(offset, offset + block.shape[1])
            out.index_add_(1, bucket[cols], block * sign[cols])
        return out.numpy()

    @property
    def _torch_dtype(self):
        return torch.float32 if self.dtype == np.float32 else torch.float64

    def project_tensor(self, G):
        """``G A`` (NumPy out) for a tensor ``G`` of shape (n, n_params)."""
        G = G.detach()
        if self._structure is not None and G.device.type == "cpu" \
                and G.dtype == self._torch_dtype:
            if G.shape[1] != self.n_params:
                raise ValueError(f"G must have n_params={self.n_params} columns, got shape "
                                 f"{tuple(G.shape)}")
            return self.project_blocks([G])
        if self._A_torch is None or G.device.type != "cpu" or G.dtype != self._A_torch.dtype:
            return self(G.cpu().numpy())
        if G.shape[1] != self.n_params:
            raise ValueError(f"G must have n_params={self.n_params} columns, got shape "
                             f"{tuple(G.shape)}")
        return (G @ self._A_torch).numpy()

    def project_blocks(self, blocks):
        """``G A`` (NumPy out) from the column blocks of ``G``: tensors ``(n, numel_j)``
        in flat parameter order, each multiplied by its rows of ``A`` and summed, so the
        flat ``(n, n_params)`` matrix is never formed. Needs ``A`` held in ``G``'s dtype."""
        if self._structure is not None:
            blocks = [block.detach() for block in blocks]
            widths = [block.shape[1] for block in blocks]
            if sum(widths) != self.n_params:
                raise ValueError(f"the blocks have {sum(widths)} columns in all, not "
                                 f"n_params={self.n_params}")
            if self.layout is not None and len(blocks) == 1:  # a flat G: cut it by parameter
                spans = self.layout.parameter_blocks()
                blocks, widths = [blocks[0][:, lo:lo + w] for lo, w in spans], \
                    [w for _, w in spans]
            return self._project_structured(blocks, np.cumsum([0] + widths[:-1]).tolist())
        out, offset = None, 0
        for block in blocks:
            block = block.detach()
            a = self._A_torch[offset:offset + block.shape[1]]
            offset += block.shape[1]
            out = block @ a if out is None else out.addmm_(block, a)
        if offset != self.n_params:
            raise ValueError(f"the blocks have {offset} columns in all, not "
                             f"n_params={self.n_params}")
        return out.numpy()

    def project_factors(self, factors):
        """``G A`` (NumPy out) of a Kronecker projector from the per-parameter factors of
        :meth:`~iif_ref.neural.functional.FunctionalModel.per_sample_vjp_factors`
        (``(g, a)`` per weight, ``g`` per bias, in flat order): the rows ``g aᵀ`` are never
        formed."""
        widths = [f[0].shape[1] * f[1].shape[1] if isinstance(f, tuple) else f.shape[1]
                  for f in factors]
        return self._project_structured(factors, np.cumsum([0] + widths[:-1]).tolist(),
                                        factors=True)

    def takes_blocks(self, dtype):
        """Whether :meth:`project_blocks` can project CPU tensors of ``dtype``."""
        if self._structure is not None:
            return self._torch_dtype == dtype
        return self._A_torch is not None and self._A_torch.dtype == dtype


def project_rows(G, *, projector):
    """``G A`` with ``projector`` (NumPy out); the rows themselves if it is None (no
    projection). ``G`` is a tensor ``(n, n_params)``."""
    if projector is None:
        return G.detach().cpu().numpy()
    if isinstance(projector, TorchProjector):
        return projector.project_tensor(G)
    return projector(G.detach().cpu().numpy())


def _vjp_rows(fm, params, X, W, projector):
    """Per-sample VJPs ``J_f(x_n)ᵀ w_{n,r}`` projected, NumPy ``(n, R, P)`` (or
    ``(n, R, n_params)`` for ``projector=None``).

    With a :class:`TorchProjector` holding ``A``, each parameter's block of the
    gradients is multiplied by its rows of ``A`` (:meth:`TorchProjector.project_blocks`),
    so the flat ``(n, R, n_params)`` block is never concatenated: that copy cost as much
    as the projection and doubled the memory of a chunk.
    """
    n, r = W.shape[0], W.shape[1]
    on_host = isinstance(projector, TorchProjector) and X.device.type == "cpu" \
        and projector.takes_blocks(fm.dtype)
    # The Kronecker projection takes a Linear stack's factors (g, a) as they are.
    factors = fm.per_sample_vjp_factors(params, X, W) \
        if on_host and projector.kind == "kronecker" else None
    if factors is not None:
        rows = projector.project_factors(factors)
    elif on_host:
        blocks = fm.per_sample_vjp_blocks(params, X, W)
        rows = projector.project_blocks([b.reshape(n * r, -1) for b in blocks])
    else:
        rows = project_rows(fm.per_sample_vjp(params, X, W).reshape(n * r, -1),
                            projector=projector)
    return rows.reshape(n, r, -1)


class _RowBuffer:
    """The ``(n, ...)`` result of a chunked computation, allocated at its first chunk and
    filled in place: a list of chunks and their concatenation held the features twice
    (2 × 117 MiB for each of Φ and Ψ at n = 60,000, P = 512, float32)."""

    def __init__(self, n):
        self.n, self.array = n, None

    def put(self, start, rows):
        if self.array is None:
            self.array = np.empty((self.n,) + rows.shape[1:], dtype=rows.dtype)
        self.array[start:start + rows.shape[0]] = rows


def _check_projector(projector, fm, proj_dim, seed, kind, backend):
    """``projector`` if given (it must project ``fm``'s parameters to ``proj_dim`` with
    ``seed`` and ``kind``), else a new one for this call."""
    if projector is None:
        return make_projector(fm, proj_dim, seed=seed, kind=kind, backend=backend)
    got = (projector.n_params, projector.proj_dim, projector.seed, projector.kind)
    want = (fm.n_params, proj_dim, seed, kind)
    if got != want:
        raise ValueError(f"projector projects (n_params, proj_dim, seed, kind) = {got}, "
                         f"but this call needs {want}")
    return projector


def _check_finite_rows(V, start, what, step):
    # Checked on the projected rows: a NaN or Inf entry of g makes every g·a_p NaN or
    # ±Inf (a_p has no zero entries), so this is as strict as checking g, P/M the cost.
    # NumPy, single-threaded: waking torch's thread pool costs more than the check.
    V = np.asarray(V)
    bad = ~np.isfinite(V.reshape(V.shape[0], -1)).all(axis=1)
    if bool(bad.any()):
        idx = (np.flatnonzero(bad) + start).tolist()
        shown = ", ".join(map(str, idx[:20])) + (", ..." if len(idx) > 20 else "")
        where = "" if step is None else f" at path step k={step}"
        raise ValueError(f"non-finite {what}{where} for sample(s) [{shown}] "
                         f"({len(idx)} in all); check these inputs and the model at θ_k")


def _prepare(model, loss, params, dtype):
    fm = model if isinstance(model, FunctionalModel) else FunctionalModel(model, dtype=dtype)
    loss = resolve_loss(loss)
    if params is None:
        params = fm.theta_star
    else:
        missing = [n for n in fm.names if n not in params]
        if missing:
            raise ValueError(f"params lacks trainable parameter(s) {missing}")
        params = {n: torch.as_tensor(params[n], dtype=fm.dtype, device=fm.device)
                  for n in fm.names}
    return fm, loss, params


def _targets(value, name, n_out, loss, fm):
    # Path targets are already in target space (soft / masked), so they are taken as
    # float (n, n_out) arrays; integer labels are one-hot encoded for convenience.
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        out = value.detach().to(fm.dtype)
        if out.ndim == 1:
            out = out[:, None]
        if out.shape[1] != n_out or not bool(torch.isfinite(out).all()):
            return as_targets(value, name, n_out, loss, fm)
        return out
    return as_targets(value, name, n_out, loss, fm)


def _parallel_factor(w_to, w_from, w_d):
    """``α`` with ``w_d = α w_to`` row-wise to rounding, or None if some row is not so.

    The tolerance is the rounding error ``w_d`` already carries as a difference of two
    computed weights, ``64 eps (‖w_to‖ + ‖w_from‖)`` with ``eps`` of the compute dtype;
    substituting ``α w_to`` for ``w_d`` therefore perturbs ``J_iΔy`` by no more than the
    two-row computation's own rounding.

    The test runs in float64 on these ``(n, n_out)`` weights (negligible next to the
    VJPs): for a confident float32 classifier ``p − e_y`` has entries near 1e-30 whose
    float32 squares underflow to 0, which would make every such chunk fall back to the
    two-row computation. A row with ``w_to = 0`` exactly is parallel when ``w_d`` is 0
    within the tolerance (α = 0: then ``u_i = 0`` and ``J_iΔy = 0`` to rounding).
    """
    eps = torch.finfo(w_to.dtype).eps
    to64, from64, d64 = w_to.double(), w_from.double(), w_d.double()
    nt2 = (to64 * to64).sum(1)
    alpha = torch.where(nt2 > 0, (d64 * to64).sum(1) / torch.where(nt2 > 0, nt2, 1.0),
                        torch.zeros_like(nt2))
    resid = torch.linalg.vector_norm(d64 - alpha[:, None] * to64, dim=1)
    tol = 64 * eps * (torch.sqrt(nt2) + torch.linalg.vector_norm(from64, dim=1))
    return alpha if bool((resid <= tol).all()) else None


def _fuse_factor(loss, F, y_to, y_from, w_to, w_from, w_d):
    """``α`` with ``J_iΔy = α_i u_i`` for every row of a chunk, or None.

    When ``∂l/∂f`` is linear in the target (``w(0) = 0``: the cross-entropy,
    ``w(y) = (Σy) p − y``), ``w(Δy) = α w(y_to)`` follows from ``Δy = α y_to``, which is
    tested on the targets themselves: on the masked path (appendix E) both are multiples
    of ``e_{y_i}``. The weights cannot show it for a confident float32 classifier: the
    true-class entry ``s (p_y − 1)`` cancels to a relative rounding far above the
    tolerance of :func:`_parallel_factor` (``p_y = 1 − 10⁻¹³`` carries a relative error
    of 10⁻³ there even in float64), so the weights are tested only for other losses.
    """
    if bool((output_weights(loss, F, torch.zeros_like(y_to)) == 0).all()):
        return _parallel_factor(y_to, y_from, y_to - y_from)
    return _parallel_factor(w_to, w_from, w_d)


def train_features(model, loss, params, X, y_from, y_to, *, proj_dim, seed=0,
                   kind="rademacher", chunk_size=256, backend=None, sample_offset=0,
                   step=None, dtype=None, fuse=True, projector=None):
    """Projected per-sample gradients and directions of one path step.

    Parameters
    ----------
    model : torch.nn.Module or FunctionalModel
    loss : "mse", "cross_entropy" or target-linear callable
    params : dict of str -> tensor, or None
        θ_k by trainable-parameter name; None uses the model's own parameters (θ*).
    X : array_like, shape (n, ...)
    y_from, y_to : array_like, shape (n, n_out) (or labels)
        Targets ``ρ(t_{k−1})`` and ``ρ(t_k)``.
    proj_dim : int or None
        P; None returns the unprojected ``(n, n_params)`` rows (small models only).
    seed : int
    kind : {"rademacher", "gaussian", "countsketch", "kronecker"}
    chunk_size : int or None
        Most samples per streamed chunk; the chunk is smaller when its gradient block
        would exceed :data:`FEATURE_MEMORY_BUDGET` (:func:`chunk_rows`). None: the budget
        alone decides.
    backend : str or None
        Kernel backend (passed through to :class:`iif_ref.kernels.Projector`).
    sample_offset : int
        Global index of row 0, used in error messages (for shards).
    step : int or None
        Path step, used in error messages.
    dtype : {"float32", "float64"} or None
        Compute dtype when ``model`` is a Module.
    fuse : bool
        When every sample's two output weights are parallel (to rounding), compute one
        VJP and one projected row per sample and scale it. This always holds on the
        masked cross-entropy path (appendix E), where ``ρ_i(t) = s(t) e_{y_i}`` makes both
        weights multiples of ``∂l/∂f(f_i, y_i)``: it halves the work of a step.
    projector : iif_ref.kernels.Projector, optional
        The projection to use (from :func:`make_projector`, shared across the calls of
        one run so that ``A`` is generated once); by default one is made for this call.
        It must match ``proj_dim``, ``seed`` and ``kind``.

    Returns
    -------
    Phi : ndarray, shape (n, P)
        ``u_i A``, ``u_i = ∇θ l(f(x_i; θ), y_to_i)``.
    Psi : ndarray, shape (n, P)
        ``(J_iΔy)ᵀ A = (∇θ l(f(x_i; θ), y_to_i) − ∇θ l(f(x_i; θ), y_from_i)) A``.

    Raises
    ------
    ValueError
        Shapes that do not match the model output, non-finite inputs, or a non-finite
        per-sample gradient (naming the samples).

    Notes
    -----
    Implements the per-step quantities of Eq. (10) with ``A`` of Eq. (17, 31). One
    ``vmap`` of ``grad`` per chunk gives both rows of a sample (two output weights), or
    one row when they are parallel (``fuse``).

    Examples
    --------
    >>> import torch
    >>> from iif_ref.neural import train_features
    >>> net = torch.nn.Linear(3, 1, bias=False).double()
    >>> X = torch.randn(4, 3, dtype=torch.float64); y = torch.randn(4, 1, dtype=torch.float64)
    >>> Phi, Psi = train_features(net, "mse", None, X, y, y, proj_dim=None)
    >>> bool(abs(Psi).max() == 0.0)   # no target change, no direction
    True
    """
    Phi, Psi, _ = step_features(model, loss, params, X, y_from, y_to, proj_dim=proj_dim,
                                seed=seed, kind=kind, chunk_size=chunk_size, backend=backend,
                                sample_offset=sample_offset, step=step, dtype=dtype,
                                fuse=fuse, projector=projector)
    return Phi, Psi


def step_features(model, loss, params, X, y_from, y_to, X_test=None, y_test=None, *,
                  proj_dim, seed=0, kind="rademacher", chunk_size=256, backend=None,
                  sample_offset=0, step=None, dtype=None, fuse=True, projector=None,
                  psi_as_scale=False):
    """:func:`train_features` and :func:`test_features` of one path step, projected together.

    Parameters
    ----------
    model, loss, params, X, y_from, y_to
        As in :func:`train_features`.
    X_test : array_like, shape (n_test, ...), optional
    y_test : array_like, shape (n_test, n_out) or labels, optional
        Test points whose loss gradients at ``params`` are projected with the last
        training chunk (when ``n_test <= chunk_size``), so ``A`` is generated once per
        chunk rather than once more for the test rows.
    proj_dim, seed, kind, chunk_size, backend, sample_offset, step, dtype, fuse, projector
        As in :func:`train_features`.
    psi_as_scale : bool
        When every chunk fuses (``Ψ = diag(α) Φ``), return ``α`` in place of ``Psi``:
        the second ``(n, P)`` array (117 MiB at n = 60,000, P = 512) is not formed.

    Returns
    -------
    Phi, Psi : ndarray, shape (n, P)
        As from :func:`train_features`; with ``psi_as_scale``, ``Psi`` may instead be
        ``α``, shape ``(n,)``, float64.
    Gamma : ndarray, shape (n_test, P), or None
        As from :func:`test_features`; None without ``X_test``.

    Notes
    -----
    Implements Eq. (7), (10), (17), (31) for one step. The projection of a row does not
    depend on the rows projected with it (docs/rng.md: ``A`` is indexed by the flat
    parameter index only), so the result equals the two separate calls up to the
    summation order of the matrix product (float rounding).
    """
    chunk_size = check_positive_int(chunk_size, "chunk_size", allow_none=True)
    proj_dim = check_positive_int(proj_dim, "proj_dim", allow_none=True)
    fm, loss, params = _prepare(model, loss, params, dtype)
    projector = _check_projector(projector, fm, proj_dim, seed, kind, backend)
    chunk_size = chunk_rows(chunk_size, fm.n_params, fm.dtype.itemsize)
    X = X if isinstance(X, torch.Tensor) and X.dtype == fm.dtype else as_inputs(X, "X", fm)
    with torch.no_grad():
        n_out = fm.forward(params, X[:1]).shape[1]
    Y_to = _targets(y_to, "y_to", n_out, loss, fm)
    Y_from = _targets(y_from, "y_from", n_out, loss, fm)
    n = X.shape[0]
    for name, Yv in (("y_to", Y_to), ("y_from", Y_from)):
        if Yv.shape[0] != n:
            raise ValueError(f"X and {name} must have the same number of rows, got {n} "
                             f"and {Yv.shape[0]}")
    Xt = Wt = None
    if X_test is not None:
        Xt = (X_test if isinstance(X_test, torch.Tensor) and X_test.dtype == fm.dtype
              else as_inputs(X_test, "X_test", fm))
        Yt = _targets(y_test, "y_test", n_out, loss, fm)
        if Yt.shape[0] != Xt.shape[0]:
            raise ValueError(f"X_test and y_test must have the same number of rows, got "
                             f"{Xt.shape[0]} and {Yt.shape[0]}")
        with torch.no_grad():
            Wt = output_weights(loss, fm.forward(params, Xt), Yt)
    n_test = 0 if Xt is None else Xt.shape[0]
    # Test rows ride with the last chunk when they fit in one more chunk's worth of rows.
    ride = 0 < n_test <= chunk_size
    Phi, Psi, Gamma = _RowBuffer(n), _RowBuffer(n), None
    scale = np.empty(n) if psi_as_scale and fuse else None   # α while every chunk fuses
    bounds = list(chunks(n, chunk_size))
    for c, (start, stop) in enumerate(bounds):
        extra = ride and c == len(bounds) - 1
        Xc = X[start:stop]
        m = stop - start
        with torch.no_grad():
            F = fm.forward(params, Xc)
        y_to, y_from = Y_to[start:stop], Y_from[start:stop]
        w_to, w_from = output_weights(loss, F, y_to), output_weights(loss, F, y_from)
        w_d = w_to - w_from
        alpha = _fuse_factor(loss, F, y_to, y_from, w_to, w_from, w_d) if fuse else None
        if alpha is not None:
            # u_i and J_iΔy are multiples of one VJP: one gradient, one projected row.
            # With test rows riding along: one VJP call for the chunk and the test rows.
            Xin, Win = (torch.cat([Xc, Xt]), torch.cat([w_to, Wt])) if extra else (Xc, w_to)
            rows = _vjp_rows(fm, params, Xin, Win[:, None, :], projector)[:, 0]
            train_rows = rows[:m]
            _check_finite_rows(train_rows, start + sample_offset,
                               "per-sample gradient", step)
            Phi.put(start, train_rows)
            if scale is not None:
                scale[start:stop] = alpha.cpu().numpy()
            else:
                Psi.put(start, train_rows * alpha.cpu().numpy().astype(rows.dtype)[:, None])
            if extra:
                Gamma = rows[m:]
        else:
            both = _vjp_rows(fm, params, Xc, torch.stack([w_to, w_d], dim=1), projector)
            _check_finite_rows(both, start + sample_offset, "per-sample gradient", step)
            if scale is not None:     # the earlier chunks' Ψ rows, as the loop makes them
                if start:
                    Psi.put(0, Phi.array[:start] * scale[:start, None].astype(both.dtype))
                scale = None
            Phi.put(start, both[:, 0])
            Psi.put(start, both[:, 1])
            if extra:
                Gamma = _vjp_rows(fm, params, Xt, Wt[:, None, :], projector)[:, 0]
        if extra:
            _check_finite_rows(Gamma, 0, "test-loss gradient", step)
    if n_test and Gamma is None:
        Gamma = gradient_features(fm, loss, params, Xt, Yt, proj_dim=proj_dim, seed=seed,
                                  kind=kind, chunk_size=chunk_size, backend=backend,
                                  step=step, what="test-loss gradient", projector=projector)
    return Phi.array, (Psi.array if scale is None else scale), Gamma


def gradient_features(model, fn, params, X, Y, *, proj_dim, seed=0, kind="rademacher",
                      chunk_size=256, backend=None, step=None, dtype=None, what="gradient",
                      projector=None):
    """Projected per-sample gradients ``∇θ fn(f(x_n; θ), y_n) A``, shape ``(n, P)``.

    Parameters
    ----------
    model : torch.nn.Module or FunctionalModel
    fn : callable or loss
        ``fn(f, y) -> scalar`` on one sample (a loss, or an output function such as
        TRAK's margin); strings are resolved as losses.
    params, proj_dim, seed, kind, chunk_size, backend, step, dtype, projector
        As in :func:`train_features`.
    X : array_like, shape (n, ...)
    Y : array_like, shape (n, n_out) or labels
    what : str
        Name of the quantity in error messages.

    Returns
    -------
    ndarray, shape (n, P) (``(n, n_params)`` if ``proj_dim`` is None)
    """
    chunk_size = check_positive_int(chunk_size, "chunk_size", allow_none=True)
    proj_dim = check_positive_int(proj_dim, "proj_dim", allow_none=True)
    loss = fn if isinstance(fn, (str, TargetLinearLoss)) else TargetLinearLoss(
        getattr(fn, "__name__", "output_fn"), fn, lambda f: f,
        classification=bool(getattr(fn, "classification", False)))
    fm, loss, params = _prepare(model, loss, params, dtype)
    projector = _check_projector(projector, fm, proj_dim, seed, kind, backend)
    chunk_size = chunk_rows(chunk_size, fm.n_params, fm.dtype.itemsize)
    X = X if isinstance(X, torch.Tensor) and X.dtype == fm.dtype else as_inputs(X, "X", fm)
    with torch.no_grad():
        n_out = fm.forward(params, X[:1]).shape[1]
    Y = _targets(Y, "y", n_out, loss, fm)
    if Y.shape[0] != X.shape[0]:
        raise ValueError(f"X and y must have the same number of rows, got "
                         f"{X.shape[0]} and {Y.shape[0]}")
    out = _RowBuffer(X.shape[0])
    for start, stop in chunks(X.shape[0], chunk_size):
        Xc = X[start:stop]
        with torch.no_grad():
            F = fm.forward(params, Xc)
        W = output_weights(loss, F, Y[start:stop])[:, None, :]
        rows = _vjp_rows(fm, params, Xc, W, projector)[:, 0]
        _check_finite_rows(rows, start, what, step)
        out.put(start, rows)
    return out.array


def test_features(model, loss, params, X_test, y_test, *, proj_dim, seed=0,
                  kind="rademacher", chunk_size=256, backend=None, step=None, dtype=None,
                  projector=None):
    """Projected test-loss gradients ``Gamma = G A`` at θ, shape ``(n_test, P)``.

    Parameters
    ----------
    model, loss, params, proj_dim, seed, kind, chunk_size, backend, step, dtype, projector
        As in :func:`train_features`.
    X_test : array_like, shape (n_test, ...)
    y_test : array_like, shape (n_test, n_out) or labels

    Returns
    -------
    Gamma : ndarray, shape (n_test, P) (``(n_test, n_params)`` if ``proj_dim`` is None)

    Notes
    -----
    Implements ``G(t_k) A`` of Eq. (7), (17): ``g_t = ∇θ l(f(x̂_t; θ), ŷ_t)``.
    """
    return gradient_features(model, resolve_loss(loss), params, X_test, y_test,
                             proj_dim=proj_dim, seed=seed, kind=kind, chunk_size=chunk_size,
                             backend=backend, step=step, dtype=dtype,
                             what="test-loss gradient", projector=projector)


# A public name starting with "test" would be collected by pytest wherever it is imported.
test_features.__test__ = False

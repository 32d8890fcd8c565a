"""The feature function of a torch model along the dataset path, for the workers.

:class:`TorchPathFeatures` implements the feature function protocol of
:mod:`iif_ref.distributed.featurize` with :func:`iif_ref.neural.train_features` on each
shard: for step ``k`` the model at ``θ_k`` and targets ``ρ(t_{k−1}) → ρ(t_k)``
(Eq. 15, path targets by :func:`iif_ref.neural.path_targets`). The driver computes the
baseline targets ``ȳ`` and the path models ``θ_k`` (Eq. 13, 16) once; workers receive
``[y, ȳ]`` side by side as the shard's targets, so a shard holds everything its
features depend on.

Imports torch; import it only when torch is installed.
"""
from __future__ import annotations

import numpy as np
import torch

from iif_ref.distributed.store import array_digest
from iif_ref.neural.features import train_features
from iif_ref.neural.functional import FunctionalModel
from iif_ref.neural.losses import resolve_loss
from iif_ref.neural.path import path_targets

__all__ = ["TorchPathFeatures"]


class TorchPathFeatures:
    """Per-shard ``{k: (Phi_k, Psi_k)}`` of a torch model along the linear path.

    Parameters
    ----------
    model : torch.nn.Module
        Architecture (its parameters are replaced by ``thetas``); pickled to workers.
    loss : str or callable
        As in :func:`iif_ref.neural.integrated_influence`.
    thetas : ndarray, shape (K, n_params)
        Flat path models ``θ_1 .. θ_K`` in :class:`~iif_ref.neural.functional.FunctionalModel`
        order (``θ_K = θ*``).
    n_out : int
        Model output width; a shard's targets are ``[y (n_out), ȳ (n_out)]``.
    mask : bool
        Appendix E mask ``ρ ⊙ y``.
    proj_dim, seed, kind, chunk_size, backend, dtype
        As in :class:`iif_ref.neural.config.IIFConfig`.
    torch_threads : int
        ``torch.set_num_threads`` on the worker (one per worker thread: more would
        oversubscribe the cores other workers use).
    tag : dict
        Extra fingerprint entries (e.g. the baseline group).
    nodes, starts : sequence of float, optional
        Per step ``k = 1..K``: the quadrature node ``t_k`` and ``t_k − w_k``
        (:class:`iif_ref.neural.quadrature.QuadratureRule`); default the Euler grid
        ``k/K`` and ``(k − 1)/K`` of Eq. (10).
    """

    def __init__(self, model, loss, thetas, *, n_out, mask, proj_dim, seed, kind,
                 chunk_size, backend, dtype, torch_threads=1, tag=None, nodes=None,
                 starts=None):
        self.model = model
        self.loss = loss
        self.thetas = np.asarray(thetas)
        self.n_out = int(n_out)
        self.mask = bool(mask)
        self.proj_dim = int(proj_dim)
        self.seed, self.kind, self.chunk_size = int(seed), kind, int(chunk_size)
        self.backend, self.torch_dtype = backend, dtype
        self.torch_threads = int(torch_threads)
        self.tag = dict(tag or {})
        self.steps = tuple(range(1, self.thetas.shape[0] + 1))
        K = len(self.steps)
        self.nodes = tuple(float(k / K) for k in self.steps) if nodes is None else \
            tuple(map(float, nodes))
        self.starts = tuple(float((k - 1) / K) for k in self.steps) if starts is None else \
            tuple(map(float, starts))
        self.dtype = np.float64 if self.thetas.dtype == np.float64 else np.float32

    def fingerprint(self):
        """Architecture, path models, loss, path options and projection (not the data)."""
        loss = resolve_loss(self.loss)
        return {"model": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
                "architecture": repr(self.model), "thetas_sha256": array_digest(self.thetas),
                "loss": loss.name, "n_out": self.n_out, "mask": self.mask,
                "proj_dim": self.proj_dim, "seed": self.seed, "kind": self.kind,
                "dtype": str(self.thetas.dtype), "nodes": list(self.nodes),
                "starts": list(self.starts), **self.tag}

    def __call__(self, shard_id, X, y):
        torch.set_num_threads(self.torch_threads)
        fm = FunctionalModel(self.model, dtype=self.torch_dtype)
        loss = resolve_loss(self.loss)
        X_t = torch.as_tensor(np.asarray(X), dtype=fm.dtype)
        Yboth = torch.as_tensor(np.asarray(y), dtype=fm.dtype)
        Y, Ybar = Yboth[:, :self.n_out], Yboth[:, self.n_out:]
        out = {}
        for k in self.steps:
            theta = fm.unflatten(torch.as_tensor(self.thetas[k - 1], dtype=fm.dtype))
            rho_k = path_targets(Y, Ybar, self.nodes[k - 1], mask=self.mask)
            rho_prev = path_targets(Y, Ybar, self.starts[k - 1], mask=self.mask)
            out[k] = train_features(fm, loss, theta, X_t, rho_prev, rho_k,
                                    proj_dim=self.proj_dim, seed=self.seed, kind=self.kind,
                                    chunk_size=self.chunk_size, backend=self.backend,
                                    step=k)
        return out

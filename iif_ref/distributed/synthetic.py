"""A small NumPy model that implements the feature function protocol.

For the distributed engine's tests and scaling benchmark, without torch: a regression
network with a frozen random first layer, ``f(x; θ) = tanh(x W) · θ``, ``W ∈ R^{d×M}``
generated from ``model_seed`` and ``θ ∈ R^M`` the ``M = n_params`` trainable weights.
With the per-sample MSE ``l(f, y) = (f − y)²`` (docs/conventions.md, no ½) and
``h(x) = tanh(x W)``:

* ``u_i(t_k) = ∇θ l(f(x_i; θ_k), ρ_i(t_k)) = 2 (h_i·θ_k − ρ_i(t_k)) h_i``   (Eq. 31)
* ``J_i Δy^(k) = ∇θ l(f, ρ_i(t_k)) − ∇θ l(f, ρ_i(t_{k−1})) = −2 (ρ_i(t_k) − ρ_i(t_{k−1})) h_i``
* ``G(t_k) = ∇θ l(f(x̂; θ_k), ŷ) = 2 (ĥ·θ_k − ŷ) ĥ``                            (Eq. 7)

with the linear path ``ρ_i(t) = t y_i + (1 − t) ȳ_i`` (Eq. 14), ``t_k = k/K``, and the
baseline targets ``ȳ_i = f(x_i; θ')`` (Eq. 13). All three are projected with
:func:`iif_ref.kernels.project`, so features of any shard are the rows of the features
of the whole set. The path models ``θ_k`` are given (the engine does not care how they
were obtained).
"""
from __future__ import annotations

import numpy as np

from iif_ref._validation import as_float_array, check_positive_int
from iif_ref.distributed.store import array_digest
from iif_ref.kernels import project

__all__ = ["RandomFeatureRegression"]


class RandomFeatureRegression:
    """Feature function of ``f(x; θ) = tanh(x W) · θ`` along a linear target path.

    Parameters
    ----------
    d_in : int
        Input dimension ``d``.
    theta_steps : ndarray, shape (K, n_params)
        Path models ``θ_1 .. θ_K`` (``θ_K = θ*``).
    theta_prime : ndarray, shape (n_params,)
        Baseline model ``θ'`` giving ``ȳ = f(x; θ')``.
    proj_dim : int
    seed : int
        Projection seed (docs/rng.md).
    model_seed : int
        Seed of the frozen first layer ``W ~ N(0, 1/d)``.
    kind : {"rademacher", "gaussian"}
    backend : str
        Kernel backend of :func:`iif_ref.kernels.project`.
    """

    def __init__(self, d_in, theta_steps, theta_prime, *, proj_dim, seed=0, model_seed=0,
                 kind="rademacher", backend="numpy"):
        self.d_in = check_positive_int(d_in, "d_in")
        self.theta_steps = as_float_array(theta_steps, "theta_steps", ndim=2)
        self.theta_prime = as_float_array(theta_prime, "theta_prime", ndim=1)
        if self.theta_prime.shape[0] != self.theta_steps.shape[1]:
            raise ValueError(f"theta_prime has {self.theta_prime.shape[0]} entries, "
                             f"theta_steps rows have {self.theta_steps.shape[1]}")
        self.proj_dim = check_positive_int(proj_dim, "proj_dim")
        self.seed = int(seed)
        self.model_seed = int(model_seed)
        self.kind = kind
        self.backend = backend
        self.steps = tuple(range(1, self.theta_steps.shape[0] + 1))
        self.dtype = np.float64

    @property
    def n_params(self):
        return self.theta_steps.shape[1]

    @property
    def K(self):
        return self.theta_steps.shape[0]

    def hidden(self, X):
        """``tanh(X W)``, shape ``(n, n_params)``."""
        W = np.random.default_rng(self.model_seed).standard_normal((self.d_in, self.n_params))
        return np.tanh(X @ (W / np.sqrt(self.d_in)))

    def fingerprint(self):
        """What the features depend on besides the data (see the protocol)."""
        return {"model": "RandomFeatureRegression", "d_in": self.d_in,
                "theta_sha256": array_digest(self.theta_steps, self.theta_prime),
                "model_seed": self.model_seed, "proj_dim": self.proj_dim,
                "seed": self.seed, "kind": self.kind}

    def _project(self, G):
        return project(G, self.proj_dim, seed=self.seed, kind=self.kind,
                       backend=self.backend)

    def __call__(self, shard_id, X, y):
        """Features ``{k: (Phi_k, Psi_k)}`` of a shard, each ``(len(X), proj_dim)``."""
        H = self.hidden(np.asarray(X, dtype=np.float64))
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        y_bar = H @ self.theta_prime
        out = {}
        for k in self.steps:
            rho_k = (k / self.K) * y + (1 - k / self.K) * y_bar
            rho_prev = ((k - 1) / self.K) * y + (1 - (k - 1) / self.K) * y_bar
            U = 2.0 * (H @ self.theta_steps[k - 1] - rho_k)[:, None] * H
            JdY = -2.0 * (rho_k - rho_prev)[:, None] * H
            out[k] = (self._project(U), self._project(JdY))
        return out

    def test_features(self, X_test, y_test):
        """Projected test gradients ``Gamma``, shape ``(K, n_test, proj_dim)``."""
        H = self.hidden(np.asarray(X_test, dtype=np.float64))
        y_test = np.asarray(y_test, dtype=np.float64).reshape(-1)
        return np.stack([self._project(2.0 * (H @ self.theta_steps[k - 1] - y_test)[:, None] * H)
                         for k in self.steps])

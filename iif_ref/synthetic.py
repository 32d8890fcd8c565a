"""Synthetic linear-regression problems of the paper's Sec. 3.1 (Tables 1 and 4).

``x ~ N(0, I_d)`` iid for training and test points, one weight vector ``w ~ N(0, I_d)``,
targets ``y = xᵀw + ε`` with zero-mean noise of standard deviation ``sigma_n`` (training)
or ``sigma_s`` (test). Gaussian or Laplace noise (Table 4's "N" and "L").
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from iif_ref._validation import as_generator, check_nonnegative_real, check_positive_int

__all__ = ["LinearProblem", "make_linear_problem", "NOISE_KINDS"]

NOISE_KINDS = ("gaussian", "laplace")


@dataclass(frozen=True)
class LinearProblem:
    """One draw of the synthetic regression problem.

    Attributes
    ----------
    X : ndarray, shape (n_train, d)
    y : ndarray, shape (n_train,)
    X_test : ndarray, shape (n_test, d)
    y_test : ndarray, shape (n_test,)
    w : ndarray, shape (d,)
        The true weight vector.
    sigma_n, sigma_s : float
        Noise standard deviations of the training and test targets.
    train_noise, test_noise : str
        ``"gaussian"`` or ``"laplace"``.
    seed : int or None
        The integer seed, when one was given (None for a Generator).
    """

    X: np.ndarray
    y: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    w: np.ndarray
    sigma_n: float
    sigma_s: float
    train_noise: str
    test_noise: str
    seed: int | None


def _noise(rng, kind, sigma, size):
    if kind == "gaussian":
        return rng.normal(0.0, sigma, size)
    # Laplace(0, b) has variance 2b², so b = σ/√2 gives standard deviation σ.
    return rng.laplace(0.0, sigma / np.sqrt(2.0), size)


def _check_kind(kind, name):
    if not isinstance(kind, str):
        raise TypeError(f"{name} must be a string, got {type(kind).__name__}")
    if kind not in NOISE_KINDS:
        raise ValueError(f"{name} must be one of {NOISE_KINDS}, got {kind!r}")
    return kind


def make_linear_problem(n_train=100, d=10, n_test=50, *, sigma_n, sigma_s,
                        train_noise="gaussian", test_noise="gaussian", seed):
    """Draw a synthetic linear-regression problem (paper Sec. 3.1).

    Parameters
    ----------
    n_train : int, default 100
        Training samples (the paper's 100).
    d : int, default 10
        Features (the paper's 10).
    n_test : int, default 50
        Test samples. The paper does not state it; 50 is this package's choice.
    sigma_n : float
        Standard deviation of the training-target noise (>= 0).
    sigma_s : float
        Standard deviation of the test-target noise (>= 0). The paper calls it "the
        variance" once but "standard deviation" for ``sigma_n``; both are read as standard
        deviations here.
    train_noise, test_noise : {"gaussian", "laplace"}
        Noise law. Laplace noise uses scale ``sigma / √2`` so that its standard deviation
        is ``sigma`` like the Gaussian's.
    seed : int or numpy.random.Generator

    Returns
    -------
    LinearProblem

    Notes
    -----
    Draw order (fixed, so a seed reproduces the problem): ``X`` (n_train × d), ``X_test``
    (n_test × d), ``w`` (d), training noise, test noise — all from one
    ``numpy.random.default_rng(seed)`` stream. Same seed and shapes, different noise
    levels therefore give the same ``X``, ``X_test`` and ``w``.

    Examples
    --------
    >>> p = make_linear_problem(sigma_n=0.0, sigma_s=0.0, seed=0)
    >>> bool(np.allclose(p.y, p.X @ p.w))
    True
    """
    n_train = check_positive_int(n_train, "n_train")
    d = check_positive_int(d, "d")
    n_test = check_positive_int(n_test, "n_test")
    sigma_n = check_nonnegative_real(sigma_n, "sigma_n")
    sigma_s = check_nonnegative_real(sigma_s, "sigma_s")
    train_noise = _check_kind(train_noise, "train_noise")
    test_noise = _check_kind(test_noise, "test_noise")
    rng = as_generator(seed)
    seed_value = None if isinstance(seed, np.random.Generator) else int(seed)
    X = rng.standard_normal((n_train, d))
    X_test = rng.standard_normal((n_test, d))
    w = rng.standard_normal(d)
    y = X @ w + _noise(rng, train_noise, sigma_n, n_train)
    y_test = X_test @ w + _noise(rng, test_noise, sigma_s, n_test)
    return LinearProblem(X=X, y=y, X_test=X_test, y_test=y_test, w=w, sigma_n=sigma_n,
                         sigma_s=sigma_s, train_noise=train_noise, test_noise=test_noise,
                         seed=seed_value)

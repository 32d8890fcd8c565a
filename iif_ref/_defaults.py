"""The numerical defaults that are chosen by measurement, and the one damping rule.

Every attributor damps its curvature as ``F = C + lam_d I`` (Eq. 17, 31). The rule that
turns a ``damping=`` argument into the absolute ``lam_d`` lives here, in one function
(:func:`absolute_damping`) that the kernel layer, the torch side and the Dask engine all
call; its constant :data:`RELATIVE_DAMPING` and the projection dimension that IIF,
the projected influence function and TRAK share (:data:`DEFAULT_PROJ_DIM`) are defined
nowhere else. This module imports NumPy only, so the kernel layer (which must not import
torch) and the torch side can both depend on it without an import circle.
"""
from __future__ import annotations

import numpy as np

__all__ = ["RELATIVE_DAMPING", "DEFAULT_RELATIVE_DAMPING", "DEFAULT_PROJ_DIM",
           "DEFAULT_PROJECTION", "absolute_damping",
           "default_relative_damping"]

#: Default damping relative to the mean eigenvalue ``tr(C) / dim`` of the undamped
#: curvature (``dim = P`` projected, ``n_params`` unprojected). It caps
#: ``cond(C + lam_d I) <= 1 + dim / RELATIVE_DAMPING`` (docs/kernels.md).
RELATIVE_DAMPING = 1e-3

#: The relative damping ``r`` that ``damping="auto"`` means for each attributor, chosen
#: by measurement (``validation/damping_defaults.py``, docs/results/damping_defaults.json):
#: on the digits MLP at 1,000 and 500 training samples each value is the LDS-best of the
#: grid ``r = 1e-4 … 100`` at both sizes. One ``r`` for all would cost up to 0.27 LDS (the
#: best ``r`` spans 0.1 for IIF to 10 for TRAK), so the rule ``r · tr(C)/dim`` is one
#: function with one constant per attributor. Keys: ``(method, projected)``.
DEFAULT_RELATIVE_DAMPING = {
    ("iif", True): 0.1,      # IIF, projected Fisher per step (Eq. 17, 31)
    ("iif", False): 10.0,    # IIF unprojected: as the exact influence function
    ("if", True): 1.0,       # influence function, projected Fisher
    ("if", False): 10.0,     # influence function, exact Gauss-Newton / Fisher / Hessian
    ("trak", True): 10.0,    # TRAK, projected margin-gradient Gram
    ("trak", False): 10.0,
}

#: Projection dimension ``P`` of Eq. (17) used by default by IIF, the projected
#: influence function and TRAK, so that their defaults are like for like.
DEFAULT_PROJ_DIM = 512

#: The projection ``A`` of Eq. (17) (``kind=``) each attributor uses by default, chosen
#: by the rule of docs/kernels.md ("Measured against dense"): a structured projection
#: replaces the dense Rademacher reference where it is within 0.01 LDS of it and at least
#: 2x faster at 60,000 samples. The CountSketch is, for IIF (0.004 below dense on Table 2's
#: full digits ground truth, 2.9x faster end to end) and for TRAK (0.005 below on digits,
#: 0.003 above on real MNIST). The projected influence function keeps the dense one: it
#: projects once and has no speed target the dense one misses.
DEFAULT_PROJECTION = {"iif": "countsketch", "trak": "countsketch", "if": "rademacher",
                      "tracin": "rademacher"}


def default_relative_damping(method, *, projected):
    """``r`` of ``damping="auto"`` for ``method`` (:data:`DEFAULT_RELATIVE_DAMPING`);
    :data:`RELATIVE_DAMPING` for a method without a measured default."""
    return DEFAULT_RELATIVE_DAMPING.get((method, bool(projected)), RELATIVE_DAMPING)


def absolute_damping(damping, trace, dim, *, relative=RELATIVE_DAMPING):
    """The absolute damping ``lam_d`` that a ``damping=`` argument stands for.

    Parameters
    ----------
    damping : None, "auto", float or callable
        None or ``"auto"``: the relative default ``relative * trace / dim``; a
        float: that absolute value (the caller has checked it finite and >= 0); a
        callable: ``damping(trace, dim) -> lam_d`` per trace, whose results must be
        finite and >= 0.
    trace : float or array_like, shape (B,)
        ``tr(C)`` of the undamped curvature of each slice (for the projected Fisher
        ``tr(Phi^T Phi) = ||Phi||_F^2``).
    dim : int
        Order of ``C``.
    relative : float, keyword-only
        ``r`` of the relative default; :func:`default_relative_damping` gives each
        attributor's measured value (the kernel layer's own default is
        :data:`RELATIVE_DAMPING`).

    Returns
    -------
    float or ndarray, shape (B,), float64
        A float for a scalar ``trace``, else one value per slice.

    Raises
    ------
    ValueError
        ``damping`` is a string other than ``"auto"``, or a callable returned a
        negative or non-finite value.

    Notes
    -----
    The damping of the Fisher of Eq. (31) and of the dense curvature; the relative
    default bounds ``cond(C + lam_d I) <= 1 + dim / RELATIVE_DAMPING``.

    Examples
    --------
    >>> absolute_damping("auto", 12.0, 3)       # 1e-3 * 12 / 3
    0.004
    >>> absolute_damping(0.5, [1.0, 2.0], 3).tolist()
    [0.5, 0.5]
    """
    scalar = np.ndim(trace) == 0
    traces = np.atleast_1d(np.asarray(trace, dtype=np.float64))
    if damping is None or (isinstance(damping, str) and damping == "auto"):
        lam = float(relative) * traces / dim
    elif isinstance(damping, str):
        raise ValueError(f"damping must be 'auto', None, a float >= 0 or a callable, "
                         f"got {damping!r}")
    elif callable(damping):
        lam = np.array([float(damping(float(tr), dim)) for tr in traces])
        if not np.all(np.isfinite(lam) & (lam >= 0)):
            raise ValueError(f"damping(trace, P) must return finite values >= 0, got "
                             f"{lam.tolist()}")
    else:
        lam = np.full(traces.shape[0], float(damping))
    return float(lam[0]) if scalar else lam

"""Kernel layer: counter-based random projection and batched projected-Fisher solves.

Public functions
----------------
project              ``Phi = G A`` streamed over row blocks of ``A`` (Eq. 17, 31)
Projector            ``G -> G A`` for many calls, ``A`` generated once when it fits a budget;
                     dense, CountSketch or Kronecker-factored (``kind=``)
LinearBlock          where a Linear layer sits in the flat parameter index (Kronecker)
projection_matrix    the materialised ``A`` (or a row block), for tests and small problems
projected_scores     ``-sum_b Gamma_b (Phi_b^T Phi_b + lam_d I)^{-1} Psi_b^T``
factor_fisher        float64 Cholesky of every ``F_b`` once -> :class:`FisherFactor`
solve_factored       ``F_b^{-1} rhs`` from a :class:`FisherFactor` (also ``factor.solve``)
solve_step           one step's ``-Gamma (C + lam_d I)^{-1} Psi^T`` and its condition estimate
resolve_damping      the absolute per-slice damping a ``damping=`` argument stands for
RELATIVE_DAMPING     the relative default, ``lam_b = RELATIVE_DAMPING tr(Phi_b^T Phi_b) / P``
is_device_array      whether an array lives in accelerator memory (CuPy, torch CUDA)
available_backends   backends that can run here ("numpy", "numba", "cupy")

``A`` is specified in ``docs/rng.md``; the interface, precision policy and damping
default in ``docs/kernels.md``. Importing this package imports neither numba nor cupy;
backends load lazily (see :mod:`iif_ref.kernels._registry` for the backend protocol).
"""
from iif_ref.kernels._fisher import RELATIVE_DAMPING, FisherFactor, solve_step
from iif_ref.kernels._frontend import (DEFAULT_MEMORY_BUDGET, PROJECTOR_KINDS, LinearBlock,
                                       Projector, factor_fisher,
                                       is_device_array, project, projected_scores,
                                       projection_matrix, resolve_damping, solve_factored)
from iif_ref.kernels._registry import available_backends

__all__ = ["DEFAULT_MEMORY_BUDGET", "PROJECTOR_KINDS", "RELATIVE_DAMPING", "FisherFactor",
           "LinearBlock", "Projector",
           "available_backends",
           "factor_fisher", "is_device_array", "project", "projected_scores",
           "projection_matrix", "resolve_damping", "solve_factored", "solve_step"]

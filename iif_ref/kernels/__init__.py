"""Kernel layer: counter-based random projection and batched projected-Fisher solves.

Public functions
----------------
project              ``Phi = G A`` streamed over row blocks of ``A`` (Eq. 17, 31)
projection_matrix    the materialised ``A`` (or a row block), for tests and small problems
projected_scores     ``-sum_b Gamma_b (Phi_b^T Phi_b + lam_d I)^{-1} Psi_b^T``
available_backends   backends that can run here ("numpy", "numba", "cupy")

``A`` is specified in ``docs/rng.md``; the interface, precision policy and damping
default in ``docs/kernels.md``. Importing this package imports neither numba nor cupy;
backends load lazily (see :mod:`iif_ref.kernels._registry` for the backend protocol).
"""
from iif_ref.kernels._frontend import (DEFAULT_MEMORY_BUDGET, project, projected_scores,
                                       projection_matrix)
from iif_ref.kernels._fisher import RELATIVE_DAMPING
from iif_ref.kernels._registry import available_backends

__all__ = ["DEFAULT_MEMORY_BUDGET", "RELATIVE_DAMPING", "available_backends", "project", "projected_scores",
           "projection_matrix"]

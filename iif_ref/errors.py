"""Exceptions and warnings of iif_ref, each carrying what is needed to fix the call."""
from __future__ import annotations

import numpy as np

__all__ = ["NotPositiveDefiniteError", "IndefiniteObjectiveError",
           "ProjectionDimensionWarning"]


class NotPositiveDefiniteError(np.linalg.LinAlgError, ValueError):
    """A damped (projected) Fisher or Hessian is not positive definite.

    Attributes
    ----------
    slices : tuple of int
        Indices of the failing batch slices (path steps, or step × test).
    damping : float
        The damping that was used.
    suggested_damping : float or None
        A damping that would make every failing slice positive definite, if known.
    """

    def __init__(self, message, *, slices=(), damping=None, suggested_damping=None):
        super().__init__(message)
        self.slices = tuple(int(s) for s in slices)
        self.damping = damping
        self.suggested_damping = suggested_damping


class IndefiniteObjectiveError(ValueError):
    """The unlearning objective ``−L_test + λ L_train`` (Eq. 12) has no minimiser.

    Attributes
    ----------
    test_indices : tuple of int
        Test points whose objective Hessian ``λ∇²L_train − ∇²L_test`` is not positive definite.
    min_eigenvalues : tuple of float
        The smallest eigenvalue of that Hessian for each offending test point.
    """

    def __init__(self, message, *, test_indices=(), min_eigenvalues=()):
        super().__init__(message)
        self.test_indices = tuple(int(i) for i in test_indices)
        self.min_eigenvalues = tuple(float(v) for v in min_eigenvalues)


class ProjectionDimensionWarning(UserWarning):
    """``proj_dim`` exceeds the number of parameters it projects.

    The projection of Eq. (17) then reduces no dimension: it costs more than the exact
    unprojected curvature (``proj_dim=None``), whose scores it reproduces without damping
    (docs/algorithm1.md, the Eq. 17 row). The run goes on (the projected scores are well
    defined), as scikit-learn's random projections do with more components than features.
    """

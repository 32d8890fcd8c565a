"""Conformance testing of attribution methods against exact least-squares answers.

Wrap a method in :class:`Attributor` (declaring its kind, sign and normalisation) and
call :func:`check_attributor`, or parametrise a pytest test with
:func:`parametrize_with_checks`. Exact answers come from :mod:`iif_ref.linear`; the
protocol is documented in :mod:`iif_ref.testing.protocol` and ``docs/testing-guide.md``.
Hypothesis strategies for property tests live in :mod:`iif_ref.testing.strategies` (it
imports hypothesis, so it is not imported here). Importing this package needs neither
torch nor hypothesis.
"""
from iif_ref.testing.checks import (
    CHECKS,
    CheckResult,
    ConformanceError,
    ConformanceReport,
    check_attributor,
    exact_scores,
    parametrize_with_checks,
)
from iif_ref.testing.problems import default_problems, make_problem
from iif_ref.testing.protocol import AttributionProblem, Attributor

__all__ = [
    "AttributionProblem",
    "Attributor",
    "CHECKS",
    "CheckResult",
    "ConformanceError",
    "ConformanceReport",
    "check_attributor",
    "default_problems",
    "exact_scores",
    "make_problem",
    "parametrize_with_checks",
]

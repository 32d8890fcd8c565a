"""Conformance checks of attribution methods against exact least-squares answers.

Each check calls a declared :class:`~iif_ref.testing.protocol.Attributor` on one or more
:class:`~iif_ref.testing.protocol.AttributionProblem`s, converts its scores to this
package's convention (sign, normalisation) and compares them with the exact answer from
:mod:`iif_ref.linear` — or, for invariances, with the method's own scores on a transformed
problem. A result says whether the check passed, the measured error, the tolerance and
why that tolerance, and, on failure, where the largest discrepancy is and what the
discrepancy looks like (a sign flip, a constant factor, a permutation).

The checks
----------
``if_exact``
    IF equals ``−∇L_test(θ*) H⁻¹ ∇l_i(θ*)`` (:func:`iif_ref.linear.influence_function`).
``tracin_exact``
    TracIn equals ``−Σ_c lr ∇L_test(θ_c)·∇l_i(θ_c)`` over the problem's checkpoints
    (:func:`iif_ref.linear.tracin`).
``iif_exact``
    IIF equals the exact Euler sum of Eq. (10) with the unlearning baseline of
    Eq. (12)–(13) (:func:`iif_ref.linear.integrated_influence`); ``K = problem.K`` for
    an attributor with exact path models, ``K = 1`` otherwise (θ_1 = θ* needs none).
``iif_k1_equals_if``
    Lemma 2.5 / Corollary 2.6: IIF with ``K = 1`` and baseline ``f(x; θ*)`` equals IF.
``iif_completeness``
    ``Σ_i I[t, i] − Δ_t`` equals the Euler bias ``c_t² / K`` with
    ``c_t = f(x̂_t; θ*) − f(x̂_t; θ'_t)`` (0 for the exact integral): the test residual
    is affine along the path, so the right-endpoint sum over-counts by exactly that.
``permutation``
    Permuting the training samples permutes the score columns the same way.
``duplicate``
    Appending a copy of training sample ``j``: the two copies get identical scores, and
    the scores equal the exact answer on the enlarged problem (θ*, H and the GD
    trajectory all change; no method may keep the old scores).
``target_scaling``
    Multiplying every target by ``s`` multiplies every loss by ``s²`` (θ*, θ', the GD
    iterates and all residuals scale by ``s``), hence every exact score by ``s²``.
``loo_sign``
    IF only: the sign of each score equals that of the exact leave-one-out change of the
    test loss on every (test, train) pair where the least-squares LOO–IF relation
    ``LOO = IF/(1 − h_i)·(1 − s/(2r))`` fixes it beyond rounding. TracIn and IIF estimate
    other quantities and are not held to it.
``projector_deterministic``, ``projector_batch_split``, ``projector_linear``, ``projector_jl``
    A projector is a pure function of the seed, independent of how rows are batched,
    linear in ``G``, and preserves squared norms in expectation (Johnson–Lindenstrauss).
"""
from __future__ import annotations

import math
import unittest
from dataclasses import dataclass, field

import numpy as np

from iif_ref.testing.problems import default_problems, hessian_condition
from iif_ref.testing.protocol import AttributionProblem, Attributor, as_attributor

__all__ = ["CheckResult", "ConformanceReport", "ConformanceError", "CHECKS",
           "check_attributor", "parametrize_with_checks", "exact_scores"]

# Factor between the rounding-error bound and the tolerance of every exact comparison
# (see :func:`_rounding_tolerance` for the bound). Pinned from both sides by
# tests/test_testing_tolerances.py: a relative error of 1e-9 on the well-conditioned
# default problem must fail, and must pass once _SAFETY is a thousand times larger (so a
# thousandfold loosening cannot go unnoticed); validation/conformance_false_alarms.py
# measures that no correct float64 attributor exceeds it over 10,000 generated problems.
_SAFETY = 10.0
# Scale factor used by ``target_scaling`` (not a power of two, so scaling is not exact
# in floating point and a correct method must still agree only to rounding).
_TARGET_SCALE = 3.0
# ``loo_sign`` compares signs only on (test, train) pairs where the exact LOO–IF relation
# fixes them: LOO = IF/(1 − h_i) · (1 − s/(2r)) with s the LOO shift of the test
# residual r (see :func:`_check_loo_sign`). With |s| ≤ _LOO_MAX_SHIFT·|r| the second
# factor lies in [1 − ½·_LOO_MAX_SHIFT, 1 + ½·_LOO_MAX_SHIFT] = [½, 3/2]: positive with a
# margin of ½, so rounding in s and r cannot flip it. (The relation alone allows
# |s| < 2|r|; the margin keeps the domain test itself robust.)
_LOO_MAX_SHIFT = 1.0
# A pair counts only if |IF| exceeds _LOO_MARGIN × the Frobenius error the IF tolerance
# allows: an attributor that passes ``if_exact`` is off by at most tol·‖IF‖ per entry,
# the reference IF by at most that again, so 2× cannot flip a counted sign.
_LOO_MARGIN = 2.0
# Projector check sizes: n vectors of n_params entries projected to dim coordinates.
_PROJ_N, _PROJ_M, _PROJ_DIM, _PROJ_SEED = 48, 300, 512, 12345
# Standard deviations allowed in the JL check: the seed is fixed, so the check is
# deterministic; 6σ keeps a correct projector from failing on an unlucky seed.
_JL_SIGMAS = 6.0


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class CheckResult:
    """Outcome of one check on one problem.

    Attributes
    ----------
    check : str
    problem : str or None
        ``None`` for projector checks (they use their own inputs).
    status : {"passed", "failed", "skipped", "error"}
        ``"error"``: the attributor raised; counts as a failure.
    error : float or None
        The measured error (meaning given in ``message``).
    tolerance : float or None
    tolerance_reason : str
        Why that tolerance.
    message : str
        What was compared; on failure where and how it differs.
    worst_index : tuple or None
        (test, train) index of the largest discrepancy, where one applies.
    """

    check: str
    problem: str | None
    status: str
    error: float | None = None
    tolerance: float | None = None
    tolerance_reason: str = ""
    message: str = ""
    worst_index: tuple | None = None

    @property
    def passed(self):
        return self.status == "passed"

    @property
    def failed(self):
        return self.status in ("failed", "error")

    def as_dict(self):
        return {"check": self.check, "problem": self.problem, "status": self.status,
                "error": self.error, "tolerance": self.tolerance,
                "tolerance_reason": self.tolerance_reason, "message": self.message,
                "worst_index": list(self.worst_index) if self.worst_index else None}


class ConformanceError(AssertionError):
    """Raised by :meth:`ConformanceReport.raise_if_failed`; carries the report."""

    def __init__(self, message, report=None):
        super().__init__(message)
        self.report = report


@dataclass
class ConformanceReport:
    """Results of :func:`check_attributor` for one attributor.

    ``str(report)`` is a table; :meth:`raise_if_failed` raises :class:`ConformanceError`
    listing every failure.
    """

    attributor: str
    declaration: dict
    results: list = field(default_factory=list)

    @property
    def passed(self):
        """True when no check failed or errored (skipped checks are not failures)."""
        return not any(r.failed for r in self.results)

    @property
    def failures(self):
        return [r for r in self.results if r.failed]

    def counts(self):
        out = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
        for r in self.results:
            out[r.status] += 1
        return out

    def as_dict(self):
        return {"attributor": self.attributor, "declaration": self.declaration,
                "counts": self.counts(), "results": [r.as_dict() for r in self.results]}

    def table(self, *, width=70):
        """Plain-text table, one row per result (messages cut to ``width``)."""
        head = f"{'check':<26} {'problem':<18} {'status':<8} {'error':>10} {'tol':>10}  message"
        lines = [f"conformance of {self.attributor} ({_fmt_decl(self.declaration)})", head,
                 "-" * len(head)]
        for r in self.results:
            msg = r.message if len(r.message) <= width else r.message[:width - 1] + "…"
            lines.append(f"{r.check:<26} {str(r.problem or '-'):<18} {r.status:<8} "
                         f"{_fmt(r.error):>10} {_fmt(r.tolerance):>10}  {msg}")
        c = self.counts()
        lines.append(f"{c['passed']} passed, {c['failed']} failed, {c['error']} error(s), "
                     f"{c['skipped']} skipped")
        return "\n".join(lines)

    def __str__(self):
        return self.table()

    def raise_if_failed(self):
        """Raise :class:`ConformanceError` naming every failed check; return self otherwise."""
        if self.passed:
            return self
        lines = [f"{self.attributor}: {len(self.failures)} conformance check(s) failed"]
        for r in self.failures:
            lines.append(f"- {r.check} on {r.problem or '-'} [{r.status}]: {r.message} "
                         f"(error {_fmt(r.error)}, tolerance {_fmt(r.tolerance)}: "
                         f"{r.tolerance_reason})")
        raise ConformanceError("\n".join(lines), report=self)


def _fmt(x):
    return "-" if x is None else f"{x:.3g}"


def _fmt_decl(decl):
    return ", ".join(f"{k}={v}" for k, v in decl.items())


# --------------------------------------------------------------------------- helpers
def exact_scores(kind, problem):
    """The exact scores of ``kind`` on ``problem`` in this package's convention.

    Parameters
    ----------
    kind : {"if", "tracin", "iif"}
    problem : AttributionProblem
        For IIF, ``problem.K``, ``problem.baseline`` and ``problem.lam`` are used.

    Returns
    -------
    ndarray, shape (n_test, n_train)
    """
    from iif_ref import linear
    args = (problem.X, problem.y, problem.X_test, problem.y_test)
    if kind == "if":
        return linear.influence_function(*args)
    if kind == "tracin":
        return linear.tracin(*args, lr=problem.lr, checkpoints=list(problem.checkpoints))
    if kind == "iif":
        baseline = problem.baseline_targets if problem.baseline == "prediction" else None
        return linear.integrated_influence(*args, lam=problem.lam, K=problem.K,
                                           baseline_targets=baseline)
    raise ValueError(f"no exact scores for kind {kind!r}")


def _cancellation(value, parts):
    """``Σ|parts| / |value|``: how much rounding in ``value = Σ parts`` is amplified.

    Capped at ``1/eps``, where ``value`` is itself rounding noise (then every relative
    statement about it is void, and the tolerance says so by exceeding 1).
    """
    eps = np.finfo(float).eps
    return np.minimum(parts / np.maximum(np.abs(value), parts * eps + np.finfo(float).tiny),
                      1.0 / eps)


def _amplification(kind, problem):
    """Per-test-point and per-sample factors by which residual rounding is amplified.

    Every score of IF, TracIn and IIF on least squares is a product of a test residual
    ``r_t = x̂_tᵀθ − ŷ_t`` and a training residual ``e_i = x_iᵀθ − y_i`` (Eq. 10 and the
    closed forms of :mod:`iif_ref.linear`), each formed by cancellation: its rounding
    error is ``eps·(|x̂_tᵀθ| + |ŷ_t|)``, i.e. ``eps·γ`` relative with
    ``γ = (|x̂_tᵀθ| + |ŷ_t|)/|r_t|``. θ is θ* for IF and IIF, and also every checkpoint
    for TracIn; IIF's rows also carry ``c_t = x̂_tᵀθ* − x̂_tᵀθ'_t`` (Eq. 12–13), formed
    by the same kind of subtraction.

    Returns
    -------
    g_test : ndarray, shape (n_test,)
    g_train : ndarray, shape (n_train,)
        Each ≥ 1.
    """
    thetas = [problem.theta_star]
    if kind == "tracin":
        thetas += list(problem.checkpoint_params())
    g_test = np.ones(problem.n_test)
    g_train = np.ones(problem.n_train)
    for theta in thetas:
        ft, f = problem.X_test @ theta, problem.X @ theta
        g_test = np.maximum(g_test, _cancellation(ft - problem.y_test,
                                                  np.abs(ft) + np.abs(problem.y_test)))
        g_train = np.maximum(g_train, _cancellation(f - problem.y,
                                                    np.abs(f) + np.abs(problem.y)))
    if kind == "iif":
        from iif_ref import linear
        prime = linear.unlearned_params(problem.X, problem.y, problem.X_test, problem.y_test,
                                        lam=problem.lam)
        f_star = problem.X_test @ problem.theta_star
        f_prime = np.einsum("td,td->t", problem.X_test, prime)
        # The path parameters θ_k are least-squares solutions for the targets ρ(t_k)
        # (Eq. 2, 16). An implementation that computes them (refits; the closed form of
        # iif_ref.linear does not) has forward error κ(H)·eps·γ relative to θ, with
        # γ = ‖y‖/‖y − Xθ*‖ the cancellation of the fitted residuals; the test residual
        # x̂_tᵀθ_k − ŷ_t then amplifies that error by its own γ_t: a product, not a sum
        # (measured on a problem with |r_t| = 5e-8: a correct Newton-refit IIF exceeded
        # the sum's bound by 18x in that row, and stays 9x below the product's).
        gamma = float(_cancellation(np.linalg.norm(problem.y - problem.X @ problem.theta_star),
                                    np.linalg.norm(problem.y)))
        g_test = np.maximum(g_test, gamma * g_test)
        g_test = np.maximum(g_test, _cancellation(f_star - f_prime,
                                                  np.abs(f_star) + np.abs(f_prime)))
    return g_test, g_train


def _rounding_tolerance(attributor, problem, ref, *, rows=False):
    """Relative tolerance on ``‖S − ref‖/‖ref‖`` from κ(H), sizes, cancellation, precision.

    The bound: a backward-stable least-squares solve has forward error ≤ κ(H)·eps times a
    low-degree polynomial in the sizes, taken as ``n_train + d`` (one rounding per term of
    the gradients' and dot products' sums); the fitted residuals lose a further factor
    ``γ = ‖y‖/‖y − Xθ*‖`` (the relative error of the residual vector, which a bad
    conditioning of X magnifies through θ*). Entry ``(t, i)`` then carries the
    cancellation factors of its own test and training residuals (:func:`_amplification`),
    so the allowed error is ``b·|ref[t, i]|·(γ + γ_t + γ_i)`` with
    ``b = _SAFETY·(n + d)·κ(H)·eps``, and the relative Frobenius tolerance is
    ``b·‖|ref|∘(γ + γ_t + γ_i)‖/‖ref‖`` — equal to ``b·(γ + O(1))`` on a problem whose
    residuals are all of the same size, and large only where some residual is at
    rounding level (no relative statement holds there).

    Parameters
    ----------
    attributor : Attributor
    problem : AttributionProblem
    ref : ndarray, shape (n_test, n_train)
        The scores the check compares with (exact, or the attributor's own).
    rows : bool
        Return one tolerance per test point (row) instead of one for the matrix.

    Returns
    -------
    tol : float or ndarray
    reason : str
    """
    if attributor.rtol is not None:
        tol = attributor.rtol
        return (np.full(problem.n_test, tol) if rows else tol,
                f"rtol={attributor.rtol:g} declared by the attributor")
    kappa_h = hessian_condition(problem)
    theta = problem.theta_star
    resid = np.linalg.norm(problem.y - problem.X @ theta)
    gamma = float(_cancellation(resid, np.linalg.norm(problem.y)))
    g_test, g_train = _amplification(attributor.kind, problem)
    size = problem.n_train + problem.d
    b = _SAFETY * size * kappa_h * attributor.eps
    ref = np.abs(np.asarray(ref, dtype=float))
    W = ref * (gamma + g_test[:, None] + g_train[None, :])
    worst = gamma + float(np.max(g_test)) + float(np.max(g_train))
    if rows:
        num, den = np.linalg.norm(W, axis=1), np.linalg.norm(ref, axis=1)
        eff = np.where(den > 0, num / np.where(den > 0, den, 1.0), worst)
    else:
        den = float(np.linalg.norm(ref))
        eff = float(np.linalg.norm(W)) / den if den > 0 else worst
    tol = b * eff
    shown = float(np.max(eff))
    return tol, (f"{_SAFETY:g}·(n+d)·κ(H)·eps·γ_eff = {_SAFETY:g}·{size}·{kappa_h:.3g}·"
                 f"{attributor.eps:.2g}·{shown:.3g} ({attributor.precision}; γ_eff: residual "
                 f"cancellation, γ = {gamma:.3g})")


def _diagnose(got, ref, n_train):
    """Words for what a discrepancy looks like (constant factor, sign, permutation)."""
    ref_sq = float(np.sum(ref * ref))
    if ref_sq == 0.0:
        return ""
    alpha = float(np.sum(got * ref) / ref_sq)       # least-squares factor got ≈ α·ref
    fit_err = np.linalg.norm(got - alpha * ref) / math.sqrt(ref_sq)
    hints = []
    if fit_err < 1e-6:
        for value, words in ((-1.0, "the opposite sign convention (declare sign='loss_down'"
                                    " if that is the method's convention)"),
                             (float(n_train), "the mean-loss normalisation "
                                              "(declare normalisation='mean')"),
                             (1.0 / n_train, "a 1/n_train factor"),
                             (0.5, "a missing factor 2 (½ in the squared error?)"),
                             (2.0, "an extra factor 2"),
                             (-0.5, "a sign flip and a missing factor 2"),
                             (-float(n_train), "a sign flip and the mean normalisation")):
            if abs(alpha - value) <= 1e-6 * max(1.0, abs(value)):
                hints.append(f"scores are {alpha:.6g} × exact: {words}")
                break
        else:
            if abs(alpha - 1.0) <= 1e-6:
                hints.append("no sign, factor or order difference: the error is spread "
                             "over all scores (an iterative solver's stopping rule or lower "
                             "precision? declare rtol= or precision=)")
            else:
                hints.append(f"scores are a constant {alpha:.6g} × exact")
    elif np.allclose(np.sort(got, axis=1), np.sort(ref, axis=1), rtol=1e-6,
                     atol=1e-12 * math.sqrt(ref_sq)):
        hints.append("each row holds the exact values in another order: the training "
                     "samples are permuted")
    else:
        hints.append(f"best constant factor {alpha:.4g} leaves relative error {fit_err:.3g}")
    return "; ".join(hints)


def _void(check, problem, tol, reason):
    """A skip when the tolerance is ≥ 100 % (``None`` otherwise).

    The derived tolerance reaches 1 where κ(H)·eps·(n + d) approaches 1/γ_eff: a Hessian
    too ill-conditioned for the precision, or residuals at rounding level (a noise-free
    fit, whose scores are rounding noise). No relative comparison means anything there:
    two correct evaluations may differ by more than the scores themselves.
    """
    if np.max(tol) < 1.0:
        return None
    return _skip(check, problem, f"tolerance {np.max(tol):.3g} ≥ 1 ({reason}): at this "
                                 f"conditioning and residual size the scores carry no "
                                 f"relative accuracy")


def _compare(check, problem, got, ref, tol, reason, what):
    """CheckResult for relative Frobenius error ‖got − ref‖/‖ref‖ ≤ tol (skip if tol ≥ 1)."""
    void = _void(check, problem, tol, reason)
    if void is not None:
        return void
    diff = got - ref
    ref_norm = float(np.linalg.norm(ref))
    err = float(np.linalg.norm(diff) / ref_norm) if ref_norm > 0 else float(np.linalg.norm(diff))
    worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(np.abs(diff))), diff.shape))
    if err <= tol:
        return CheckResult(check, problem.name, "passed", err, tol, reason,
                           f"{what}: relative error {err:.3g}", worst)
    msg = (f"{what}: relative error {err:.3g} > {tol:.3g}; worst at (test, train) = {worst}: "
           f"got {got[worst]:.6g}, expected {ref[worst]:.6g}")
    hint = _diagnose(got, ref, problem.n_train)
    if hint:
        msg += f"; {hint}"
    return CheckResult(check, problem.name, "failed", err, tol, reason, msg, worst)


def _skip(check, problem, why):
    return CheckResult(check, getattr(problem, "name", None), "skipped", message=why)


# --------------------------------------------------------------------------- score checks
def _check_if_exact(att, problem):
    ref = exact_scores("if", problem)
    tol, reason = _rounding_tolerance(att, problem, ref)
    return _compare("if_exact", problem, att.scores(problem), ref, tol, reason,
                    "IF vs −∇L_test H⁻¹ ∇l_i")


def _check_tracin_exact(att, problem):
    ref = exact_scores("tracin", problem)
    tol, reason = _rounding_tolerance(att, problem, ref)
    return _compare("tracin_exact", problem, att.scores(problem), ref, tol, reason,
                    f"TracIn vs exact sum over checkpoints {list(problem.checkpoints)}")


def _iif_problem(att, problem):
    """The IIF problem this attributor can be held to exactly (unlearning baseline)."""
    K = problem.K if "exact_path" in att.capabilities else 1
    return problem.replace(K=K, baseline="unlearn")


def _check_iif_exact(att, problem):
    p = _iif_problem(att, problem)
    ref = exact_scores("iif", p)
    tol, reason = _rounding_tolerance(att, p, ref)
    return _compare("iif_exact", p, att.scores(p), ref, tol, reason,
                    f"IIF (K={p.K}, unlearning baseline, lam={p.lam:g}) vs exact Eq. (10)")


def _check_iif_k1_equals_if(att, problem):
    if "prediction_baseline" not in att.capabilities:
        return _skip("iif_k1_equals_if", problem,
                     "attributor does not declare 'prediction_baseline' (baseline f(x; θ*))")
    p = problem.replace(K=1, baseline="prediction")
    ref = exact_scores("if", p)
    tol, reason = _rounding_tolerance(att, p, ref)
    return _compare("iif_k1_equals_if", p, att.scores(p), ref, tol, reason,
                    "IIF (K=1, baseline f(x; θ*)) vs IF (Corollary 2.6)")


def _check_iif_completeness(att, problem):
    from iif_ref import linear
    if "exact_integral" in att.capabilities:
        K = None
    elif "exact_path" in att.capabilities:
        K = problem.K
    else:
        K = 1                                   # θ_1 = θ*: no path model needed
    p = problem.replace(K=K, baseline="unlearn")
    S = att.scores(p)
    args = (p.X, p.y, p.X_test, p.y_test)
    delta = linear.delta(*args, lam=p.lam)
    theta_prime = linear.unlearned_params(*args, lam=p.lam)
    c = p.X_test @ p.theta_star - np.einsum("td,td->t", p.X_test, theta_prime)
    bias = np.zeros_like(delta) if K is None else c ** 2 / K
    resid = S.sum(axis=1) - delta
    # Rounding in Σ_i is relative to Σ_i |I[t, i]|, not to the (possibly cancelled) sum.
    scale = np.maximum(np.abs(S).sum(axis=1) + np.abs(delta) + bias, np.finfo(float).tiny)
    rel = np.abs(resid - bias) / scale
    tols, reason = _rounding_tolerance(att, p, S, rows=True)
    # Rows whose tolerance reaches 1 carry no relative accuracy (see _void).
    rel = np.where(tols < 1.0, rel, 0.0)
    if not np.any(tols < 1.0):
        return _void("iif_completeness", p, tols, reason)
    t = int(np.argmax(rel / tols))
    tol = float(tols[t])
    what = (f"Σ_i I − Δ vs Euler bias c²/K (K={K})" if K is not None
            else "Σ_i I − Δ vs 0 (exact integral)")
    status = "passed" if rel[t] <= tol else "failed"
    msg = (f"{what}: worst test point {t}: Σ_i I − Δ = {resid[t]:.6g}, expected "
           f"{bias[t]:.6g} (Δ = {delta[t]:.6g}); relative error {rel[t]:.3g}")
    return CheckResult("iif_completeness", p.name, status, float(rel[t]), tol, reason, msg,
                       (t,))


def _permutation(problem):
    rng = np.random.default_rng(987654321 + (problem.seed or 0))
    return rng.permutation(problem.n_train)


def _check_permutation(att, problem):
    p = _scoring_problem(att, problem)
    perm = _permutation(p)
    S = att.scores(p)
    q = p.replace(X=p.X[perm], y=p.y[perm], name=f"{p.name}[permuted]")
    tol, reason = _rounding_tolerance(att, p, S)
    return _compare("permutation", p, att.scores(q), S[:, perm], tol, reason,
                    "scores on permuted data vs permuted scores")


def _scoring_problem(att, problem):
    """The problem version the attributor is exact on (IIF: see :func:`_iif_problem`)."""
    return _iif_problem(att, problem) if att.kind == "iif" else problem


def _check_duplicate(att, problem):
    p = _scoring_problem(att, problem)
    j = 0
    q = p.replace(X=np.vstack([p.X, p.X[j:j + 1]]), y=np.append(p.y, p.y[j]),
                  name=f"{p.name}[dup {j}]")
    S = att.scores(q)
    ref = exact_scores(att.kind, q)
    tol, reason = _rounding_tolerance(att, q, ref)
    void = _void("duplicate", p, tol, reason)
    if void is not None:
        return void
    n = p.n_train
    copies = float(np.linalg.norm(S[:, j] - S[:, n]) / max(np.linalg.norm(S), 1e-300))
    if copies > tol:
        t = int(np.argmax(np.abs(S[:, j] - S[:, n])))
        return CheckResult("duplicate", p.name, "failed", copies, tol, reason,
                           f"the two copies of sample {j} get different scores: relative "
                           f"difference {copies:.3g}; test {t}: {S[t, j]:.6g} vs {S[t, n]:.6g}",
                           (t, n))
    res = _compare("duplicate", p, S, ref, tol, reason,
                   f"scores with sample {j} duplicated vs exact answer on the enlarged data "
                   f"(copies agree to {copies:.2g})")
    return res


def _check_target_scaling(att, problem):
    p = _scoring_problem(att, problem)
    s = _TARGET_SCALE
    S = att.scores(p)
    q = p.replace(y=s * p.y, y_test=s * p.y_test, name=f"{p.name}[y×{s:g}]")
    tol, reason = _rounding_tolerance(att, p, S)
    return _compare("target_scaling", p, att.scores(q), s * s * S, tol, reason,
                    f"scores with targets ×{s:g} vs {s * s:g} × scores")


def _loo_shift(problem):
    """LOO shifts ``s[t, i] = r_t − r_{t,−i}``, test residuals ``r_t`` and leverages ``h_i``.

    Sherman–Morrison: ``θ_{−i} = θ* − (XᵀX)⁻¹x_i e_i/(1 − h_i)`` with ``e_i = y_i − x_iᵀθ*``,
    so ``s[t, i] = x̂_tᵀ(XᵀX)⁻¹x_i e_i/(1 − h_i)`` (computed through a QR of X).
    """
    Q, R = np.linalg.qr(problem.X)
    h = np.einsum("id,id->i", Q, Q)
    theta = problem.theta_star
    e = problem.y - problem.X @ theta
    r = problem.X_test @ theta - problem.y_test
    C = np.linalg.solve(R.T, problem.X_test.T).T @ Q.T        # x̂_tᵀ(XᵀX)⁻¹x_i
    return C * (e / (1.0 - h))[None, :], r, h


def _check_loo_sign(att, problem):
    """Sign agreement with the exact leave-one-out change where the LOO–IF relation fixes it.

    For least squares with the summed loss, removing sample ``i`` shifts the test residual
    by ``s = r − r_{−i}``; the exact LOO change ``r² − r_{−i}² = s(2r − s)`` and
    ``IF = 2 r s (1 − h_i)``, hence ``LOO = IF/(1 − h_i) · (1 − s/(2r))``. Where
    ``|s| ≤ |r|`` the last factor is in [½, 3/2], so LOO and IF have the same sign. The
    check counts those pairs whose exact |IF| also exceeds twice the Frobenius error
    ``if_exact`` tolerates, and requires the attributor's sign to equal the exact LOO's on
    every one of them: an attributor within the ``if_exact`` tolerance cannot fail it.
    No rank-correlation threshold is sound: near-equal IF values may be reordered by the
    factors ``1/(1 − h_i)`` and ``1 − s/(2r)`` on any problem.
    """
    from iif_ref import linear
    s, r, h = _loo_shift(problem)
    # leave_one_out refuses 1 − h at rounding level (the refit is undefined there).
    if np.max(h) >= 1.0 - 64.0 * problem.d * np.finfo(float).eps:
        return _skip("loo_sign", problem,
                     f"a training sample has leverage {np.max(h):.17g} ≈ 1: leave-one-out "
                     f"is undefined")
    ref = exact_scores("if", problem)
    tol, reason = _rounding_tolerance(att, problem, ref)
    margin = _LOO_MARGIN * tol * float(np.linalg.norm(ref))
    mask = (np.abs(s) <= _LOO_MAX_SHIFT * np.abs(r)[:, None]) & (np.abs(ref) > margin)
    n_pairs = int(mask.sum())
    domain = (f"pairs with |s| ≤ |r| (LOO–IF relation fixes the sign) and |IF| > "
              f"{_LOO_MARGIN:g}·tol·‖IF‖ ({reason})")
    if n_pairs == 0:
        return _skip("loo_sign", problem,
                     f"no (test, train) pair where the sign is determined: needs {domain}")
    loo = linear.leave_one_out(problem.X, problem.y, problem.X_test, problem.y_test)
    S = att.scores(problem)
    wrong = mask & (np.sign(S) != np.sign(loo))
    n_wrong = int(wrong.sum())
    frac = n_wrong / n_pairs
    msg = (f"sign of scores vs sign of the exact LOO change of the test loss on {n_pairs} of "
           f"{mask.size} (test, train) pairs: {n_wrong} differ")
    worst = None
    if n_wrong:
        worst = tuple(int(i) for i in np.argwhere(wrong)[0])
        msg += (f"; first at (test, train) = {worst}: score {S[worst]:.6g}, LOO "
                f"{loo[worst]:.6g}")
        if frac > 0.5:
            msg += "; the signs are opposite on most pairs: the sign convention looks reversed"
    return CheckResult("loo_sign", problem.name, "failed" if n_wrong else "passed", frac, 0.0,
                       f"every sign must agree on the {domain}", msg, worst)


# --------------------------------------------------------------------------- projectors
def _proj_inputs():
    rng = np.random.default_rng(_PROJ_SEED)
    return rng.standard_normal((_PROJ_N, _PROJ_M))


def _proj_tol(att):
    # Each output entry is a length-m dot product: rounding ≤ m·eps relative to
    # Σ|g_p||a_pq| ≤ √m‖g‖‖a‖; 10× that bound.
    return 10.0 * _PROJ_M * att.eps, f"10·n_params·eps = 10·{_PROJ_M}·{att.eps:.2g}"


def _rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _projector_agreement(name, att, got, want, compared):
    """Check that two projections the identity says are equal agree to rounding.

    ``compared`` describes the two sides; the relative Frobenius difference is held to
    :func:`_proj_tol`.
    """
    tol, reason = _proj_tol(att)
    err = _rel(got, want)
    status = "passed" if err <= tol else "failed"
    return CheckResult(name, None, status, err, tol, reason,
                       f"{compared}: relative difference {err:.3g}")


def _check_projector_deterministic(att, problem=None):
    G = _proj_inputs()
    a = att.project(G, _PROJ_DIM, 7)
    b = att.project(G, _PROJ_DIM, 7)
    c = att.project(G, _PROJ_DIM, 8)
    same = float(np.max(np.abs(a - b)))
    other = _rel(c, a)
    if same != 0.0:
        return CheckResult("projector_deterministic", None, "failed", same, 0.0,
                           "same seed must give the same bits",
                           f"two calls with seed 7 differ by up to {same:.3g}")
    if other < 0.1:
        return CheckResult("projector_deterministic", None, "failed", other, 0.1,
                           "independent seeds give projections differing by O(1)",
                           f"seeds 7 and 8 give nearly the same projection "
                           f"(relative difference {other:.3g}): the seed is ignored?")
    return CheckResult("projector_deterministic", None, "passed", same, 0.0,
                       "same seed must give the same bits",
                       f"seed 7 twice: identical; seed 8 differs by {other:.3g} (relative)")


def _check_projector_batch_split(att, problem=None):
    G = _proj_inputs()
    whole = att.project(G, _PROJ_DIM, 7)
    k = _PROJ_N // 3
    parts = np.vstack([att.project(G[:k], _PROJ_DIM, 7), att.project(G[k:], _PROJ_DIM, 7),
                       ])
    return _projector_agreement("projector_batch_split", att, parts, whole,
                                f"rows [0,{k}) and [{k},{_PROJ_N}) projected separately vs "
                                f"together")


def _check_projector_linear(att, problem=None):
    G = _proj_inputs()
    G1, G2 = G[: _PROJ_N // 2], G[_PROJ_N // 2:]
    a, b = 0.75, -1.5
    lhs = att.project(a * G1 + b * G2, _PROJ_DIM, 7)
    rhs = a * att.project(G1, _PROJ_DIM, 7) + b * att.project(G2, _PROJ_DIM, 7)
    return _projector_agreement("projector_linear", att, lhs, rhs,
                                "project(aG1 + bG2) vs a·project(G1) + b·project(G2)")


def _check_projector_jl(att, problem=None):
    G = _proj_inputs()
    Phi = att.project(G, _PROJ_DIM, 7)
    ratio = np.sum(Phi ** 2, axis=1) / np.sum(G ** 2, axis=1)
    # For ±1/√P or N(0, 1/P) entries, ‖gA‖²/‖g‖² has mean 1 and variance ≤ 2/P.
    sd_one = math.sqrt(2.0 / _PROJ_DIM)
    mean_tol = _JL_SIGMAS * sd_one / math.sqrt(_PROJ_N)
    max_tol = _JL_SIGMAS * sd_one
    mean_err = abs(float(np.mean(ratio)) - 1.0)
    j = int(np.argmax(np.abs(ratio - 1.0)))
    max_err = abs(float(ratio[j]) - 1.0)
    ok = mean_err <= mean_tol and max_err <= max_tol
    msg = (f"‖gA‖²/‖g‖² over {_PROJ_N} vectors, dim {_PROJ_DIM}: mean {np.mean(ratio):.4f} "
           f"(|mean − 1| ≤ {mean_tol:.3g}), worst {ratio[j]:.4f} at row {j} "
           f"(|· − 1| ≤ {max_tol:.3g})")
    if not ok and np.mean(ratio) > 0:
        m = float(np.mean(ratio))
        if abs(m - _PROJ_DIM) / _PROJ_DIM < 0.2:
            msg += "; norms grow by dim: entries ±1 instead of ±1/√dim?"
        elif abs(m * _PROJ_DIM - 1) < 0.2:
            msg += "; norms shrink by dim: entries ±1/dim instead of ±1/√dim?"
    return CheckResult("projector_jl", None, "passed" if ok else "failed",
                       max(mean_err / mean_tol, max_err / max_tol), 1.0,
                       f"{_JL_SIGMAS:g} standard deviations (var ≤ 2/dim); error is the "
                       f"larger deviation in units of its tolerance", msg, (j,))


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class _Check:
    name: str
    kinds: tuple
    func: object
    uses_problems: bool = True

    def run(self, att, problem):
        try:
            return self.func(att, problem)
        except Exception as exc:  # the attributor (or its inputs) raised: report, not crash
            return CheckResult(self.name, getattr(problem, "name", None), "error",
                               message=f"{type(exc).__name__}: {exc}")


_SCORING = ("if", "tracin", "iif")
CHECKS = {c.name: c for c in (
    _Check("if_exact", ("if",), _check_if_exact),
    _Check("tracin_exact", ("tracin",), _check_tracin_exact),
    _Check("iif_exact", ("iif",), _check_iif_exact),
    _Check("iif_k1_equals_if", ("iif",), _check_iif_k1_equals_if),
    _Check("iif_completeness", ("iif",), _check_iif_completeness),
    _Check("permutation", _SCORING, _check_permutation),
    _Check("duplicate", _SCORING, _check_duplicate),
    _Check("target_scaling", _SCORING, _check_target_scaling),
    _Check("loo_sign", ("if",), _check_loo_sign),
    _Check("projector_deterministic", ("projector",), _check_projector_deterministic, False),
    _Check("projector_batch_split", ("projector",), _check_projector_batch_split, False),
    _Check("projector_linear", ("projector",), _check_projector_linear, False),
    _Check("projector_jl", ("projector",), _check_projector_jl, False),
)}
"""Every check by name, with the kinds it applies to."""


def _select(att, checks):
    applicable = [c for c in CHECKS.values() if att.kind in c.kinds]
    if checks is None:
        return applicable
    names = [checks] if isinstance(checks, str) else list(checks)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; known: {sorted(CHECKS)}")
    return [c for c in applicable if c.name in names]


def _problems(problems):
    if problems is None:
        return default_problems()
    problems = [problems] if isinstance(problems, AttributionProblem) else list(problems)
    for i, p in enumerate(problems):
        if not isinstance(p, AttributionProblem):
            raise TypeError(f"problems[{i}] must be an AttributionProblem, "
                            f"got {type(p).__name__}")
    if not problems:
        raise ValueError("problems is empty")
    return problems


def check_attributor(fn, *, kind=None, sign=None, normalisation=None, problems=None,
                     checks=None, **declaration):
    """Run every check that applies to an attribution method.

    Parameters
    ----------
    fn : callable or Attributor
        ``fn(problem) -> scores (n_test, n_train)`` (``kind="projector"``:
        ``fn(G, dim, seed) -> (n, dim)``), or an :class:`Attributor`.
    kind : {"if", "tracin", "iif", "projector"}
        Required for a plain callable.
    sign : {"loss_up", "loss_down"}, optional
        Default ``"loss_up"`` (this package's).
    normalisation : {"sum", "mean"} or float, optional
        Default ``"sum"``.
    problems : AttributionProblem or list of them, optional
        Default :func:`~iif_ref.testing.problems.default_problems`.
    checks : str or list of str, optional
        Restrict to these check names (default: all that apply to ``kind``).
    **declaration
        Further :class:`Attributor` fields: ``name``, ``precision``, ``capabilities``,
        ``rtol``.

    Returns
    -------
    ConformanceReport

    Examples
    --------
    >>> from iif_ref import linear
    >>> def my_if(p):
    ...     return linear.influence_function(p.X, p.y, p.X_test, p.y_test)
    >>> report = check_attributor(my_if, kind="if")
    >>> report.passed
    True
    """
    decl = {k: v for k, v in (("kind", kind), ("sign", sign),
                              ("normalisation", normalisation)) if v is not None}
    decl.update(declaration)
    att = as_attributor(fn, **decl)
    selected = _select(att, checks)
    problem_list = _problems(problems) if any(c.uses_problems for c in selected) else []
    decl = {"kind": att.kind, "precision": att.precision}
    if att.kind != "projector":           # sign and normalisation mean nothing for A
        decl.update(sign=att.sign, normalisation=att.normalisation,
                    capabilities=sorted(att.capabilities), rtol=att.rtol)
    report = ConformanceReport(att.name, decl)
    for c in selected:
        if c.uses_problems:
            report.results.extend(c.run(att, p) for p in problem_list)
        else:
            report.results.append(c.run(att, None))
    return report


class _BoundCheck:
    """One check, callable on an attributor: raises on failure, SkipTest when skipped."""

    def __init__(self, check, problems):
        self.check = check
        self.problems = problems
        self.__name__ = check.name

    def __call__(self, attributor):
        att = as_attributor(attributor)
        if not self.check.uses_problems:
            results = [self.check.run(att, None)]
        else:
            results = [self.check.run(att, p) for p in _problems(self.problems)]
        report = ConformanceReport(att.name, {"kind": att.kind}, results)
        report.raise_if_failed()
        if all(r.status == "skipped" for r in results):
            raise unittest.SkipTest("; ".join(sorted({r.message for r in results})))
        return report

    def __repr__(self):
        return self.check.name


def parametrize_with_checks(attributors, *, problems=None):
    """A ``pytest.mark.parametrize`` over (attributor, check) pairs, like scikit-learn's.

    Parameters
    ----------
    attributors : list of Attributor
    problems : list of AttributionProblem, optional
        Default :func:`~iif_ref.testing.problems.default_problems`.

    Returns
    -------
    pytest.MarkDecorator
        Parametrises the arguments ``attributor`` and ``check``; test ids are
        ``"<attributor name>-<check name>"``. Call ``check(attributor)`` in the test: it
        raises :class:`ConformanceError` (an ``AssertionError``) on failure and
        ``unittest.SkipTest`` when the check does not apply (pytest reports a skip with
        the reason).

    Examples
    --------
    ::

        @parametrize_with_checks([Attributor(my_if, kind="if")])
        def test_conformance(attributor, check):
            check(attributor)
    """
    import pytest
    attributors = list(attributors)
    params, ids = [], []
    for att in attributors:
        if not isinstance(att, Attributor):
            raise TypeError(f"attributors must be Attributor instances (they carry the "
                            f"declared conventions), got {type(att).__name__}")
        for c in _select(att, None):
            params.append((att, _BoundCheck(c, problems)))
            ids.append(f"{att.name}-{c.name}")
    return pytest.mark.parametrize("attributor, check", params, ids=ids)

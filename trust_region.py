"""The trust-region subproblem over the exact curvature, by damped solves only.

``min_s g^T s + s^T B s / 2`` subject to ``||s|| <= radius``, for B the
Hessian or the Gauss-Newton matrix of a tracked chain
(:class:`hessian_inverse.HessianOperator`), solved exactly by Moré and
Sorensen's method (docs/ALGORITHM.md, "Trust region").  Its helpers live here
too: Lanczos for the lowest eigenpair (:func:`lowest_eigenpair`) and an exact
positive-definiteness test by a layer-wise block Cholesky
(:func:`definiteness`).  This module uses the core; the core never uses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from hessian_inverse import (AffinePivots, HessianInverseError, HessianOperator, RiccatiFactor,
                             SingularHessianError)

__all__ = ["EigenEstimate", "lowest_eigenpair", "Definiteness", "definiteness",
           "TrustRegionStep", "trust_region_step"]


@dataclass
class EigenEstimate:
    """Lanczos estimate of the lowest eigenpair of B (on the complement of the gauge).

    - ``value``: the lowest Ritz value theta.  Always an UPPER bound on
      lambda_min (Cauchy interlacing), so ``-value`` is a safe lower bound for
      the trust-region multiplier.
    - ``vector`` (n,): its unit Ritz vector q.
    - ``residual``: ``||B q - theta q||``; when Lanczos has converged to the
      lowest eigenvalue, lambda_min >= theta - residual.
    - ``steps``: Lanczos steps (Hessian-vector products) taken.
    """

    value: float
    vector: torch.Tensor
    residual: float
    steps: int


def lowest_eigenpair(operator: HessianOperator, steps: int = 64, seed: int = 0
                     ) -> EigenEstimate:
    """Lowest eigenpair of the operator's B by Lanczos with full reorthogonalisation.

    Uses only products ``B v`` (two sweeps each; no factorisation).  Runs on
    the orthogonal complement of the known gauge N, where B is blind anyway
    (``B N = 0`` for the Hessian and the GGN alike), so a softmax
    classifier's always-zero eigenvalues are not reported.  The start vector
    is random (``seed``), never the gradient: the Krylov space of a gradient
    orthogonal to the lowest eigenvector (the trust region's hard case) would
    never contain it.  Cost: ``min(steps, n - k)`` products and O(n steps^2).
    """
    project = operator.project_out_gauge
    kw = dict(dtype=operator.dtype, device=operator.device)
    n = operator.num_params
    free = n - (0 if operator.gauge is None else operator.gauge.shape[1])
    m = max(1, min(int(steps), free))
    gen = torch.Generator(device=operator.device).manual_seed(seed)
    q = project(torch.randn(n, generator=gen, **kw))
    basis = [q / q.norm()]
    alpha, beta = [], []
    for j in range(m):
        w = project(operator.matmul(basis[j]))
        alpha.append(torch.dot(basis[j], w))
        Q = torch.stack(basis, dim=1)
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w = w - Q @ (Q.T @ w)
        beta.append(w.norm())
        scale = max(abs(a.item()) for a in alpha)
        if j + 1 == m or beta[-1] <= 1e-12 * scale:  # done, or an invariant subspace
            break
        basis.append(w / beta[-1])
    T = torch.diag(torch.stack(alpha))
    if len(alpha) > 1:
        off = torch.stack(beta[:-1])
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(T)
    y = vectors[:, 0]
    ritz = torch.stack(basis[:len(alpha)], dim=1) @ y
    return EigenEstimate(values[0].item(), ritz / ritz.norm(),
                         (beta[-1] * y[-1].abs()).item(), len(alpha))


@dataclass
class Definiteness:
    """Whether ``B + damping I`` is positive definite, decided exactly (:func:`definiteness`).

    - ``positive_definite``: the verdict.
    - ``layer``: 0-based layer whose Schur complement P_l failed, or None.
    - ``direction`` (n,): when not positive definite, a vector v with
      ``v^T (B + damping I) v = quadratic_form <= 0``; None otherwise.
    - ``quadratic_form``: that value (the lowest eigenvalue of the failing P_l).
    """

    positive_definite: bool
    layer: Optional[int] = None
    direction: Optional[torch.Tensor] = None
    quadratic_form: Optional[float] = None


def definiteness(operator: HessianOperator, damping: float) -> Definiteness:
    r"""Exact positive-definiteness test of ``B + damping I``: a block Cholesky by layers.

    B is the operator's curvature (``B + P_N`` at damping 0 when there is a gauge,
    as in :meth:`HessianOperator.factorize`).  The core's layer-wise factorisation
    (:class:`hessian_inverse.RiccatiFactor`, docs/ALGORITHM.md, "Layer-wise LDL^T")
    writes ``v^T (B + damping I) v = sum_l w_l^T P_l w_l`` with ``w_l = v_l + K_l
    t_{l-1}``, a unit block-triangular change of variables, so by Sylvester's law of
    inertia ``B + damping I`` is positive definite iff every P_l is: one Cholesky
    factorisation each (Moré-Sorensen's test, layer by layer; closed-form layers in
    rotated coordinates, nothing p_l x p_l).  When P_l fails (the last layer that
    fails, counting down from the loss: every P_k above it is positive definite), its
    lowest eigenvector w, continued through the layers above with ``w_k = 0``
    (``v_k = -K_k t_{k-1}``), gives a direction v with
    ``v^T (B + damping I) v = lambda_min(P_l) <= 0``.

    At damping 0 a rank-deficient layer input (batch below fan-in + 1, or repeated
    examples) is decided first: a unit x_l with ``K x_l = 0`` (rows summing to zero
    for the gauge-fixed loss layer) has ``v^T (B + P_N) v = 0``, so B + P_N is not
    positive definite.  Such a v is an exact null vector of B + P_N for the first
    layer (no C_1) and under the GGN (no E term); for a later layer of the Hessian it
    couples to the layers below through the E term of C_l, ``(B + P_N) v != 0``, and
    B + P_N is then indefinite, not singular.
    """
    lam = float(damping)
    derivs = operator.derivs
    gauge = operator.gauge if lam == 0.0 else None
    factor = RiccatiFactor(derivs, lam, "cholesky", gauge)
    if lam == 0.0:
        for l in range(len(derivs)):
            group, g = factor.pivot(l)
            found = group.null_direction(g) if isinstance(group, AffinePivots) else None
            if found is not None:
                blocks = [found.new_zeros(d.num_params) for d in derivs]
                blocks[l] = found
                return Definiteness(False, l, torch.cat(blocks), 0.0)
    failed = factor.broken.nonzero()
    if not failed.numel():
        return Definiteness(True)
    layer = int(failed[-1])
    group, g = factor.pivot(layer)
    value, w = group.lowest(g)
    blocks = [w.new_zeros(d.num_params) for d in derivs[:layer]] + [w]
    t = derivs[layer].J @ w
    for k in range(layer + 1, len(derivs)):
        later, j = factor.pivot(k)
        v = -later.select(j).gain(t[None, :, None])[0, :, 0]
        blocks.append(v)
        t = derivs[k].J @ v + derivs[k].F @ t
    return Definiteness(False, layer, torch.cat(blocks), value)


@dataclass
class TrustRegionStep:
    """The solution of ``min g^T s + s^T B s / 2  s.t.  ||s|| <= radius``.

    - ``step`` (n,): s.  ``(B + damping I) s = -g``, plus ``tau z`` in the hard case.
    - ``damping``: the multiplier lambda >= 0 (0 for an interior Newton step).
    - ``predicted_reduction``: ``-(g^T s + s^T B s / 2)`` from one more ``B s``.
    - ``on_boundary``: ``||s|| = radius`` to the tolerance.
    - ``hard_case``: the step is ``s(lambda) + tau z``, z an approximate lowest
      eigenvector, lambda ~ -lambda_min: g is (nearly) orthogonal to z and the
      secular equation has no root where ``B + lambda I`` is positive definite.
    - ``iterations``: trial values of lambda (each one definiteness test and,
      if positive definite, one LU factorisation).
    - ``converged``: the stopping test was met; if not (iteration cap), the
      feasible step with the lowest model value seen is returned.
    - ``min_eigenvalue``: the best upper bound found on lambda_min(B) (Lanczos
      and Rayleigh quotients), on the complement of the gauge.
    """

    step: torch.Tensor
    damping: float
    predicted_reduction: float
    on_boundary: bool
    hard_case: bool
    iterations: int
    converged: bool
    min_eigenvalue: float


@dataclass
class _SecularPoint:
    """The damped solves at lambda = ``damping`` (B + lambda I positive definite).

    ``step`` = s = -(B + lambda I)^{-1} g; ``inverse_quadratic`` =
    s^T (B + lambda I)^{-1} s, so that d||s||/dlambda = -inverse_quadratic/||s||;
    ``quadratic`` = s^T (B + lambda I) s = -g^T s; ``eigvec`` = the unit
    inverse-iteration update (B + lambda I)^{-1} z of the lowest-eigenvector estimate.
    """

    damping: float
    step: torch.Tensor
    norm: float
    inverse_quadratic: float
    quadratic: float
    eigvec: torch.Tensor


def _secular_point(operator: HessianOperator, g: torch.Tensor, z: torch.Tensor,
                   damping: float, project, rtol: Optional[float]) -> Optional[_SecularPoint]:
    """One factorisation of ``B + damping I``, two solves (None if singular or inaccurate).

    No acceptance probe: every solve is held to the accuracy contract ``rtol``
    itself (:class:`hessian_inverse.HessianInverse`).
    """
    try:
        inverse = operator.factorize(damping, check_condition=False, rtol=rtol)
        solved = project(inverse.solve(torch.stack([g, z], dim=1)))
        s, w = -solved[:, 0], solved[:, 1]
        inverse_quadratic = torch.dot(s, project(inverse.solve(s))).item()
    except SingularHessianError:  # also InaccurateSolveError: lambda is at -lambda_min
        return None
    return _SecularPoint(damping, s, s.norm().item(), inverse_quadratic,
                         -torch.dot(g, s).item(), w / w.norm())


def _boundary_roots(s: torch.Tensor, z: torch.Tensor, radius: float) -> tuple[float, float]:
    """Both roots tau of ``||s + tau z|| = radius`` (z a unit vector, ||s|| <= radius)."""
    sz = torch.dot(s, z).item()
    disc = math.sqrt(max(sz * sz + radius * radius - s.norm().item() ** 2, 0.0))
    return -sz - disc, -sz + disc


def _bracketed(candidate: Optional[float], lo: float, hi: float) -> float:
    """The next trial lambda: ``candidate`` if inside (lo, hi), else just right of lo.

    ``lo`` is a lower bound on the multiplier (so is every lambda found
    indefinite), hence the fallback steps 1% of the bracket off it, as in
    Moré-Sorensen's safeguard.
    """
    if candidate is not None and lo < candidate < hi:
        return candidate
    return lo + 0.01 * (hi - lo)


def trust_region_step(operator: HessianOperator, gradient: torch.Tensor, radius: float,
                      tol: Optional[float] = None, max_iterations: int = 40,
                      lanczos_steps: int = 20, seed: int = 0,
                      rtol: Optional[float] = None,
                      damping_guess: Optional[float] = None) -> TrustRegionStep:
    """Solve the trust-region subproblem exactly with damped solves (Moré-Sorensen).

    Minimises ``m(s) = g^T s + s^T B s / 2`` over ``||s|| <= radius`` for B the
    operator's curvature (Hessian or GGN).  The minimiser is
    ``s(lambda) = -(B + lambda I)^{-1} g`` with ``B + lambda I`` positive
    semi-definite and ``lambda (radius - ||s||) = 0``.  If B is positive
    definite and the Newton step fits, it is returned (lambda = 0).  Otherwise
    lambda solves the secular equation ``phi(lambda) = 1/||s(lambda)|| -
    1/radius = 0`` by safeguarded Newton, ``lambda+ = lambda + (||s||^2 / q)
    (||s|| - radius) / radius`` with ``q = s^T (B + lambda I)^{-1} s``: each
    trial lambda costs one ``operator.factorize(lambda)`` (reusing the same
    derivatives) and two solves with it; no n x n matrix is formed.  phi is
    concave and increasing where ``B + lambda I`` is positive definite, so
    Newton from the left never overshoots; from the right it may, which the
    bracket [lo, hi] catches.

    Positive definiteness.  The factorisation is a pivoted LU of an indefinite
    saddle-point system, so unlike Moré-Sorensen's Cholesky it cannot reveal
    an indefinite ``B + lambda I``.  Each trial lambda is therefore first
    tested exactly by :func:`definiteness`, a block Cholesky of ``B + lambda
    I`` by layers (Sylvester's law of inertia; closed-form layers in
    rotated coordinates, so about the cost of the structured factorisation
    and linear in depth, with no p_l x p_l matrix).  A
    failure proves ``lambda < -lambda_min``; it also yields a direction of
    non-positive curvature whose Rayleigh quotient rho raises the lower bound
    to ``lo = -rho``.  A Lanczos run on B (:func:`lowest_eigenpair`, HVPs
    only) gives the first such bound and the first lowest-eigenvector
    estimate z; every factorisation then refines z by a step of inverse iteration.

    Hard case.  When g is (nearly) orthogonal to the lowest eigenvector,
    ``||s(lambda)|| < radius`` all the way down to ``lambda = -lambda_min``.
    At any positive definite lambda with ``||s|| < radius``, the step
    ``s + tau z`` with ``||s + tau z|| = radius`` (tau of lower model value)
    satisfies ``m(s + tau z) <= (1 - sigma) m*`` whenever ``tau^2 z^T (B +
    lambda I) z <= sigma (s^T (B + lambda I) s + lambda radius^2)`` (Moré and
    Sorensen 1983, Lemma 3.4, with sigma = ``tol``); that step is returned
    with ``hard_case=True``.  Likewise s alone is returned (interior, minimum
    norm) when ``lambda (radius^2 - ||s||^2) <= sigma (s^T (B + lambda I) s +
    lambda radius^2)``: this is how a singular positive semi-definite B (a GGN
    with little data) ends.  After ``max_iterations`` trials the feasible step
    of lowest model value seen is returned with ``converged=False``.

    The softmax gauge.  The loss is exactly flat along the gauge directions N
    (docs/ALGORITHM.md, "The softmax gauge"): g has no component there, B N = 0, and the model
    predicts no change along them, so any multiple could be added to a
    solution.  The subproblem is solved on the complement of N: the minimum-
    norm solution is returned, g's component along N (rounding) is dropped,
    and lambda = 0 means ``-B^+ g`` (the gauge-fixed factorisation).

    Args:
        operator: from :func:`hessian_operator` (``curvature='hessian'`` or ``'ggn'``).
        gradient: g (n,), ordered as ``model.parameters()``.
        radius: the trust-region radius > 0.
        tol: relative tolerance on ``||s|| = radius`` and the model value (sigma);
            default ``max(1e-9, 100 eps)`` of the dtype.
        max_iterations: cap on trial values of lambda.
        lanczos_steps, seed: for the initial :func:`lowest_eigenpair`.
        rtol: the accuracy contract of the damped solves (None: the core's
            default, :func:`hessian_inverse.default_rtol`); a solve that misses
            it at a positive definite lambda marks lambda as a lower bound, as
            lambda is then within rounding of -lambda_min.
        damping_guess: a first trial lambda (e.g. the previous step's
            multiplier), used if it lies inside the initial bracket.

    Returns:
        :class:`TrustRegionStep`.
    """
    if not (isinstance(gradient, torch.Tensor) and gradient.dim() == 1):
        raise HessianInverseError("gradient must be a vector of shape (n,)")
    blocks = operator.split(gradient, "gradient")
    radius = float(radius)
    if not (math.isfinite(radius) and radius > 0):
        raise HessianInverseError(f"radius must be a finite number > 0, got {radius}")
    if tol is None:
        tol = max(1e-9, 100 * torch.finfo(operator.dtype).eps)
    project = operator.project_out_gauge
    g = project(torch.cat(blocks)[:, 0])
    gnorm = g.norm().item()
    eig = lowest_eigenpair(operator, lanczos_steps, seed)
    z, rho = eig.vector, eig.value

    def result(step, damping, on_boundary, hard_case, iterations, converged):
        reduction = -(torch.dot(g, step) + 0.5 * torch.dot(step, operator.matmul(step))).item()
        return TrustRegionStep(step, float(damping), reduction, on_boundary, hard_case,
                               iterations, converged, rho)

    def rayleigh(v: torch.Tensor) -> tuple[float, torch.Tensor]:
        v = project(v)
        v = v / v.norm()
        return torch.dot(v, operator.matmul(v)).item(), v

    if gnorm == 0.0:  # a stationary point: move along negative curvature, if any
        if rho >= 0:
            return result(torch.zeros_like(g), 0.0, False, False, 0, True)
        return result(radius * z, -rho, True, True, 0, True)

    lo = max(0.0, -rho)  # lambda* >= -lambda_min >= -rho
    hi = gnorm / radius + max(0.0, eig.residual - eig.value)  # grown if wrong
    lam = 0.0 if rho > 0 else _bracketed(None, lo, hi)
    if damping_guess is not None and lo < damping_guess < hi:
        lam = float(damping_guess)
    best = (math.inf, torch.zeros_like(g), 0.0, False)  # (model value, step, lambda, hard)
    for iteration in range(1, max_iterations + 1):
        test = definiteness(operator, lam)
        point = (_secular_point(operator, g, z, lam, project, rtol) if test.positive_definite
                 else None)
        if point is None:  # indefinite (or singular): lambda <= -lambda_min
            lo = max(lo, lam)
            if test.direction is not None and test.direction.norm() > 0:
                rho_v, v = rayleigh(test.direction)
                if rho_v < rho:
                    rho, z = rho_v, v
                lo = max(lo, -rho)
            hi = hi if hi > lo else 2 * lo + gnorm / radius
            lam = _bracketed(None, lo, hi)
            continue
        zBz, z = rayleigh(point.eigvec)
        rho = min(rho, zBz)
        s, norm, quadratic = point.step, point.norm, point.quadratic
        # With (B + lambda I) s = -g: m(s) = -(s^T (B + lambda I) s + lambda ||s||^2) / 2.
        model_s = -0.5 * (quadratic + lam * norm * norm)
        scale = min(1.0, radius / norm)  # the feasible multiple of s, as a fallback
        value = -scale * quadratic + 0.5 * scale * scale * (quadratic - lam * norm * norm)
        best = min(best, (value, scale * s, lam, False), key=lambda c: c[0])
        on_boundary = abs(norm - radius) <= tol * radius
        if on_boundary or (lam == 0.0 and norm <= radius):
            return result(s, lam, on_boundary, False, iteration, True)
        newton = lam + (norm * norm / point.inverse_quadratic) * (norm - radius) / radius
        fallback = None
        if norm > radius:  # left of the root: Newton cannot overshoot it
            lo = max(lo, lam)
            hi = hi if newton < hi else 2 * newton
        else:  # right of the root, or the hard case
            hi = min(hi, lam)
            bound = quadratic + lam * radius * radius  # -2 m* <= bound
            if lam * (radius * radius - norm * norm) <= tol * bound:
                return result(s, lam, False, False, iteration, True)
            # the largest lambda at which that test would pass if s stayed put: going
            # lower only amplifies rounding in flat directions (~ eps / lambda)
            fallback = 0.5 * tol * quadratic / ((1 - tol) * radius * radius - norm * norm)
            sz = torch.dot(s, z).item()
            value_tau, tau = min((model_s - lam * tau * sz + 0.5 * tau * tau * zBz, tau)
                                 for tau in _boundary_roots(s, z, radius))
            best = min(best, (value_tau, s + tau * z, lam, True), key=lambda c: c[0])
            if tau * tau * (zBz + lam) <= tol * bound:
                return result(s + tau * z, lam, True, True, iteration, True)
        lam = _bracketed(newton if lo < newton < hi else fallback, lo, hi)
    _, step, damping, hard_case = best
    on_boundary = abs(step.norm().item() - radius) <= tol * radius
    return result(step, damping, on_boundary, hard_case, max_iterations, False)


"""A second-order optimizer over the exact inverse curvature: damped Newton or trust region.

:class:`DampedNewton` follows the ``step(closure)`` convention of
:class:`torch.optim.LBFGS`.  It uses the core (:mod:`hessian_inverse`) for the
curvature and its damped solves and :mod:`trust_region` for trust-region
steps; the core never uses it.  docs/training.md explains the choices and
measures them against tuned first-order methods.

The step control is in named parts, read top to bottom: the damping and
radius rules (:func:`hessian_free_update`, :func:`nielsen_update`,
:func:`trust_radius_update`, functions of numbers), the plane model
(:class:`_PlaneModel`), and in :class:`DampedNewton` the direction with its
factorisation reuse (``_direction``), the damped step (``_damped_step``) and the
trust-region step (``_trust_region_step``).
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Callable, Optional

import torch

from hessian_inverse import (PATHS, HessianOperator, LayerSizes, TrackedChain, choose_route,
                             hessian_operator, validate_model)
from trust_region import trust_region_step

__all__ = ["DampedNewton", "hessian_free_update", "nielsen_update", "trust_radius_update"]


def _to_float(loss) -> float:
    if loss is None:
        raise TypeError("DampedNewton: the closure returned None; it must return the loss "
                        "(zero the gradients, compute the loss, call loss.backward(), return it)")
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and \
        math.isfinite(value)


def _count(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# --------------------------------------------------------------------------
# The rules: damping and radius as functions of the reduction ratio rho
# --------------------------------------------------------------------------

#: ``damping_update`` values: the Hessian-free / K-FAC rule, or Nielsen's.
DAMPING_UPDATES = ("factor", "nielsen")
#: Nielsen's tau: with ``damping_update='nielsen'`` and ``damping=None`` the first
#: damping is tau times the curvature along the first gradient.
NIELSEN_TAU = 1e-3


def hessian_free_update(damping: float, ratio: float, factor: float) -> float:
    """Martens' Levenberg-Marquardt rule (Hessian-free, K-FAC): ``damping / factor`` if
    ``rho > 3/4``, ``damping * factor`` if ``rho < 1/4``, else unchanged."""
    if ratio > 0.75:
        return damping / factor
    if ratio < 0.25:
        return damping * factor
    return damping


def nielsen_update(damping: float, ratio: float) -> float:
    """Nielsen's rule for an accepted step (Madsen, Nielsen & Tingleff 2004, eq. 2.21):
    ``damping * max(1/3, 1 - (2 rho - 1)^3)``: a third when the model is right
    (rho >= 1), unchanged at rho = 1/2, up to twice at rho = 0, continuously."""
    return damping * max(1.0 / 3.0, 1.0 - (2.0 * ratio - 1.0) ** 3)


def trust_radius_update(radius: float, ratio: float, on_boundary: bool) -> float:
    """Nocedal & Wright, Algorithm 4.1 (``ratio = -inf`` for a failed proposal): a quarter
    if ``rho < 1/4``, twice if ``rho > 3/4`` on the boundary, else unchanged."""
    if ratio < 0.25:
        return radius / 4
    if ratio > 0.75 and on_boundary:
        return 2 * radius
    return radius


def _clamp(value: float, low: Optional[float], high: float) -> float:
    """``value`` within ``[low, high]``; ``low=None`` keeps it above the smallest normal
    float64 only (no hand-set floor: the solves decide what is too small)."""
    return min(max(value, low if low is not None else _SMALLEST), high)


_SMALLEST = torch.finfo(torch.float64).tiny


# --------------------------------------------------------------------------
# The plane model
# --------------------------------------------------------------------------


class _PlaneModel:
    """The damped quadratic model restricted to the span of V's columns (k = 1 or 2).

    ``m(c) = b.c + c.(M + lam G) c / 2`` with ``b = V^T g``, ``M = V^T H V``,
    ``G = V^T V``.  In the coordinates ``y = L^T c`` (``G = L L^T``) and the
    eigenbasis of ``T = L^{-1} M L^{-T} = Q diag(theta) Q^T``, with
    ``beta = Q^T L^{-1} b``, the minimiser for ``lam > -theta_min`` has
    ``y_i = -beta_i / (theta_i + lam)``, so the step length
    ``||V c|| = ||y||`` and the predicted reduction
    ``-m = sum_i beta_i^2 / (theta_i + lam) / 2`` are explicit in lam.
    """

    def __init__(self, V: torch.Tensor, HV: torch.Tensor, grad: torch.Tensor):
        M = V.T @ HV
        self.chol = torch.linalg.cholesky(V.T @ V)
        T = torch.linalg.solve_triangular(
            self.chol, torch.linalg.solve_triangular(self.chol, 0.5 * (M + M.T),
                                                     upper=False).T, upper=False)
        theta, self.Q = torch.linalg.eigh(0.5 * (T + T.T))
        self.theta = theta.tolist()
        self.beta = (self.Q.T @ torch.linalg.solve_triangular(
            self.chol, (V.T @ grad)[:, None], upper=False)[:, 0]).tolist()

    def lowest(self) -> float:
        """The model's lowest curvature in the plane (per unit step length squared)."""
        return self.theta[0]

    def coefficients(self, lam: float) -> torch.Tensor:
        y = torch.tensor([-b / (t + lam) for b, t in zip(self.beta, self.theta)],
                         dtype=self.Q.dtype, device=self.Q.device)
        return torch.linalg.solve_triangular(self.chol.T, (self.Q @ y)[:, None],
                                             upper=True)[:, 0]

    def reduction(self, lam: float) -> float:
        return 0.5 * sum(b * b / (t + lam) for b, t in zip(self.beta, self.theta))

    def length(self, lam: float) -> float:
        return math.sqrt(sum((b / (t + lam)) ** 2 for b, t in zip(self.beta, self.theta)))

    def damping_for_length(self, target: float, lam: float) -> float:
        """The lam' >= lam at which the minimiser has length ``target`` (bisection on
        log(lam' - lam + tiny): the length falls monotonically as lam' grows)."""
        lo, hi = lam, max(2 * lam, 1e-300)
        while self.length(hi) > target and hi < 1e300:
            hi *= 4
        for _ in range(200):
            mid = math.sqrt(lo * hi) if lo > 0 else 0.5 * hi
            if self.length(mid) > target:
                lo = mid
            else:
                hi = mid
            if hi <= lo * (1 + 1e-6):
                break
        return hi


def _preferred_rescaling(grad: torch.Tensor, s: torch.Tensor, Hs: torch.Tensor, lam: float,
                         previous: float) -> float:
    """alpha_1 = -g.s / s.(H + lam I) s, the damped model's preferred multiple of s alone
    (``previous`` where the model has no positive curvature along s)."""
    norm2 = torch.dot(s, s).item()
    curvature = torch.dot(s, Hs).item() / norm2 + lam
    return -torch.dot(grad, s).item() / (norm2 * curvature) if curvature > 0 else previous


# Settings absent from state dicts written before they existed, with the value that
# reproduces what those runs did (any other absent setting takes this instance's value).
_LEGACY = {"curvature": "hessian", "mode": "damped", "damping_update": "factor",
           "path": "auto"}


class DampedNewton(torch.optim.Optimizer):
    r"""Second-order steps through the exact inverse curvature: damped Newton or trust region.

    Follows the ``step(closure)`` convention of :class:`torch.optim.LBFGS`: the
    closure zeroes the gradients, re-evaluates the loss, calls ``backward()``
    and returns the loss.  The curvature comes from a *tracked* forward pass
    (``model(x, y, track_activations=True)``): either the closure's own, or one
    run by ``curvature_closure`` on a separate, usually smaller batch
    (sub-sampled Newton: the curvature batch sets the price of a step).

    The curvature B_c is the generalized Gauss-Newton matrix
    (``curvature='ggn'``, recommended: positive semi-definite, so every damped
    direction descends) or the Hessian (``curvature='hessian'``).

    **Damped mode** (``mode='damped'``, Levenberg-Marquardt with the step
    control of Martens' Hessian-free and K-FAC; docs/training.md).  With g and
    f the gradient and loss of the closure's batch (the *gradient batch*):

    1. Direction ``s = -(B_c + gamma I)^{-1} g`` from the exact factorisation of
       the curvature batch's B_c, by the route ``path`` (``'auto'``: the cheapest
       by :func:`hessian_inverse.choose_route`, for the GGN usually the
       output-space route; a route that fails is not swapped for another: gamma
       is raised instead).  ``gamma`` (``factor_damping``) is the curvature the
       inverse assumes where B_c has none (a curvature batch of b examples sees
       at most b (classes - 1) directions).  The solve is held to relative
       residual ``solve_tol`` without refinement beyond it.  A factorisation is
       reused for up to ``curvature_reuse`` steps while the steps it gives stay
       good (reduction ratio >= 1/4, rescaling within [1/2, 2]); a checkpoint
       (:meth:`state_dict`) ends the reuse, so resumed runs repeat exactly.
    2. Step ``delta = alpha s + mu d``, d the previous step (``momentum``), with
       (alpha, mu) minimising the damped quadratic model of the gradient batch
       ``m(delta) = g.delta + delta.(H + lambda I) delta / 2`` over the plane,
       a 2 x 2 solve: the K-FAC rule (Martens & Grosse 2015, section 7).  H
       is the gradient batch's Hessian along s and d: exact products when the
       closure's own pass is the tracked one (no ``curvature_closure``),
       otherwise gradient differences ``(grad f(x + h v) - g) / h`` (two closure
       calls, relative accuracy ~ sqrt(eps)).  With a fresh factorisation, no
       curvature batch and lambda = gamma the plane's minimiser is (1, 0)
       exactly; the model earns its keep when B_c is a sub-sample or stale.
       If the model has negative curvature in the plane (the Hessian is
       indefinite), lambda is raised for this step to twice its magnitude.
    3. ``rho = (f(x) - f(x + delta)) / (-m(delta))``.  ``rho < accept_ratio``
       rejects the step: parameters restored and the step retried at a quarter
       of its length (Moré's trust-region rule, through the lambda that gives
       that length in the plane), reusing the direction, its factorisation and
       the products (``rejected``).  After ``max_retries`` rejections a
       gradient step ``-gradient_lr g`` is taken (``gradient_fallbacks``) and
       the momentum is dropped.
    4. The damping update, every ``adapt_interval`` accepted second-order steps
       (``damping_update``):

       - ``'factor'`` (default; Hessian-free, K-FAC): ``lambda`` divided by
         ``damping_factor`` if ``rho > 3/4``, multiplied by it if ``rho < 1/4``
         (:func:`hessian_free_update`; K-FAC: ``damping_factor`` = (20/19)^5
         every 5 steps; Hessian-free: 3/2 every step).  ``gamma`` follows the
         model: ``alpha_1 = -g.s / s.(H + lambda I) s`` is the model's preferred
         rescaling of s alone, and s scales like 1 / gamma where B_c is blind, so
         each new factorisation uses ``gamma / alpha_1`` (by at most a factor of
         4), replacing K-FAC's greedy search over gamma (three factorisations).
       - ``'nielsen'`` (Levenberg-Marquardt for full-batch least squares):
         ``lambda * max(1/3, 1 - (2 rho - 1)^3)`` (:func:`nielsen_update`), and
         every factorisation uses ``gamma = lambda``, one damping as in
         Levenberg-Marquardt.  With no floor on the damping
         (``min_damping=None``), lambda falls by 3 per step where the model is
         right, so near a zero-residual fit convergence becomes superlinear
         (order 1.7-1.8 measured, docs/training.md).

    The initial damping (``damping=None``) is scaled to the curvature along the
    first gradient, ``|g.B_c g| / g.g``, for both lambda and gamma; with
    ``'nielsen'`` it is ``NIELSEN_TAU`` (1e-3, Nielsen's tau) times that.

    **Trust-region mode** (``mode='trust_region'``): ``s`` minimises
    ``g.s + s.B_c s / 2`` over ``||s|| <= radius`` (:func:`trust_region_step`,
    Moré-Sorensen, exact also for indefinite B_c); ``rho`` compares the actual
    with that model's reduction; the radius follows :func:`trust_radius_update`
    (a quarter if ``rho < 1/4``, counted in ``radius_shrinks``; twice if
    ``rho > 3/4`` and the step reached the boundary, ``radius_expansions``),
    kept within ``[min_radius, max_radius]``.  A rejected step (or a failed
    solve) is retried with the smaller radius on the same derivatives, up to
    ``max_retries`` times, then ``-gradient_lr g`` is taken.  The damping
    reports the last multiplier lambda of ``(B_c + lambda I) s = -g``.

    Failures.  A singular or inaccurate solve (any ``torch.linalg.LinAlgError``;
    the solve's accuracy contract is ``rtol = solve_tol``) counts as
    ``singular`` and raises gamma by ``damping_factor^2`` (with ``'nielsen'``,
    lambda with it; in trust-region mode it shrinks the radius); a model
    predicting no decrease counts as ``non_descent``.  A step whose loss or
    gradient is not finite changes nothing (``nonfinite``).  A closure that
    returns without computing a gradient raises :class:`RuntimeError`.

    Every ``curvature_interval``-th step is a second-order step; the steps
    between are plain gradient steps ``-gradient_lr g``.  All steps are clipped
    to ``max_step_norm``.  State (both dampings, the radius, the previous
    step, the counters) is in :meth:`state_dict`, settings in its parameter
    group; copies (``copy.deepcopy``, ``pickle``) carry the model with them.
    :attr:`stats` counts ``newton_steps``, ``gradient_steps``, ``accepted``,
    ``rejected``, ``non_descent``, ``singular``, ``gradient_fallbacks``,
    ``clipped``, ``nonfinite``, ``func_evals`` (closure calls),
    ``factorizations``, ``reused`` (steps on a reused factorisation) and, in
    trust-region mode, ``radius_shrinks``, ``radius_expansions``,
    ``hard_cases`` and ``unconverged``.

    Args:
        model: the :class:`TrackedChain` to train; all its parameters, in
            order, form the single parameter group.
        lr: scale of the chosen step, in (0, 2) (1 = the model's minimiser).
        damping: initial lambda (and gamma), > 0; None: scaled to the curvature.
        min_damping, max_damping: bounds for both dampings.  ``min_damping=None``
            (default): no floor; the dampings go as low as the solves stay within
            ``solve_tol`` (a factorisation refused as singular to working
            precision raises gamma).
        damping_factor: the multiplier (> 1) of one ``'factor'`` adaptation of
            lambda; its square raises gamma after a failed factorisation.
        damping_update: ``'factor'`` or ``'nielsen'`` (above).
        accept_ratio: smallest accepted reduction ratio, in [0, 1).
        max_retries: retries after a rejected or failed proposal.
        max_step_norm: cap on the 2-norm of any step (None: no cap).
        curvature_interval: take a second-order step every this many steps.
        gradient_lr: learning rate of the gradient steps (between second-order
            steps and as the fallback).
        solve_tol: the accuracy contract (``rtol``) of the damped solves.
        memory_limit: bytes, passed to :func:`hessian_operator`'s guard
            (None: the device's free memory).
        curvature: ``'ggn'`` or ``'hessian'``.
        path: the route of the damped mode's factorisations, one of
            :data:`hessian_inverse.PATHS` (``'output'`` needs ``curvature='ggn'``
            and damped mode; ``'generic'`` also holds every layer's derivatives
            as dense blocks).
        mode: ``'damped'`` or ``'trust_region'``.
        radius: initial trust-region radius (2-norm, in parameter space).
        min_radius, max_radius: bounds for the adapted radius (> 0).
        momentum: include the previous step in the 2 x 2 model (damped mode).
        curvature_reuse: most steps one factorisation serves (damped mode).
        adapt_interval: second-order steps between damping updates.

    Example::

        opt = DampedNewton(model)                       # Gauss-Newton, damped
        def closure():
            opt.zero_grad()
            loss = model(x, y)
            loss.backward()
            return loss
        opt.step(closure, curvature_closure=lambda: model(xs, ys, track_activations=True))
    """

    MODES = ("damped", "trust_region")
    TR_TOL = 1e-2  # trust-region subproblems: ||s|| = radius to 1%, model value within 1%
    COUNTERS = ("n_iter", "func_evals", "newton_steps", "gradient_steps", "accepted",
                "rejected", "non_descent", "singular", "gradient_fallbacks", "clipped",
                "nonfinite", "radius_shrinks", "radius_expansions", "hard_cases",
                "unconverged", "factorizations", "reused")

    def __init__(self, model: TrackedChain, lr: float = 1.0,
                 damping: Optional[float] = None, min_damping: Optional[float] = None,
                 max_damping: float = 1e8, damping_factor: float = 1.5,
                 accept_ratio: float = 1e-4, max_retries: int = 3,
                 max_step_norm: Optional[float] = None, curvature_interval: int = 1,
                 gradient_lr: float = 0.1, solve_tol: float = 1e-3,
                 memory_limit: Optional[int] = None, curvature: str = "ggn",
                 mode: str = "damped", radius: float = 1.0, min_radius: float = 1e-6,
                 max_radius: float = 100.0, momentum: bool = True, curvature_reuse: int = 1,
                 adapt_interval: int = 1, damping_update: str = "factor",
                 path: str = "auto"):
        validate_model(model, curvature)
        settings = dict(lr=lr, damping=damping, min_damping=min_damping,
                        max_damping=max_damping, damping_factor=damping_factor,
                        accept_ratio=accept_ratio, max_retries=max_retries,
                        max_step_norm=max_step_norm, curvature_interval=curvature_interval,
                        gradient_lr=gradient_lr, solve_tol=solve_tol, curvature=curvature,
                        mode=mode, radius=radius, min_radius=min_radius, max_radius=max_radius,
                        momentum=momentum, curvature_reuse=curvature_reuse,
                        adapt_interval=adapt_interval, damping_update=damping_update,
                        path=path)
        self._check_settings(settings)
        if memory_limit is not None and not (_count(memory_limit) and memory_limit > 0):
            raise ValueError(f"DampedNewton: memory_limit must be a number of bytes > 0 or "
                             f"None, got {memory_limit!r}")
        params = list(model.parameters())
        if not all(p.requires_grad for p in params):
            raise ValueError("DampedNewton optimises every parameter of the model; all must "
                             "require grad (the Hessian is over model.parameters())")
        super().__init__(params, settings)
        self.model = model
        self.memory_limit = memory_limit
        self._params = self.param_groups[0]["params"]
        self._cache: Optional[dict] = None
        self._on_boundary = False  # of the last trust-region proposal

    @staticmethod
    def _check_settings(s: dict) -> None:
        """Refuse nonsensical settings, saying what is expected."""
        def need(ok, what):
            if not ok:
                raise ValueError(f"DampedNewton: {what}")

        if s["mode"] not in DampedNewton.MODES:
            raise ValueError(f"mode must be one of {DampedNewton.MODES}, got {s['mode']!r}")
        need(_finite(s["lr"]) and 0 < s["lr"] < 2,
             f"lr must be a number in (0, 2) (the fraction of the model's minimising step; "
             f"at 2 the model predicts no decrease), got {s['lr']!r}")
        need(_finite(s["solve_tol"]) and s["solve_tol"] > 0,
             f"solve_tol must be a finite number > 0, got {s['solve_tol']!r}")
        need(_finite(s["gradient_lr"]) and s["gradient_lr"] >= 0,
             f"gradient_lr must be a finite number >= 0, got {s['gradient_lr']!r}")
        low = s["min_damping"]
        need((low is None or (_finite(low) and low > 0)) and _finite(s["max_damping"])
             and (low or 0) <= s["max_damping"] and s["max_damping"] > 0,
             f"need min_damping None (no floor) or 0 < min_damping <= max_damping < inf; got "
             f"{low!r}, {s['max_damping']!r}")
        need(s["damping"] is None or (_finite(s["damping"]) and s["damping"] > 0 and
                                      (low or 0) <= s["damping"] <= s["max_damping"]),
             f"damping must be None (scaled to the curvature) or a number > 0 in [min_damping, "
             f"max_damping] = [{low!r}, {s['max_damping']!r}]; got {s['damping']!r}")
        need(_finite(s["damping_factor"]) and s["damping_factor"] > 1,
             f"damping_factor must be a finite number > 1, got {s['damping_factor']!r}")
        need(s["damping_update"] in DAMPING_UPDATES,
             f"damping_update must be one of {DAMPING_UPDATES}, got {s['damping_update']!r}")
        need(_finite(s["accept_ratio"]) and 0 <= s["accept_ratio"] < 1,
             f"accept_ratio must be a number in [0, 1) (the smallest accepted ratio of actual "
             f"to predicted decrease), got {s['accept_ratio']!r}")
        need(all(_finite(s[k]) for k in ("radius", "min_radius", "max_radius"))
             and 0 < s["min_radius"] <= s["radius"] <= s["max_radius"],
             f"need 0 < min_radius <= radius <= max_radius < inf; got {s['min_radius']!r}, "
             f"{s['radius']!r}, {s['max_radius']!r}")
        need(s["max_step_norm"] is None or (_finite(s["max_step_norm"]) and
                                            s["max_step_norm"] > 0),
             f"max_step_norm must be a finite number > 0 or None, got {s['max_step_norm']!r}")
        need(_count(s["max_retries"]) and s["max_retries"] >= 0,
             f"max_retries must be an integer >= 0, got {s['max_retries']!r}")
        for name in ("curvature_interval", "curvature_reuse", "adapt_interval"):
            need(_count(s[name]) and s[name] >= 1,
                 f"{name} must be an integer >= 1, got {s[name]!r}")
        need(isinstance(s["momentum"], bool), f"momentum must be True or False, got "
                                               f"{s['momentum']!r}")
        need(s["path"] in PATHS, f"path must be one of {PATHS}, got {s['path']!r}")
        need(s["path"] != "output" or (s["curvature"] == "ggn" and s["mode"] == "damped"),
             f"path='output' (Woodbury on the Gauss-Newton matrix in output space) needs "
             f"curvature='ggn' and mode='damped'; got curvature={s['curvature']!r}, "
             f"mode={s['mode']!r}")

    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups:
            raise ValueError("DampedNewton has one parameter group: the model's parameters")
        super().add_param_group(param_group)

    # --- copies, pickles and state dicts ------------------------------------

    def __getstate__(self) -> dict:
        """What ``pickle`` and ``copy.deepcopy`` copy: torch's state plus the model.

        The parameters in the group and in the model are the same objects, so
        a copy's model and parameter group stay tied.  Not copied: a cached
        factorisation (the copy factorises at its next second-order step) and
        the model's record of its last tracked forward pass, which belongs to
        the original's autograd graph (and holds a weak reference, which
        pickle refuses); the copy's closures run their own.
        """
        model = copy.copy(self.model)  # shares modules and parameters with the original
        model.__dict__["_tracked"] = None
        return {**super().__getstate__(), "model": model, "memory_limit": self.memory_limit}

    def __setstate__(self, state: dict) -> None:
        """Also :meth:`load_state_dict`'s hook: settings missing from an older
        state dict take their old meaning (``_LEGACY``) or this instance's value."""
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, _LEGACY.get(key, value))
        self._params = self.param_groups[0]["params"]
        self._cache = None
        self._on_boundary = False

    def state_dict(self) -> dict:
        """torch's state dict.  Ends the reuse of the current factorisation, so
        that a run resumed from it and the original take the same steps."""
        self._cache = None
        return super().state_dict()

    # --- global state (kept on the first parameter, as LBFGS does) ---------

    def _state(self) -> dict:
        state = self.state[self._params[0]]
        group = self.param_groups[0]
        state.setdefault("damping", group["damping"])
        state.setdefault("factor_damping", state["damping"])
        state.setdefault("radius", float(group["radius"]))
        state.setdefault("last_ratio", float("nan"))
        state.setdefault("rescale", 1.0)
        state.setdefault("previous_step", None)
        for key in self.COUNTERS:
            state.setdefault(key, 0)
        return state

    @property
    def damping(self) -> Optional[float]:
        """lambda, the model's (adapted) damping; in trust-region mode, the last multiplier.

        None before the first second-order step when the damping is scaled
        to the curvature.
        """
        return self._state()["damping"]

    @property
    def radius(self) -> float:
        """The current trust-region radius (used in trust-region mode only)."""
        return self._state()["radius"]

    @property
    def stats(self) -> dict:
        """Dampings, radius, last reduction ratio and event counters, as plain numbers."""
        state = self._state()
        return {"damping": state["damping"], "factor_damping": state["factor_damping"],
                "radius": state["radius"], "last_ratio": state["last_ratio"],
                **{key: state[key] for key in self.COUNTERS}}

    # --- flat views of parameters and gradients ----------------------------

    def _gather_flat_grad(self) -> torch.Tensor:
        return torch.cat([p.grad.reshape(-1) if p.grad is not None
                          else p.new_zeros(p.numel()) for p in self._params])

    def _flat_params(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params])

    def _set_flat_params(self, flat: torch.Tensor) -> None:
        offset = 0
        for p in self._params:
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def _add_flat(self, step: torch.Tensor) -> None:
        offset = 0
        for p in self._params:
            p.add_(step[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def _clip(self, step: torch.Tensor, state: dict) -> tuple[torch.Tensor, float]:
        """``step`` scaled down to ``max_step_norm`` if longer; returns (step, scale)."""
        cap = self.param_groups[0]["max_step_norm"]
        norm = step.norm().item()
        if cap is None or norm <= cap:
            return step, 1.0
        state["clipped"] += 1
        return step * (cap / norm), cap / norm

    def _evaluate(self, closure, state: dict) -> tuple[torch.Tensor, float, torch.Tensor]:
        """One closure call: (loss, its float, the flat gradient).

        The gradients are cleared first, so a closure that forgets
        ``backward()`` is caught instead of reusing an old gradient.
        """
        for p in self._params:
            p.grad = None
        loss = closure()
        state["func_evals"] += 1
        value = _to_float(loss)
        if all(p.grad is None for p in self._params):
            raise RuntimeError(
                "DampedNewton: the closure returned a loss but computed no gradient. It must "
                "zero the gradients, compute the loss, call loss.backward() and return the loss.")
        return loss, value, self._gather_flat_grad()

    def _take(self, step: torch.Tensor, state: dict, kind: str) -> None:
        """Take ``step`` (clipped) and remember it as the previous step."""
        step, _ = self._clip(step, state)
        self._add_flat(step)
        state[kind] += 1
        state["previous_step"] = step.clone() if kind != "gradient_fallbacks" else None

    def _fallback(self, grad: torch.Tensor, state: dict) -> None:
        self._take(-self.param_groups[0]["gradient_lr"] * grad, state, "gradient_fallbacks")

    def _trial(self, closure, step: torch.Tensor, predicted: float, f0: float,
               state: dict) -> float:
        """Move by ``step``, evaluate, return rho; the caller keeps or restores."""
        self._add_flat(step)
        for p in self._params:
            p.grad = None
        f1 = _to_float(closure())
        state["func_evals"] += 1
        ratio = (f0 - f1) / predicted if math.isfinite(f1) else -math.inf
        state["last_ratio"] = ratio
        return ratio

    # --- curvature -----------------------------------------------------------

    def _operator(self, loss: torch.Tensor, curvature: str, path: str = "auto"
                  ) -> HessianOperator:
        """The curvature operator at the model's last tracked forward pass.

        It is a snapshot of that point (it holds copies of what it needs), so
        a factorisation reused over several steps keeps describing the point
        it was computed at after the parameters move.
        """
        with torch.enable_grad():
            return hessian_operator(self.model, loss, memory_limit=self.memory_limit,
                                    curvature=curvature, path=path)

    def _curvature_operator(self, closure_loss, curvature_closure) -> HessianOperator:
        """B_c: from the closure's own tracked pass, or from ``curvature_closure``'s."""
        group = self.param_groups[0]
        if curvature_closure is None:
            return self._operator(closure_loss, group["curvature"], group["path"])
        with torch.enable_grad():
            loss = curvature_closure()
        return self._operator(loss, group["curvature"], group["path"])

    # --- the direction and factorisation reuse (damped mode, items 1 and 5) ---

    def _direction(self, closure_loss, curvature_closure, grad, state: dict
                   ) -> Optional[torch.Tensor]:
        """``s = -(B_c + gamma I)^{-1} g``: from the cached factorisation while it is
        still good, else from a fresh one.  None if every try failed."""
        cache, self._cache = self._cache, None
        if cache is not None:
            direction = self._reused_direction(cache, grad, state)
            if direction is not None:
                return direction
        operator = self._curvature_operator(closure_loss, curvature_closure)
        self._set_factor_damping(operator, grad, state)
        return self._fresh_direction(operator, grad, state)

    def _reused_direction(self, cache: dict, grad: torch.Tensor, state: dict
                          ) -> Optional[torch.Tensor]:
        """The cached factorisation's direction, if it may serve another step: younger than
        ``curvature_reuse`` and its last step good (rho >= 1/4, rescaling in [1/2, 2])."""
        group = self.param_groups[0]
        good = state["last_ratio"] >= 0.25 and 0.5 <= state["rescale"] <= 2.0
        if not (cache["age"] < group["curvature_reuse"] and good):
            return None
        try:
            direction = -cache["inverse"].solve(grad)
        except torch.linalg.LinAlgError:
            state["singular"] += 1
            return None
        if not torch.isfinite(direction).all():
            return None
        cache["age"] += 1
        self._cache = cache
        state["reused"] += 1
        return direction

    def _set_factor_damping(self, operator: HessianOperator, grad: torch.Tensor,
                            state: dict) -> None:
        """gamma for a fresh factorisation (and lambda, the first time): scaled to the
        curvature along g at first; then lambda itself (``'nielsen'``), or gamma
        corrected by the last rescaling, by at most 4x (``'factor'``)."""
        group = self.param_groups[0]
        low, high = group["min_damping"], group["max_damping"]
        nielsen = group["damping_update"] == "nielsen"
        if state["damping"] is None:  # scaled to the curvature along g
            scale = abs(torch.dot(grad, operator @ grad).item()) / torch.dot(grad, grad).item()
            scale = _clamp(scale * (NIELSEN_TAU if nielsen else 1.0), low, high)
            state["damping"] = state["factor_damping"] = scale
        elif nielsen:
            state["factor_damping"] = state["damping"]
        else:
            rescale = min(max(state["rescale"], 0.25), 4.0)
            state["factor_damping"] = _clamp(state["factor_damping"] / rescale, low, high)
        state["rescale"] = 1.0

    def _fresh_direction(self, operator: HessianOperator, grad: torch.Tensor, state: dict
                         ) -> Optional[torch.Tensor]:
        """Factorise ``B_c + gamma I`` by the route ``path`` resolves to and solve; a
        singular or inaccurate try raises gamma by ``damping_factor^2``.  With
        ``'nielsen'`` (one damping) lambda is raised with it, so that the next step
        starts above the damping the solves refused instead of going back below it."""
        group = self.param_groups[0]
        sizes = LayerSizes.of_derivatives(operator.derivs)
        direction = None
        for _ in range(group["max_retries"] + 1):
            gamma = state["factor_damping"]
            route = choose_route(group["path"], gamma, operator.has_closed_forms,
                                 operator.curvature, sizes)
            try:
                inverse = operator.factorize(gamma, check_condition=False, path=route,
                                             rtol=group["solve_tol"], max_refinement=0)
                state["factorizations"] += 1
                direction = -inverse.solve(grad)
                if not torch.isfinite(direction).all():
                    raise torch.linalg.LinAlgError("the damped solve is not finite")
            except torch.linalg.LinAlgError:  # SingularHessianError, InaccurateSolveError
                direction = None
                state["singular"] += 1
                if gamma >= group["max_damping"]:
                    break
                state["factor_damping"] = min(gamma * group["damping_factor"] ** 2,
                                              group["max_damping"])
                continue
            self._cache = {"inverse": inverse, "age": 1}
            break
        if group["damping_update"] == "nielsen":
            state["damping"] = max(state["damping"], state["factor_damping"])
        return direction

    # --- the damped step: plane model, ratio test, damping update ------------

    def _model_products(self, closure, closure_loss, curvature_closure, grad, V, state):
        """H V for the gradient batch's Hessian H: exact, or by gradient differences."""
        if curvature_closure is None:
            return self._operator(closure_loss, "hessian") @ V
        start = self._flat_params()
        scale = math.sqrt(torch.finfo(V.dtype).eps) * (1.0 + start.norm().item())
        columns = []
        for v in V.T:
            h = scale / v.norm().item()
            self._set_flat_params(start + h * v)
            _, _, moved = self._evaluate(closure, state)
            columns.append((moved - grad) / h)
        self._set_flat_params(start)
        return torch.stack(columns, dim=1)

    def _directions(self, direction: torch.Tensor, state: dict) -> torch.Tensor:
        """[s] or [s, d] as columns; d dropped when (nearly) parallel to s."""
        d = state["previous_step"]
        if not self.param_groups[0]["momentum"] or d is None or not torch.isfinite(d).all():
            return direction[:, None]
        V = torch.stack([direction, d], dim=1)
        gram = V.T @ V
        if gram.det() <= 1e-8 * gram[0, 0] * gram[1, 1]:
            return direction[:, None]
        return V

    def _plane(self, closure, loss, grad, curvature_closure, state
               ) -> Optional[tuple[_PlaneModel, torch.Tensor, torch.Tensor]]:
        """The direction, the plane [s, d] and its model; None (counted) on failure."""
        direction = self._direction(loss, curvature_closure, grad, state)
        if direction is None:
            return None
        V = self._directions(direction, state)
        HV = self._model_products(closure, loss, curvature_closure, grad, V, state)
        if not torch.isfinite(HV).all():
            state["nonfinite"] += 1
            return None
        try:
            return _PlaneModel(V, HV, grad), V, HV
        except torch.linalg.LinAlgError:
            state["non_descent"] += 1
            return None

    def _damped_step(self, closure, loss, f0, grad, curvature_closure, state) -> None:
        """Steps 1-4 of the class docstring: a proposal from the plane model, judged by
        rho; rejected ones retried at a quarter of their length; then a gradient step."""
        group = self.param_groups[0]
        found = self._plane(closure, loss, grad, curvature_closure, state)
        if found is None:
            return self._fallback(grad, state)
        plane, V, HV = found
        start = self._flat_params().clone()
        lam = state["damping"]
        for _ in range(group["max_retries"] + 1):
            step, predicted, used = self._model_step(plane, V, lam, state)
            state["rescale"] = _preferred_rescaling(grad, V[:, 0], HV[:, 0], used,
                                                    state["rescale"])
            if not (predicted > 0 and math.isfinite(predicted)):
                state["non_descent"] += 1
                state["last_ratio"] = -math.inf
                lam = max(used * group["damping_factor"], abs(plane.lowest()))
            else:
                ratio = self._trial(closure, step, predicted, f0, state)
                if ratio >= group["accept_ratio"]:
                    state["accepted"] += 1
                    state["previous_step"] = step.clone()
                    if state["newton_steps"] % group["adapt_interval"] == 0:
                        self._adapt_damping(state, ratio)
                    return None
                state["rejected"] += 1
                self._set_flat_params(start)
                # retry at a quarter of the length, by the damping that gives it in the plane
                lam = plane.damping_for_length(0.25 * step.norm().item() / group["lr"], used)
            state["damping"] = lam = min(lam, group["max_damping"])
            if used >= group["max_damping"]:
                break
        self._cache = None
        return self._fallback(grad, state)

    def _model_step(self, plane: _PlaneModel, V: torch.Tensor, lam: float, state: dict
                    ) -> tuple[torch.Tensor, float, float]:
        """The step minimising the plane model at damping lam (raised for this step to
        twice the magnitude of negative curvature in the plane), times ``lr`` and
        clipped; its predicted reduction; the damping used."""
        group = self.param_groups[0]
        used = min(max(lam, -2.0 * plane.lowest()), group["max_damping"])
        step, scale = self._clip(group["lr"] * (V @ plane.coefficients(used)), state)
        scale *= group["lr"]  # m(scale c*) = scale (2 - scale) m(c*) for the minimiser c*
        return step, plane.reduction(used) * scale * (2 - scale), used

    def _adapt_damping(self, state: dict, ratio: float) -> None:
        """lambda after an accepted step of reduction ratio ``ratio``, by ``damping_update``."""
        group = self.param_groups[0]
        if group["damping_update"] == "nielsen":
            damping = nielsen_update(state["damping"], ratio)
        else:
            damping = hessian_free_update(state["damping"], ratio, group["damping_factor"])
        state["damping"] = _clamp(damping, group["min_damping"], group["max_damping"])

    # --- the trust-region step -----------------------------------------------

    def _propose_trust_region(self, operator: HessianOperator, grad: torch.Tensor,
                              radius: float, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The minimiser s of ``g.s + s.B s / 2`` in the ball, and ``B s``.

        Solved by :func:`trust_region_step` on the same derivatives (the
        softmax gauge is handled there), starting from the last multiplier and
        with the solves held to ``solve_tol`` and the boundary to ``TR_TOL``
        (1% of the radius, Moré-Sorensen's sigma_1: an optimizer step needs no
        more, and each digit costs a factorisation).  Records the multiplier as the
        damping and counts hard cases and solves stopped at the iteration cap
        (their step, the best one seen, is still a valid proposal).
        """
        guess = state["damping"] if state["newton_steps"] > 1 and state["damping"] else None
        result = trust_region_step(operator, grad, radius, tol=self.TR_TOL,
                                   rtol=self.param_groups[0]["solve_tol"], damping_guess=guess)
        if not torch.isfinite(result.step).all():
            raise torch.linalg.LinAlgError(f"trust-region step at radius {radius:g} is not finite")
        state["damping"] = result.damping
        state["hard_cases"] += int(result.hard_case)
        state["unconverged"] += int(not result.converged)
        self._on_boundary = result.on_boundary
        step = result.step
        if step.norm().item() > radius:  # within TR_TOL outside: back onto the sphere
            step = step * (radius / step.norm().item())
        return step, operator @ step

    def _adapt_radius(self, state: dict, ratio: float, on_boundary: bool) -> None:
        """:func:`trust_radius_update`, within ``[min_radius, max_radius]``, counted."""
        group = self.param_groups[0]
        radius = trust_radius_update(state["radius"], ratio, on_boundary)
        radius = min(max(radius, group["min_radius"]), group["max_radius"])
        if radius < state["radius"]:
            state["radius_shrinks"] += 1
        elif radius > state["radius"]:
            state["radius_expansions"] += 1
        state["radius"] = radius

    def _trust_region_step(self, closure, loss, f0, grad, curvature_closure, state) -> None:
        group = self.param_groups[0]
        operator = self._curvature_operator(loss, curvature_closure)
        start = self._flat_params().clone()
        for _ in range(group["max_retries"] + 1):
            exhausted = state["radius"] <= group["min_radius"]
            try:
                step, h_step = self._propose_trust_region(operator, grad, state["radius"], state)
            except torch.linalg.LinAlgError:  # SingularHessianError, or a failed eigensolve
                state["singular"] += 1
                self._adapt_radius(state, -math.inf, False)
                if exhausted:
                    break
                continue
            on_boundary = self._on_boundary
            step, scale = self._clip(step, state)
            predicted = -(torch.dot(grad, step) + 0.5 * scale * torch.dot(step, h_step)).item()
            if not predicted > 0:
                state["non_descent"] += 1
                self._adapt_radius(state, -math.inf, False)
            else:
                ratio = self._trial(closure, step, predicted, f0, state)
                accepted = ratio >= group["accept_ratio"]
                self._adapt_radius(state, ratio if accepted else -math.inf, on_boundary)
                if accepted:
                    state["accepted"] += 1
                    state["previous_step"] = step.clone()
                    return None
                state["rejected"] += 1
                self._set_flat_params(start)
            if exhausted:
                break
        return self._fallback(grad, state)

    # --- the step ----------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor],
             curvature_closure: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
        """One step; returns the loss ``closure()`` gave before it.

        Args:
            closure: zeroes grads, evaluates the loss, calls ``backward()``,
                returns the loss.  Called once per step, twice more for the
                gradient differences when a ``curvature_closure`` is given
                (damped mode), and once per proposal that reaches the ratio
                test.  If no ``curvature_closure`` is given its forward pass
                must be tracked.
            curvature_closure: runs ``model(x_c, y_c, track_activations=True)``
                on the curvature batch and returns that loss (no backward needed).
        """
        if not callable(closure):
            raise TypeError("DampedNewton.step needs a closure: a function that zeroes the "
                            "gradients, computes the loss, calls loss.backward() and returns it")
        closure = torch.enable_grad()(closure)
        group = self.param_groups[0]
        state = self._state()

        loss, f0, grad = self._evaluate(closure, state)
        state["n_iter"] += 1
        if not (math.isfinite(f0) and torch.isfinite(grad).all()):
            state["nonfinite"] += 1
            return loss
        if grad.norm() == 0:
            return loss
        if (state["n_iter"] - 1) % group["curvature_interval"] != 0:
            self._take(-group["gradient_lr"] * grad, state, "gradient_steps")
            return loss
        state["newton_steps"] += 1
        if group["mode"] == "trust_region":
            self._trust_region_step(closure, loss, f0, grad, curvature_closure, state)
        else:
            self._damped_step(closure, loss, f0, grad, curvature_closure, state)
        return loss

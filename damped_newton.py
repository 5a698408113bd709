"""A second-order optimizer over the exact inverse curvature: damped Newton or trust region.

:class:`DampedNewton` follows the ``step(closure)`` convention of
:class:`torch.optim.LBFGS`.  It uses the core (:mod:`hessian_inverse`) for the
curvature and its damped solves and :mod:`trust_region` for trust-region
steps; the core never uses it.  docs/training.md explains the choices and
measures them against tuned first-order methods.
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Callable, Optional

import torch

from hessian_inverse import HessianOperator, TrackedChain, hessian_operator, validate_model
from trust_region import trust_region_step

__all__ = ["DampedNewton"]


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


# Settings absent from state dicts written before they existed, with the value that
# reproduces what those runs did (any other absent setting takes this instance's value).
_LEGACY = {"curvature": "hessian", "mode": "damped"}


class DampedNewton(torch.optim.Optimizer):
    r"""Second-order steps through the exact inverse curvature: damped Newton or trust region.

    Follows the ``step(closure)`` convention of :class:`torch.optim.LBFGS`: the
    closure zeroes the gradients, re-evaluates the loss, calls ``backward()``
    and returns the loss.  The curvature comes from a *tracked* forward pass
    (``model(x, y, track_activations=True)``): either the closure's own, or one
    run by ``curvature_closure`` on a separate, usually smaller batch
    (sub-sampled Newton: the factorisation costs O(sum_l a_l^3), a_l = batch
    x width, so the curvature batch sets the price of a step).

    The curvature B_c is the generalized Gauss-Newton matrix
    (``curvature='ggn'``, recommended: positive semi-definite, so every damped
    direction descends) or the Hessian (``curvature='hessian'``).

    **Damped mode** (``mode='damped'``, Levenberg-Marquardt with the step
    control of Martens' Hessian-free and K-FAC; docs/training.md).  With g and
    f the gradient and loss of the closure's batch (the *gradient batch*):

    1. Direction ``s = -(B_c + gamma I)^{-1} g`` from the exact factorisation of
       the curvature batch's B_c.  ``gamma`` (``factor_damping``) is the
       curvature the inverse assumes where B_c has none (a curvature batch of
       b examples sees at most b (classes - 1) directions).  A factorisation
       is reused for up to ``curvature_reuse`` steps while the steps it gives
       stay good (reduction ratio >= 1/4, rescaling within [1/2, 2]); a
       checkpoint (:meth:`state_dict`) ends the reuse, so resumed runs repeat
       exactly.
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
       rejects the step: parameters restored, ``lambda`` multiplied by
       ``damping_factor`` and the 2 x 2 model solved again, reusing the
       direction, its factorisation and the products (``rejected``).  After
       ``max_retries`` rejections a gradient step ``-gradient_lr g`` is taken
       (``gradient_fallbacks``) and the momentum is dropped.
    4. Levenberg-Marquardt: every ``adapt_interval`` second-order steps,
       ``lambda`` is divided by ``damping_factor`` if ``rho > 3/4`` and
       multiplied by it if ``rho < 1/4`` (K-FAC: ``damping_factor`` =
       (20/19)^5 every 5 steps; Hessian-free: 3/2 every step).
    5. ``gamma`` follows the model: ``alpha_1 = -g.s / s.(H + lambda I) s`` is the
       model's preferred rescaling of s alone, and s scales like 1 / gamma where
       B_c is blind, so each new factorisation uses ``gamma / alpha_1``
       (by at most a factor of 4).  This replaces K-FAC's greedy search over
       gamma, which would cost three factorisations.

    The initial damping (``damping=None``) is scaled to the curvature: ``lambda
    = gamma = |g.B_c g| / g.g``, the curvature along the first gradient.

    **Trust-region mode** (``mode='trust_region'``): ``s`` minimises
    ``g.s + s.B_c s / 2`` over ``||s|| <= radius`` (:func:`trust_region_step`,
    Moré-Sorensen, exact also for indefinite B_c); ``rho`` compares the actual
    with that model's reduction; the radius is divided by 4 if ``rho < 1/4``
    (``radius_shrinks``), doubled if ``rho > 3/4`` and the step reached the
    boundary (``radius_expansions``), kept within ``[min_radius, max_radius]``
    (Nocedal & Wright, Algorithm 4.1).  A rejected step (or a failed solve) is
    retried with the smaller radius on the same derivatives, up to
    ``max_retries`` times, then ``-gradient_lr g`` is taken.  The damping
    reports the last multiplier lambda of ``(B_c + lambda I) s = -g``.

    Failures.  A singular or inaccurate solve (any ``torch.linalg.LinAlgError``;
    the solve's accuracy contract is ``rtol = solve_tol``) counts as
    ``singular`` and raises gamma (or shrinks the radius); a model predicting
    no decrease counts as ``non_descent``.  A step whose loss or gradient is
    not finite changes nothing (``nonfinite``).  A closure that returns
    without computing a gradient raises :class:`RuntimeError`.

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
        damping: initial lambda (and gamma); None: scaled to the curvature.
        min_damping, max_damping: bounds for both dampings.
        damping_factor: the multiplier (> 1) of one adaptation of lambda.
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
        mode: ``'damped'`` or ``'trust_region'``.
        radius: initial trust-region radius (2-norm, in parameter space).
        min_radius, max_radius: bounds for the adapted radius (> 0).
        momentum: include the previous step in the 2 x 2 model (damped mode).
        curvature_reuse: most steps one factorisation serves (damped mode).
        adapt_interval: second-order steps between Levenberg-Marquardt adaptations.

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
                 damping: Optional[float] = None, min_damping: float = 1e-8,
                 max_damping: float = 1e8, damping_factor: float = 1.5,
                 accept_ratio: float = 1e-4, max_retries: int = 3,
                 max_step_norm: Optional[float] = None, curvature_interval: int = 1,
                 gradient_lr: float = 0.1, solve_tol: float = 1e-3,
                 memory_limit: Optional[int] = None, curvature: str = "ggn",
                 mode: str = "damped", radius: float = 1.0, min_radius: float = 1e-6,
                 max_radius: float = 100.0, momentum: bool = True, curvature_reuse: int = 1,
                 adapt_interval: int = 1):
        validate_model(model, curvature)
        settings = dict(lr=lr, damping=damping, min_damping=min_damping,
                        max_damping=max_damping, damping_factor=damping_factor,
                        accept_ratio=accept_ratio, max_retries=max_retries,
                        max_step_norm=max_step_norm, curvature_interval=curvature_interval,
                        gradient_lr=gradient_lr, solve_tol=solve_tol, curvature=curvature,
                        mode=mode, radius=radius, min_radius=min_radius, max_radius=max_radius,
                        momentum=momentum, curvature_reuse=curvature_reuse,
                        adapt_interval=adapt_interval)
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
        need(_finite(s["min_damping"]) and _finite(s["max_damping"])
             and 0 < s["min_damping"] <= s["max_damping"],
             f"need 0 < min_damping <= max_damping < inf; got {s['min_damping']!r}, "
             f"{s['max_damping']!r}")
        need(s["damping"] is None or (_finite(s["damping"]) and
                                      s["min_damping"] <= s["damping"] <= s["max_damping"]),
             f"damping must be None (scaled to the curvature) or a number in [min_damping, "
             f"max_damping] = [{s['min_damping']!r}, {s['max_damping']!r}]; got {s['damping']!r}")
        need(_finite(s["damping_factor"]) and s["damping_factor"] > 1,
             f"damping_factor must be a finite number > 1, got {s['damping_factor']!r}")
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

    # --- curvature -----------------------------------------------------------

    def _operator(self, loss: torch.Tensor, curvature: str) -> HessianOperator:
        """The curvature operator at the model's last tracked forward pass.

        It is a snapshot of that point (it holds copies of what it needs), so
        a factorisation reused over several steps keeps describing the point
        it was computed at after the parameters move.
        """
        with torch.enable_grad():
            return hessian_operator(self.model, loss, memory_limit=self.memory_limit,
                                    curvature=curvature)

    def _curvature_operator(self, closure_loss, curvature_closure) -> HessianOperator:
        group = self.param_groups[0]
        if curvature_closure is None:
            return self._operator(closure_loss, group["curvature"])
        with torch.enable_grad():
            loss = curvature_closure()
        return self._operator(loss, group["curvature"])

    def _direction(self, closure_loss, curvature_closure, grad, state: dict
                   ) -> Optional[torch.Tensor]:
        """``s = -(B_c + gamma I)^{-1} g``, from the cached factorisation while still good.

        A new factorisation uses gamma corrected by the last rescaling (at
        most 4x) and is retried with gamma raised by ``damping_factor^2`` when
        singular or inaccurate.  Returns None if every try failed.
        """
        group = self.param_groups[0]
        cache, self._cache = self._cache, None
        good = state["last_ratio"] >= 0.25 and 0.5 <= state["rescale"] <= 2.0
        if cache is not None and cache["age"] < group["curvature_reuse"] and good:
            try:
                direction = -cache["inverse"].solve(grad)
            except torch.linalg.LinAlgError:
                state["singular"] += 1
            else:
                if torch.isfinite(direction).all():
                    cache["age"] += 1
                    self._cache = cache
                    state["reused"] += 1
                    return direction
        operator = self._curvature_operator(closure_loss, curvature_closure)
        if state["damping"] is None:  # scaled to the curvature along g
            scale = abs(torch.dot(grad, operator @ grad).item()) / torch.dot(grad, grad).item()
            scale = min(max(scale, group["min_damping"]), group["max_damping"])
            state["damping"] = state["factor_damping"] = scale
        else:
            rescale = min(max(state["rescale"], 0.25), 4.0)
            state["factor_damping"] = min(max(state["factor_damping"] / rescale,
                                              group["min_damping"]), group["max_damping"])
        state["rescale"] = 1.0
        for _ in range(group["max_retries"] + 1):
            try:
                # path 'auto': for the GGN usually the output-space route, whose
                # setup grows with the curvature batch, not with the width cubed.
                inverse = operator.factorize(state["factor_damping"], check_condition=False,
                                             rtol=group["solve_tol"])
                state["factorizations"] += 1
                direction = -inverse.solve(grad)
                if not torch.isfinite(direction).all():
                    raise torch.linalg.LinAlgError("the damped solve is not finite")
            except torch.linalg.LinAlgError:  # SingularHessianError, InaccurateSolveError
                state["singular"] += 1
                if state["factor_damping"] >= group["max_damping"]:
                    return None
                state["factor_damping"] = min(
                    state["factor_damping"] * group["damping_factor"] ** 2, group["max_damping"])
                continue
            self._cache = {"inverse": inverse, "age": 1}
            return direction
        return None

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

    # --- the two modes -------------------------------------------------------

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

    def _damped_step(self, closure, loss, f0, grad, curvature_closure, state) -> None:
        group = self.param_groups[0]
        direction = self._direction(loss, curvature_closure, grad, state)
        if direction is None:
            return self._fallback(grad, state)
        V = self._directions(direction, state)
        HV = self._model_products(closure, loss, curvature_closure, grad, V, state)
        if not torch.isfinite(HV).all():
            state["nonfinite"] += 1
            return self._fallback(grad, state)
        try:
            plane = _PlaneModel(V, HV, grad)
        except torch.linalg.LinAlgError:
            state["non_descent"] += 1
            return self._fallback(grad, state)
        s_norm2 = torch.dot(V[:, 0], V[:, 0]).item()
        s_curvature = torch.dot(V[:, 0], HV[:, 0]).item() / s_norm2
        start = self._flat_params().clone()
        lam = state["damping"]
        for _ in range(group["max_retries"] + 1):
            step, predicted, used = self._model_step(plane, V, lam, state)
            if s_curvature + used > 0:
                state["rescale"] = -torch.dot(grad, V[:, 0]).item() / (s_norm2 * (s_curvature + used))
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
        """The Levenberg-Marquardt rule on lambda."""
        group = self.param_groups[0]
        damping, factor = state["damping"], group["damping_factor"]
        if ratio > 0.75:
            damping = damping / factor
        elif ratio < 0.25:
            damping = damping * factor
        state["damping"] = min(max(damping, group["min_damping"]), group["max_damping"])

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
        """Nocedal & Wright, Algorithm 4.1 (``ratio = -inf`` for a failed proposal)."""
        group = self.param_groups[0]
        radius = state["radius"]
        if ratio < 0.25:
            radius = radius / 4
        elif ratio > 0.75 and on_boundary:
            radius = 2 * radius
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

    def _fallback(self, grad: torch.Tensor, state: dict) -> None:
        self._take(-self.param_groups[0]["gradient_lr"] * grad, state, "gradient_fallbacks")

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

"""A second-order optimizer over the exact inverse curvature: damped Newton or trust region.

:class:`DampedNewton` follows the ``step(closure)`` convention of
:class:`torch.optim.LBFGS`.  It uses the core (:mod:`hessian_inverse`) for the
curvature and its damped solves and :mod:`trust_region` for trust-region
steps; the core never uses it.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from hessian_inverse import (HessianOperator, SingularHessianError, TrackedChain, hessian_operator,
                             validate_model)
from trust_region import trust_region_step

__all__ = ["DampedNewton"]



def _to_float(loss) -> float:
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)


class DampedNewton(torch.optim.Optimizer):
    r"""Second-order steps through the exact inverse curvature: damped Newton or trust region.

    Follows the ``step(closure)`` convention of :class:`torch.optim.LBFGS`: the
    closure zeroes the gradients, re-evaluates the loss, calls ``backward()``
    and returns the loss.  The curvature comes from a *tracked* forward pass
    (``model(x, y, track_activations=True)``): either the closure's own, or one
    run by ``curvature_closure`` on a separate, usually smaller batch
    (sub-sampled Newton; the solve costs O(sum_l (p_l + 2 a_l)^3) with
    a_l = batch x width, so the curvature batch sets the price of a step).

    The curvature B is the Hessian (``curvature='hessian'``) or the
    generalized Gauss-Newton matrix (``curvature='ggn'``, see
    :func:`hessian_operator`).  Two ways of turning it into a step:

    - ``mode='damped'`` (Levenberg-Marquardt): ``s = -lr (B + damping I)^{-1} g``,
      the damping adapted from how well the quadratic model predicted the loss.
    - ``mode='trust_region'``: ``s`` minimises the model ``g.s + s.B s / 2``
      over ``||s|| <= radius`` (:func:`trust_region_step`, Moré-Sorensen, exact
      also for indefinite B), the radius adapted by the standard rules
      (Nocedal & Wright, Algorithm 4.1).  The damping is then an output, the
      multiplier lambda of ``(B + lambda I) s = -g``, not a setting.

    The Hessian of a deep net is indefinite and, on a sub-batch, noisy, so no
    step is taken blindly.  One second-order step:

    1. ``g`` and ``f0`` from ``closure()``; the derivatives once, by
       :func:`hessian_operator` on the curvature batch; every retry reuses them.
    2. A proposal ``s`` and ``B s`` (:meth:`_propose` or
       :meth:`_propose_trust_region`), clipped to ``max_step_norm``; the
       quadratic model's predicted reduction ``pred = -(g.s + s.B s / 2)``.
    3. The proposal fails when the solve is singular or inaccurate
       (``singular``), when the model predicts no decrease or, in damped mode,
       ``s`` is not a descent direction (``non_descent``), or when
       ``rho = (f0 - f(x + s)) / pred`` is below ``accept_ratio``
       (``rejected``; the parameters are restored).  A failure counts as
       ``rho = -inf`` below.
    4. After every proposal the damping or the radius is adapted from rho:

       - damped: divided by ``damping_factor`` if ``rho > 0.75``, multiplied
         by it if ``rho < 0.25`` (the Levenberg-Marquardt rule), kept within
         ``[min_damping, max_damping]``;
       - trust region: divided by 4 if ``rho < 0.25`` (``radius_shrinks``),
         doubled if ``rho > 0.75`` and the step reached the boundary
         (``radius_expansions``), kept within ``[min_radius, max_radius]``.

       A failed proposal is retried (a larger damping or a smaller radius:
       both give a shorter, better-conditioned step) up to ``max_retries``
       times.  After that, or once the damping or radius is at its bound, a
       plain gradient step ``-gradient_lr g`` is taken instead
       (``gradient_fallbacks``); ``gradient_lr=0`` leaves the parameters
       unchanged, as Algorithm 4.1 does after a rejected step.

    Descent.  ``(B + damping I)`` with B positive semi-definite (the GGN for
    cross-entropy) is positive definite, so in damped Gauss-Newton mode the
    step is always a descent direction with ``pred > 0``, and ``non_descent``
    can only come from rounding; for the indefinite Hessian it is a real
    event.  A trust-region step minimises the model over the ball, so
    ``pred >= 0`` by construction and only ``pred > 0`` is required: at (or
    near) a saddle its step follows negative curvature with ``g.s`` about 0,
    and the reduction ratio, not the slope, decides.

    Every ``curvature_interval``-th step is a second-order step; the steps
    between are plain gradient steps ``-gradient_lr g`` (clipped), so no stale
    curvature has to be kept and checkpoints resume exactly.  All state
    (damping, radius, step counter, event counters) is a few numbers in
    :meth:`state_dict`, and the settings (mode and curvature included) are in
    its parameter group.  A step whose loss or gradient is not finite changes
    nothing (``nonfinite``); the caller decides whether to stop.  Besides the
    counters named above, :attr:`stats` counts ``newton_steps`` (second-order
    steps, in either mode), ``gradient_steps`` (between them), ``clipped``,
    ``func_evals``, and from the trust-region solver ``hard_cases`` and
    ``unconverged`` (stopped at its iteration cap with its best step).

    Args:
        model: the :class:`TrackedChain` to train; all its parameters, in
            order, form the single parameter group.
        lr: scale of the damped Newton step (1 = the full step); damped mode only.
        damping: initial damping (the ``eps`` of ``B + eps I``); damped mode.
        min_damping, max_damping: bounds for the adapted damping (> 0).
        damping_factor: multiplier (> 1) for raising and lowering the damping.
        accept_ratio: smallest actual / predicted reduction accepted (the
            ``eta`` of Algorithm 4.1 in trust-region mode).
        max_retries: proposals per step after the first, before the gradient fallback.
        max_step_norm: cap on the 2-norm of any step (None: no cap).
        curvature_interval: take a second-order step every this many steps.
        gradient_lr: learning rate of the gradient steps (between second-order
            steps and as the fallback).
        solve_tol: largest accepted relative residual of the damped solve.
        memory_limit: bytes, passed to :func:`hessian_operator`'s guard
            (None: the device's free memory).
        curvature: ``'hessian'`` or ``'ggn'`` (generalized Gauss-Newton).
        mode: ``'damped'`` or ``'trust_region'``.
        radius: initial trust-region radius (2-norm, in parameter space).
        min_radius, max_radius: bounds for the adapted radius (> 0).

    Example::

        opt = DampedNewton(model, damping=1e-2, max_step_norm=1.0)
        # or DampedNewton(model, curvature='ggn'), DampedNewton(model, mode='trust_region')
        def closure():
            opt.zero_grad()
            loss = model(x, y)
            loss.backward()
            return loss
        opt.step(closure, curvature_closure=lambda: model(xs, ys, track_activations=True))
    """

    MODES = ("damped", "trust_region")
    COUNTERS = ("n_iter", "func_evals", "newton_steps", "gradient_steps", "accepted",
                "rejected", "non_descent", "singular", "gradient_fallbacks", "clipped",
                "nonfinite", "radius_shrinks", "radius_expansions", "hard_cases",
                "unconverged")

    def __init__(self, model: TrackedChain, lr: float = 1.0, damping: float = 1e-2,
                 min_damping: float = 1e-6, max_damping: float = 1e6,
                 damping_factor: float = 3.0, accept_ratio: float = 1e-2,
                 max_retries: int = 3, max_step_norm: Optional[float] = None,
                 curvature_interval: int = 1, gradient_lr: float = 0.1,
                 solve_tol: float = 1e-3, memory_limit: Optional[int] = None,
                 curvature: str = "hessian", mode: str = "damped", radius: float = 1.0,
                 min_radius: float = 1e-6, max_radius: float = 100.0):
        validate_model(model, curvature)
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if not 0.0 < min_damping <= damping <= max_damping < math.inf:
            raise ValueError("need 0 < min_damping <= damping <= max_damping < inf; got "
                             f"{min_damping}, {damping}, {max_damping}")
        if not 0.0 < min_radius <= radius <= max_radius < math.inf:
            raise ValueError("need 0 < min_radius <= radius <= max_radius < inf; got "
                             f"{min_radius}, {radius}, {max_radius}")
        if not damping_factor > 1.0:
            raise ValueError(f"damping_factor must be > 1, got {damping_factor}")
        if not (lr > 0 and gradient_lr >= 0 and solve_tol > 0 and max_retries >= 0):
            raise ValueError("need lr > 0, gradient_lr >= 0, solve_tol > 0, max_retries >= 0")
        if max_step_norm is not None and not max_step_norm > 0:
            raise ValueError(f"max_step_norm must be > 0 or None, got {max_step_norm}")
        if int(curvature_interval) < 1:
            raise ValueError(f"curvature_interval must be >= 1, got {curvature_interval}")
        params = list(model.parameters())
        if not all(p.requires_grad for p in params):
            raise ValueError("DampedNewton optimises every parameter of the model; all must "
                             "require grad (the Hessian is over model.parameters())")
        defaults = dict(lr=lr, damping=damping, min_damping=min_damping,
                        max_damping=max_damping, damping_factor=damping_factor,
                        accept_ratio=accept_ratio, max_retries=int(max_retries),
                        max_step_norm=max_step_norm, curvature_interval=int(curvature_interval),
                        gradient_lr=gradient_lr, solve_tol=solve_tol, curvature=curvature,
                        mode=mode, radius=radius, min_radius=min_radius, max_radius=max_radius)
        super().__init__(params, defaults)
        self.model = model
        self.memory_limit = memory_limit
        self._params = self.param_groups[0]["params"]

    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups:
            raise ValueError("DampedNewton has one parameter group: the model's parameters")
        super().add_param_group(param_group)

    def __setstate__(self, state: dict) -> None:
        """Settings added since a state dict was saved take this instance's values."""
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    # --- global state (kept on the first parameter, as LBFGS does) ---------

    def _state(self) -> dict:
        state = self.state[self._params[0]]
        group = self.param_groups[0]
        state.setdefault("damping", float(group["damping"]))
        state.setdefault("radius", float(group["radius"]))
        state.setdefault("last_ratio", float("nan"))
        for key in self.COUNTERS:
            state.setdefault(key, 0)
        return state

    @property
    def damping(self) -> float:
        """The current (adapted) damping; in trust-region mode, the last step's multiplier."""
        return self._state()["damping"]

    @property
    def radius(self) -> float:
        """The current trust-region radius (used in trust-region mode only)."""
        return self._state()["radius"]

    @property
    def stats(self) -> dict:
        """Damping, radius, last reduction ratio and event counters, as plain numbers."""
        state = self._state()
        return {"damping": state["damping"], "radius": state["radius"],
                "last_ratio": state["last_ratio"],
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

    # --- the pieces a curvature or step variant replaces -------------------

    def _curvature_operator(self, loss: torch.Tensor) -> HessianOperator:
        """The curvature operator (Hessian or GGN) at the model's last tracked forward pass."""
        with torch.enable_grad():
            return hessian_operator(self.model, loss, memory_limit=self.memory_limit,
                                    curvature=self.param_groups[0]["curvature"])

    def _propose(self, operator: HessianOperator, grad: torch.Tensor, damping: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Damped mode: one proposed step ``s = -lr (B + damping I)^{-1} g``, and ``B s``.

        Raises :class:`SingularHessianError` if the damped system is singular
        or its solve misses ``solve_tol`` (checked through ``B s``, which is
        also what the predicted reduction needs).  The residual replaces the
        factorisation's condition estimate, which bounds the lifted system and
        is far too pessimistic for float32 (it rejects solves accurate to 1e-5).
        The step is not clipped.
        """
        group = self.param_groups[0]
        direction = operator.factorize(damping, check_condition=False).solve(-grad)
        h_direction = operator @ direction
        residual = (h_direction + damping * direction + grad).norm() / grad.norm()
        if not residual <= group["solve_tol"]:
            raise SingularHessianError(
                f"damped solve inaccurate at damping {damping:g}: relative residual "
                f"{float(residual):.1e} > solve_tol {group['solve_tol']:g}")
        return group["lr"] * direction, group["lr"] * h_direction

    def _propose_trust_region(self, operator: HessianOperator, grad: torch.Tensor,
                              radius: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Trust-region mode: the minimiser s of ``g.s + s.B s / 2`` in the ball, and ``B s``.

        Solved by :func:`trust_region_step` with the same derivatives (damped
        solves only; the softmax gauge is handled there: the step has no
        component along it).  Records the multiplier lambda as the damping and
        counts hard cases and solves stopped at the iteration cap (their step,
        the best one seen, is still a valid proposal: the ratio test judges it).
        Raises :class:`SingularHessianError` if the step is not finite.
        """
        state = self._state()
        result = trust_region_step(operator, grad, radius)
        if not torch.isfinite(result.step).all():
            raise SingularHessianError(f"trust-region step at radius {radius:g} is not finite")
        state["damping"] = result.damping
        state["hard_cases"] += int(result.hard_case)
        state["unconverged"] += int(not result.converged)
        return result.step, operator @ result.step

    def _adapt(self, state: dict, ratio: float, on_boundary: bool) -> None:
        """Update the damping (damped mode) or the radius (trust region) after a proposal.

        ``ratio`` is the actual over the predicted reduction, ``-inf`` for a
        proposal that failed or was rejected: either way the next one is
        shorter (more damping, or a quarter of the radius).
        """
        group = self.param_groups[0]
        if group["mode"] == "trust_region":
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
        else:
            damping, factor = state["damping"], group["damping_factor"]
            if ratio > 0.75:
                damping = damping / factor
            elif ratio < 0.25:
                damping = damping * factor
            state["damping"] = min(max(damping, group["min_damping"]), group["max_damping"])

    def _exhausted(self, state: dict) -> bool:
        """The damping (or radius) is at the bound a failure pushes it to: retrying is futile."""
        group = self.param_groups[0]
        if group["mode"] == "trust_region":
            return state["radius"] <= group["min_radius"]
        return state["damping"] >= group["max_damping"]

    def _try_step(self, closure, operator: HessianOperator, grad: torch.Tensor,
                  f0: float, state: dict) -> bool:
        """Propose, check and test one second-order step, then adapt; True if it was taken.

        On False the parameters may have moved; the caller restores them.
        """
        group = self.param_groups[0]
        trust_region = group["mode"] == "trust_region"
        try:
            if trust_region:
                step, h_step = self._propose_trust_region(operator, grad, state["radius"])
            else:
                step, h_step = self._propose(operator, grad, state["damping"])
        except torch.linalg.LinAlgError:  # SingularHessianError, or a failed eigensolve
            state["singular"] += 1
            self._adapt(state, -math.inf, False)
            return False
        step, scale = self._clip(step, state)
        slope = torch.dot(grad, step)
        predicted = -(slope + 0.5 * scale * torch.dot(step, h_step)).item()
        if not (predicted > 0 and (trust_region or slope < 0)):
            state["non_descent"] += 1
            self._adapt(state, -math.inf, False)
            return False
        # trust_region_step's boundary tolerance is tighter than sqrt(eps)
        eps = torch.finfo(step.dtype).eps
        on_boundary = trust_region and step.norm().item() >= (1 - math.sqrt(eps)) * state["radius"]
        self._add_flat(step)
        f1 = _to_float(closure())
        state["func_evals"] += 1
        ratio = (f0 - f1) / predicted if math.isfinite(f1) else -math.inf
        state["last_ratio"] = ratio
        accepted = ratio >= group["accept_ratio"]
        self._adapt(state, ratio if accepted else -math.inf, on_boundary)
        state["accepted" if accepted else "rejected"] += 1
        return accepted

    # --- the step ----------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor],
             curvature_closure: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
        """One step; returns the loss ``closure()`` gave before it.

        Args:
            closure: zeroes grads, evaluates the loss, calls ``backward()``,
                returns the loss.  Called once per step, plus once per
                proposal that reaches the reduction-ratio test.  If no
                ``curvature_closure`` is given its forward pass must be tracked.
            curvature_closure: runs ``model(x_c, y_c, track_activations=True)``
                on the curvature batch and returns that loss (no backward needed).
        """
        closure = torch.enable_grad()(closure)
        group = self.param_groups[0]
        state = self._state()

        loss = closure()
        state["func_evals"] += 1
        state["n_iter"] += 1
        f0 = _to_float(loss)
        grad = self._gather_flat_grad()
        if not (math.isfinite(f0) and torch.isfinite(grad).all()):
            state["nonfinite"] += 1
            return loss
        if grad.norm() == 0:
            return loss

        if (state["n_iter"] - 1) % group["curvature_interval"] != 0:
            step, _ = self._clip(-group["gradient_lr"] * grad, state)
            self._add_flat(step)
            state["gradient_steps"] += 1
            return loss

        state["newton_steps"] += 1
        if curvature_closure is not None:
            with torch.enable_grad():
                curvature_loss = curvature_closure()
            operator = self._curvature_operator(curvature_loss)
        else:
            operator = self._curvature_operator(loss)

        start = self._flat_params().clone()
        for _ in range(group["max_retries"] + 1):
            exhausted = self._exhausted(state)
            if self._try_step(closure, operator, grad, f0, state):
                return loss
            self._set_flat_params(start)
            if exhausted:
                break

        state["gradient_fallbacks"] += 1
        step, _ = self._clip(-group["gradient_lr"] * grad, state)
        self._add_flat(step)
        return loss

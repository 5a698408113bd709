"""Tests of the DampedNewton optimizer: damped Newton steps (descent, damping
adaptation, failed proposals), Gauss-Newton steps, trust-region mode (radius
rules, rejected and failed solves, tiny curvature batches), state_dict round
trips and option errors.  CPU only, tiny models.

    python -m pytest test_optimizer.py -q
"""

import copy
import math

import pytest
import torch

from conftest import (assert_continue_identically, closure_for, gradient_descent_losses,
                      spoiled_closure, teacher_problem)
from conftest import flat_parameters as flat
from damped_newton import DampedNewton
from hessian_inverse import DeepMLPWithTracking, HessianInverseError, NotTrackedError
from hessian_inverse import SingularHessianError


def loss_of(model, x, y):
    return float(model(x, y).detach())


class Recording(DampedNewton):
    """Records every proposal as (step, gradient, damping or radius it was made for)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.proposals = []

    def _propose(self, curvature, grad, damping):
        step, h_step = super()._propose(curvature, grad, damping)
        self.proposals.append((step, grad, damping))
        return step, h_step

    def _propose_trust_region(self, curvature, grad, radius):
        step, h_step = super()._propose_trust_region(curvature, grad, radius)
        self.proposals.append((step, grad, radius))
        return step, h_step


# --------------------------------------------------------------------------
# Damped Newton
# --------------------------------------------------------------------------


def test_newton_beats_gradient_descent_in_the_same_number_of_steps():
    model0, x, y = teacher_problem()
    steps = 8
    losses = gradient_descent_losses(model0, x, y, steps)
    model = copy.deepcopy(model0)
    opt = DampedNewton(model, damping=1e-2)
    for _ in range(steps):
        opt.step(closure_for(model, opt, x, y))
    newton = float(model(x, y).detach())
    assert newton < 0.5 * min(losses.values()), (newton, losses)
    assert opt.stats["accepted"] >= steps - 1


def test_damping_rises_after_a_rejected_step_and_falls_after_accepted_ones():
    model, x, y = teacher_problem()
    opt = DampedNewton(model, damping=1.0, max_retries=0, gradient_lr=0.05)
    start = flat(model)
    opt.step(spoiled_closure(model, opt, x, y))
    assert opt.stats["rejected"] == 1 and opt.stats["gradient_fallbacks"] == 1
    assert opt.damping == pytest.approx(3.0)
    # The fallback is exactly a gradient step from the start, not the rejected Newton step.
    model_check, _, _ = teacher_problem()
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(model_check(x, y),
                                                              list(model_check.parameters()))])
    torch.testing.assert_close(flat(model), start - 0.05 * g)

    dampings, ratios = [opt.damping], []
    for _ in range(3):
        opt.step(closure_for(model, opt, x, y))
        dampings.append(opt.damping)
        ratios.append(opt.stats["last_ratio"])
    assert opt.stats["accepted"] == 3 and opt.stats["rejected"] == 1
    for before, after, ratio in zip(dampings, dampings[1:], ratios):  # the LM rule
        expected = before / 3 if ratio > 0.75 else before * 3 if ratio < 0.25 else before
        assert after == pytest.approx(expected), (dampings, ratios)
    assert dampings[-1] < dampings[0] / 3, (dampings, ratios)


class FlakyNewton(DampedNewton):
    """Fails its first proposal in a chosen way, then behaves."""

    def __init__(self, *args, failure, **kwargs):
        super().__init__(*args, **kwargs)
        self.failure, self.proposals = failure, 0

    def _propose(self, curvature, grad, damping):
        self.proposals += 1
        if self.proposals == 1:
            if self.failure == "singular":
                raise SingularHessianError("test")
            return grad.clone(), curvature @ grad  # uphill
        return super()._propose(curvature, grad, damping)


@pytest.mark.parametrize("failure,counter", [("singular", "singular"), ("uphill", "non_descent")])
def test_failed_proposals_are_redamped_not_taken(failure, counter):
    model, x, y = teacher_problem()
    opt = FlakyNewton(model, damping=0.1, failure=failure)
    before = float(model(x, y).detach())
    opt.step(closure_for(model, opt, x, y))
    assert opt.stats[counter] >= 1 and opt.stats["accepted"] == 1
    assert opt.stats["gradient_fallbacks"] == 0 and opt.proposals >= 2
    assert float(model(x, y).detach()) < before


def test_state_dict_round_trip_resumes_exactly():
    model, x, y = teacher_problem()
    opt = DampedNewton(model, damping=0.5, max_step_norm=2.0, curvature_interval=2)
    for _ in range(3):
        opt.step(closure_for(model, opt, x, y))
    twin = copy.deepcopy(model)
    twin_opt = DampedNewton(twin)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert twin_opt.stats == opt.stats
    assert twin_opt.param_groups[0]["max_step_norm"] == 2.0
    assert_continue_identically(model, opt, twin, twin_opt, x, y)


def test_curvature_interval_step_cap_and_curvature_batch():
    model, x, y = teacher_problem(dtype=torch.float32)
    opt = DampedNewton(model, damping=0.01, max_step_norm=0.05, curvature_interval=3,
                       gradient_lr=0.5)
    before = float(model(x, y).detach())
    for _ in range(6):
        start = flat(model)
        opt.step(closure_for(model, opt, x, y, tracked=False),
                 curvature_closure=lambda: model(x[:8], y[:8], track_activations=True))
        assert (flat(model) - start).norm() <= 0.05 * (1 + 1e-5)
    s = opt.stats
    assert (s["newton_steps"], s["gradient_steps"]) == (2, 4)
    assert s["clipped"] >= 1
    assert float(model(x, y).detach()) < before


def test_untracked_closure_and_nonfinite_loss():
    model, x, y = teacher_problem()
    opt = DampedNewton(model)
    with pytest.raises(NotTrackedError):
        opt.step(closure_for(model, opt, x, y, tracked=False))
    start = flat(model)
    opt.step(lambda: torch.tensor(math.nan))
    assert torch.equal(flat(model), start) and opt.stats["nonfinite"] == 1
    with pytest.raises(ValueError):
        DampedNewton(model, damping=0.0)


# --------------------------------------------------------------------------
# Gauss-Newton
# --------------------------------------------------------------------------


def test_gauss_newton_steps_are_descent_directions_and_reduce_the_loss():
    model0, x, y = teacher_problem()
    model = copy.deepcopy(model0)
    opt = Recording(model, curvature="ggn", damping=1e-2)
    losses = [loss_of(model, x, y)]
    for _ in range(6):
        opt.step(closure_for(model, opt, x, y))
        losses.append(loss_of(model, x, y))
    assert len(opt.proposals) >= 6
    for step, grad, _ in opt.proposals:  # (GGN + eps I) is positive definite
        assert torch.dot(grad, step) < 0
    s = opt.stats
    assert s["non_descent"] == 0 and s["singular"] == 0 and s["gradient_fallbacks"] == 0
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # accepted: a decrease
    assert losses[-1] < 0.1 * losses[0], losses

    # The same run on the indefinite Hessian does meet uphill proposals: the check is live.
    model = copy.deepcopy(model0)
    opt = DampedNewton(model, damping=1e-2)
    for _ in range(6):
        opt.step(closure_for(model, opt, x, y))
    assert opt.stats["non_descent"] > 0


# --------------------------------------------------------------------------
# Trust region
# --------------------------------------------------------------------------


def test_trust_region_steps_stay_inside_the_radius_and_beat_gradient_descent():
    model0, x, y = teacher_problem()
    steps = 8
    gd = gradient_descent_losses(model0, x, y, steps)
    model = copy.deepcopy(model0)
    opt = Recording(model, mode="trust_region", radius=0.5)
    for _ in range(steps):
        radius, start = opt.radius, flat(model)
        opt.step(closure_for(model, opt, x, y))
        assert (flat(model) - start).norm() <= radius * (1 + 1e-9)
    for step, _, radius in opt.proposals:
        assert step.norm() <= radius * (1 + 1e-9)
    assert any(abs(step.norm() / radius - 1) < 1e-6 for step, _, radius in opt.proposals)
    s = opt.stats
    assert s["gradient_fallbacks"] == 0 and s["accepted"] == steps
    assert loss_of(model, x, y) < 0.5 * min(gd.values()), (loss_of(model, x, y), gd)


def test_trust_region_rejects_restores_and_shrinks_then_grows_on_the_boundary():
    model, x, y = teacher_problem()
    opt = DampedNewton(model, mode="trust_region", radius=0.5, max_retries=0, gradient_lr=0.0)
    start = flat(model)
    opt.step(spoiled_closure(model, opt, x, y))
    s = opt.stats
    assert (s["rejected"], s["radius_shrinks"], s["gradient_fallbacks"]) == (1, 1, 1)
    assert s["last_ratio"] < 0 and opt.radius == 0.5 / 4
    assert torch.equal(flat(model), start)  # restored; gradient_lr=0: nothing else taken

    # A tiny radius: the model is accurate there (rho ~ 1) and the step is on the boundary.
    opt = Recording(model, mode="trust_region", radius=1e-3)
    opt.step(closure_for(model, opt, x, y))
    step, _, radius = opt.proposals[-1]
    assert radius == 1e-3 and step.norm().item() == pytest.approx(1e-3, rel=1e-9)
    assert opt.stats["last_ratio"] > 0.75 and opt.stats["radius_expansions"] == 1
    assert opt.radius == 2e-3

    # ... and the radius never grows past max_radius.
    opt = DampedNewton(model, mode="trust_region", radius=1e-3, max_radius=1e-3)
    opt.step(closure_for(model, opt, x, y))
    assert opt.radius == 1e-3 and opt.stats["radius_expansions"] == 0


def test_trust_region_interior_newton_steps_leave_the_radius_alone():
    """Logistic regression (no hidden layer, random labels): convex with a finite minimum,
    so the steps are interior Newton steps (lambda = 0) that predict the loss well."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=gen)
    torch.manual_seed(0)
    model = DeepMLPWithTracking(5, 4, 3, num_hidden_layers=0).double()
    opt = Recording(model, mode="trust_region", radius=10.0)
    losses = []
    for _ in range(4):
        opt.step(closure_for(model, opt, x, y))
        losses.append(loss_of(model, x, y))
        assert opt.stats["last_ratio"] > 0.75 and opt.damping == 0.0
    assert all(step.norm() < 0.5 * radius for step, _, radius in opt.proposals)
    assert opt.radius == 10.0 and opt.stats["radius_expansions"] == 0
    assert losses[-2] - losses[-1] < 1e-6 < 1e-2 < losses[0] - losses[1]  # Newton: quadratic


@pytest.mark.parametrize("ratio,on_boundary,factor", [
    (-math.inf, False, 0.25), (0.1, True, 0.25), (0.5, True, 1.0), (0.9, False, 1.0),
    (0.9, True, 2.0)])
def test_radius_rules(ratio, on_boundary, factor):
    """Nocedal & Wright, Algorithm 4.1: the radius after a step of reduction ratio rho."""
    model, _, _ = teacher_problem()
    opt = DampedNewton(model, mode="trust_region", radius=0.4)
    state = opt._state()
    opt._adapt(state, ratio, on_boundary)
    assert opt.radius == pytest.approx(0.4 * factor)


def test_trust_region_state_dict_round_trip_resumes_exactly():
    model, x, y = teacher_problem()
    opt = DampedNewton(model, mode="trust_region", curvature="ggn", radius=0.3,
                       max_radius=5.0, curvature_interval=2)
    for _ in range(3):
        opt.step(closure_for(model, opt, x, y))
    assert opt.radius != 0.3  # adapted
    twin = copy.deepcopy(model)
    twin_opt = DampedNewton(twin)  # settings come with the state dict
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert twin_opt.stats == opt.stats and twin_opt.radius == opt.radius
    group = twin_opt.param_groups[0]
    assert (group["mode"], group["curvature"], group["max_radius"]) == ("trust_region", "ggn", 5.0)
    assert_continue_identically(model, opt, twin, twin_opt, x, y)


def test_state_dict_from_before_the_curvature_options_still_loads():
    model, x, y = teacher_problem()
    opt = DampedNewton(model, damping=0.5)
    opt.step(closure_for(model, opt, x, y))
    old = copy.deepcopy(opt.state_dict())
    for key in ("curvature", "mode", "radius", "min_radius", "max_radius"):
        del old["param_groups"][0][key]
    for key in ("radius", "radius_shrinks", "radius_expansions", "hard_cases", "unconverged"):
        del old["state"][0][key]
    twin_opt = DampedNewton(model)
    twin_opt.load_state_dict(old)
    assert twin_opt.param_groups[0]["mode"] == "damped" and twin_opt.damping == opt.damping
    twin_opt.step(closure_for(model, twin_opt, x, y))
    assert twin_opt.stats["newton_steps"] == 2


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_trust_region_on_a_tiny_curvature_batch_does_not_crash(curvature):
    """Curvature from one or two examples: singular far beyond the softmax gauge."""
    model, x, y = teacher_problem()
    opt = DampedNewton(model, mode="trust_region", curvature=curvature)
    before = loss_of(model, x, y)
    for i in range(4):
        opt.step(closure_for(model, opt, x, y, tracked=False),
                 curvature_closure=lambda: model(x[i:i + 1 + i % 2], y[i:i + 1 + i % 2],
                                                 track_activations=True))
    assert opt.stats["accepted"] >= 3
    assert loss_of(model, x, y) < before


class FlakyTrustRegion(DampedNewton):
    """The first trust-region solve fails in a chosen way, then it behaves."""

    def __init__(self, *args, failure, **kwargs):
        super().__init__(*args, mode="trust_region", **kwargs)
        self.failure, self.calls = failure, 0

    def _propose_trust_region(self, curvature, grad, radius):
        self.calls += 1
        if self.calls == 1:
            if self.failure == "singular":
                raise SingularHessianError("test")
            if self.failure == "eigensolver":
                raise torch.linalg.LinAlgError("test: eigh failed to converge")
            return grad.clone(), curvature @ grad  # uphill: the model predicts an increase
        return super()._propose_trust_region(curvature, grad, radius)


@pytest.mark.parametrize("failure,counter", [("singular", "singular"),
                                             ("eigensolver", "singular"),
                                             ("uphill", "non_descent")])
def test_failed_trust_region_solves_shrink_the_radius_and_retry(failure, counter):
    model, x, y = teacher_problem()
    opt = FlakyTrustRegion(model, radius=0.8, failure=failure)
    before = loss_of(model, x, y)
    opt.step(closure_for(model, opt, x, y))
    s = opt.stats
    assert s[counter] == 1 and s["accepted"] == 1 and s["gradient_fallbacks"] == 0
    assert opt.calls == 2 and s["radius_shrinks"] >= 1
    assert loss_of(model, x, y) < before


def test_option_errors():
    model, _, _ = teacher_problem()
    with pytest.raises(ValueError, match="mode must be one of"):
        DampedNewton(model, mode="line_search")
    with pytest.raises(HessianInverseError, match="curvature must be one of"):
        DampedNewton(model, curvature="fisher")
    for bad in (dict(radius=0.0), dict(radius=10.0, max_radius=1.0), dict(min_radius=-1.0)):
        with pytest.raises(ValueError, match="radius"):
            DampedNewton(model, mode="trust_region", **bad)

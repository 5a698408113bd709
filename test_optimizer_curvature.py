"""Tests of DampedNewton's curvature choices: Gauss-Newton steps and trust-region
mode (radius rules, state, robustness), and simple_example.py with every method.
CPU only, tiny float64 models.

    PYTHONPATH=. python -m pytest test_optimizer_curvature.py -q
"""

import copy
import math

import pytest
import torch

import simple_example
from damped_newton import DampedNewton
from hessian_inverse import DeepMLPWithTracking, HessianInverseError, SingularHessianError
from test_training import image_folder  # noqa: F401 (a pytest fixture)
from test_training import (assert_continue_identically, closure_for, flat,
                           gradient_descent_losses, imagenet, spoiled_closure, teacher_problem)


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


def loss_of(model, x, y):
    return float(model(x, y).detach())


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


# --------------------------------------------------------------------------
# Scripts
# --------------------------------------------------------------------------


def test_simple_example_all_methods_report_and_plot(tmp_path, capsys):
    out = tmp_path / "plot.png"
    simple_example.main(["--quick", "--dataset", "digits", "--steps", "2", "--methods", "all",
                         "--out", str(out)])
    text = capsys.readouterr().out
    summary = text[text.index("summary"):]
    rows = [line.split("  ")[0] for line in summary.splitlines()[3:7]]
    assert rows == ["gradient descent", "damped Newton", "Gauss-Newton", "trust region"]
    assert "trust region: " in summary and "radius shrunk" in summary
    assert out.read_bytes()[:4] == b"\x89PNG"
    import matplotlib.image
    assert matplotlib.image.imread(out).shape[1] > 1000  # both panels drawn

    with pytest.raises(SystemExit):
        simple_example.main(["--methods", "gd,bfgs"])
    assert "unknown method(s) bfgs" in capsys.readouterr().err


def test_train_imagenet_trust_region_on_the_gauss_newton_matrix(image_folder, tmp_path):
    ckpt = imagenet(image_folder, tmp_path, "--use-hessian", "--epochs", "1", "--curvature",
                    "ggn", "--trust-region", "--radius", "0.2", "--max-radius", "3")
    group, state = ckpt["optimizer"]["param_groups"][0], ckpt["optimizer"]["state"][0]
    assert (group["mode"], group["curvature"], group["max_radius"]) == ("trust_region", "ggn", 3.0)
    assert state["newton_steps"] == 3 and state["radius"] != 0.2
    with pytest.raises(SystemExit):
        imagenet(image_folder, tmp_path, "--use-hessian", "--trust-region", "--radius", "5",
                 "--max-radius", "3")

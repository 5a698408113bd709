"""Tests of DampedNewton as Levenberg-Marquardt on least squares (issue 20): the squared-error
model trained unchanged, the route (``path=``, 'auto' taking the output-space route, no
cross-route fallback), Nielsen's damping update and its convergence on a zero-residual
problem without a hand-set floor, and the settings' checks and legacy state dicts.
CPU only, tiny models, seconds.

    python -m pytest test_levenberg_marquardt.py -q
"""

import copy
import math

import pytest
import torch

import hessian_inverse as hi
from conftest import SineSquaredError, closure_for, dense_ggn, teacher_problem
from damped_newton import (NIELSEN_TAU, DampedNewton, hessian_free_update, nielsen_update,
                           trust_radius_update)

F64 = torch.float64


def zero_residual_problem(seed=0, n=12, layers=3, width=4, input_dim=3):
    """Teacher-student least squares with fewer residuals (n) than parameters: a fit with
    zero residual exists (the teacher), which is where Levenberg-Marquardt is fast."""
    gen = torch.Generator().manual_seed(seed)
    teacher = hi.DeepMLPWithTracking(input_dim, width, 1, layers - 1, loss="mse").double()
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
    x = torch.randn(n, input_dim, generator=gen, dtype=F64)
    with torch.no_grad():
        z = x
        for layer in teacher.layers[:-1]:
            z = layer(z)
        y = teacher.loss_layer.logits(z)
    torch.manual_seed(seed)
    student = hi.DeepMLPWithTracking(input_dim, width, 1, layers - 1, loss="mse").double()
    assert n < sum(p.numel() for p in student.parameters())
    return student, x, y


def losses_of(opt, model, x, y, steps):
    out = []
    for _ in range(steps):
        opt.step(closure_for(model, opt, x, y))
        with torch.no_grad():
            out.append(float(model(x, y).detach()))
    return out


class RouteRecording(DampedNewton):
    """Records the path each factorisation was asked for."""

    def _curvature_operator(self, *args):
        operator = super()._curvature_operator(*args)
        real, self.paths = operator.factorize, getattr(self, "paths", [])

        def factorize(damping, *a, **k):
            self.paths.append(k.get("path"))
            return real(damping, *a, **k)

        operator.factorize = factorize
        return operator


# --------------------------------------------------------------------------
# The rules, as functions of numbers
# --------------------------------------------------------------------------


@pytest.mark.parametrize("ratio,factor", [(2.0, 1 / 3), (1.0, 1 / 3), (0.75, 0.875), (0.5, 1.0),
                                          (0.25, 1.125), (0.0, 2.0)])
def test_nielsen_update(ratio, factor):
    assert nielsen_update(0.6, ratio) == pytest.approx(0.6 * factor, rel=1e-15)


def test_the_other_rules_as_functions():
    assert hessian_free_update(0.4, 0.9, 1.5) == pytest.approx(0.4 / 1.5)
    assert hessian_free_update(0.4, 0.5, 1.5) == 0.4
    assert hessian_free_update(0.4, 0.1, 1.5) == pytest.approx(0.6)
    assert trust_radius_update(1.0, 0.1, True) == 0.25
    assert trust_radius_update(1.0, 0.9, True) == 2.0
    assert trust_radius_update(1.0, 0.9, False) == 1.0


def test_nielsen_adapts_lambda_and_ties_gamma_to_it():
    model, x, y = zero_residual_problem()
    opt = DampedNewton(model, damping_update="nielsen", damping=0.5)
    state = opt._state()
    opt._adapt_damping(state, 1.0)
    assert opt.damping == pytest.approx(0.5 / 3)
    opt.step(closure_for(model, opt, x, y))
    assert opt.stats["factor_damping"] == pytest.approx(0.5 / 3)  # gamma = lambda


def test_nielsen_starts_at_tau_times_the_curvature_along_the_gradient():
    model, x, y = zero_residual_problem(1)
    loss = model(x, y, track_activations=True)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
    G = dense_ggn(model, x, lambda o: ((o.view(len(x), -1) - y) ** 2).mean())
    opt = DampedNewton(model, damping_update="nielsen")
    opt.step(closure_for(model, opt, x, y))
    first = opt._state()["factor_damping"]
    assert first == pytest.approx(NIELSEN_TAU * (g @ G @ g).item() / (g @ g).item(), rel=1e-12)


# --------------------------------------------------------------------------
# Levenberg-Marquardt on a zero-residual problem
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 2])
def test_levenberg_marquardt_converges_superlinearly_without_a_hand_set_floor(seed):
    """The default floor is none: lambda falls by 3 per step where the model is right, and
    the loss falls by ever larger factors (superlinear: the last factors below 1e-2 and
    1e-6, local order above 1.35) down to rounding.  A floor at the scale of the GGN's
    small eigenvalues (1e-2 here; the old default 1e-8 on larger problems) turns the rate
    linear: the loss stalls orders of magnitude higher."""
    model0, x, y = zero_residual_problem(seed)
    model = copy.deepcopy(model0)
    opt = DampedNewton(model, damping_update="nielsen", momentum=False)
    losses = []
    while len(losses) < 40 and not (losses and losses[-1] < 1e-23):
        losses += losses_of(opt, model, x, y, 1)
    assert losses[-1] < 1e-23 and opt.stats["gradient_fallbacks"] == 0
    factors = [b / a for a, b in zip(losses, losses[1:])]
    assert max(factors[-3:]) < 1e-2 and min(factors[-3:]) < 1e-6, (losses, factors)
    orders = [math.log(b) / math.log(a) for a, b in zip(losses, losses[1:]) if a < 1e-6]
    assert max(orders) > 1.35, (losses, orders)
    assert opt._cache["inverse"].route == "output"  # 12 residuals against 37 parameters

    floored = copy.deepcopy(model0)
    opt = DampedNewton(floored, damping_update="nielsen", momentum=False, min_damping=1e-2)
    pinned = losses_of(opt, floored, x, y, 40)
    assert opt.damping == 1e-2 and min(pinned) > 1e6 * min(losses)
    late = [b / a for a, b in zip(pinned[-6:], pinned[-5:])]
    assert all(0.01 < f < 1 for f in late), pinned  # linear


def test_the_squared_error_model_trains_under_both_damping_updates():
    for update in ("factor", "nielsen"):
        model, x, y = zero_residual_problem(3, n=16)
        start = float(model(x, y).detach())
        opt = DampedNewton(model, damping_update=update)
        losses = losses_of(opt, model, x, y, 15)
        assert losses[-1] < 1e-3 * start, (update, losses)
        assert all(b <= a for a, b in zip(losses, losses[1:]))


# --------------------------------------------------------------------------
# The route
# --------------------------------------------------------------------------


def test_auto_resolves_to_one_route_per_factorisation_and_never_falls_back():
    """'auto' is resolved by choose_route before factorising, so a failed output-space
    factorisation raises gamma instead of handing over to the structured route (whose
    memory at a full batch can exceed the machine's: issue 20)."""
    model, x, y = zero_residual_problem(4, n=30)
    opt = RouteRecording(model, damping_update="nielsen")
    losses_of(opt, model, x, y, 3)
    assert opt.paths and set(opt.paths) == {"output"}

    class Refused(RouteRecording):
        def _curvature_operator(self, *args):
            operator = super()._curvature_operator(*args)
            inner = operator.factorize

            def factorize(damping, *a, **k):
                if damping < 1.0:
                    raise hi.SingularHessianError("test: refused")
                return inner(damping, *a, **k)

            operator.factorize = factorize
            return operator

    model, x, y = zero_residual_problem(4, n=30)
    opt = Refused(model, damping=0.5, damping_update="nielsen")
    before = float(model(x, y).detach())
    opt.step(closure_for(model, opt, x, y))
    s = opt.stats
    assert s["singular"] == 1 and s["factorizations"] == 1
    assert s["factor_damping"] == pytest.approx(0.5 * 1.5 ** 2)
    assert set(opt.paths) == {"output"} and float(model(x, y).detach()) < before


def test_a_refused_damping_is_not_gone_back_below():
    """Without a floor the solves find it: a factorisation refused as singular raises
    gamma, and with one damping (Nielsen) lambda with it, so the next step starts within
    one Nielsen decrease of what was refused instead of below the last refusal (which
    exhausted the retries and fell back to gradient steps that blew the loss up, on the
    regression regime).  Here the solves refuse every damping below 1e-3."""
    refused = []

    class Floor(DampedNewton):
        def _curvature_operator(self, *args):
            operator = super()._curvature_operator(*args)
            inner = operator.factorize

            def factorize(damping, *a, **k):
                if damping < 1e-3:
                    refused.append(damping)
                    raise hi.SingularHessianError("test: below the floor")
                return inner(damping, *a, **k)

            operator.factorize = factorize
            return operator

    model, x, y = zero_residual_problem(7, n=20)
    opt = Floor(model, damping=1e-4, damping_update="nielsen", momentum=False)
    losses = losses_of(opt, model, x, y, 12)
    s = opt.stats
    assert s["gradient_fallbacks"] == 0 and s["accepted"] == 12
    assert s["singular"] == len(refused) >= 12 and min(refused[3:]) >= 1e-3 / 3 / 1.5 ** 2
    assert opt.damping >= 1e-3 / 3 and losses[-1] < 1e-2 * losses[0]


@pytest.mark.parametrize("path", ["output", "structured", "generic"])
def test_a_forced_path_gives_the_exact_damped_ggn_direction(path):
    """path= on a user's loss layer without closed forms (the output route through the
    eigen-root of its block, the crash of issue 20) and on the closed-form MSE model."""
    torch.manual_seed(5)
    user = hi.TrackedChain([hi.AffineActivation(3, 4, "tanh")], SineSquaredError(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    mse, xm, ym = zero_residual_problem(5)
    for model, xs, ys, loss_in_outputs in (
            (user, x, y, lambda o: ((o.view(6, 2) - y) ** 2).mean()),
            (mse, xm, ym, lambda o: ((o.view(len(xm), 1) - ym) ** 2).mean())):
        G = dense_ggn(model, xs, loss_in_outputs)
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(
            model(xs, ys), list(model.parameters()))])
        opt = RouteRecording(model, damping=1e-2, path=path)
        directions = []
        real = opt._direction
        opt._direction = lambda *a: directions.append(real(*a)) or directions[-1]
        opt.step(closure_for(model, opt, xs, ys))
        assert opt.paths[0] == path and opt._cache["inverse"].route == path
        expected = -torch.linalg.solve(G + 1e-2 * torch.eye(len(g), dtype=F64), g)
        torch.testing.assert_close(directions[0], expected, rtol=1e-9, atol=1e-12)


BAD = [
    (dict(path="fast"), "path must be one of"),
    (dict(path="output", curvature="hessian"), "path='output'.*curvature='ggn'"),
    (dict(path="output", mode="trust_region"), "path='output'.*mode='damped'"),
    (dict(damping_update="marquardt"), "damping_update must be one of"),
    (dict(min_damping=0.0), "min_damping"),
    (dict(min_damping=-1.0), "min_damping"),
]


@pytest.mark.parametrize("settings,message", BAD, ids=[m for _, m in BAD])
def test_new_settings_are_checked(settings, message):
    model, _, _ = teacher_problem()
    with pytest.raises(ValueError, match=message):
        DampedNewton(model, **settings)


def test_state_dicts_carry_the_new_settings_and_older_ones_keep_their_meaning():
    model, x, y = zero_residual_problem(6)
    opt = DampedNewton(model, damping_update="nielsen", path="output", momentum=False)
    losses_of(opt, model, x, y, 2)
    saved = copy.deepcopy(opt.state_dict())
    twin = DampedNewton(copy.deepcopy(model))
    twin.load_state_dict(saved)
    group = twin.param_groups[0]
    assert (group["damping_update"], group["path"], group["min_damping"]) == \
        ("nielsen", "output", None)
    old = copy.deepcopy(saved)
    for key in ("damping_update", "path"):
        del old["param_groups"][0][key]
    legacy = DampedNewton(copy.deepcopy(model), damping_update="nielsen", path="generic")
    legacy.load_state_dict(old)
    assert (legacy.param_groups[0]["damping_update"], legacy.param_groups[0]["path"]) == \
        ("factor", "auto")

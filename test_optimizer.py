"""Tests of the DampedNewton optimizer: the damped step (its 2 x 2 quadratic model against
a dense Hessian, rejected steps on the same factorisation, the Levenberg-Marquardt rule,
curvature scaling and reuse), Gauss-Newton descent, trust-region mode (radius rules,
rejected and failed solves, tiny curvature batches), state_dict round trips, copies,
option errors and closures that forget backward().  CPU only, tiny models.

    python -m pytest test_optimizer.py -q
"""

import copy
import math
import pickle

import pytest
import torch

from conftest import (assert_continue_identically, closure_for, cross_entropy_in_logits,
                      dense_ggn, dense_hessian,
                      gradient_descent_losses, spoiled_closure, teacher_problem)
from conftest import flat_parameters as flat
from damped_newton import DampedNewton
from hessian_inverse import DeepMLPWithTracking, HessianInverseError, NotTrackedError
from hessian_inverse import SingularHessianError


def loss_of(model, x, y):
    return float(model(x, y).detach())


def flat_grad(model, x, y):
    return torch.cat([t.reshape(-1) for t in torch.autograd.grad(model(x, y),
                                                                 list(model.parameters()))])


class Recording(DampedNewton):
    """Records directions, trial steps (with the model damping used) and trust-region
    proposals."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.directions, self.trials, self.proposals = [], [], []

    def _direction(self, *args):
        direction = super()._direction(*args)
        self.directions.append(direction)
        return direction

    def _model_step(self, plane, V, lam, state):
        step, predicted, used = super()._model_step(plane, V, lam, state)
        self.trials.append((step.clone(), predicted, used))
        return step, predicted, used

    def _propose_trust_region(self, curvature, grad, radius, state):
        step, h_step = super()._propose_trust_region(curvature, grad, radius, state)
        self.proposals.append((step, grad, radius))
        return step, h_step


# --------------------------------------------------------------------------
# The damped step
# --------------------------------------------------------------------------


def test_newton_beats_gradient_descent_in_the_same_number_of_steps():
    model0, x, y = teacher_problem()
    steps = 8
    losses = gradient_descent_losses(model0, x, y, steps)
    for curvature in ("ggn", "hessian"):
        model = copy.deepcopy(model0)
        opt = DampedNewton(model, curvature=curvature)
        for _ in range(steps):
            opt.step(closure_for(model, opt, x, y))
        newton = loss_of(model, x, y)
        assert newton < 0.5 * min(losses.values()), (curvature, newton, losses)
        assert opt.stats["accepted"] >= steps - 1 and opt.stats["gradient_fallbacks"] == 0


def test_first_step_is_the_damped_newton_step_with_the_damping_scaled_to_the_curvature():
    """No curvature batch, B = H, a fresh factorisation and lambda = gamma: the plane model's
    minimiser is the damped Newton step itself, with gamma = |g.H g| / g.g."""
    model, x, y = teacher_problem()
    g = flat_grad(model, x, y)
    H = dense_hessian(model, x, y)
    scale = abs((g @ H @ g).item()) / (g @ g).item()
    expected = -torch.linalg.solve(H + scale * torch.eye(len(g), dtype=g.dtype), g)
    opt = Recording(model, curvature="hessian")
    start = flat(model)
    opt.step(closure_for(model, opt, x, y))
    assert opt.stats["factor_damping"] == pytest.approx(scale, rel=1e-12)
    torch.testing.assert_close(opt.directions[0], expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(flat(model) - start, expected, rtol=1e-8, atol=1e-12)


def test_gauss_newton_direction_takes_the_cheaper_output_route_and_is_exact():
    """With a curvature batch of 4 (4 x 2 output rows against width 16), 'auto' picks the
    output-space route; the direction is still the damped GGN solve of a dense oracle."""
    _, x, y = teacher_problem()
    model = DeepMLPWithTracking(5, 16, 3, num_hidden_layers=3).double()
    xc, yc = x[:4], y[:4]
    g = flat_grad(model, x, y)
    G = dense_ggn(model, xc, cross_entropy_in_logits(4, yc))
    opt = Recording(model)
    opt.step(closure_for(model, opt, x, y),
             lambda: model(xc, yc, track_activations=True))
    gamma = opt.stats["factor_damping"]
    expected = -torch.linalg.solve(G + gamma * torch.eye(len(g), dtype=g.dtype), g)
    assert opt._cache["inverse"].route == "output"
    torch.testing.assert_close(opt.directions[0], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("curvature_batch", [False, True])
def test_step_minimises_the_quadratic_model_over_the_direction_and_the_previous_step(
        curvature_batch):
    """Against a dense Hessian of the gradient batch: the step is V c with c minimising
    g.Vc + c.V^T (H + lambda I) V c / 2, V = [s, previous step], and the ratio it is judged
    by uses that model's predicted decrease.  With a curvature batch the products come
    from gradient differences (accurate to ~ sqrt(eps)), else from the tracked pass."""
    model, x, y = teacher_problem()
    opt = Recording(model)  # Gauss-Newton directions, Hessian model
    curvature_closure = (lambda: model(x[:8], y[:8], track_activations=True)) \
        if curvature_batch else None
    tolerance = 1e-6 if curvature_batch else 1e-9
    for k in range(3):
        previous = opt._state()["previous_step"]
        H, g, start = dense_hessian(model, x, y), flat_grad(model, x, y), flat(model)
        trials = len(opt.trials)
        opt.step(closure_for(model, opt, x, y, tracked=not curvature_batch), curvature_closure)
        step, predicted, lam = opt.trials[trials]
        V = opt.directions[-1][:, None] if previous is None else \
            torch.stack([opt.directions[-1], previous], dim=1)
        assert V.shape[1] == (1 if k == 0 else 2)
        M = V.T @ (H + lam * torch.eye(len(g), dtype=g.dtype)) @ V
        c = -torch.linalg.solve(M, V.T @ g)
        assert (step - V @ c).norm() <= tolerance * step.norm()
        assert predicted == pytest.approx(-(g @ V @ c + 0.5 * c @ M @ c).item(), rel=tolerance)
        assert torch.allclose(flat(model) - start, step)
    assert opt.stats["accepted"] == 3


def test_rejected_step_is_retried_on_the_same_factorisation_at_a_quarter_of_its_length():
    model, x, y = teacher_problem()
    opt = Recording(model, damping=1.0)
    start = flat(model)
    opt.step(spoiled_closure(model, opt, x, y))  # the first trial point reports +10
    s = opt.stats
    assert (s["rejected"], s["accepted"], s["factorizations"]) == (1, 1, 1)
    (first, _, lam0), (second, _, lam1) = opt.trials
    assert second.norm().item() == pytest.approx(0.25 * first.norm().item(), rel=1e-5)
    assert lam1 > lam0 and opt.damping >= lam1 / 1.5 * (1 - 1e-12)
    # the retry is a multiple of the same direction: no new solve
    assert abs(torch.nn.functional.cosine_similarity(first, second, dim=0)) > 1 - 1e-12
    torch.testing.assert_close(flat(model) - start, second)


def test_failures_on_every_retry_end_in_a_gradient_step_from_the_start():
    model, x, y = teacher_problem()
    opt = DampedNewton(model, damping=1.0, max_retries=1, gradient_lr=0.05)
    start, g = flat(model), flat_grad(model, x, y)
    honest = closure_for(model, opt, x, y)
    calls = []

    def closure():  # every trial point looks terrible
        calls.append(1)
        return honest() + 10.0 if len(calls) > 1 else honest()

    opt.step(closure)
    s = opt.stats
    assert (s["rejected"], s["accepted"], s["gradient_fallbacks"]) == (2, 0, 1)
    torch.testing.assert_close(flat(model), start - 0.05 * g)
    assert opt._state()["previous_step"] is None  # no momentum from a failed step


@pytest.mark.parametrize("ratio,factor", [(0.9, 1 / 1.5), (0.5, 1.0), (0.1, 1.5)])
def test_levenberg_marquardt_rule(ratio, factor):
    model, _, _ = teacher_problem()
    opt = DampedNewton(model, damping=0.4)
    state = opt._state()
    opt._adapt_damping(state, ratio)
    assert opt.damping == pytest.approx(0.4 * factor)


def test_damping_adapts_only_every_adapt_interval_steps():
    model, x, y = teacher_problem()
    opt = DampedNewton(model, damping=0.3, adapt_interval=2)
    adapted = []
    opt._adapt_damping = lambda state, ratio: adapted.append(state["newton_steps"])
    for _ in range(5):
        opt.step(closure_for(model, opt, x, y))
    assert opt.stats["accepted"] == 5 and adapted == [2, 4]


class FlakyFactorisation(DampedNewton):
    """The first factorisation fails (singular), then it behaves."""

    calls = 0

    def _curvature_operator(self, *args):
        operator = super()._curvature_operator(*args)
        real = operator.factorize

        def factorize(damping, *a, **k):
            FlakyFactorisation.calls += 1
            if FlakyFactorisation.calls == 1:
                raise SingularHessianError("test")
            return real(damping, *a, **k)

        operator.factorize = factorize
        return operator


def test_a_singular_factorisation_is_retried_with_more_damping():
    model, x, y = teacher_problem()
    opt = FlakyFactorisation(model, damping=0.1)
    before = loss_of(model, x, y)
    opt.step(closure_for(model, opt, x, y))
    s = opt.stats
    assert (s["singular"], s["factorizations"], s["accepted"]) == (1, 1, 1)
    assert s["factor_damping"] == pytest.approx(0.1 * 1.5 ** 2)
    assert loss_of(model, x, y) < before


def test_curvature_is_reused_while_good_and_a_checkpoint_ends_the_reuse():
    model, x, y = teacher_problem()
    opt = Recording(model, curvature_reuse=3)
    curvature_closure = lambda: model(x[:8], y[:8], track_activations=True)  # noqa: E731
    opt.step(closure_for(model, opt, x, y, tracked=False), curvature_closure)
    inverse = opt._cache["inverse"]
    for _ in range(2):
        g = flat_grad(model, x, y)
        opt.step(closure_for(model, opt, x, y, tracked=False), curvature_closure)
        # a reused step solves with the first step's factorisation, at today's gradient
        torch.testing.assert_close(opt.directions[-1], -inverse.solve(g))
    s = opt.stats
    assert (s["factorizations"], s["reused"], s["accepted"]) == (1, 2, 3)
    opt.step(closure_for(model, opt, x, y, tracked=False), curvature_closure)  # age 3: fresh
    opt.state_dict()
    opt.step(closure_for(model, opt, x, y, tracked=False), curvature_closure)  # checkpoint
    assert opt.stats["factorizations"] == 3 and opt.stats["reused"] == 2


def test_gauss_newton_directions_descend_and_the_hessian_ones_need_not():
    model0, x, y = teacher_problem()
    model = copy.deepcopy(model0)
    opt = Recording(model, curvature="ggn", damping=1e-2)
    losses = [loss_of(model, x, y)]
    for _ in range(6):
        g = flat_grad(model, x, y)
        opt.step(closure_for(model, opt, x, y))
        assert torch.dot(g, opt.directions[-1]) < 0  # (GGN + gamma I) is positive definite
        losses.append(loss_of(model, x, y))
    s = opt.stats
    assert s["non_descent"] == 0 and s["singular"] == 0 and s["gradient_fallbacks"] == 0
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.2 * losses[0], losses


def test_curvature_interval_step_cap_and_curvature_batch():
    model, x, y = teacher_problem(dtype=torch.float32)
    opt = DampedNewton(model, damping=0.01, max_step_norm=0.05, curvature_interval=3,
                       gradient_lr=0.5)
    before = loss_of(model, x, y)
    for _ in range(6):
        start = flat(model)
        opt.step(closure_for(model, opt, x, y, tracked=False),
                 curvature_closure=lambda: model(x[:8], y[:8], track_activations=True))
        assert (flat(model) - start).norm() <= 0.05 * (1 + 1e-5)
    s = opt.stats
    assert (s["newton_steps"], s["gradient_steps"]) == (2, 4)
    assert s["clipped"] >= 1
    assert loss_of(model, x, y) < before


def test_untracked_closure_and_nonfinite_loss():
    model, x, y = teacher_problem()
    opt = DampedNewton(model)
    with pytest.raises(NotTrackedError):
        opt.step(closure_for(model, opt, x, y, tracked=False))
    def nan_closure():
        opt.zero_grad()
        loss = model(x, y) * math.nan
        loss.backward()
        return loss

    start = flat(model)
    opt.step(nan_closure)
    assert torch.equal(flat(model), start) and opt.stats["nonfinite"] == 1


# --------------------------------------------------------------------------
# Closures, copies and settings (issue 10, item 12)
# --------------------------------------------------------------------------


def test_a_closure_that_forgets_backward_is_an_error_not_a_silent_no_op():
    model, x, y = teacher_problem()
    opt = DampedNewton(model)
    closure_for(model, opt, x, y)()  # gradients exist from an earlier call ...

    def forgetful():  # ... and this closure neither zeroes nor recomputes them
        return model(x, y, track_activations=True)

    start = flat(model)
    with pytest.raises(RuntimeError, match=r"no gradient.*loss\.backward\(\)"):
        opt.step(forgetful)
    with pytest.raises(TypeError, match="returned None"):
        opt.step(lambda: closure_for(model, opt, x, y)() and None)
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step(None)
    assert torch.equal(flat(model), start)


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))],
                         ids=["deepcopy", "pickle"])
def test_copies_are_usable_and_independent(copier):
    model, x, y = teacher_problem()
    opt = DampedNewton(model, curvature_reuse=2)
    opt.step(closure_for(model, opt, x, y))
    twin = copier(opt)
    assert twin.model is not model and twin.stats == opt.stats
    assert all(a is b for a, b in zip(twin.model.parameters(), twin.param_groups[0]["params"]))
    assert torch.equal(flat(twin.model), flat(model))
    for _ in range(2):
        opt.step(closure_for(model, opt, x, y))
        twin.step(closure_for(twin.model, twin, x, y))
    # the copy refactorises where the original reused: same damping state, same counters
    # except that split, and both descend
    assert twin.stats["newton_steps"] == opt.stats["newton_steps"] == 3
    assert loss_of(twin.model, x, y) < 0.9 * loss_of(*teacher_problem())
    assert not torch.equal(flat(twin.model), flat(teacher_problem()[0]))


BAD_SETTINGS = [
    (dict(accept_ratio=math.nan), "accept_ratio"), (dict(accept_ratio=1.5), "accept_ratio"),
    (dict(accept_ratio=-0.1), "accept_ratio"), (dict(lr=math.inf), "lr"),
    (dict(lr=math.nan), "lr"), (dict(lr=0.0), "lr"), (dict(lr=2.0), "lr"),
    (dict(damping=0.0), "damping"), (dict(damping=math.inf), "damping"),
    (dict(damping=math.nan), "damping"), (dict(min_damping=1.0, max_damping=0.1), "min_damping"),
    (dict(damping_factor=1.0), "damping_factor"), (dict(damping_factor=math.nan), "damping_factor"),
    (dict(max_retries=-1), "max_retries"), (dict(max_retries=1.5), "max_retries"),
    (dict(curvature_interval=0), "curvature_interval"), (dict(gradient_lr=-1.0), "gradient_lr"),
    (dict(gradient_lr=math.inf), "gradient_lr"), (dict(solve_tol=0.0), "solve_tol"),
    (dict(radius=math.inf), "radius"), (dict(max_step_norm=math.nan), "max_step_norm"),
    (dict(momentum="yes"), "momentum"), (dict(curvature_reuse=0), "curvature_reuse"),
    (dict(adapt_interval=0), "adapt_interval"), (dict(memory_limit=-5), "memory_limit"),
    (dict(mode="line_search"), "mode"), (dict(radius=10.0, max_radius=1.0), "radius"),
]


@pytest.mark.parametrize("settings,name", BAD_SETTINGS, ids=[n for _, n in BAD_SETTINGS])
def test_nonsensical_settings_are_refused_with_the_expected_range(settings, name):
    model, _, _ = teacher_problem()
    with pytest.raises(ValueError, match=name) as err:
        DampedNewton(model, **settings)
    assert "must" in str(err.value) or "need" in str(err.value)


def test_curvature_errors():
    model, _, _ = teacher_problem()
    with pytest.raises(HessianInverseError, match="curvature must be one of"):
        DampedNewton(model, curvature="fisher")


# --------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["damped", "trust_region"])
def test_state_dict_round_trip_resumes_exactly(mode):
    model, x, y = teacher_problem()
    opt = DampedNewton(model, mode=mode, radius=0.3, max_radius=5.0, max_step_norm=2.0,
                       curvature_interval=2, curvature_reuse=3)
    for _ in range(3):
        opt.step(closure_for(model, opt, x, y))
    saved = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    twin_opt = DampedNewton(twin)  # settings come with the state dict
    twin_opt.load_state_dict(saved)
    assert twin_opt.stats == opt.stats
    group = twin_opt.param_groups[0]
    assert (group["mode"], group["max_step_norm"], group["curvature_reuse"]) == (mode, 2.0, 3)
    assert_continue_identically(model, opt, twin, twin_opt, x, y)


def test_state_dict_from_before_the_new_options_still_loads():
    """A state dict written before curvature, trust region, momentum, reuse and the
    model damping existed: a damped Hessian run, continued with today's rules."""
    model, x, y = teacher_problem()
    opt = DampedNewton(model, curvature="hessian", damping=0.5)
    opt.step(closure_for(model, opt, x, y))
    old = copy.deepcopy(opt.state_dict())
    for key in ("curvature", "mode", "radius", "min_radius", "max_radius", "momentum",
                "curvature_reuse", "adapt_interval"):
        del old["param_groups"][0][key]
    for key in ("radius", "radius_shrinks", "radius_expansions", "hard_cases", "unconverged",
                "factor_damping", "rescale", "previous_step", "factorizations", "reused"):
        del old["state"][0][key]
    twin_opt = DampedNewton(model)
    twin_opt.load_state_dict(old)
    group = twin_opt.param_groups[0]
    assert (group["mode"], group["curvature"], group["momentum"]) == ("damped", "hessian", True)
    assert twin_opt.damping == opt.damping and twin_opt.stats["factor_damping"] == opt.damping
    twin_opt.step(closure_for(model, twin_opt, x, y))
    assert twin_opt.stats["newton_steps"] == 2 and twin_opt.stats["accepted"] == 2


# --------------------------------------------------------------------------
# Trust region
# --------------------------------------------------------------------------


def test_trust_region_steps_stay_inside_the_radius_and_beat_gradient_descent():
    model0, x, y = teacher_problem()
    steps = 8
    gd = gradient_descent_losses(model0, x, y, steps)
    model = copy.deepcopy(model0)
    opt = Recording(model, mode="trust_region", curvature="hessian", radius=0.5)
    for _ in range(steps):
        radius, start = opt.radius, flat(model)
        opt.step(closure_for(model, opt, x, y))
        assert (flat(model) - start).norm() <= radius * (1 + 1e-9)
    for step, _, radius in opt.proposals:
        assert step.norm() <= radius * (1 + 1e-9)
    assert any(abs(step.norm() / radius - 1) <= DampedNewton.TR_TOL
               for step, _, radius in opt.proposals)
    s = opt.stats
    assert s["gradient_fallbacks"] == 0 and s["accepted"] == steps
    assert loss_of(model, x, y) < 0.5 * min(gd.values()), (loss_of(model, x, y), gd)


def test_trust_region_rejects_restores_and_shrinks_then_grows_on_the_boundary():
    model, x, y = teacher_problem()
    opt = DampedNewton(model, mode="trust_region", curvature="hessian", radius=0.5,
                       max_retries=0, gradient_lr=0.0)
    start = flat(model)
    opt.step(spoiled_closure(model, opt, x, y))
    s = opt.stats
    assert (s["rejected"], s["radius_shrinks"], s["gradient_fallbacks"]) == (1, 1, 1)
    assert s["last_ratio"] < 0 and opt.radius == 0.5 / 4
    assert torch.equal(flat(model), start)  # restored; gradient_lr=0: nothing else taken

    # A tiny radius: the model is accurate there (rho ~ 1) and the step is on the boundary.
    opt = Recording(model, mode="trust_region", curvature="hessian", radius=1e-3)
    opt.step(closure_for(model, opt, x, y))
    step, _, radius = opt.proposals[-1]
    assert radius == 1e-3 and step.norm().item() == pytest.approx(1e-3, rel=DampedNewton.TR_TOL)
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
    opt = Recording(model, mode="trust_region", curvature="hessian", radius=10.0)
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
    opt._adapt_radius(state, ratio, on_boundary)
    assert opt.radius == pytest.approx(0.4 * factor)


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
        super().__init__(*args, mode="trust_region", curvature="hessian", **kwargs)
        self.failure, self.calls = failure, 0

    def _propose_trust_region(self, curvature, grad, radius, state):
        self.calls += 1
        if self.calls == 1:
            if self.failure == "singular":
                raise SingularHessianError("test")
            if self.failure == "eigensolver":
                raise torch.linalg.LinAlgError("test: eigh failed to converge")
            return grad.clone(), curvature @ grad  # uphill: the model predicts an increase
        return super()._propose_trust_region(curvature, grad, radius, state)


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

"""Tests of the core: exact (H + eps I)^{-1} v and H v against independent oracles.

Run with ``python -m pytest`` or ``python test_hessian.py``.  The seed's four
groups are here: (1) correctness, (2) random vectors and many right-hand sides,
(3) cost linear in depth and the memory guard, (4) numerical stability; then
the Hessian-vector product, generic layer chains, and every bad-input error.

Tolerances: float64 rounding is 1.1e-16, so a backward-stable solve has a
relative forward error of about cond * 1e-16 times a modest growth factor.
Where the cases are well conditioned (cond <~ 1e5) we ask for 1e-8, the
issue's bar, leaving three orders of margin; ill-conditioned cases use a bound
proportional to the condition number measured from the dense oracle.
"""

import copy
import itertools
import math
import random
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hessian_inverse as hi
from conftest import (SquaredErrorLoss, autograd_hvp, dense_hessian, flat_parameters,
                      loss_of_flat_parameters, make_mlp, relative_error)

F64 = torch.float64
ACTIVATIONS = sorted(hi.ACTIVATIONS)


def dense_solve(H, v, damping):
    return torch.linalg.solve(H + damping * torch.eye(H.shape[0], dtype=H.dtype), v)


# A spread of random models: depth 1..9, width 1..8, batch 1..8, every
# activation, damping 1e-4, 1e-2, 1.  Drawn once from a fixed seed.
_rng = random.Random(1234)
SPREAD = [
    (i, _rng.choice([1, 2, 3, 4, 5, 6, 8, 9]), _rng.randint(1, 8), _rng.randint(1, 8),
     ACTIVATIONS[i % len(ACTIVATIONS)], [1e-4, 1e-2, 1.0][i % 3])
    for i in range(42)
]


# ----------------------------------------------------------------------------
# 1. Correctness
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed,num_layers,width,batch,activation,damping", SPREAD)
def test_solve_matches_dense_hessian(seed, num_layers, width, batch, activation, damping):
    model, x, t, loss = make_mlp(seed, num_layers, width, batch, activation)
    H = dense_hessian(model, x, t)
    v = torch.randn(H.shape[0], dtype=F64)
    y = hi.hessian_inverse_vector_product(model, loss, v, damping=damping)
    ref = dense_solve(H, v, damping)
    cond = torch.linalg.cond(H + damping * torch.eye(H.shape[0], dtype=F64)).item()
    # Forward error bound of a stable solve, with growth margin; never looser than 1e-8.
    assert relative_error(y, ref) <= min(1e-8, max(1e-12, 1e-14 * cond))


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_newton_direction_of_the_gradient_round_trips(activation):
    """The seed's usage verbatim: backward(create_graph=True), then H^{-1} g."""
    model, x, t, loss = make_mlp(7, 4, 5, 6, activation)
    loss.backward(create_graph=True)
    gradient = torch.cat([p.grad.flatten() for p in model.parameters()])
    y = hi.hessian_inverse_vector_product(model, loss, gradient.detach(), damping=1e-3)
    hy = autograd_hvp(model, (x, t), y) + 1e-3 * y
    assert relative_error(hy, gradient.detach()) < 1e-10


def gauge_case(seed, activation, num_layers=4, width=3, batch=64):
    """A classifier with enough data that H's null space is exactly the softmax gauge."""
    model, x, t, loss = make_mlp(seed, num_layers, width, batch, activation)
    H = dense_hessian(model, x, t)
    eig = torch.linalg.eigvalsh(H).abs().sort().values
    gauge_dim = width + 1  # one direction per input unit of the output layer, plus the bias
    # The test is meaningful only if that is exactly the null space: check it.
    assert eig[gauge_dim - 1] < 1e-14 * eig[-1]
    assert eig[gauge_dim] > 1e-9 * eig[-1]
    return model, x, t, loss, H, (eig[-1] / eig[gauge_dim]).item()


@pytest.mark.parametrize("seed,activation", [(0, "tanh"), (1, "gelu"), (2, "softplus"),
                                             (3, "silu"), (4, "sigmoid")])
def test_damping_zero_gives_moore_penrose_on_the_softmax_gauge(seed, activation):
    model, x, t, loss, H, cond = gauge_case(seed, activation)
    v = torch.randn(H.shape[0], dtype=F64)
    y = hi.hessian_inverse_vector_product(model, loss, v)
    ref = torch.linalg.pinv(H, hermitian=True, rtol=1e-12) @ v
    assert relative_error(y, ref) <= max(1e-12, 1e-14 * cond)


def test_damping_zero_newton_step_solves_h_x_equals_g():
    """g is orthogonal to the gauge, so H (H^+ g) = g exactly."""
    model, x, t, loss, H, cond = gauge_case(5, "tanh")
    g = torch.func.grad(loss_of_flat_parameters(model, x, t))(flat_parameters(model))
    y = hi.hessian_inverse_vector_product(model, loss, g)
    assert relative_error(H @ y, g) <= max(1e-12, 1e-15 * cond)


# ----------------------------------------------------------------------------
# 2. Random vectors and many right-hand sides
# ----------------------------------------------------------------------------


def test_many_right_hand_sides_match_dense_and_single_solves():
    model, x, t, loss = make_mlp(11, 5, 4, 5, "tanh")
    H = dense_hessian(model, x, t)
    V = torch.randn(H.shape[0], 7, dtype=F64)
    Y = hi.hessian_inverse_vector_product(model, loss, V, damping=1e-2)
    assert Y.shape == V.shape
    assert relative_error(Y, dense_solve(H, V, 1e-2)) < 1e-11
    inverse = hi.factorize(model, loss, damping=1e-2)
    for j in range(V.shape[1]):
        assert relative_error(inverse @ V[:, j], Y[:, j]) < 1e-13


def test_one_set_of_derivatives_serves_several_dampings():
    model, x, t, loss = make_mlp(12, 3, 3, 4, "softplus")
    H = dense_hessian(model, x, t)
    v = torch.randn(H.shape[0], dtype=F64)
    inverse = hi.factorize(model, loss, damping=1.0)
    for damping in [1.0, 0.1, 1e-3]:
        other = inverse.with_damping(damping)
        assert other.operator is inverse.operator  # derivatives reused, not recomputed
        assert relative_error(other @ v, dense_solve(H, v, damping)) < 1e-10


def test_operators_interoperate_with_scipy():
    import numpy as np
    model, x, t, loss = make_mlp(13, 3, 3, 4, "tanh")
    H = dense_hessian(model, x, t).numpy()
    op = hi.hessian_operator(model, loss)
    v = np.random.default_rng(0).standard_normal(op.num_params)
    assert np.allclose(op.as_linear_operator() @ v, H @ v, rtol=1e-12, atol=1e-14)
    inv = op.factorize(0.5).as_linear_operator()
    ref = np.linalg.solve(H + 0.5 * np.eye(len(v)), v)
    assert np.linalg.norm(inv @ v - ref) <= 1e-12 * np.linalg.norm(ref)


# ----------------------------------------------------------------------------
# 3. Cost: linear in depth, and the memory guard
# ----------------------------------------------------------------------------


def _factor_tensors(factor) -> list:
    """Every tensor the factors of a factorisation hold (stacked over blocks or levels),
    but the pivot statistics (one pair per level of cyclic reduction: log L of them)."""
    if isinstance(factor, torch.Tensor):
        return [factor]
    if isinstance(factor, (list, tuple)):
        return [t for f in factor for t in _factor_tensors(f)]
    if hasattr(factor, "__dataclass_fields__"):
        return [t for name in factor.__dataclass_fields__ if name != "pivot_ranges"
                for t in _factor_tensors(getattr(factor, name))]
    return []


def _factor_elements(inverse):
    """Numbers stored by the factors: each storage once (factors may be views into a work
    array)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() // t.element_size()
                for t in _factor_tensors(inverse.solver.lu)}
    return sum(storages.values())


@pytest.mark.parametrize("factorization", ["banded", "cyclic"])
def test_factor_storage_grows_linearly_with_depth(factorization):
    """Stored factors are exactly proportional to depth: no block grows with L."""
    counts, largest = {}, {}
    for depth in (8, 16, 32):
        model, x, t, loss = make_mlp(0, depth, 4, 3, "tanh")
        inverse = hi.factorize(model, loss, damping=1e-3, path="structured",
                               factorization=factorization)
        assert inverse.factorization == factorization
        counts[depth] = _factor_elements(inverse)
        largest[depth] = max(t[0].numel() for t in _factor_tensors(inverse.solver.lu) if t.dim() > 2)
    # Interior layers are identical in size, so the increments are exactly equal.
    assert counts[32] - counts[16] == 2 * (counts[16] - counts[8])
    assert largest[8] == largest[16] == largest[32]


def test_memory_estimate_is_linear_in_depth():
    est = [hi.estimate_factorization_bytes([272] * L, [128] * (L - 1) + [1], 128, F64)
           for L in (64, 128, 256)]
    assert est[2] - est[1] == 2 * (est[1] - est[0])


def test_memory_guard_refuses_before_allocating():
    model, x, t, loss = make_mlp(0, 3, 4, 3, "tanh")
    with pytest.raises(hi.InsufficientMemoryError, match="batch") as err:
        hi.hessian_inverse_vector_product(model, loss, torch.zeros(
            sum(p.numel() for p in model.parameters()), dtype=F64), damping=1.0,
            memory_limit=1000)
    assert "GiB" in str(err.value) and "layer" in str(err.value)


# ----------------------------------------------------------------------------
# 4. Numerical stability
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("input_scale", [1e-3, 1e-1, 1e1, 1e3])
def test_inputs_of_any_scale(input_scale):
    model, x, t, loss = make_mlp(21, 4, 3, 5, "tanh", input_scale=input_scale)
    H = dense_hessian(model, x, t)
    v = torch.randn(H.shape[0], dtype=F64)
    damping = 1e-2
    y = hi.hessian_inverse_vector_product(model, loss, v, damping=damping)
    cond = torch.linalg.cond(H + damping * torch.eye(H.shape[0], dtype=F64)).item()
    assert relative_error(y, dense_solve(H, v, damping)) <= max(1e-12, 1e-14 * cond)


@pytest.mark.parametrize("damping", [1e-6, 1e-9, 1e-11])
def test_ill_conditioned_systems(damping):
    """H + eps I with the gauge's eigenvalue at eps: condition numbers 8e5 to 8e10.

    The gauge directions make leading blocks singular too, so the paper's
    unpivoted block LDU would have nothing to divide by; pivoting copes.
    """
    model, x, t, loss = make_mlp(22, 4, 3, 32, "tanh")
    H = dense_hessian(model, x, t)
    v = torch.randn(H.shape[0], dtype=F64)
    damped = H + damping * torch.eye(H.shape[0], dtype=F64)
    cond = torch.linalg.cond(damped).item()
    assert cond > 1e-2 / damping  # really ill-conditioned: the gauge eigenvalue is eps
    y = hi.hessian_inverse_vector_product(model, loss, v, damping=damping)
    assert relative_error(y, torch.linalg.solve(damped, v)) <= 1e-15 * cond
    # And the residual stays at rounding level whatever the conditioning.
    residual = autograd_hvp(model, (x, t), y) + damping * y - v
    assert residual.norm() <= 1e-12 * (damped.norm(2) * y.norm() + v.norm())


def test_too_little_data_is_a_clear_singular_error():
    """Batch 1: H has null directions beyond the gauge; no exact H^+ via the gauge."""
    model, x, t, loss = make_mlp(23, 3, 4, 1, "tanh")
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64)
    with pytest.raises(hi.SingularHessianError, match="damping > 0"):
        hi.hessian_inverse_vector_product(model, loss, v)


@pytest.mark.parametrize("path", ["generic", "structured", "auto"])
def test_damping_at_an_eigenvalue_is_a_clear_singular_error(path):
    """H + eps I singular because eps = -lambda_min(H) exactly (H indefinite).

    Both paths refuse; 'auto' tries the structured path first, says that it
    falls back, and the generic path's pivoted factorisation refuses.
    """
    model, x, t, loss = make_mlp(24, 3, 3, 8, "tanh", weight_scale=3.0)
    H = dense_hessian(model, x, t)
    lam_min = torch.linalg.eigvalsh(H)[0].item()
    assert lam_min < -1e-3  # indefinite
    v = torch.randn(H.shape[0], dtype=F64)
    with pytest.raises(hi.SingularHessianError, match="increase the damping"):
        if path == "auto":
            with pytest.warns(RuntimeWarning, match="Falling back to the generic path"):
                hi.hessian_inverse_vector_product(model, loss, v, damping=-lam_min)
        else:
            hi.hessian_inverse_vector_product(model, loss, v, damping=-lam_min, path=path)


def test_unit_in_the_last_place_away_from_singular_still_solves():
    """Slightly off the eigenvalue the system is nonsingular and must be solved."""
    model, x, t, loss = make_mlp(24, 3, 3, 8, "tanh", weight_scale=3.0)
    H = dense_hessian(model, x, t)
    damping = -torch.linalg.eigvalsh(H)[0].item() + 1e-6
    v = torch.randn(H.shape[0], dtype=F64)
    damped = H + damping * torch.eye(H.shape[0], dtype=F64)
    cond = torch.linalg.cond(damped).item()
    y = hi.hessian_inverse_vector_product(model, loss, v, damping=damping)
    assert relative_error(y, torch.linalg.solve(damped, v)) <= 1e-15 * cond


@pytest.mark.parametrize("activation", ["tanh", "gelu", "sigmoid"])
def test_float32_is_correct_to_single_precision(activation):
    model32, x32, t, loss32 = make_mlp(31, 5, 4, 6, activation, dtype=torch.float32)
    # The float64 oracle at exactly the same (float32-representable) point.
    model64, x64 = copy.deepcopy(model32).double(), x32.double()
    damping = 0.1
    H = dense_hessian(model64, x64, t)
    v = torch.randn(H.shape[0], dtype=F64)
    y = hi.hessian_inverse_vector_product(model32, loss32, v.float(), damping=damping)
    assert y.dtype == torch.float32
    cond = torch.linalg.cond(H + damping * torch.eye(H.shape[0], dtype=F64)).item()
    # float32 rounding is 6e-8; same growth margin as in float64.
    assert relative_error(y.double(), dense_solve(H, v, damping)) <= max(1e-5, 1e-6 * cond)


# ----------------------------------------------------------------------------
# Hessian-vector products and the per-layer oracle
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("activation,num_layers,width,batch",
                         list(zip(ACTIVATIONS, itertools.cycle([1, 3, 6, 9]),
                                  itertools.cycle([1, 5, 8]), itertools.cycle([1, 4, 7]))))
def test_hessian_vector_product_matches_autograd(activation, num_layers, width, batch):
    model, x, t, loss = make_mlp(41, num_layers, width, batch, activation)
    n = sum(p.numel() for p in model.parameters())
    V = torch.randn(n, 3, dtype=F64)
    hv = hi.hessian_vector_product(model, loss, V)
    assert relative_error(hv, autograd_hvp(model, (x, t), V)) < 1e-12


def test_layer_derivatives_match_autograd_functional():
    """J, F, A, C, G of one layer against torch.autograd.functional (another API)."""
    from torch.autograd.functional import hessian as ag_hessian, jacobian as ag_jacobian
    torch.manual_seed(0)
    layer = hi.AffineActivation(3, 4, "gelu").double()
    z = torch.randn(5, 3, dtype=F64)
    b = torch.randn(20, dtype=F64)
    d = hi.compute_layer_derivatives(layer, z, b)
    W0, c0 = layer.linear.weight.detach(), layer.linear.bias.detach()

    def f(W, c, zz):
        return F.gelu(zz @ W.T + c).reshape(-1)

    JW, Jc, Jz = ag_jacobian(f, (W0, c0, z))
    assert torch.allclose(d.J, torch.cat([JW.reshape(20, -1), Jc], 1), rtol=1e-13, atol=1e-15)
    assert torch.allclose(d.F, Jz.reshape(20, 15), rtol=1e-13, atol=1e-15)
    Hs = ag_hessian(lambda W, c, zz: b @ f(W, c, zz), (W0, c0, z))
    sizes = [12, 4, 15]  # W (4 x 3), c (4), z (5 x 3), flattened row-major
    blocks = [[Hs[i][j].reshape(sizes[i], sizes[j]) for j in range(3)] for i in range(3)]
    A = torch.cat([torch.cat(blocks[0][:2], 1), torch.cat(blocks[1][:2], 1)])
    C = torch.cat([blocks[0][2], blocks[1][2]])
    assert torch.allclose(d.A, A, rtol=1e-12, atol=1e-14)
    assert torch.allclose(d.C, C, rtol=1e-12, atol=1e-14)
    assert torch.allclose(d.G, blocks[2][2], rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------
# Generic chains: the user's own smooth layers and loss
# ----------------------------------------------------------------------------


class ResidualTanh(nn.Module):
    """``z + tanh(W z + c)``: a layer type the MLP does not have."""

    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, z):
        return z + torch.tanh(self.linear(z))


class ScaleShiftNorm(nn.Module):
    """Per-example standardisation with learned scale and shift (a LayerNorm)."""

    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)

    def forward(self, z):
        return self.norm(z)


def make_generic_chain(seed, loss="mse"):
    torch.manual_seed(seed)
    layers = [hi.AffineActivation(3, 4, "silu"), ResidualTanh(4), ScaleShiftNorm(4),
              ResidualTanh(4)]
    if loss == "mse":
        model = hi.TrackedChain(layers, SquaredErrorLoss(4, 2)).double()
        x, t = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    else:
        model = hi.TrackedChain(layers, hi.AffineCrossEntropy(4, 3)).double()
        x, t = torch.randn(6, 3, dtype=F64), torch.randint(0, 3, (6,))
    return model, x, t, model(x, t, track_activations=True)


@pytest.mark.parametrize("loss_kind", ["mse", "cross_entropy"])
@pytest.mark.parametrize("damping", [1e-3, 1.0])
def test_generic_chain_matches_dense(loss_kind, damping):
    model, x, t, loss = make_generic_chain(51, loss_kind)
    H = dense_hessian(model, x, t, vectorize=False)  # vmap-free: see dense_hessian
    V = torch.randn(H.shape[0], 2, dtype=F64)
    assert relative_error(hi.hessian_vector_product(model, loss, V), H @ V) < 1e-12
    y = hi.hessian_inverse_vector_product(model, loss, V, damping=damping)
    cond = torch.linalg.cond(H + damping * torch.eye(H.shape[0], dtype=F64)).item()
    assert relative_error(y, dense_solve(H, V, damping)) <= min(1e-8, max(1e-12, 1e-14 * cond))


def test_generic_chain_without_gauge_solves_undamped_when_nonsingular():
    """MSE has no softmax gauge: with enough data, damping 0 is a plain inverse."""
    torch.manual_seed(52)
    model = hi.TrackedChain([hi.AffineActivation(2, 2, "tanh")], SquaredErrorLoss(2, 1)).double()
    x, t = torch.randn(40, 2, dtype=F64), torch.randn(40, 1, dtype=F64)
    loss = model(x, t, track_activations=True)
    H = dense_hessian(model, x, t, vectorize=False)
    v = torch.randn(H.shape[0], dtype=F64)
    cond = torch.linalg.cond(H).item()
    y = hi.hessian_inverse_vector_product(model, loss, v)
    assert relative_error(y, torch.linalg.solve(H, v)) <= max(1e-12, 1e-14 * cond)


# ----------------------------------------------------------------------------
# Bad input gets a clear error
# ----------------------------------------------------------------------------


@pytest.fixture
def tracked():
    return make_mlp(61, 3, 3, 4, "tanh")


def _n(model):
    return sum(p.numel() for p in model.parameters())


def test_wrong_length(tracked):
    model, x, t, loss = tracked
    with pytest.raises(hi.HessianInverseError, match=rf"\({_n(model)},\)"):
        hi.hessian_inverse_vector_product(model, loss, torch.zeros(_n(model) + 1, dtype=F64), 1.0)
    with pytest.raises(hi.HessianInverseError, match="shape"):
        hi.hessian_vector_product(model, loss, torch.zeros(_n(model), 2, 2, dtype=F64))


def test_wrong_dtype_and_device(tracked):
    model, x, t, loss = tracked
    with pytest.raises(hi.HessianInverseError, match="dtype"):
        hi.hessian_inverse_vector_product(model, loss, torch.zeros(_n(model)), 1.0)
    with pytest.raises(hi.HessianInverseError, match="meta"):
        hi.hessian_inverse_vector_product(
            model, loss, torch.zeros(_n(model), dtype=F64, device="meta"), 1.0)
    with pytest.raises(hi.HessianInverseError, match="torch.Tensor"):
        hi.hessian_inverse_vector_product(model, loss, [0.0] * _n(model), 1.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_vector(tracked, bad):
    model, x, t, loss = tracked
    v = torch.zeros(_n(model), dtype=F64)
    v[3] = bad
    with pytest.raises(hi.HessianInverseError, match="NaN or Inf"):
        hi.hessian_inverse_vector_product(model, loss, v, 1.0)


@pytest.mark.parametrize("damping", [-1.0, math.nan, math.inf])
def test_bad_damping(tracked, damping):
    model, x, t, loss = tracked
    with pytest.raises(hi.HessianInverseError, match="damping"):
        hi.hessian_inverse_vector_product(model, loss, torch.zeros(_n(model), dtype=F64), damping)


def test_model_not_run_with_tracking():
    torch.manual_seed(0)
    model = hi.DeepMLPWithTracking(4, 3, 3, 2).double()
    loss = model(torch.randn(2, 4, dtype=F64), torch.tensor([0, 1]))
    with pytest.raises(hi.NotTrackedError, match="track_activations=True"):
        hi.hessian_inverse_vector_product(model, loss, torch.zeros(_n(model), dtype=F64), 1.0)


def test_loss_from_another_forward_pass(tracked):
    model, x, t, loss = tracked
    other = model(x, t)  # untracked
    with pytest.raises(hi.NotTrackedError, match="not the output"):
        hi.hessian_vector_product(model, other, torch.zeros(_n(model), dtype=F64))


def test_parameters_changed_since_tracking(tracked):
    model, x, t, loss = tracked
    with torch.no_grad():
        next(model.parameters()).add_(0.1)
    with pytest.raises(hi.NotTrackedError, match="changed"):
        hi.hessian_vector_product(model, loss, torch.zeros(_n(model), dtype=F64))


def test_non_finite_forward_pass():
    model, x, t, _ = make_mlp(62, 3, 3, 4, "tanh")
    with torch.no_grad():
        next(model.parameters())[0, 0] = math.nan
    loss = model(x, t, track_activations=True)
    with pytest.raises(hi.HessianInverseError, match="NaN/Inf"):
        hi.hessian_vector_product(model, loss, torch.zeros(_n(model), dtype=F64))


def test_not_a_tracked_chain():
    with pytest.raises(hi.HessianInverseError, match="TrackedChain"):
        hi.hessian_inverse_vector_product(nn.Linear(2, 2), None, torch.zeros(6), 1.0)


def test_unknown_activation():
    with pytest.raises(hi.HessianInverseError, match="tanh"):
        hi.DeepMLPWithTracking(4, 3, 3, 2, activation="swish2")


def test_loss_argument_is_optional(tracked):
    model, x, t, loss = tracked
    v = torch.randn(_n(model), dtype=F64)
    assert torch.equal(hi.hessian_vector_product(model, None, v),
                       hi.hessian_vector_product(model, loss, v))


# ----------------------------------------------------------------------------
# No silent wrong answer: stale state, the accuracy contract, what H v needs
# ----------------------------------------------------------------------------


def _change_parameters(model, loss, how):
    """Every way users change parameters, most of them invisible to autograd."""
    params = list(model.parameters())
    if how == "vector_to_parameters":
        nn.utils.vector_to_parameters(flat_parameters(model) + 0.1, params)
    elif how == "assign_data":
        params[0].data = params[0].data + 0.1
    elif how == "data_add_":
        params[0].data.add_(0.1)
    elif how == "fused_adam":
        optimizer = torch.optim.Adam(params, lr=0.1, fused=True)
        loss.backward()
        optimizer.step()
    elif how == "double":
        model.float()


@pytest.mark.parametrize("how", ["vector_to_parameters", "assign_data", "data_add_",
                                 "fused_adam", "double"])
@pytest.mark.parametrize("route", ["product", "solve"])
def test_parameters_changed_behind_autograds_back_are_refused(how, route):
    """Issue 10.1: the tracked pass keeps the parameter values and compares them bit for bit."""
    model, x, t, loss = make_mlp(63, 3, 4, 6, "tanh")
    v = torch.randn(_n(model), dtype=F64)
    _change_parameters(model, loss, how)
    v = v.to(next(model.parameters()).dtype)
    with pytest.raises(hi.NotTrackedError, match="parameters changed"):
        if route == "product":
            hi.hessian_vector_product(model, loss, v)
        else:
            hi.hessian_inverse_vector_product(model, loss, v, damping=1e-2)


def test_input_changed_in_place_after_tracking_does_not_change_the_answer():
    """Issue 10.2: the recorded input is a copy, so the answer is the tracked point's."""
    model, x, t, loss = make_mlp(64, 3, 4, 6, "tanh")
    x_at_tracking = x.clone()
    v = torch.randn(_n(model), dtype=F64)
    x.mul_(3)
    y = hi.hessian_inverse_vector_product(model, loss, v, damping=1e-2)
    H = dense_hessian(model, x_at_tracking, t)
    assert relative_error(y, dense_solve(H, v, 1e-2)) <= 1e-12
    assert relative_error(hi.hessian_vector_product(model, loss, v), H @ v) <= 1e-13


@pytest.mark.parametrize("seed,layers,damping", [(65, 6, 1e-4), (66, 12, 1e-3), (67, 24, 1e-2)])
@pytest.mark.parametrize("path", ["structured", "generic"])
def test_float32_meets_the_accuracy_contract_or_raises(seed, layers, damping, path):
    """Issue 10.3: a float32 result's backward error, measured independently in
    float64 against the dense Hessian of the same float32 values, is within the
    stated rtol (plus the rounding of the float32 product that checked it), or
    the call raised InaccurateSolveError (or SingularHessianError) with the figure."""
    model, x, t, loss = make_mlp(seed, layers, 6, 8, "tanh", dtype=torch.float32)
    v = torch.randn(_n(model))
    try:
        inverse = hi.factorize(model, loss, damping, path=path)
        y = inverse @ v
    except hi.SingularHessianError as err:
        assert "float64" in str(err) or "singular" in str(err)
        return
    twin = copy.deepcopy(model).double()
    A = dense_hessian(twin, x.double(), t) + damping * torch.eye(_n(model), dtype=F64)
    y64, v64 = y.double(), v.double()
    eta = (v64 - A @ y64).norm() / (torch.linalg.matrix_norm(A, 2) * y64.norm() + v64.norm())
    assert eta <= inverse.rtol + 10 * torch.finfo(torch.float32).eps
    assert inverse.backward_error <= inverse.rtol


def test_an_unattainable_tolerance_raises_with_the_figure_or_warns():
    model, x, t, loss = make_mlp(68, 8, 6, 8, "tanh", dtype=torch.float32)
    v = torch.randn(_n(model))
    with pytest.raises(hi.InaccurateSolveError, match=r"backward error .* above rtol.*float64"):
        hi.hessian_inverse_vector_product(model, loss, v, damping=1e-3, rtol=1e-12,
                                          path="structured")
    with pytest.warns(RuntimeWarning, match="backward error"):
        y = hi.hessian_inverse_vector_product(model, loss, v, damping=1e-3, rtol=1e-12,
                                              path="generic", on_inaccurate="warn")
    assert torch.isfinite(y).all()
    with pytest.raises(hi.HessianInverseError, match="rtol"):
        hi.factorize(model, loss, 1e-3, rtol=-1.0)
    with pytest.raises(hi.HessianInverseError, match="on_inaccurate"):
        hi.factorize(model, loss, 1e-3, on_inaccurate="ignore")


def test_a_product_is_guarded_by_what_it_needs_not_by_a_factorisation():
    """Issue 10.4: a wide model's H v runs in little memory; its factorisation is refused."""
    torch.manual_seed(69)
    model = hi.DeepMLPWithTracking(256, 512, 10, 3)
    x, t = torch.randn(32, 256), torch.randint(0, 10, (32,))
    loss = model(x, t, track_activations=True)
    v = torch.randn(_n(model))
    operator = hi.hessian_operator(model, loss, memory_limit=2 ** 30)
    assert relative_error(operator @ v, autograd_hvp(model, (x, t), v)) <= 1e-5
    with pytest.raises(hi.InsufficientMemoryError, match="factorisation needs about"):
        operator.factorize(1e-2)
    with pytest.raises(hi.InsufficientMemoryError, match="Shrink the curvature batch"):
        hi.factorize(model, loss, 1e-2, memory_limit=2 ** 30)


@pytest.mark.parametrize("damping,path", [(1e-2, "structured"), (1e-2, "generic"),
                                          (0.0, "auto")])
def test_solve_and_product_are_differentiable_in_v(damping, path):
    """Issue 10.5: d/dv of w . (A^{-1} v) is A^{-1} w (A symmetric), to any order."""
    model, x, t, loss = make_mlp(70, 3, 3, 64, "tanh")
    H = dense_hessian(model, x, t)
    A = H + damping * torch.eye(_n(model), dtype=F64)
    solve = torch.linalg.pinv if damping == 0 else torch.linalg.inv
    v = torch.randn(_n(model), dtype=F64, requires_grad=True)
    w = torch.randn(_n(model), dtype=F64)
    y = hi.hessian_inverse_vector_product(model, loss, v, damping=damping, path=path)
    (grad,) = torch.autograd.grad(w @ y, v)
    assert relative_error(grad, solve(A) @ w) <= 1e-9
    # Second order: f = |A^{-1} v|^2 / 2 has gradient A^{-2} v and Hessian A^{-2}.
    y = hi.hessian_inverse_vector_product(model, loss, v, damping=damping, path=path)
    (grad,) = torch.autograd.grad(0.5 * y.square().sum(), v, create_graph=True)
    (second,) = torch.autograd.grad(grad @ w, v)
    assert relative_error(second, solve(A) @ solve(A) @ w) <= 1e-8
    inverse = hi.factorize(model, loss, damping, path=path)
    V = torch.randn(_n(model), 2, dtype=F64, requires_grad=True)
    (grad_matrix,) = torch.autograd.grad((inverse @ V).square().sum(), V)
    assert relative_error(grad_matrix, 2 * solve(A) @ solve(A) @ V.detach()) <= 1e-8
    hv = hi.hessian_vector_product(model, loss, v)
    (grad_hv,) = torch.autograd.grad(w @ hv, v)
    assert relative_error(grad_hv, H @ w) <= 1e-13


def test_tied_weights_are_refused_with_a_correct_message():
    """Issue 10.6: one module used twice."""
    shared = hi.AffineActivation(4, 4)
    chain = hi.TrackedChain([shared, shared], hi.AffineCrossEntropy(4, 3)).double()
    loss = chain(torch.randn(5, 4, dtype=F64), torch.randint(0, 3, (5,)), track_activations=True)
    with pytest.raises(hi.HessianInverseError, match="tied weights.*own copy"):
        hi.hessian_vector_product(chain, loss, torch.zeros(_n(chain), dtype=F64))


def test_half_precision_models_are_refused_with_the_fix():
    """Issue 10.7: float16 / bfloat16."""
    for dtype in (torch.float16, torch.bfloat16):
        model = hi.DeepMLPWithTracking(4, 3, 3, 2).to(dtype)
        loss = model(torch.randn(5, 4, dtype=dtype), torch.randint(0, 3, (5,)),
                     track_activations=True)
        with pytest.raises(hi.HessianInverseError, match=r"float32 or float64.*model.float\(\)"):
            hi.hessian_vector_product(model, loss, torch.zeros(_n(model), dtype=dtype))


@pytest.mark.parametrize("module", [nn.Dropout(0.5), nn.BatchNorm1d(4)])
def test_random_or_stateful_training_mode_layers_are_refused(module):
    """Issue 10.7: Dropout / BatchNorm in train mode; eval() makes them fine."""
    torch.manual_seed(71)
    chain = hi.TrackedChain([hi.AffineActivation(4, 4), module],
                            hi.AffineCrossEntropy(4, 3)).double()
    x, t = torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,))
    loss = chain(x, t, track_activations=True)
    with pytest.raises(hi.NotTrackedError, match=r"training mode.*model.eval\(\)"):
        hi.hessian_vector_product(chain, loss, torch.zeros(_n(chain), dtype=F64))
    chain.eval()
    loss = chain(x, t, track_activations=True)
    v = torch.randn(_n(chain), dtype=F64)
    H = dense_hessian(chain, x, t, vectorize=False)
    assert relative_error(hi.hessian_vector_product(chain, loss, v), H @ v) <= 1e-12


def test_no_columns_and_infinite_damping_are_clear_errors(tracked):
    """Issue 10.7: v of shape (n, 0), damping=inf."""
    model, x, t, loss = tracked
    with pytest.raises(hi.HessianInverseError, match="k >= 1"):
        hi.hessian_inverse_vector_product(model, loss, torch.zeros(_n(model), 0, dtype=F64), 1.0)
    with pytest.raises(hi.HessianInverseError, match="finite number"):
        hi.factorize(model, loss, damping=math.inf)


@pytest.mark.parametrize("path", ["structured", "generic"])
@pytest.mark.parametrize("seed,damping", [(80, 1e-2), (81, 1e-4), (82, 1e-7)])
def test_mixed_precision_factors_reach_float64_accuracy_or_refactor(seed, damping, path):
    """Issue 9.2: float32 factors refined in float64 against the exact product are as
    accurate as float64 factors (error <= max(1e-12, 1e-15 cond)); where float32
    cannot contract (cond ~ 1e7 here) the factorisation is redone in float64."""
    model, x, t, loss = make_mlp(seed, 4, 4, 8, "tanh")
    H = dense_hessian(model, x, t)
    A = H + damping * torch.eye(H.shape[0], dtype=F64)
    cond = torch.linalg.cond(A).item()
    v = torch.randn(H.shape[0], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        inverse = hi.factorize(model, loss, damping, path=path, factor_dtype=torch.float32)
        y = inverse @ v
    assert relative_error(y, torch.linalg.solve(A, v)) <= max(1e-12, 1e-15 * cond)
    assert inverse.backward_error <= inverse.rtol
    expected = torch.float32 if cond * torch.finfo(torch.float32).eps < 0.1 else torch.float64
    assert inverse.factor_dtype == expected
    assert hi.factorize(model, loss, damping, path=path, factor_dtype=None).factor_dtype == F64
    with pytest.raises(hi.HessianInverseError, match="factor_dtype"):
        hi.factorize(model, loss, damping, path=path, factor_dtype=torch.float16)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

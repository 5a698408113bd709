"""Tests of the curvature choices: exact Gauss-Newton solves and trust-region steps.

Every reference here is built independently of the lifted system and of the
layer oracle, densely, in float64, on small models:

- the GGN as ``J^T H_loss J`` with J = ``torch.func.jacrev`` of the logits in
  the flattened parameters (``conftest.loss_of_flat_parameters``) and H_loss =
  ``torch.func.hessian`` of the loss in the logits;
- the Hessian as ``torch.func.hessian`` of the loss in the flattened parameters
  (``conftest.dense_hessian``);
- the trust-region solution from the eigendecomposition of the dense matrix
  (secular equation on the eigenvalues, solved by bisection-safe Brent);
- the softmax gauge basis written out from its definition.

Tolerances.  float64 rounding is 1.1e-16.  Products (GGN v) only add rounding:
1e-12 relative.  A backward-stable solve has a forward error of about
cond * eps times a modest growth factor: we ask for 100 * cond * eps (cond
measured from the dense matrix), floored at 1e-13.  The trust-region solver
stops when ``| ||s|| - radius | <= tol radius`` with tol = 1e-9, and its
Newton iteration converges quadratically, so steps agree with the dense
solution to better than tol; we ask for 1e-8 relative (1e-7 in the hard
case, whose step is defined only through an eigenvector).  Model values may
differ by the first-order effect of the radius tolerance, ``lambda radius^2
tol``, and no more (twice that, plus rounding, is asserted).
"""

import math
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import brentq

import hessian_inverse as hi
import trust_region as tr
from conftest import (SineSquaredError, cross_entropy_in_logits, dense_ggn, dense_hessian,
                      flat_parameters, loss_of_flat_parameters, make_mlp)
from conftest import relative_error as rel

F64 = torch.float64
EPS = torch.finfo(F64).eps
TOL = 1e-9  # trust_region_step's default tolerance in float64


# ----------------------------------------------------------------------------
# Independent dense oracles
# ----------------------------------------------------------------------------


def dense_hessian_and_gradient(model, x, t):
    """The dense Hessian (conftest's oracle) and the gradient, in the flat parameters."""
    gradient = torch.func.grad(loss_of_flat_parameters(model, x, t))(flat_parameters(model))
    return dense_hessian(model, x, t), gradient


def gauge_basis(model):
    """Orthonormal softmax gauge, embedded in all n parameters (docs/ALGORITHM.md, "The softmax gauge")."""
    W = model.loss_layer.linear.weight
    classes, h = W.shape
    n = sum(p.numel() for p in model.parameters())
    start = n - classes * h - classes
    N = torch.zeros(n, h + 1, dtype=F64)
    rows = start + torch.arange(classes) * h
    for k in range(h):
        N[rows + k, k] = 1 / math.sqrt(classes)
    N[n - classes:, h] = 1 / math.sqrt(classes)
    return N


def complement(N):
    Q, _ = torch.linalg.qr(N, mode="complete")
    return Q[:, N.shape[1]:]


def dense_trust_region(B, g, radius, N):
    """Exact solution from the eigendecomposition of B on the complement of N.

    Returns (s, lambda).  Not for the hard case (tested with its own construction).
    """
    Q = complement(N)
    mu, V = torch.linalg.eigh(Q.T @ B @ Q)
    V = Q @ V
    c = V.T @ g
    if mu[0] > 0 and (c / mu).norm() <= radius:
        return -V @ (c / mu), 0.0

    def excess(lam):
        return (c / (mu + lam)).norm().item() - radius

    lo = max(0.0, -mu[0].item())
    left = lo + 1e-13 * (1 + lo)
    assert excess(left) > 0, "hard case: use the hard-case construction"
    hi_ = g.norm().item() / radius + abs(mu[0].item()) + 1.0
    lam = brentq(excess, left, hi_, xtol=1e-15, rtol=4 * EPS, maxiter=500)
    return -V @ (c / (mu + lam)), lam


def model_value(B, g, s):
    return (g @ s + 0.5 * s @ B @ s).item()


def solve_tolerance(M):
    ev = torch.linalg.eigvalsh(M).abs()
    return max(100 * (ev.max() / ev.min()).item() * EPS, 1e-13)


# ----------------------------------------------------------------------------
# Gauss-Newton: products and solves against the dense GGN
# ----------------------------------------------------------------------------

_ACTIVATIONS = sorted(hi.ACTIVATIONS)
_rng = random.Random(5)
GGN_SPREAD = [
    (i, _rng.randint(0, 4), _rng.randint(1, 5), _rng.randint(1, 8),
     _ACTIVATIONS[i % len(_ACTIVATIONS)], [1e-3, 1e-1, 1.0][i % 3])
    for i in range(14)
]


@pytest.mark.parametrize("path", ["structured", "generic"])
@pytest.mark.parametrize("seed,hidden,width,batch,activation,damping", GGN_SPREAD)
def test_ggn_product_and_solve_match_dense(seed, hidden, width, batch, activation, damping,
                                           path):
    """Both solver paths: closed forms ("Structured layers") and the generic autograd oracle."""
    model, x, t, loss = make_mlp(seed, hidden + 1, width, batch, activation)
    G = dense_ggn(model, x, cross_entropy_in_logits(batch, t))
    n = G.shape[0]
    V = torch.randn(n, 3, dtype=F64)
    op = hi.hessian_operator(model, loss, curvature="ggn", path=path)
    assert rel(op @ V, G @ V) < 1e-12
    assert rel(hi.hessian_vector_product(model, loss, V[:, 0], curvature="ggn"),
               G @ V[:, 0]) < 1e-12
    M = G + damping * torch.eye(n, dtype=F64)
    ref = torch.linalg.solve(M, V)
    assert rel(op.factorize(damping, path=path).solve(V), ref) < solve_tolerance(M)
    x0 = hi.hessian_inverse_vector_product(model, loss, V[:, 0], damping, curvature="ggn",
                                           path=path)
    assert rel(x0, ref[:, 0]) < solve_tolerance(M)


def test_ggn_of_a_generic_loss_layer_matches_dense():
    """A user's loss layer (mean squared error, no gauge) split into logits and loss."""

    torch.manual_seed(3)
    hidden = [hi.AffineActivation(3, 4, "softplus"), hi.AffineActivation(4, 4, "tanh")]
    model = hi.TrackedChain(hidden, SineSquaredError(4, 2)).to(F64)
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    loss = model(x, y, track_activations=True)
    G = dense_ggn(model, x, lambda o: ((o.view(6, 2) - y) ** 2).mean())
    v = torch.randn(G.shape[0], dtype=F64)
    assert rel(hi.hessian_vector_product(model, loss, v, curvature="ggn"), G @ v) < 1e-12
    M = G + 0.01 * torch.eye(G.shape[0], dtype=F64)
    got = hi.hessian_inverse_vector_product(model, loss, v, 0.01, curvature="ggn")
    assert rel(got, torch.linalg.solve(M, v)) < solve_tolerance(M)


def test_ggn_is_symmetric_positive_semidefinite_and_blind_to_the_gauge():
    model, x, t, loss = make_mlp(11, 3, 3, 4, "tanh")
    op = hi.hessian_operator(model, loss, curvature="ggn")
    n = op.num_params
    G = op @ torch.eye(n, dtype=F64)  # our products, column by column
    scale = G.abs().max().item()
    assert (G - G.T).abs().max().item() <= 1e-14 * scale
    ev = torch.linalg.eigvalsh(0.5 * (G + G.T))
    assert ev.min().item() >= -1e-14 * ev.max().item()
    assert (G @ gauge_basis(model)).abs().max().item() <= 1e-14 * scale
    # the full Hessian of the same model is indefinite, so the difference is real
    H, _ = dense_hessian_and_gradient(model, x, t)
    assert torch.linalg.eigvalsh(H).min().item() < -1e-3


def test_ggn_equals_hessian_when_the_logits_are_linear_in_the_parameters():
    model, x, t, loss = make_mlp(2, 1, 1, 7)  # softmax regression: no hidden layer
    H, _ = dense_hessian_and_gradient(model, x, t)
    V = torch.randn(H.shape[0], 4, dtype=F64)
    assert rel(hi.hessian_vector_product(model, loss, V, curvature="ggn"), H @ V) < 1e-12


def test_ggn_damping_zero_is_the_pseudo_inverse_on_the_gauge():
    model, x, t, loss = make_mlp(4, 2, 2, 40)
    G = dense_ggn(model, x, cross_entropy_in_logits(40, t))
    ev = torch.linalg.eigvalsh(G)
    k = gauge_basis(model).shape[1]
    assert (ev.abs() < 1e-13).sum().item() == k and ev[k].item() > 1e-6  # only the gauge
    v = torch.randn(G.shape[0], dtype=F64)
    got = hi.hessian_inverse_vector_product(model, loss, v, 0.0, curvature="ggn")
    assert rel(got, torch.linalg.pinv(G, hermitian=True, rtol=1e-10) @ v) < \
        100 * (ev[-1] / ev[k]).item() * EPS


def test_ggn_damping_zero_with_too_little_data_is_a_clear_singular_error():
    model, x, t, loss = make_mlp(4, 3, 4, 2)  # rank <= batch * (classes - 1) = 4
    with pytest.raises(hi.SingularHessianError, match="damping > 0"):
        hi.factorize(model, loss, 0.0, curvature="ggn")


@pytest.mark.parametrize("seed,damping", [(0, 1e-3), (1, 1e-2), (2, 1.0)])
def test_ggn_newton_direction_is_a_descent_direction(seed, damping):
    """s = -(GGN + eps I)^{-1} g has g.s <= -||g||^2 / (lambda_max + eps) < 0."""
    model, x, t, loss = make_mlp(seed, 4, 4, 5, "tanh")
    _, g = dense_hessian_and_gradient(model, x, t)
    s = -hi.hessian_inverse_vector_product(model, loss, g, damping, curvature="ggn")
    G = dense_ggn(model, x, cross_entropy_in_logits(5, t))
    bound = -(g @ g).item() / (torch.linalg.eigvalsh(G).max().item() + damping)
    assert (g @ s).item() <= bound * (1 - 1e-10) < 0


def test_curvature_argument_errors():
    model, x, t, loss = make_mlp(0, 2, 2, 3)
    v = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=F64)
    with pytest.raises(hi.HessianInverseError, match="curvature must be one of"):
        hi.hessian_inverse_vector_product(model, loss, v, 0.1, curvature="fisher")

    class FusedOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 3)

        def forward(self, z, targets):
            return F.cross_entropy(self.linear(z), targets)

    torch.manual_seed(0)
    chain = hi.TrackedChain([hi.AffineActivation(4, 2)], FusedOnly()).to(F64)
    loss = chain(x, t, track_activations=True)
    with pytest.raises(hi.HessianInverseError, match=r"FusedOnly has no logits or loss.*Add"):
        hi.hessian_operator(chain, loss, curvature="ggn")
    hi.hessian_operator(chain, loss)  # the Hessian needs no split


# ----------------------------------------------------------------------------
# Exact definiteness test and the Lanczos estimate
# ----------------------------------------------------------------------------


_rng = random.Random(11)
DEFINITENESS_SPREAD = [  # (seed, layers, width, batch): batch < or >= each layer's inputs + 1
    (i, _rng.randint(1, 4), _rng.randint(1, 5), _rng.choice([1, 2, 3, 5, 8]))
    for i in range(10)
]


def dense_curvature(model, x, t, curvature):
    """The independent dense B: torch.func.hessian, or J^T H_loss J (jacrev, hessian)."""
    if curvature == "ggn":
        return dense_ggn(model, x, cross_entropy_in_logits(x.shape[0], t))
    return dense_hessian_and_gradient(model, x, t)[0]


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("seed,layers,width,batch", DEFINITENESS_SPREAD)
def test_definiteness_matches_dense_eigenvalues(seed, layers, width, batch, curvature):
    """The layer-wise block Cholesky (closed forms, no p_l x p_l matrix) against the sign of
    lambda_min(B) + lambda from a dense eigendecomposition: indefinite, positive definite,
    damping 0 with the gauge fixed, and singular (rank-deficient inputs), for both
    curvatures, on the closed-form and on the dense (densified) blocks alike."""
    model, x, t, loss = make_mlp(seed, layers, width, batch, "tanh")
    op = hi.hessian_operator(model, loss, curvature=curvature)
    assert op.has_closed_forms
    B = dense_curvature(model, x, t, curvature)
    mu = torch.linalg.eigvalsh(B)
    N = gauge_basis(model)
    lowest_fixed = torch.linalg.eigvalsh(B + N @ N.T)[0].item()  # damping 0: B + P_N
    scale = max(mu.abs().max().item(), 1e-3)
    dampings = [0.0] + [abs(mu[0].item()) * f for f in (0.5, 0.9, 1.1, 2.0)] + [1e-3 * scale,
                                                                             0.1 * scale]
    for lam in dampings:
        lowest = lowest_fixed if lam == 0.0 else mu[0].item() + lam
        if abs(lowest) < 1e-8 * scale:
            continue  # too close to singular for an eigenvalue's sign to mean anything
        for operator in (op, op.densified()):
            test = tr.definiteness(operator, lam)
            assert test.positive_definite == (lowest > 0), (lam, lowest, operator.has_closed_forms)
            if not test.positive_definite:
                v = test.direction
                M = B + (N @ N.T if lam == 0.0 else lam * torch.eye(B.shape[0], dtype=F64))
                assert v.norm() > 0.5 and test.quadratic_form <= 1e-12 * scale
                assert (v @ M @ v).item() == pytest.approx(test.quadratic_form,
                                                           rel=1e-8, abs=1e-10 * scale)


def test_definiteness_at_damping_zero_finds_the_null_direction_of_a_rank_deficient_layer():
    """Batch 2 into 4 inputs: the first layer's K has a null space, so B + P_N is singular
    whatever the other layers do; the certificate is an exact null vector of B + P_N."""
    model, x, t, loss = make_mlp(3, 3, 3, 2)
    for curvature in ("hessian", "ggn"):
        B = dense_curvature(model, x, t, curvature)
        N = gauge_basis(model)
        test = tr.definiteness(hi.hessian_operator(model, loss, curvature=curvature), 0.0)
        assert not test.positive_definite and test.quadratic_form == 0.0
        v = test.direction
        assert v.norm().item() == pytest.approx(1.0)
        assert ((B + N @ N.T) @ v).norm().item() < 1e-12 * B.abs().max().item()


def test_lowest_eigenpair_is_an_upper_bound_and_exact_when_lanczos_completes():
    model, x, t, loss = make_mlp(7, 3, 3, 5)
    H, _ = dense_hessian_and_gradient(model, x, t)
    Q = complement(gauge_basis(model))
    lowest = torch.linalg.eigvalsh(Q.T @ H @ Q)[0].item()
    op = hi.hessian_operator(model, loss)
    full = tr.lowest_eigenpair(op, steps=op.num_params)
    assert full.value == pytest.approx(lowest, abs=1e-10)
    assert (H @ full.vector - full.value * full.vector).norm().item() < 1e-8
    assert (gauge_basis(model).T @ full.vector).abs().max().item() < 1e-12
    for steps in (1, 3):
        assert tr.lowest_eigenpair(op, steps=steps).value >= lowest - 1e-12


# ----------------------------------------------------------------------------
# Trust region against the dense eigendecomposition
# ----------------------------------------------------------------------------


def check_against_dense(result, B, g, radius, N, on_boundary):
    s_ref, lam_ref = dense_trust_region(B, g, radius, N)
    assert result.converged and not result.hard_case
    assert result.on_boundary == on_boundary
    assert rel(result.step, s_ref) < 1e-8
    assert result.damping == pytest.approx(lam_ref, rel=1e-8, abs=1e-12)
    # ||s|| = radius (1 +- tol) moves the optimal model value by lambda radius^2 tol
    m_ref = model_value(B, g, s_ref)
    slack = 2 * TOL * lam_ref * radius ** 2 + 1e-12 * abs(m_ref)
    assert abs(model_value(B, g, result.step) - m_ref) <= slack
    assert abs(result.predicted_reduction + m_ref) <= slack
    assert result.step.norm().item() <= radius * (1 + TOL)


@pytest.mark.parametrize("radius,on_boundary", [(100.0, False), (0.05, True)])
def test_trust_region_positive_definite_interior_and_boundary(radius, on_boundary):
    model, x, t, loss = make_mlp(2, 1, 3, 30)  # softmax regression, plenty of data
    H, g = dense_hessian_and_gradient(model, x, t)
    N = gauge_basis(model)
    assert torch.linalg.eigvalsh(complement(N).T @ H @ complement(N))[0] > 1e-3
    result = tr.trust_region_step(hi.hessian_operator(model, loss), g, radius)
    check_against_dense(result, H, g, radius, N, on_boundary)
    if not on_boundary:
        assert result.damping == 0.0
        assert rel(result.step, -torch.linalg.pinv(H, hermitian=True, rtol=1e-10) @ g) < 1e-10


@pytest.mark.parametrize("seed,hidden,width,batch,radius,lanczos_steps", [
    (0, 2, 3, 5, 0.1, 20), (1, 2, 3, 5, 10.0, 20), (4, 3, 4, 6, 1.0, 20),
    (5, 3, 4, 6, 3.0, 1),  # a poor Lanczos start: the definiteness test carries it
    (1, 2, 3, 5, 10.0, 2),
])
def test_trust_region_indefinite_hessian(seed, hidden, width, batch, radius, lanczos_steps):
    model, x, t, loss = make_mlp(seed, hidden + 1, width, batch)
    H, g = dense_hessian_and_gradient(model, x, t)
    assert torch.linalg.eigvalsh(H)[0] < -0.1
    op = hi.hessian_operator(model, loss)
    result = tr.trust_region_step(op, g, radius, lanczos_steps=lanczos_steps)
    check_against_dense(result, H, g, radius, gauge_basis(model), True)
    assert result.min_eigenvalue < 0


@pytest.mark.parametrize("radius,on_boundary", [(1e3, False), (0.1, True)])
def test_trust_region_on_the_gauss_newton_matrix(radius, on_boundary):
    model, x, t, loss = make_mlp(3, 2, 3, 30, "gelu")
    G = dense_ggn(model, x, cross_entropy_in_logits(30, t))
    _, g = dense_hessian_and_gradient(model, x, t)
    result = tr.trust_region_step(hi.hessian_operator(model, loss, curvature="ggn"), g, radius)
    check_against_dense(result, G, g, radius, gauge_basis(model), on_boundary)


# Tiny trial multipliers make the structured elimination refuse; 'auto' then says so
# and takes the generic path, which is what this test exercises.
@pytest.mark.filterwarnings("ignore:.*Falling back to the generic path:RuntimeWarning")
def test_trust_region_singular_ggn_gives_the_minimum_norm_step():
    """Little data: the GGN is singular beyond the gauge, g in its range: -GGN^+ g."""
    model, x, t, loss = make_mlp(6, 3, 3, 3)
    G = dense_ggn(model, x, cross_entropy_in_logits(3, t))
    _, g = dense_hessian_and_gradient(model, x, t)
    s_ref = -torch.linalg.pinv(G, hermitian=True, rtol=1e-10) @ g
    result = tr.trust_region_step(hi.hessian_operator(model, loss, curvature="ggn"), g,
                                  10 * s_ref.norm().item())
    assert result.converged and not result.on_boundary and not result.hard_case
    # stopped when lambda (radius^2 - ||s||^2) <= tol (...): the model value is optimal
    # to tol relative (Moré-Sorensen Lemma 3.4)
    m_ref = model_value(G, g, s_ref)
    assert abs(model_value(G, g, result.step) - m_ref) <= TOL * abs(m_ref)
    # the step: lambda / mu_min+ from the damping itself, plus rounding in the flat
    # directions amplified by 1 / lambda (the reason lambda is not driven lower)
    ev = torch.linalg.eigvalsh(G)
    lam = result.damping
    bound = lam / ev[ev > 1e-10].min().item() + 10 * EPS * g.norm().item() / (lam * s_ref.norm())
    assert 0 < lam and rel(result.step, s_ref) <= bound < 1e-3


@pytest.mark.parametrize("seed,hidden,width,batch,lanczos_steps", [
    (0, 2, 3, 5, 20), (4, 3, 4, 6, 20), (1, 2, 3, 5, 3)])
def test_trust_region_hard_case(seed, hidden, width, batch, lanczos_steps):
    """g orthogonal to the lowest eigenvector and a radius beyond ||s(-lambda_min)||."""
    model, x, t, loss = make_mlp(seed, hidden + 1, width, batch)
    H, g = dense_hessian_and_gradient(model, x, t)
    Q = complement(gauge_basis(model))
    mu, V = torch.linalg.eigh(Q.T @ H @ Q)
    V = Q @ V
    assert mu[0] < 0 and mu[1] - mu[0] > 1e-2  # a simple lowest eigenvalue
    g = g - V[:, 0] * (V[:, 0] @ g)
    s_h = -V[:, 1:] @ ((V[:, 1:].T @ g) / (mu[1:] - mu[0]))
    radius = 2 * s_h.norm().item()
    tau = math.sqrt(radius ** 2 - s_h.norm().item() ** 2)
    optima = [s_h + tau * V[:, 0], s_h - tau * V[:, 0]]  # both minimise the model
    m_ref = model_value(H, g, optima[0])
    result = tr.trust_region_step(hi.hessian_operator(model, loss), g, radius,
                                  lanczos_steps=lanczos_steps)
    assert result.hard_case and result.converged and result.on_boundary
    assert result.step.norm().item() <= radius * (1 + 1e-9)
    assert result.damping == pytest.approx(-mu[0].item(), rel=1e-8)
    assert model_value(H, g, result.step) == pytest.approx(m_ref, rel=1e-9)
    assert min(rel(result.step, s) for s in optima) < 1e-7


def test_trust_region_at_a_saddle_moves_along_negative_curvature():
    model, x, t, loss = make_mlp(0, 3, 3, 5)
    op = hi.hessian_operator(model, loss)
    H, g = dense_hessian_and_gradient(model, x, t)
    result = tr.trust_region_step(op, torch.zeros_like(g), 0.5, lanczos_steps=op.num_params)
    Q = complement(gauge_basis(model))
    lowest = torch.linalg.eigvalsh(Q.T @ H @ Q)[0].item()
    assert result.hard_case and result.step.norm().item() == pytest.approx(0.5)
    assert result.predicted_reduction == pytest.approx(-0.5 * lowest * 0.25, rel=1e-9)


def test_trust_region_argument_errors():
    model, x, t, loss = make_mlp(0, 2, 2, 3)
    op = hi.hessian_operator(model, loss)
    g = torch.zeros(op.num_params, dtype=F64)
    with pytest.raises(hi.HessianInverseError, match="radius"):
        tr.trust_region_step(op, g, 0.0)
    with pytest.raises(hi.HessianInverseError, match=r"shape \(n,\)"):
        tr.trust_region_step(op, g[:, None], 1.0)
    with pytest.raises(hi.HessianInverseError, match="gradient must have shape"):
        tr.trust_region_step(op, g[1:], 1.0)

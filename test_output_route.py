"""Tests of the output-space (Woodbury) route for the Gauss-Newton matrix (``path='output'``).

The reference is the dense GGN built independently of the layer blocks:
``J^T H_o J`` with J = ``torch.func.jacrev`` of the logits in the flat parameter
vector (``conftest.loss_of_flat_parameters`` + ``functional_call``) and H_o =
``torch.func.hessian`` of the mean cross-entropy in the logits; solves by
``torch.linalg.solve``, float64.

Tolerances.  float64 rounding u = 1.1e-16.  Woodbury forms x = (v - U^T y) / eps:
the two terms are each of size ~||v||, so their difference carries an absolute
error ~ u ||v|| / eps, and ||x|| >= ||v|| / (||GGN|| + eps), a relative error of
about u cond(GGN + eps I) (the same order as a backward-stable solver's forward
error, though Woodbury is not backward stable).  We ask for 100 u cond, floored at
1e-13 (well-conditioned cases: <= 1e-12; measured errors are 0.01-0.3 u cond).
Refined solves (through ``HessianInverse``) obey the same bound and must meet the
core's backward-error contract.  Products of factors (R^T R, U U^T) are checked at
1e-12 relative.
"""

from typing import Sequence

import pytest
import torch

import hessian_inverse as hi
from conftest import SineSquaredError, cross_entropy_in_logits, dense_ggn, make_mlp
from conftest import relative_error as rel

F64 = torch.float64
EPS64 = torch.finfo(F64).eps


# ----------------------------------------------------------------------------
# Independent dense oracle
# ----------------------------------------------------------------------------


def cross_entropy(batch, targets):
    return cross_entropy_in_logits(batch, targets)


def damped(G, eps):
    return G + eps * torch.eye(G.shape[0], dtype=G.dtype)


def tolerance(M):
    return max(1e-13, 100 * EPS64 * torch.linalg.cond(M).item())


def softmax_hessian_root(probabilities: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """R (B, C-1, C) with R_n^T R_n = scale_n (diag(p_n) - p_n p_n^T), in closed form.

    ``probabilities`` p (B, C), rows summing to 1; ``scale`` (B,) or a number (mu / B for
    the mean cross-entropy).  R_n = sqrt(scale_n) H_n[:C-1] diag(sqrt p_n), H_n the
    Householder reflector mapping sqrt(p_n) to -e_C (see the comment above).  Cost O(B C^2).
    """
    root_p = probabilities.sqrt()
    w = root_p.clone()
    w[:, -1] += 1.0
    num_classes = root_p.shape[1]
    eye = torch.eye(num_classes, dtype=root_p.dtype, device=root_p.device)
    reflector = eye - w[:, :, None] * w[:, None, :] / (1.0 + root_p[:, -1, None, None])
    scale = torch.as_tensor(scale, dtype=root_p.dtype, device=root_p.device).reshape(-1, 1, 1)
    return scale.sqrt() * reflector[:, :-1, :] * root_p[:, None, :]


def mlp_layer_sizes(batch: int, input_dim: int, widths: Sequence[int], classes: int,
                    bias: bool = True) -> hi.LayerSizes:
    """``LayerSizes`` of a closed-form MLP (``DeepMLPWithTracking``)
    from B, the input size, the hidden widths and C, before any model exists."""
    dims = [input_dim] + list(widths) + [classes]
    params = [o * (i + int(bias)) for i, o in zip(dims[:-1], dims[1:])]
    inputs = [batch * i for i in dims[:-1]]
    u = [batch * o for o in dims[1:]]
    return hi.LayerSizes(params, inputs, inputs[1:] + [1], u, [1] * len(widths) + [classes],
                         [batch] * (len(widths) + 1))


class DenseTanh(hi.AffineActivation):
    """Same function as AffineActivation, but a subclass: no closed forms (dense blocks)."""


# ----------------------------------------------------------------------------
# The square root of the softmax Hessian
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [2, 3, 6])
def test_softmax_hessian_identity_and_closed_form_root(classes):
    """diag(p) - p p^T = (I - 1 p^T)^T diag(p) (I - 1 p^T), and the (C-1)-row root."""
    gen = torch.Generator().manual_seed(classes)
    logits = 3 * torch.randn(5, classes, generator=gen, dtype=F64)
    logits[0] = torch.linspace(0, 40, classes, dtype=F64)  # saturated: p ~ one-hot
    p = torch.softmax(logits, -1)
    target = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    one_minus = torch.eye(classes, dtype=F64) - torch.ones(classes, 1, dtype=F64) * p[:, None, :]
    full = one_minus.transpose(1, 2) @ torch.diag_embed(p) @ one_minus
    assert (full - target).abs().max() < 1e-15
    scale = torch.rand(5, generator=gen, dtype=F64)
    R = softmax_hessian_root(p, scale)
    assert R.shape == (5, classes - 1, classes)
    assert ((R.transpose(1, 2) @ R - scale[:, None, None] * target).abs().max()
            < 4 * EPS64 * scale.max())
    assert (R @ torch.ones(classes, dtype=F64)).abs().max() < 4 * EPS64


@pytest.mark.parametrize("classes", [2, 5])
def test_root_from_the_stored_softmax_hessian(classes):
    torch.manual_seed(classes)
    p = torch.softmax(4 * torch.randn(6, classes, dtype=F64), -1)
    D = 0.7 * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / 6
    R = hi.softmax_curvature_root(D)
    assert R.shape == (6, classes - 1, classes)
    assert (R.transpose(1, 2) @ R - D).abs().max() < 16 * EPS64 * D.abs().max()
    Q = hi.ones_complement(classes, D)
    assert (Q.T @ Q - torch.eye(classes - 1, dtype=F64)).abs().max() < 4 * EPS64
    assert (Q.T @ torch.ones(classes, dtype=F64)).abs().max() < 4 * EPS64
    # Not a softmax Hessian (rows do not sum to 0): the full C-row root.
    S = torch.randn(6, classes, classes, dtype=F64)
    R = hi.softmax_curvature_root(S @ S.transpose(1, 2))
    assert R.shape == (6, classes, classes)
    assert rel(R.transpose(1, 2) @ R, S @ S.transpose(1, 2)) < 1e-13


# ----------------------------------------------------------------------------
# Solves against the dense GGN
# ----------------------------------------------------------------------------

CASES = [  # seed, layers, width, batch, classes, activation, damping
    (0, 2, 4, 3, 3, "tanh", 1e-2),
    (1, 4, 3, 8, 5, "sigmoid", 1e-6),
    (2, 6, 2, 4, 2, "softplus", 1.0),
    (3, 3, 8, 1, 4, "gelu", 1e-4),
    (4, 5, 5, 6, 3, "silu", 1e-3),
    (5, 1, 4, 7, 5, "tanh", 1e-2),
]


PATHS = [case + ("structured",) for case in CASES] + [
    CASES[0] + ("generic",), CASES[2] + ("generic",), CASES[5] + ("generic",)]


@pytest.mark.parametrize("seed,layers,width,batch,classes,activation,damping,path", PATHS)
def test_solve_matches_dense(seed, layers, width, batch, classes, activation, damping, path):
    """Closed-form blocks (path='structured') and dense blocks, loss layer included
    (path='generic'): one un-refined solve of three right-hand sides."""
    model, x, t, loss = make_mlp(seed, layers, width, batch, activation, classes=classes)
    M = damped(dense_ggn(model, x, cross_entropy(batch, t)), damping)
    op = hi.hessian_operator(model, loss, curvature="ggn", path=path)
    solver = hi.OutputSpaceSolver(op, damping)
    V = torch.randn(M.shape[0], 3, dtype=F64)
    got = solver.solve_once(V)
    assert rel(got, torch.linalg.solve(M, V)) < tolerance(M)
    if path == "structured":
        assert solver.rows == batch * (classes - 1)


def test_gram_is_the_logit_jacobian_gram():
    """Eigenvalues of U U^T are the nonzero eigenvalues of the GGN (rank m)."""
    model, x, t, loss = make_mlp(7, 4, 6, 3, "tanh", classes=4)
    G = dense_ggn(model, x, cross_entropy(3, t))
    solver = hi.OutputSpaceSolver(hi.hessian_operator(model, loss, curvature="ggn"), 0.1)
    m = solver.rows
    top = torch.linalg.eigvalsh(G)[-m:]
    assert rel(torch.linalg.eigvalsh(solver.gram), top) < 1e-12


def test_refined_solve_meets_the_contract_and_is_differentiable():
    model, x, t, loss = make_mlp(8, 5, 4, 5, "tanh", classes=3)
    M = damped(dense_ggn(model, x, cross_entropy(5, t)), 1e-5)
    op = hi.hessian_operator(model, loss, curvature="ggn")
    inv = hi.HessianInverse(op, 1e-5, path="output")
    assert inv.route == "output" and inv.rcond is None
    v = torch.randn(M.shape[0], dtype=F64, requires_grad=True)
    got = inv @ v
    assert inv.backward_error <= inv.rtol
    assert rel(got.detach(), torch.linalg.solve(M, v.detach())) < tolerance(M)
    w = torch.randn_like(got)
    (grad,) = torch.autograd.grad(got, v, w)
    assert rel(grad, torch.linalg.solve(M, w)) < tolerance(M)


def test_mixed_dense_and_closed_form_layers():
    """A dense hidden layer between closed-form ones: example blocks above it, dense
    Phi below it (closed-form layers included)."""
    torch.manual_seed(9)
    layers = [hi.AffineActivation(3, 5, "tanh"), hi.AffineActivation(5, 4, "gelu"),
              DenseTanh(4, 4, "tanh"), hi.AffineActivation(4, 3, "sigmoid")]
    model = hi.TrackedChain(layers, hi.AffineCrossEntropy(3, 4)).to(F64)
    x, t = torch.randn(5, 3, dtype=F64), torch.randint(0, 4, (5,))
    loss = model(x, t, track_activations=True)
    op = hi.hessian_operator(model, loss, curvature="ggn", path="structured")
    kinds = [isinstance(d, hi.AffineLayerBlocks) for d in op.derivs]
    assert kinds == [True, True, False, True, True]
    M = damped(dense_ggn(model, x, cross_entropy(5, t)), 1e-3)
    V = torch.randn(M.shape[0], 2, dtype=F64)
    got = hi.OutputSpaceSolver(op, 1e-3).solve_once(V)
    assert rel(got, torch.linalg.solve(M, V)) < tolerance(M)


def test_soft_targets_and_no_bias():
    """Probability targets of mass 0.7 (D = mu (diag p - p p^T) / B) on a bias-free MLP."""
    torch.manual_seed(10)
    model = hi.DeepMLPWithTracking(3, 4, 3, 2, "tanh", bias=False).to(F64)
    x = torch.randn(4, 3, dtype=F64)
    y = 0.7 * torch.softmax(torch.randn(4, 3, dtype=F64), -1)
    loss = model(x, y, track_activations=True)
    M = damped(dense_ggn(model, x, cross_entropy(4, y)), 1e-3)
    op = hi.hessian_operator(model, loss, curvature="ggn")
    assert isinstance(op.derivs[-1], hi.AffineLayerBlocks)
    v = torch.randn(M.shape[0], 1, dtype=F64)
    got = hi.OutputSpaceSolver(op, 1e-3).solve_once(v)
    assert rel(got, torch.linalg.solve(M, v)) < tolerance(M)


def test_dense_loss_layer_without_gauge():
    """A user's loss layer (nonlinear logits, squared error): the eigen-root of its block."""

    torch.manual_seed(11)
    model = hi.TrackedChain([hi.AffineActivation(3, 4, "softplus")],
                            SineSquaredError(4, 2)).to(F64)
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    loss = model(x, y, track_activations=True)
    M = damped(dense_ggn(model, x, lambda o: ((o.view(6, 2) - y) ** 2).mean()), 1e-2)
    op = hi.hessian_operator(model, loss, curvature="ggn")
    v = torch.randn(M.shape[0], 2, dtype=F64)
    got = hi.OutputSpaceSolver(op, 1e-2).solve_once(v)
    assert rel(got, torch.linalg.solve(M, v)) < tolerance(M)


def test_gauge_directions_are_scaled_by_one_over_damping():
    """U N = 0, so (GGN + eps I)^{-1} N = N / eps."""
    model, x, t, loss = make_mlp(12, 3, 4, 6, "tanh", classes=3)
    op = hi.hessian_operator(model, loss, curvature="ggn")
    N = torch.zeros(op.num_params, op.gauge.shape[1], dtype=F64)
    N[-op.param_sizes[-1]:] = op.gauge
    got = hi.OutputSpaceSolver(op, 0.5).solve_once(N)
    assert rel(got, N / 0.5) < 1e-13


def test_float32_sanity():
    model, x, t, _ = make_mlp(13, 4, 4, 4, "tanh", classes=3)
    M = damped(dense_ggn(model, x, cross_entropy(4, t)), 0.1)
    model, x = model.float(), x.float()
    op = hi.hessian_operator(model, model(x, t, track_activations=True), curvature="ggn")
    v = torch.randn(M.shape[0], 1, dtype=F64)
    got = hi.OutputSpaceSolver(op, 0.1).solve_once(v.float())
    u32 = torch.finfo(torch.float32).eps
    assert rel(got.double(), torch.linalg.solve(M, v)) < 100 * u32 * torch.linalg.cond(M)
    inv = hi.HessianInverse(op, 0.1, path="output")
    inv @ v[:, 0].float()
    assert inv.backward_error <= inv.rtol


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


def test_refusals():
    model, x, t, loss = make_mlp(14, 3, 4, 3, "tanh", classes=3)
    ggn = hi.hessian_operator(model, loss, curvature="ggn")
    with pytest.raises(hi.HessianInverseError, match="Gauss-Newton"):
        hi.OutputSpaceSolver(hi.hessian_operator(model, loss), 0.1)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(hi.HessianInverseError, match="damping > 0"):
            hi.OutputSpaceSolver(ggn, bad)
    with pytest.raises(hi.SingularHessianError, match="singular to working precision"):
        hi.OutputSpaceSolver(ggn, 1e-300)


# ----------------------------------------------------------------------------
# Cost model and route choice
# ----------------------------------------------------------------------------


def test_layer_sizes_and_cost_model():
    model, x, t, loss = make_mlp(15, 4, 5, 3, "tanh", input_dim=2, classes=4)
    tracked = model.tracked_forward(loss)
    real = hi.LayerSizes.of_model(model, tracked, hi.closed_form_flags(model, tracked))
    assert mlp_layer_sizes(3, 2, [5, 5, 5], 4) == real
    blocks = hi.LayerSizes.of_derivatives(hi.hessian_operator(model, loss, curvature="ggn").derivs)
    for cost in (hi.output_space_cost, hi.structured_cost):
        assert cost(blocks) == cost(real)
    bench = mlp_layer_sizes(8, 8, [16] * 31, 10)
    out, structured = hi.output_space_cost(bench), hi.structured_cost(bench)
    assert out.setup_flops < structured.setup_flops / 50 and out.bytes < structured.bytes
    wide_output = mlp_layer_sizes(4, 8, [4] * 3, 200)  # B C far above batch x width
    assert hi.output_space_cost(wide_output).setup_flops > hi.structured_cost(
        wide_output).setup_flops


def test_route_rule():
    bench = mlp_layer_sizes(8, 8, [16] * 31, 10)
    wide_output = mlp_layer_sizes(4, 8, [4] * 3, 200)
    choose = hi.choose_route
    assert choose("auto", 1e-2, True, "ggn", bench) == "output"
    assert choose("auto", 1e-2, True, "hessian", bench) == "riccati"
    assert choose("auto", 1e-2, True, "hessian", wide_output) == "structured"
    assert choose("auto", 0.0, True, "ggn", bench) == "generic"
    assert choose("auto", None, True, "ggn", bench) == "structured"
    assert choose("auto", 1e-2, True, "ggn", wide_output) == "structured"
    assert choose("structured", 1e-2, True, "ggn", bench) == "structured"
    assert choose("output", 1e-2, True, "ggn", wide_output) == "output"


def test_auto_takes_the_output_route_through_the_public_entry_points():
    """curvature='ggn', damping > 0, B C small against batch x width: 'auto' picks 'output';
    the Hessian or a forced path keep their routes (damping 0: test_route_rule)."""
    model, x, t, loss = make_mlp(17, 6, 8, 3, "tanh", classes=3)
    M = damped(dense_ggn(model, x, cross_entropy(3, t)), 1e-3)
    v = torch.randn(M.shape[0], dtype=F64)
    inverse = hi.factorize(model, loss, 1e-3, curvature="ggn")
    assert inverse.route == "output"
    assert rel(inverse @ v, torch.linalg.solve(M, v)) < tolerance(M)
    y = hi.hessian_inverse_vector_product(model, loss, v, damping=1e-3, curvature="ggn")
    assert rel(y, torch.linalg.solve(M, v)) < tolerance(M)
    assert hi.factorize(model, loss, 1e-3).route == "riccati"
    assert hi.factorize(model, loss, 1e-3, curvature="ggn", path="structured").route == \
        "structured"
    with pytest.raises(hi.HessianInverseError, match="damping > 0"):
        hi.factorize(model, loss, 0.0, curvature="ggn", path="output")

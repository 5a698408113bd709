"""Tests of the regression loss layer (``DeepMLPWithTracking(..., loss='mse')``,
:class:`AffineSquaredError`): its closed forms, the Hessian and the Gauss-Newton matrix on
the riccati, structured, generic and output-space routes, the cost model's row count, and the
output route on a loss layer without closed forms.

Oracles, independent of the code under test (``conftest.py``): the dense Hessian from
``torch.func.hessian`` of the loss in the flat parameter vector, and the dense GGN
``J^T H_loss J`` with J from ``torch.func.jacrev`` of the network's outputs and H_loss
from ``torch.func.hessian`` of ``F.mse_loss`` in the outputs; solves by
``torch.linalg.solve``, float64.

Tolerances.  float64 rounding u = 1.1e-16.  Products are sums of a few O(1) terms:
1e-13 relative.  A refined solve meets a backward error of at most rtol = u^(2/3)
(3.7e-11, the core's contract), so its forward error is at most about cond x rtol; we
allow 10 x that, floored at 1e-12.  An un-refined output-space solve (Woodbury) has a
forward error of about u cond (test_output_route.py): 100 u cond, floored at 1e-13.
"""

import pytest
import torch
import torch.nn.functional as F

import hessian_inverse as hi
from conftest import SineSquaredError, dense_ggn, dense_hessian, relative_error
from test_structured import assert_closed_forms_match_autograd

F64 = torch.float64
U64 = torch.finfo(F64).eps
RTOL = U64 ** (2 / 3)


def regression(seed, layers, width, batch, outputs, activation="tanh", input_dim=3,
               bias=True, residual=1.0, dtype=F64):
    """A tracked MSE regression MLP and its data: targets = the model's own outputs plus
    ``residual`` x noise (residual 0: a zero-residual fit, where H = GGN)."""
    torch.manual_seed(seed)
    model = hi.DeepMLPWithTracking(input_dim, width, outputs, layers - 1, activation, bias,
                                   loss="mse").to(dtype)
    x = torch.randn(batch, input_dim, dtype=dtype)
    with torch.no_grad():
        z = x
        for layer in model.layers[:-1]:
            z = layer(z)
        y = model.loss_layer.logits(z) + residual * torch.randn(batch, outputs, dtype=dtype)
    loss = model(x, y, track_activations=True)
    return model, x, y, loss


def mse_in_outputs(batch, y):
    return lambda o: F.mse_loss(o.view(batch, -1), y)


def damped(M, eps):
    return M + eps * torch.eye(M.shape[0], dtype=M.dtype)


def cond(M):
    eig = torch.linalg.eigvalsh(M).abs()
    return (eig.max() / eig.min()).item()


def refined_tolerance(M):
    return max(1e-12, 10 * RTOL * cond(M))


# (seed, layers, width, batch, outputs, activation, damping): depths 1-5, batch 1-9 on both
# sides of the widths, 1-3 outputs, every smooth activation, dampings 1e-6..10.
CASES = [
    (0, 3, 4, 5, 1, "tanh", 1e-3),
    (1, 1, 3, 4, 2, "tanh", 1e-2),
    (2, 4, 3, 9, 3, "sigmoid", 1e-6),
    (3, 2, 5, 1, 2, "softplus", 1.0),
    (4, 5, 2, 6, 1, "gelu", 10.0),
    (5, 3, 4, 3, 3, "silu", 1e-4),
    (6, 2, 3, 7, 1, "identity", 1e-2),
]


# -- the layer ----------------------------------------------------------------------


def test_the_model_is_the_mean_squared_error_and_refuses_bad_targets():
    model, x, y, loss = regression(0, 3, 4, 5, 2)
    z = x
    for layer in model.layers[:-1]:
        z = layer(z)
    linear = model.loss_layer.linear
    expected = F.mse_loss(z @ linear.weight.T + linear.bias, y)
    assert isinstance(model.loss_layer, hi.AffineSquaredError) and model.loss == "mse"
    assert relative_error(loss.detach(), expected.detach()) < 1e-15
    assert not hasattr(model.loss_layer, "null_directions")
    assert hi.hessian_operator(model, loss).gauge is None
    with pytest.raises(hi.HessianInverseError, match=r"float targets of the outputs' shape"):
        model(x, y[:, 0])  # (B,) against (B, 2) outputs would broadcast
    one = hi.DeepMLPWithTracking(3, 4, 1, 2, loss="mse").double()
    with pytest.raises(hi.HessianInverseError, match=r"y\[:, None\]"):
        one(x, y[:, 0])
    with pytest.raises(hi.HessianInverseError, match="float targets"):
        model(x, torch.zeros(5, 2, dtype=torch.long))
    with pytest.raises(hi.HessianInverseError, match="unknown loss 'l1'"):
        hi.DeepMLPWithTracking(3, 4, 1, 2, loss="l1")
    assert one(x, y[:, :1].float()).dtype == F64  # float32 targets: converted


def test_closed_form_blocks_equal_autograd_blocks():
    """J, F, A, C, G of the closed-form loss layer against the generic autograd oracle."""
    model, x, y, loss = regression(1, 3, 4, 6, 3, "softplus")
    structured = assert_closed_forms_match_autograd(model, loss)
    assert isinstance(structured[-1], hi.AffineLayerBlocks)
    R = structured[-1].u_hessian_root
    assert R.shape == (6, 3, 3)
    assert (R.mT @ R - structured[-1].u_hessian).abs().max() <= 4 * U64 * (2 / 18)


# -- the Hessian ----------------------------------------------------------------------


@pytest.mark.parametrize("seed,layers,width,batch,outputs,activation,damping", CASES)
def test_hessian_products_and_solves_match_dense(seed, layers, width, batch, outputs,
                                                 activation, damping):
    model, x, y, loss = regression(seed, layers, width, batch, outputs, activation)
    H = dense_hessian(model, x, y)
    V = torch.randn(H.shape[0], 2, dtype=F64)
    ref = torch.linalg.solve(damped(H, damping), V)
    for path in ("riccati", "structured", "generic"):
        op = hi.hessian_operator(model, loss, path=path)
        assert isinstance(op.derivs[-1], hi.AffineLayerBlocks) == (path != "generic")
        assert relative_error(op @ V, H @ V) < 1e-13
        inverse = op.factorize(damping, path=path)
        assert inverse.route == path
        assert relative_error(inverse @ V, ref) < refined_tolerance(damped(H, damping))
    assert hi.factorize(model, loss, damping).route in ("riccati", "structured")  # auto


def test_hessian_at_damping_zero_without_a_gauge():
    """Nonzero residuals: H is nonsingular (no softmax gauge to fix), so the undamped
    Newton step is the plain solve."""
    model, x, y, loss = regression(7, 3, 3, 6, 2, residual=1.0)
    H = dense_hessian(model, x, y)
    assert torch.linalg.eigvalsh(H).abs().min() > 1e-6
    g = torch.randn(H.shape[0], dtype=F64)
    inverse = hi.factorize(model, loss, 0.0)
    assert inverse.route == "generic" and inverse.gauge is None
    assert relative_error(inverse @ g, torch.linalg.solve(H, g)) < refined_tolerance(H)


# -- the Gauss-Newton matrix ------------------------------------------------------------


@pytest.mark.parametrize("seed,layers,width,batch,outputs,activation,damping", CASES)
def test_ggn_products_and_solves_match_dense_on_every_route(seed, layers, width, batch,
                                                           outputs, activation, damping):
    model, x, y, loss = regression(seed, layers, width, batch, outputs, activation)
    G = dense_ggn(model, x, mse_in_outputs(batch, y))
    M = damped(G, damping)
    V = torch.randn(G.shape[0], 2, dtype=F64)
    ref = torch.linalg.solve(M, V)
    for path in ("riccati", "structured", "generic", "output"):
        op = hi.hessian_operator(model, loss, curvature="ggn", path=path)
        assert relative_error(op @ V, G @ V) < 1e-13
        inverse = op.factorize(damping, path=path)
        assert inverse.route == path
        assert relative_error(inverse @ V, ref) < refined_tolerance(M)
    op = hi.hessian_operator(model, loss, curvature="ggn")
    solver = hi.OutputSpaceSolver(op, damping)
    assert solver.rows == batch * outputs  # the root has C rows: no gauge to drop
    got = solver.solve_once(V)
    assert relative_error(got, ref) < max(1e-13, 100 * U64 * cond(M))


def test_zero_residual_hessian_is_the_ggn():
    """At a zero-residual fit the network's own curvature is multiplied by r = 0."""
    model, x, y, loss = regression(8, 4, 3, 5, 2, residual=0.0)
    H, G = dense_hessian(model, x, y), dense_ggn(model, x, mse_in_outputs(5, y))
    assert relative_error(H, G) < 1e-13
    v = torch.randn(G.shape[0], dtype=F64)
    op = hi.hessian_operator(model, loss)
    assert relative_error(op @ v, G @ v) < 1e-13


def test_ggn_at_damping_zero_when_there_are_more_residuals_than_parameters():
    """B C >= n: the GGN (2 / (B C)) J^T J is generically nonsingular."""
    model, x, y, loss = regression(9, 2, 2, 12, 1, input_dim=2)  # n = 6 + 3 = 9, B C = 12
    G = dense_ggn(model, x, mse_in_outputs(12, y))
    assert G.shape == (9, 9) and torch.linalg.eigvalsh(G).min() > 1e-8
    v = torch.randn(9, dtype=F64)
    inverse = hi.factorize(model, loss, 0.0, curvature="ggn")
    assert inverse.route == "generic"
    assert relative_error(inverse @ v, torch.linalg.solve(G, v)) < refined_tolerance(G)


def test_float32():
    model, x, y, loss = regression(10, 3, 4, 5, 2)
    G = damped(dense_ggn(model, x, mse_in_outputs(5, y)), 1e-2)
    v = torch.randn(G.shape[0], dtype=F64)
    model32 = model.float()
    loss32 = model32(x.float(), y.float(), track_activations=True)
    inverse = hi.factorize(model32, loss32, 1e-2, curvature="ggn")
    assert inverse.route == "output" and inverse.backward_error is None
    got = inverse @ v.float()
    u32 = torch.finfo(torch.float32).eps
    assert relative_error(got.double(), torch.linalg.solve(G, v)) < 100 * u32 * cond(G)
    assert inverse.backward_error <= inverse.rtol


# -- the route and its cost model ---------------------------------------------------------


def test_cost_model_counts_the_roots_rows_and_auto_takes_the_output_route():
    """The regime of docs/training.md, scaled down: many examples, narrow layers, one
    output.  m = B C rows (not B (C - 1)), and 'auto' factors the GGN in output space."""
    model, x, y, loss = regression(11, 4, 3, 40, 2)
    tracked = model.tracked_forward(loss)
    sizes = hi.LayerSizes.of_model(model, tracked, hi.closed_form_flags(model, tracked))
    op = hi.hessian_operator(model, loss, curvature="ggn")
    blocks = hi.LayerSizes.of_derivatives(op.derivs)
    assert (blocks.u, blocks.u_block, blocks.root_rows) == (sizes.u, sizes.u_block, 2)
    for cost in (hi.output_space_cost, hi.structured_cost):
        assert cost(blocks) == cost(sizes)
    assert hi.output_rows(sizes) == 80
    assert hi.output_space_cost(sizes).setup_flops < hi.structured_cost(sizes).setup_flops
    inverse = hi.factorize(model, loss, 1e-3, curvature="ggn")
    assert inverse.route == "output" and inverse.solver.rows == 80
    G = dense_ggn(model, x, mse_in_outputs(40, y))
    v = torch.randn(G.shape[0], dtype=F64)
    assert relative_error(inverse @ v, torch.linalg.solve(damped(G, 1e-3), v)) < \
        refined_tolerance(damped(G, 1e-3))
    # cross-entropy keeps its C - 1 rows
    ce = hi.DeepMLPWithTracking(3, 3, 4, 3).double()
    ce_loss = ce(x, torch.randint(0, 4, (40,)), track_activations=True)
    tracked = ce.tracked_forward(ce_loss)
    ce_sizes = hi.LayerSizes.of_model(ce, tracked, hi.closed_form_flags(ce, tracked))
    assert ce_sizes.root_rows is None and hi.output_rows(ce_sizes) == 40 * 3


def test_output_route_on_a_loss_layer_without_closed_forms():
    """The crash of issue 20 (`NoneType // NoneType` in the memory guard): a user's loss
    layer takes the output route through the eigen-root of its dense GGN block, exactly;
    the Hessian is refused there with the reason."""
    torch.manual_seed(12)
    model = hi.TrackedChain([hi.AffineActivation(3, 4, "tanh"), hi.AffineActivation(4, 4)],
                            SineSquaredError(4, 2)).to(F64)
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    loss = model(x, y, track_activations=True)
    G = damped(dense_ggn(model, x, lambda o: ((o.view(6, 2) - y) ** 2).mean()), 1e-2)
    v = torch.randn(G.shape[0], dtype=F64)
    inverse = hi.factorize(model, loss, 1e-2, curvature="ggn", path="output")
    assert inverse.route == "output"
    assert relative_error(inverse @ v, torch.linalg.solve(G, v)) < refined_tolerance(G)
    op = hi.hessian_operator(model, loss, curvature="ggn", path="output")
    assert relative_error(op.factorize(1e-2, path="output") @ v, inverse @ v) < 1e-12
    tracked = model.tracked_forward(loss)
    sizes = hi.LayerSizes.of_model(model, tracked, hi.closed_form_flags(model, tracked))
    assert hi.output_rows(sizes) == sizes.params[-1] + sizes.inputs[-1]  # a bound
    with pytest.raises(hi.HessianInverseError, match="Gauss-Newton"):
        hi.factorize(model, loss, 1e-2, path="output")
    with pytest.raises(hi.InsufficientMemoryError, match="Gram matrix of the logits"):
        hi.factorize(model, loss, 1e-2, curvature="ggn", path="output", memory_limit=1000)


def test_inaccuracy_advice_fits_the_dtype():
    """Issue 20: a float64 model is not told to use float64."""
    model, x, y, loss = regression(13, 3, 4, 5, 2)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64)
    with pytest.raises(hi.InaccurateSolveError) as err:
        hi.hessian_inverse_vector_product(model, loss, v, 1e-3, rtol=1e-30, path="structured")
    assert "increase the damping" in str(err.value) and "model.double()" not in str(err.value)
    model32 = model.float()
    loss32 = model32(x.float(), y.float(), track_activations=True)
    with pytest.raises(hi.InaccurateSolveError, match=r"use float64 \(model.double\(\)\)"):
        hi.hessian_inverse_vector_product(model32, loss32, v.float(), 1e-3, rtol=1e-12,
                                          path="structured")

"""Tests of the layer-wise LDL^T, the Riccati recursion (docs/ALGORITHM.md,
"Layer-wise LDL^T"): ``B + delta I = L^T diag(P_l) L``, the solves it gives
(``path='riccati'``), and what its pivots show (inertia, determinant).

Oracles, independent of the code under test: the dense Hessian
(``torch.func.hessian`` of the loss in the flat parameters) and the dense GGN
(``J^T H_loss J`` from ``jacrev`` and ``hessian``), both from ``conftest.py``,
with ``torch.linalg.solve``, ``eigvalsh`` and ``slogdet``.

Tolerances.  float64 rounding u = 1.1e-16.  A raw solve through the factors
(no refinement) has a forward error of about growth * u * cond(B + delta I);
nothing pivots across layers, so the growth is not bounded a priori: on these
shapes it stays below 150 (observed worst 1.4e2 u cond over 1,344 cases), and we
allow 1e3 u cond.  The route through ``HessianInverse`` refines against the
exact product, so its answers meet the usual 10 u cond.  Inertia is compared at
shifts whose nearest eigenvalue is more than 1e-8 ||B|| away, where rounding
cannot flip a sign; log|det| to 1e-9 relative (a sum of ~n logs each exact to a
few u, divided by its own size).
"""

import itertools

import pytest
import torch
import torch.nn as nn

import hessian_inverse as hi
from conftest import (SquaredErrorLoss, cross_entropy_in_logits, dense_ggn, dense_hessian,
                      make_mlp, relative_error)
from test_structured import Flatten, SineGate, curved_shift_chain, dense_solve_and_cond

F64 = torch.float64
U64 = torch.finfo(F64).eps


def dense_curvature(model, x, t, curvature):
    if curvature == "ggn":
        return dense_ggn(model, x, cross_entropy_in_logits(x.shape[0], t))
    return dense_hessian(model, x, t)


def blocks_of(v, sizes):
    return list(v.split(sizes))


# (layers, width, batch, input_dim, bias, activation): batch below and above fan-in + 1
# (rank-deficient inputs: a Y_perp block in every layer), one layer, no bias, long runs.
SHAPES = [(1, 3, 2, 4, True, "tanh"), (2, 5, 7, 3, True, "gelu"), (4, 3, 2, 4, True, "sigmoid"),
          (5, 4, 9, 2, False, "softplus"), (3, 6, 4, 5, True, "silu")]
SPREAD = [(seed,) + shape + (curvature,) for seed, (shape, curvature) in
          enumerate(itertools.product(SHAPES, ("hessian", "ggn")))]


@pytest.mark.parametrize("seed,layers,width,batch,input_dim,bias,activation,curvature", SPREAD)
def test_factors_solve_and_show_the_inertia_and_determinant(seed, layers, width, batch,
                                                            input_dim, bias, activation,
                                                            curvature):
    """Raw solves, inertia and log|det| against dense, for positive and negative delta
    (a damping, or minus a spectral shift), on closed-form and on dense blocks."""
    model, x, t, loss = make_mlp(seed, layers, width, batch, activation, input_dim, bias=bias)
    B = dense_curvature(model, x, t, curvature)
    ev = torch.linalg.eigvalsh(B)
    scale = ev.abs().max().item()
    closed = hi.hessian_operator(model, loss, curvature=curvature)
    assert all(isinstance(d, hi.AffineLayerBlocks) for d in closed.derivs)
    dense = closed.densified()
    g = torch.randn(B.shape[0], 3, dtype=F64)
    shifts = [0.3 * scale, 1e-3 * scale, -(ev[0].item() + ev[1].item()) / 2, -0.5 * scale]
    for delta, operator in itertools.product(shifts, (closed, dense)):
        M = B + delta * torch.eye(B.shape[0], dtype=F64)
        gap = (ev + delta).abs().min().item()
        if gap < 1e-8 * scale:
            continue
        ref, cond = dense_solve_and_cond(B, g, delta)
        kinds = ["lu", "ldl"] + (["cholesky"] if ev[0] + delta > 0 else [])
        for kind in kinds:
            factor = hi.RiccatiFactor(operator.derivs, delta, kind)
            assert factor.ok
            got = torch.cat(factor.solve(blocks_of(g, operator.param_sizes)))
            assert relative_error(got, ref) < 1e3 * U64 * cond, (delta, kind)
            if kind == "lu":
                continue
            values = factor.values()
            assert values.shape == (B.shape[0],)
            assert int((values < 0).sum()) == int((ev + delta < 0).sum()), (delta, kind)
            assert int((values == 0).sum()) == 0
            sign, logabsdet = torch.linalg.slogdet(M)
            assert torch.prod(values.sign()).item() == sign.item()
            assert values.abs().log().sum().item() == pytest.approx(
                logabsdet.item(), rel=1e-9, abs=1e-9)


def mixed_chain():
    """Closed-form layers around a layer without closed forms (SineGate), a parameter-free
    Flatten, and a loss layer without closed forms or gauge; returns (chain, x, y, loss)."""
    torch.manual_seed(5)
    chain = hi.TrackedChain(
        [hi.AffineActivation(3, 4, "tanh"), SineGate(4), Flatten(),
         hi.AffineActivation(8, 3, "silu"), hi.AffineActivation(3, 3, "tanh")],
        SquaredErrorLoss(3, 2)).to(F64)
    x, y = torch.randn(3, 2, 3, dtype=F64), torch.randn(3, 2, dtype=F64)
    return chain, x, y, chain(x, y, track_activations=True)


def test_chains_with_layers_without_closed_forms():
    """Dense pivots (p_l square) between closed-form ones, a parameter-free layer, a loss
    layer without closed forms; through the public route with refinement."""
    chain, x, y, loss = mixed_chain()
    H = dense_hessian(chain, x, y)
    v = torch.randn(H.shape[0], 2, dtype=F64)
    for damping in (1e-4, 1e-2, 1.0):
        ref, cond = dense_solve_and_cond(H, v, damping)
        inverse = hi.factorize(chain, loss, damping, path="riccati")
        assert inverse.route == "riccati"
        assert relative_error(inverse @ v, ref) < 10 * U64 * cond
        values = hi.RiccatiFactor(inverse.operator.derivs, damping, "ldl").values()
        ev = torch.linalg.eigvalsh(H + damping * torch.eye(H.shape[0], dtype=F64))
        assert int((values < 0).sum()) == int((ev < 0).sum())


@pytest.mark.parametrize("dtype,damping", [(F64, 1e-6), (F64, 1e-3), (F64, 1.0),
                                           (torch.float32, 1e-2)])
def test_public_route_meets_the_accuracy_contract(dtype, damping):
    """path='riccati' through hessian_inverse_vector_product and factorize, refined
    against the exact product: 10 u cond against dense (u of the model's dtype)."""
    model, x, t, loss = make_mlp(3, 5, 4, 3, "tanh", input_dim=3, dtype=dtype)
    model64 = make_mlp(3, 5, 4, 3, "tanh", input_dim=3)[0]
    model64.load_state_dict({k: p.double() for k, p in model.state_dict().items()})
    H = dense_hessian(model64, x.double(), t)
    v = torch.randn(H.shape[0], dtype=dtype)
    ref, cond = dense_solve_and_cond(H, v.double(), damping)
    got = hi.hessian_inverse_vector_product(model, loss, v, damping, path="riccati")
    assert got.dtype == dtype
    assert relative_error(got.double(), ref) < 10 * torch.finfo(dtype).eps * cond
    inverse = hi.factorize(model, loss, damping, path="riccati")
    assert inverse.route == "riccati" and inverse.probe_error is not None
    assert relative_error((inverse @ v).double(), ref) < 10 * torch.finfo(dtype).eps * cond


def test_gauss_newton_uses_cholesky_pivots_and_matches_dense():
    model, x, t, loss = make_mlp(6, 4, 5, 6, "gelu", input_dim=3)
    G = dense_ggn(model, x, cross_entropy_in_logits(6, t))
    v = torch.randn(G.shape[0], 2, dtype=F64)
    for damping in (1e-5, 1e-2):
        inverse = hi.factorize(model, loss, damping, curvature="ggn", path="riccati")
        assert inverse.solver.factor.kind == "cholesky"
        ref, cond = dense_solve_and_cond(G, v, damping)
        assert relative_error(inverse @ v, ref) < 10 * U64 * cond


def test_damping_zero_with_the_gauge_fixed_is_the_pseudo_inverse():
    """Enough data that the softmax gauge is the whole null space: H + P_N factored layer
    by layer gives H^+ g (the minimum-norm solution), as on the generic route."""
    model, x, t, loss = make_mlp(2, 3, 2, 12, "tanh", input_dim=2)
    H = dense_hessian(model, x, t)
    g = H @ torch.randn(H.shape[0], dtype=F64)
    ref = torch.linalg.pinv(H, hermitian=True, rtol=1e-10) @ g
    inverse = hi.factorize(model, loss, 0.0, path="riccati")
    assert inverse.route == "riccati"
    assert relative_error(inverse @ g, ref) < 1e-8


def test_a_singular_pivot_is_refused_and_auto_falls_back():
    """P_2 = A_2 + eps I + J_2^T Ghat_2 J_2 made zero (a scalar parameter whose curvature
    c (b . u) is tuned) while H + eps I stays invertible: path='riccati' refuses with
    EliminationError, 'auto' warns and hands over to the structured route, exactly."""
    damping = 1e-2
    chain, gate, x, t, loss = curved_shift_chain()
    operator = hi.hessian_operator(chain, loss)
    a = operator.derivs[1].A.item()                     # c (b . u) at c = 1
    group, g = hi.RiccatiFactor(operator.derivs, damping).pivot(1)
    rest = group.P[0, 0, 0].item() - a                  # eps + J^T Ghat J, independent of c
    gate.c = -rest / a
    loss = chain(x, t, track_activations=True)
    with pytest.raises(hi.EliminationError, match="layer 2"):
        hi.factorize(chain, loss, damping, path="riccati")
    with pytest.warns(RuntimeWarning, match="structured path"):
        inverse = hi.factorize(chain, loss, damping)
    assert inverse.route == "structured"
    H = dense_hessian(chain, x, t)
    v = torch.randn(H.shape[0], dtype=F64)
    ref, cond = dense_solve_and_cond(H, v, damping)
    assert relative_error(inverse @ v, ref) < 10 * U64 * cond


def test_breakdown_is_reported_per_layer_without_a_solve():
    """delta = 0 on a rank-deficient input (batch 2 into 4 inputs): the Y_perp block of
    every such layer is exactly singular, flagged in ``broken``; with enough data none is."""
    model, x, t, loss = make_mlp(1, 3, 3, 2, "tanh")
    derivs = hi.hessian_operator(model, loss).derivs
    factor = hi.RiccatiFactor(derivs, 0.0, "ldl")
    assert not factor.ok and factor.broken.tolist() == [True, True, True]
    model, x, t, loss = make_mlp(1, 3, 3, 12, "tanh")
    factor = hi.RiccatiFactor(hi.hessian_operator(model, loss).derivs, 0.5, "ldl")
    assert factor.ok


def test_storage_grows_linearly_with_depth():
    """Per layer the route keeps P_l, its factors, K_l and Phi_l: exactly the same sizes
    for every interior layer, so storage increments are equal and no block grows with L."""
    sizes = {}
    for depth in (8, 16, 32):
        model, x, t, loss = make_mlp(0, depth, 4, 3, "tanh")
        factor = hi.factorize(model, loss, damping=1e-3, path="riccati").solver.factor
        tensors = [tensor for group in factor.groups for tensor in
                   (group.P, group.K, group.Phi) + group.factor.factors if tensor is not None]
        sizes[depth] = (sum(tensor.numel() for tensor in tensors),
                        max(tensor[0].numel() for tensor in tensors))
    assert sizes[32][0] - sizes[16][0] == 2 * (sizes[16][0] - sizes[8][0])
    assert sizes[8][1] == sizes[16][1] == sizes[32][1]


def test_auto_prefers_the_layerwise_route_where_it_is_cheaper():
    model, x, t, loss = make_mlp(4, 6, 8, 4, "tanh")
    assert hi.factorize(model, loss, 1e-2).route == "riccati"
    assert hi.factorize(model, loss, 1e-2, curvature="ggn").route == "output"
    with pytest.raises(hi.HessianInverseError, match="path must be one of"):
        hi.factorize(model, loss, 1e-2, path="ricatti")

"""block_tridiagonal.py: block cyclic reduction (``factorization='cyclic'``) and the pivoted
banded LU against dense solves and each other."""

from __future__ import annotations

import math
from itertools import accumulate

import pytest
import torch

import block_tridiagonal as bt
import hessian_inverse as hi
from block_tridiagonal import cyclic_reduction, cyclic_reduction_solve

F64 = torch.float64
DEPTHS = (1, 2, 3, 5, 8, 13, 64)


def dense_block_tridiagonal(diag, sub) -> torch.Tensor:
    """The dense symmetric matrix with diagonal blocks ``diag`` and sub-diagonal ``sub``."""
    ends = [0, *accumulate(d.shape[0] for d in diag)]
    out = torch.block_diag(*diag)
    for l, s in enumerate(sub):
        out[ends[l + 1]:ends[l + 2], ends[l]:ends[l + 1]] = s
        out[ends[l]:ends[l + 1], ends[l + 1]:ends[l + 2]] = s.T
    return out


def random_system(sizes, dtype, generator) -> bt.BlockTridiagonal:
    """Symmetric, strictly block diagonally dominant (so both factorisations are stable)."""
    diag = [torch.randn(n, n, generator=generator, dtype=dtype) for n in sizes]
    diag = [d + d.T for d in diag]
    sub = [torch.randn(sizes[l + 1], sizes[l], generator=generator, dtype=dtype)
           for l in range(len(sizes) - 1)]
    dense = dense_block_tridiagonal(diag, sub)
    shift = (dense.abs().sum(1) + 1).split(list(sizes))
    return bt.BlockTridiagonal([d + torch.diag(s) for d, s in zip(diag, shift)], sub)


def end_sizes(depth: int) -> list:
    """Interior blocks of one size, different first and last ones (as in the reduced systems)."""
    return ([5] + [4] * (depth - 2) + [3])[:depth] if depth > 1 else [5]


def relative(x, y) -> float:
    return float((torch.cat(x) - torch.cat(y)).norm() / torch.cat(y).norm())


def backward_error(system: bt.BlockTridiagonal, x, b) -> float:
    r = torch.cat([bi - ai for bi, ai in zip(b, system.matmul(x))])
    x, b = torch.cat(x), torch.cat(b)
    return float((r.abs().amax(0) / (system.norm1() * x.abs().amax(0) + b.abs().amax(0))).max())


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("merge", [1, 2])
def test_random_systems_match_dense_and_banded(dtype, merge):
    generator = torch.Generator().manual_seed(0)
    tol = 1e-12 if dtype == F64 else 2e-5
    for depth in DEPTHS:
        mixed = torch.randint(1, 5, (depth,), generator=generator).tolist()
        for sizes in (end_sizes(depth), mixed):
            system = random_system(sizes, dtype, generator)
            rhs = [torch.randn(n, 3, generator=generator, dtype=dtype) for n in sizes]
            factor = cyclic_reduction(system, merge=merge)
            x = cyclic_reduction_solve(factor, rhs)
            assert [xi.shape for xi in x] == [(n, 3) for n in sizes]
            assert len(factor.levels) == math.ceil(math.log2(math.ceil(depth / merge)))
            dense = torch.linalg.solve(dense_block_tridiagonal(system.diag, system.sub),
                                       torch.cat(rhs))
            assert relative(x, list(dense.split(sizes))) < tol, (depth, sizes)
            if depth == 13:
                assert relative(x, bt.banded_lu_solve(bt.banded_lu(system), rhs)) < tol
            # The factors serve any number of right-hand sides.
            one = cyclic_reduction_solve(factor, [r[:, 1:2] for r in rhs])
            assert relative(one, [xi[:, 1:2] for xi in x]) < tol


def model_system(path: str, damping: float, depth: int = 4, curvature: str = "hessian"):
    """The equilibrated reduced system of the structured route, or the lifted system of
    the generic one (assembled from the densified closed forms: what the generic route
    factors, without its autograd oracle's start-up cost)."""
    torch.manual_seed(0)
    model = hi.DeepMLPWithTracking(8, 8, 10, depth - 1).double()
    x, t = torch.randn(4, 8, dtype=F64), torch.randint(0, 10, (4,))
    loss = model(x, t, track_activations=True)
    if path == "generic":
        operator = hi.hessian_operator(model, loss, curvature=curvature)
        return hi.assemble_lifted_system(operator.densified().derivs, damping)
    return hi.factorize(model, loss, damping, path=path, curvature=curvature).solver.system


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_structured_reduced_system(curvature):
    system = model_system("structured", 1e-2, curvature=curvature)
    generator = torch.Generator().manual_seed(1)
    rhs = [torch.randn(n, 2, generator=generator, dtype=F64) for n in system.block_sizes]
    # Blocks w_1, y_1, ..: y_L's diagonal block R_{L+1} is 0 (and every R_l with 'ggn').
    with pytest.raises(bt.SingularSystemError, match="zero .*pivot.*banded LU"):
        cyclic_reduction(system)
    x = cyclic_reduction_solve(cyclic_reduction(system, merge=2), rhs)
    assert relative(x, bt.banded_lu_solve(bt.banded_lu(system), rhs)) < 1e-10
    assert backward_error(system, x, rhs) < 1e-14


@pytest.mark.parametrize("merge", [1, 2])
def test_generic_lifted_system(merge):
    system = model_system("generic", 1e-1, depth=3)
    generator = torch.Generator().manual_seed(2)
    rhs = [torch.randn(n, 2, generator=generator, dtype=F64) for n in system.block_sizes]
    x = cyclic_reduction_solve(cyclic_reduction(system, merge=merge), rhs)
    assert relative(x, bt.banded_lu_solve(bt.banded_lu(system), rhs)) < 1e-10
    assert backward_error(system, x, rhs) < 1e-14


def scalar_system(middle: float) -> bt.BlockTridiagonal:
    """[[1, 1, 0], [1, middle, 1], [0, 1, 1]] as three 1 x 1 blocks (determinant -2 at 0)."""
    one = torch.ones(1, 1, dtype=F64)
    return bt.BlockTridiagonal([one, middle * one, one], [one, one])


def test_no_pivoting_across_blocks():
    rhs = [torch.ones(1, 1, dtype=F64)] * 3
    # Nonsingular, but the eliminated block is 0: the banded LU pivots past it, CR cannot.
    system = scalar_system(0.0)
    assert relative(bt.banded_lu_solve(bt.banded_lu(system), rhs),
                    [torch.tensor([[0.5]], dtype=F64), torch.tensor([[0.5]], dtype=F64),
                     torch.tensor([[0.5]], dtype=F64)]) < 1e-15
    with pytest.raises(bt.SingularSystemError, match="zero .*pivot"):
        cyclic_reduction(system)
    # A tiny pivot instead: growth ~ 1/middle, a large backward error (the refinement
    # contract of HessianInverse is what catches it), where the banded LU stays exact.
    system = scalar_system(1e-14)
    x = cyclic_reduction_solve(cyclic_reduction(system), rhs)
    assert backward_error(system, x, rhs) > 1e-6
    assert backward_error(system, bt.banded_lu_solve(bt.banded_lu(system), rhs), rhs) < 1e-16


def test_singular_system_raises():
    generator = torch.Generator().manual_seed(3)
    system = random_system([3] * 6, F64, generator)
    system.diag[4] = torch.zeros(3, 3, dtype=F64)  # decoupled: block 4's rows vanish
    system.sub[3] = torch.zeros(3, 3, dtype=F64)
    system.sub[4] = torch.zeros(3, 3, dtype=F64)
    for merge in (1, 2, 4):
        with pytest.raises(bt.SingularSystemError, match="zero"):
            cyclic_reduction(system, merge=merge)
    with pytest.raises(bt.SingularSystemError):
        bt.banded_lu(system)
    system.diag[4] = torch.full((3, 3), math.nan, dtype=F64)
    with pytest.raises(bt.SingularSystemError, match="non-finite"):
        cyclic_reduction(system)


@pytest.mark.parametrize("path,damping", [("structured", 1e-2), ("generic", 1e-2), ("generic", 0.0)])
def test_factorize_with_cyclic_reduction_matches_dense(path, damping):
    """Through the public entry points, refined and held to the accuracy contract."""
    import warnings
    from conftest import dense_hessian, make_mlp, relative_error
    model, x, t, loss = make_mlp(90, 6, 4, 32, "tanh")
    H = dense_hessian(model, x, t)
    v = torch.randn(H.shape[0], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        inverse = hi.factorize(model, loss, damping, path=path, factorization="cyclic")
        y = inverse @ v
    reference = torch.linalg.pinv(H) @ v if damping == 0 else torch.linalg.solve(
        H + damping * torch.eye(H.shape[0], dtype=F64), v)
    assert relative_error(y, reference) <= 1e-9
    assert inverse.backward_error <= inverse.rtol
    with pytest.raises(hi.HessianInverseError, match="factorization"):
        hi.factorize(model, loss, damping, path=path, factorization="qr")

"""block_tridiagonal.py: the pivoted banded LU and block cyclic reduction on stacked blocks,
against ``torch.linalg.solve`` of the dense matrix (random, ill-conditioned and singular
systems, float32 and float64, equal and unequal block sizes, several right-hand sides),
and their kernel counts (a constant per step for the banded LU, per level for cyclic
reduction)."""

from __future__ import annotations

import math
from itertools import accumulate

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import block_tridiagonal as bt
import hessian_inverse as hi
from block_tridiagonal import cyclic_reduction, cyclic_reduction_solve

F64 = torch.float64
DEPTHS = (1, 2, 3, 5, 8, 13, 64)


def dense(diag, sub) -> torch.Tensor:
    """The dense symmetric matrix with diagonal blocks ``diag`` and sub-diagonal ``sub``."""
    ends = [0, *accumulate(d.shape[0] for d in diag)]
    out = torch.block_diag(*diag)
    for l, s in enumerate(sub):
        out[ends[l + 1]:ends[l + 2], ends[l]:ends[l + 1]] = s
        out[ends[l]:ends[l + 1], ends[l + 1]:ends[l + 2]] = s.T
    return out


def random_blocks(sizes, dtype, generator, dominant=True):
    """Symmetric blocks; strictly block diagonally dominant if ``dominant`` (so that both
    factorisations are stable), else indefinite with no dominance at all."""
    diag = [torch.randn(n, n, generator=generator, dtype=dtype) for n in sizes]
    diag = [d + d.T for d in diag]
    sub = [torch.randn(sizes[l + 1], sizes[l], generator=generator, dtype=dtype)
           for l in range(len(sizes) - 1)]
    if dominant:
        shift = (dense(diag, sub).abs().sum(1) + 1).split(list(sizes))
        diag = [d + torch.diag(s) for d, s in zip(diag, shift)]
    return diag, sub


def random_system(sizes, dtype, generator, dominant=True) -> bt.BlockTridiagonal:
    return bt.BlockTridiagonal.from_blocks(*random_blocks(sizes, dtype, generator, dominant))


def blocks_of(system: bt.BlockTridiagonal):
    """The unpadded blocks of a stacked system."""
    s = system.sizes
    return ([system.diag[l, :n, :n] for l, n in enumerate(s)],
            [system.sub[l, :s[l + 1], :s[l]] for l in range(len(s) - 1)])


def dense_of(system: bt.BlockTridiagonal) -> torch.Tensor:
    return dense(*blocks_of(system))


def end_sizes(depth: int) -> list:
    """Interior blocks of one size, different first and last ones (as in the reduced systems)."""
    return ([5] + [4] * (depth - 2) + [3])[:depth] if depth > 1 else [5]


def flat(system: bt.BlockTridiagonal, x: torch.Tensor) -> torch.Tensor:
    """A stacked (N, n, k) block vector as (sum n_l, k), padding dropped."""
    return torch.cat(system.unstack(x))


def relative(x, y) -> float:
    return float((x - y).norm() / y.norm())


def backward_error(system: bt.BlockTridiagonal, x: torch.Tensor, b: torch.Tensor) -> float:
    """Normwise backward error of a stacked solution, columnwise max, infinity norms."""
    A, xf, bf = dense_of(system), flat(system, x), flat(system, b)
    r = bf - A @ xf
    norm = A.abs().sum(1).max()
    return float((r.abs().amax(0) / (norm * xf.abs().amax(0) + bf.abs().amax(0))).max())


def both(system, rhs, merge=1):
    """Solutions by the banded LU and by cyclic reduction."""
    return (bt.banded_lu_solve(bt.banded_lu(system), rhs),
            cyclic_reduction_solve(cyclic_reduction(system, merge=merge), rhs))


# ----------------------------------------------------------------------------
# Storage
# ----------------------------------------------------------------------------


def test_stacked_storage_pads_with_identity():
    generator = torch.Generator().manual_seed(0)
    sizes = [3, 1, 4, 2]
    diag, sub = random_blocks(sizes, F64, generator)
    system = bt.BlockTridiagonal.from_blocks(diag, sub)
    assert system.diag.shape == (4, 4, 4) and system.sub.shape == (3, 4, 4)
    assert system.block_sizes == sizes and system.padded
    # The padded matrix is block_diag(A, I) up to a permutation.
    mask = system.mask().reshape(-1)
    full = dense(list(system.diag), list(system.sub))
    assert torch.equal(full[mask][:, mask], dense(diag, sub))
    assert torch.equal(full[~mask][:, ~mask], torch.eye(int((~mask).sum()), dtype=F64))
    assert not full[mask][:, ~mask].any()
    x = [torch.randn(n, 2, generator=generator, dtype=F64) for n in sizes]
    stacked = system.stack(x)
    assert not stacked[~system.mask()].any()
    assert torch.equal(flat(system, stacked), torch.cat(x))
    assert torch.allclose(flat(system, system.matmul(stacked)), dense(diag, sub) @ torch.cat(x),
                          rtol=1e-14, atol=1e-14)
    assert float(system.norm1()) == pytest.approx(float(dense(diag, sub).abs().sum(0).max()))


# ----------------------------------------------------------------------------
# Against torch.linalg.solve
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("merge", [1, 2])
def test_random_systems_match_dense(dtype, merge):
    generator = torch.Generator().manual_seed(0)
    tol = 1e-12 if dtype == F64 else 2e-5
    for depth in DEPTHS:
        mixed = torch.randint(1, 5, (depth,), generator=generator).tolist()
        for sizes in ([4] * depth, end_sizes(depth), mixed):
            system = random_system(sizes, dtype, generator)
            rhs = system.stack([torch.randn(n, 3, generator=generator, dtype=dtype)
                                for n in sizes])
            reference = torch.linalg.solve(dense_of(system), flat(system, rhs))
            banded, cyclic = both(system, rhs, merge)
            for x in (banded, cyclic):
                assert x.shape == rhs.shape
                assert not x[~system.mask()].any()
                assert relative(flat(system, x), reference) < tol, (depth, sizes)
            # The factors serve any number of right-hand sides.
            one = cyclic_reduction_solve(cyclic_reduction(system, merge=merge), rhs[..., 1:2])
            assert relative(one, cyclic[..., 1:2]) < tol


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_indefinite_systems_need_pivoting_across_blocks(dtype):
    """No dominance, indefinite: the banded LU's pivoting keeps it backward stable."""
    generator = torch.Generator().manual_seed(1)
    u = torch.finfo(dtype).eps
    for sizes in ([3] * 40, torch.randint(1, 6, (40,), generator=generator).tolist()):
        system = random_system(sizes, dtype, generator, dominant=False)
        rhs = system.stack([torch.randn(n, 2, generator=generator, dtype=dtype) for n in sizes])
        x = bt.banded_lu_solve(bt.banded_lu(system), rhs)
        assert backward_error(system, x, rhs) < 50 * u
        A64 = dense_of(system).double()
        reference = torch.linalg.solve(A64, flat(system, rhs).double())
        cond = float(torch.linalg.cond(A64))
        assert relative(flat(system, x).double(), reference) < 100 * cond * u


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_ill_conditioned_systems(dtype):
    """A diagonal shift puts one eigenvalue at 1e-10 (float32: 1e-5) of the largest:
    the error follows cond * u, the backward error stays at rounding."""
    generator = torch.Generator().manual_seed(2)
    u = torch.finfo(dtype).eps
    gap = 1e-10 if dtype == F64 else 1e-5
    sizes = [4] * 12 + [2]
    diag, sub = random_blocks(sizes, F64, generator, dominant=False)
    A = dense(diag, sub)
    lam = torch.linalg.eigvalsh(A)
    shift = lam[len(lam) // 2] - gap * lam.abs().max()
    diag = [(d - shift * torch.eye(d.shape[0], dtype=F64)).to(dtype) for d in diag]
    system = bt.BlockTridiagonal.from_blocks(diag, [s.to(dtype) for s in sub])
    A64 = dense_of(system).double()
    cond = float(torch.linalg.cond(A64))
    assert cond > 0.1 / gap
    rhs = system.stack([torch.randn(n, 2, generator=generator, dtype=dtype) for n in sizes])
    reference = torch.linalg.solve(A64, flat(system, rhs).double())
    for merge in (1, 2):
        banded, cyclic = both(system, rhs, merge)
        assert backward_error(system, banded, rhs) < 50 * u
        assert relative(flat(system, banded).double(), reference) < 10 * cond * u
        # Cyclic reduction pivots within blocks only; here it stays within cond * u too.
        assert relative(flat(system, cyclic).double(), reference) < 1e3 * cond * u


def test_singular_systems_raise():
    generator = torch.Generator().manual_seed(3)
    for sizes in ([3] * 6, [3, 2, 3, 1, 3, 3]):
        diag, sub = random_blocks(sizes, F64, generator)
        diag[4] = torch.zeros_like(diag[4])  # decoupled: block 4's rows vanish
        sub[3], sub[4] = torch.zeros_like(sub[3]), torch.zeros_like(sub[4])
        system = bt.BlockTridiagonal.from_blocks(diag, sub)
        for merge in (1, 2, 4):
            with pytest.raises(bt.SingularSystemError, match="zero"):
                cyclic_reduction(system, merge=merge)
        with pytest.raises(bt.SingularSystemError, match="zero pivot in block 5"):
            bt.banded_lu(system)
        # Deferred: no exception, the caller reads the smallest pivot.
        assert float(bt.banded_lu(system, check=False).smallest_pivot) == 0.0
        diag[4] = torch.full_like(diag[4], math.nan)
        system = bt.BlockTridiagonal.from_blocks(diag, sub)
        with pytest.raises(bt.SingularSystemError, match="non-finite"):
            cyclic_reduction(system)
        with pytest.raises(bt.SingularSystemError, match="zero pivot"):
            bt.banded_lu(system)


def scalar_system(values) -> bt.BlockTridiagonal:
    """1 x 1 blocks: ``values`` on the diagonal, ones beside it."""
    one = torch.ones(1, 1, dtype=F64)
    return bt.BlockTridiagonal.from_blocks([v * one for v in values], [one] * (len(values) - 1))


def test_no_pivoting_across_blocks():
    rhs = torch.ones(3, 1, 1, dtype=F64)
    # [[1, 1, 0], [1, 0, 1], [0, 1, 1]] (determinant -2) is nonsingular, but the
    # eliminated block is 0: the banded LU pivots past it, CR cannot.
    system = scalar_system([1.0, 0.0, 1.0])
    assert relative(bt.banded_lu_solve(bt.banded_lu(system), rhs),
                    torch.full((3, 1, 1), 0.5, dtype=F64)) < 1e-15
    with pytest.raises(bt.SingularSystemError, match="zero .*pivot"):
        cyclic_reduction(system)
    # A tiny pivot instead: growth ~ 1/middle, a large backward error (the refinement
    # contract of HessianInverse is what catches it), where the banded LU stays exact.
    system, rhs = scalar_system([2.0, 1e-14, 3.0, 1.0, 2.0]), torch.ones(5, 1, 1, dtype=F64)
    x = cyclic_reduction_solve(cyclic_reduction(system), rhs)
    assert backward_error(system, x, rhs) > 1e-6
    assert backward_error(system, bt.banded_lu_solve(bt.banded_lu(system), rhs), rhs) < 1e-16


def test_equilibrate_and_condition_estimate():
    generator = torch.Generator().manual_seed(4)
    sizes = [3, 4, 4, 2]
    diag, sub = random_blocks(sizes, F64, generator, dominant=False)
    scale = torch.logspace(-4, 4, sum(sizes), dtype=F64)
    A = dense(diag, sub)
    A = scale[:, None] * A * scale[None, :]
    ends = [0, *accumulate(sizes)]
    diag = [A[ends[l]:ends[l + 1], ends[l]:ends[l + 1]] for l in range(len(sizes))]
    sub = [A[ends[l + 1]:ends[l + 2], ends[l]:ends[l + 1]] for l in range(len(sizes) - 1)]
    system = bt.BlockTridiagonal.from_blocks(diag, sub)
    scaled, scales = bt.equilibrate(system)
    s = flat(system, scales.unsqueeze(-1))[:, 0]
    assert torch.allclose(dense_of(scaled), s[:, None] * A * s[None, :], rtol=1e-14)
    assert torch.equal(scales[~system.mask()], torch.ones_like(scales[~system.mask()]))
    assert float(dense_of(scaled).abs().amax(1).max()) == pytest.approx(1.0)
    assert float(torch.linalg.cond(dense_of(scaled))) < 1e-4 * float(torch.linalg.cond(A))
    for factor in (bt.banded_lu(scaled), cyclic_reduction(scaled)):
        rcond = bt.reciprocal_condition(scaled, factor)
        exact = 1.0 / float(torch.linalg.cond(dense_of(scaled), 1))
        assert exact / 3.5 <= rcond <= exact * 1.0000001


# ----------------------------------------------------------------------------
# The systems of the core
# ----------------------------------------------------------------------------


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
    rhs = system.stack([torch.randn(n, 2, generator=generator, dtype=F64)
                        for n in system.block_sizes])
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
    rhs = system.stack([torch.randn(n, 2, generator=generator, dtype=F64)
                        for n in system.block_sizes])
    x = cyclic_reduction_solve(cyclic_reduction(system, merge=merge), rhs)
    assert relative(x, bt.banded_lu_solve(bt.banded_lu(system), rhs)) < 1e-10
    assert backward_error(system, x, rhs) < 1e-14


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


# ----------------------------------------------------------------------------
# Kernel counts: per step (banded), per level (cyclic)
# ----------------------------------------------------------------------------


class _Kernels(TorchDispatchMode):
    """Counts the non-view aten ops dispatched."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def kernels(fn) -> int:
    with _Kernels() as counter:
        fn()
    return counter.count


def test_kernel_counts():
    generator = torch.Generator().manual_seed(5)
    counts = {}
    for N in (16, 32, 64, 128, 256):
        system = random_system([2] * N, F64, generator)
        rhs = torch.randn(N, 2, 1, generator=generator, dtype=F64)
        banded, cyclic = bt.banded_lu(system), cyclic_reduction(system, merge=2)
        counts[N] = (kernels(lambda: bt.banded_lu(system, check=False)),
                     kernels(lambda: bt.banded_lu_solve(banded, rhs)),
                     kernels(lambda: cyclic_reduction(system, merge=2, check=False)),
                     kernels(lambda: cyclic_reduction_solve(cyclic, rhs)))
    # The banded LU: the same calls for every block, factorisation and solve.
    for i in (0, 1):
        steps = [counts[2 * N][i] - counts[N][i] for N in (16, 32, 64)]
        assert steps[1] == 2 * steps[0] and steps[2] == 2 * steps[1]
        assert steps[0] <= 10 * 16
    # Cyclic reduction: a constant number per level (N = 2^k + 1 blocks after padding).
    for i in (2, 3):
        levels = [counts[2 * N][i] - counts[N][i] for N in (16, 32, 64, 128)]
        assert len(set(levels)) == 1 and levels[0] <= 16, levels

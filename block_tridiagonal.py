"""Block-tridiagonal linear algebra on stacked blocks: no knowledge of networks.

A symmetric block-tridiagonal matrix (:class:`BlockTridiagonal`), its factorisation by
Gaussian elimination with partial pivoting by blocks (:func:`banded_lu`, LAPACK's banded
``gbtrf`` scheme) and by block cyclic reduction (:func:`cyclic_reduction`), their solves,
and a symmetric equilibration (:func:`equilibrate`).  ``hessian_inverse.py`` builds the
systems (docs/ALGORITHM.md, "The lifted system", "Parameter elimination") and factors them
here; this module imports nothing of the project.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Optional, Sequence

import torch

__all__ = ["SingularSystemError", "BlockTridiagonal", "banded_lu", "banded_lu_solve",
           "cyclic_reduction", "cyclic_reduction_solve", "merge_blocks", "equilibrate"]


class SingularSystemError(torch.linalg.LinAlgError):
    """A factorisation met an exactly zero (or non-finite) pivot."""



@dataclass
class BlockTridiagonal:
    """A symmetric block-tridiagonal matrix.

    ``diag[l]`` is (n_l, n_l); ``sub[l]`` is the block in block-row l+1, block-column
    l, (n_{l+1}, n_l); the super-diagonal is ``sub[l].T``.
    """

    diag: list
    sub: list

    @property
    def block_sizes(self) -> list:
        return [d.shape[0] for d in self.diag]

    def matmul(self, blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Block-wise product with a block vector (each block (n_l, k))."""
        out = [d @ x for d, x in zip(self.diag, blocks)]
        for l, s in enumerate(self.sub):
            out[l + 1] = out[l + 1] + s @ blocks[l]
            out[l] = out[l] + s.T @ blocks[l + 1]
        return out

    def norm1(self) -> torch.Tensor:
        """The matrix 1-norm (largest absolute column sum)."""
        sums = [d.abs().sum(0) for d in self.diag]
        for l, s in enumerate(self.sub):
            sums[l] = sums[l] + s.abs().sum(0)
            sums[l + 1] = sums[l + 1] + s.abs().sum(1)
        return torch.cat(sums).max()


# --------------------------------------------------------------------------
# Banded LU with partial pivoting (docs/ALGORITHM.md, "Banded LU with partial pivoting")
# --------------------------------------------------------------------------


@dataclass
class PanelFactor:
    """Step l of the banded LU: ``P [D_l; S_{l+1}] = [L_11; L_21] U_ll``.

    ``perm`` (n_l + n_{l+1},) reorders the panel's rows; ``lower`` is the unit
    lower-trapezoidal factor; ``upper`` (n_l, n_l); ``right`` (n_l, n_{l+1} +
    n_{l+2}) is block-row l of U in block-columns l+1 and l+2: ``right1`` and
    ``right2`` (the second is the fill that row pivoting creates).
    """

    perm: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    right: torch.Tensor
    split: int

    @property
    def right1(self) -> torch.Tensor:
        return self.right[:, :self.split]

    @property
    def right2(self) -> torch.Tensor:
        return self.right[:, self.split:]


@dataclass
class BandedLU:
    """The factors of :func:`banded_lu`: one :class:`PanelFactor` per block."""

    panels: list
    block_sizes: list
    min_pivot: float


def _panel_rows(top: torch.Tensor, diag_next: Optional[torch.Tensor],
                super_next: Optional[torch.Tensor], n2: int) -> torch.Tensor:
    """Rows of panel l in block-columns l+1 and l+2: ``[[top, 0], [D_{l+1}, S_{l+2}^T]]``."""
    n, n1 = top.shape
    rows = top.new_zeros(n + (diag_next.shape[0] if diag_next is not None else 0), n1 + n2)
    rows[:n, :n1] = top
    if diag_next is not None:
        rows[n:, :n1] = diag_next
        if super_next is not None:
            rows[n:, n1:] = super_next
    return rows


def banded_lu(system: BlockTridiagonal) -> BandedLU:
    """Factor a block-tridiagonal matrix by Gaussian elimination with partial pivoting.

    Step l LU-factors the tall panel [diagonal block l; sub-diagonal block below]
    with row pivoting, then updates the next diagonal block and the next
    super-diagonal block.  Pivoting may swap rows of block l+1 into block l,
    whose row then reaches block-column l+2: one extra super-diagonal of fill.
    Cost O(sum_l n_l^3), storage O(sum_l n_l^2).  Raises
    :class:`SingularSystemError` on an exactly zero (or non-finite) pivot.
    """
    diag, sub = system.diag, system.sub
    sizes = system.block_sizes
    num_blocks = len(diag)
    panels = []
    D = diag[0]
    U1 = sub[0].T if num_blocks > 1 else D.new_zeros(sizes[0], 0)
    pivots = []
    for l in range(num_blocks):
        n = sizes[l]
        n2 = sizes[l + 2] if l + 2 < num_blocks else 0
        has_next = l + 1 < num_blocks
        panel = torch.cat([D, sub[l]]) if has_next else D
        Pm, Lm, Um = torch.linalg.lu(panel)
        perm = Pm.argmax(dim=0)  # (P^T X)[i] = X[perm[i]]
        pivots.append(Um.diagonal().abs().min())
        R = _panel_rows(U1, diag[l + 1] if has_next else None,
                        sub[l + 1].T if l + 2 < num_blocks else None, n2)[perm]
        Rt = torch.linalg.solve_triangular(Lm[:n], R[:n], upper=False, unitriangular=True)
        panels.append(PanelFactor(perm, Lm, Um, Rt, U1.shape[1]))
        if has_next:
            Rb = torch.addmm(R[n:], Lm[n:], Rt, alpha=-1)
            D, U1 = Rb[:, :U1.shape[1]], Rb[:, U1.shape[1]:]
    smallest = torch.stack(pivots)
    # A zero or NaN pivot: pivoting found nothing to divide by.
    bad = torch.nonzero(~(smallest > 0.0))
    if bad.numel():
        raise SingularSystemError(
            f"the block-tridiagonal system is exactly singular (zero pivot in block {int(bad[0]) + 1})")
    return BandedLU(panels, sizes, float(smallest.min()))


def banded_lu_solve(lu: BandedLU, rhs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Solve with the factors of :func:`banded_lu`; ``rhs[l]`` is (n_l, k)."""
    panels, sizes = lu.panels, lu.block_sizes
    num_blocks = len(panels)
    c = list(rhs)
    # Forward: apply each panel's row permutation and unit-lower factor.
    for l, f in enumerate(panels):
        n = sizes[l]
        rows = torch.cat([c[l], c[l + 1]]) if l + 1 < num_blocks else c[l]
        rows = rows[f.perm]
        top = torch.linalg.solve_triangular(f.lower[:n], rows[:n], upper=False,
                                            unitriangular=True)
        c[l] = top
        if l + 1 < num_blocks:
            c[l + 1] = torch.addmm(rows[n:], f.lower[n:], top, alpha=-1)
    # Backward: block upper-triangular with two super-diagonals.
    x: list[Optional[torch.Tensor]] = [None] * num_blocks
    for l in reversed(range(num_blocks)):
        f = panels[l]
        r = c[l]
        if l + 1 < num_blocks:
            later = torch.cat(x[l + 1:l + 3]) if l + 2 < num_blocks else x[l + 1]
            r = torch.addmm(r, f.right, later, alpha=-1)
        x[l] = torch.linalg.solve_triangular(f.upper, r, upper=True)
    return x


# --------------------------------------------------------------------------
# Block cyclic reduction (docs/ALGORITHM.md, "Banded LU with partial pivoting")
# --------------------------------------------------------------------------
#
# An alternative factorisation for deep, narrow systems on GPUs: log2 N
# sequential levels of batched calls instead of N sequential steps, no host
# synchronisation until one pivot check at the end, but no pivoting across
# blocks (HessianInverse checks every solve and falls back to the banded LU).
#
# One level eliminates every odd-indexed block o of the current system from its
# own row, ``x_o = D_o^{-1} (b_o - S_{o-1} x_{o-1} - S_o^T x_{o+1})``.  The even
# blocks keep a block-tridiagonal Schur complement of half the size,
#
#     D_e' = D_e - S_e^T D_{e+1}^{-1} S_e - S_{e-1} D_{e-1}^{-1} S_{e-1}^T
#     S_e' = -S_{e+1} D_{e+1}^{-1} S_e            (block-row e+2, block-column e)
#
# (symmetric, as a Schur complement of a symmetric matrix), which is reduced in
# turn: ceil(log2 N) levels for N blocks, then one LU of the last block.  All
# blocks of a level are independent, so each level is a few batched calls
# (``lu_factor``, ``lu_solve``, ``bmm``) per shape of block, instead of one
# sequential step per block.
#
# Couplings are kept compact: ``sub[k]`` links only the first rows ("head") of
# block k+1 with the last columns ("tail") of block k.  For the input system
# head and tail are whole blocks; when runs of consecutive blocks are merged
# into one (``merge``), they are the run's first and last original blocks, and
# the formulas above keep that shape at every level: ``S_e'`` joins the head of
# e+2 to the tail of e, and the updates of ``D_e`` touch only its tail-by-tail
# and head-by-head corners.


@dataclass
class OddBlocks:
    """The g blocks of one level that are eliminated together (all of one shape).

    ``positions``: their (odd) indices o in the level.  ``lu``, ``pivots``: LU
    factors of their diagonal blocks D_o, (g, n, n) and (g, n).  The rest of
    block-column o: ``above`` (g, n_l, h) = S_{o-1}^T, rows the tail of block
    o-1, columns block o's first h (its head); ``below`` (g, n_r, t) = S_o, rows
    the head of block o+1, columns block o's last t (its tail); t = n_r = 0 for a
    last block.  ``solved`` (g, n, n_l + n_r) = D_o^{-1} [above^T, below^T], the
    transposes placed in their rows (block-row o outside the diagonal).
    """

    positions: list
    lu: torch.Tensor
    pivots: torch.Tensor
    above: torch.Tensor
    below: torch.Tensor
    solved: torch.Tensor

    def couple(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(above X[head], below X[tail])`` for X (g, n, c)."""
        n, head, tail = X.shape[1], self.above.shape[2], self.below.shape[2]
        return self.above @ X[:, :head], self.below @ X[:, n - tail:]


@dataclass
class ReductionLevel:
    """One level of cyclic reduction of a system of ``num_blocks`` blocks.

    ``odd``: its eliminated blocks as :class:`OddBlocks`, one per shape.
    ``even``: the kept (even) positions, grouped by shape and neighbours for
    the batched Schur update; kept block e is block e // 2 of the next level.
    """

    num_blocks: int
    odd: list
    even: list


@dataclass
class CyclicReductionFactor:
    """The factors of :func:`cyclic_reduction`.

    ``levels``: one :class:`ReductionLevel` per level, finest first.  ``root``:
    LU factors (lu, pivots), (1, n, n) and (1, n), of the one block left at the
    end.  ``block_sizes``: the input system's; ``merge``: how many of its
    consecutive blocks form one block of the reduction.  ``min_pivot``: the
    smallest pivot magnitude over all levels.
    """

    levels: list
    root: tuple
    block_sizes: list
    merge: int
    min_pivot: float


def _groups(keys: Sequence) -> list[list[int]]:
    """Positions sharing a key, in order of first appearance: [[i, ...], ...]."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _smallest_pivot(lu: torch.Tensor) -> torch.Tensor:
    """min |U_ii| over a batch of LU factors, a non-finite pivot counting as 0 (0-dim)."""
    pivots = lu.diagonal(dim1=-2, dim2=-1).abs()
    return torch.where(torch.isfinite(pivots), pivots, 0.0).amin()


def merge_blocks(system: BlockTridiagonal, merge: int) -> tuple[list, list]:
    """Runs of ``merge`` consecutive blocks as single blocks (the last run may be shorter).

    Returns the runs' dense diagonal blocks and the compact couplings between
    runs: the original ``S`` at each boundary, linking the first block of run
    k+1 to the last block of run k.  Runs of equal block sizes are assembled
    together (O(merge) batched copies per shape).  For the reduced system of the
    structured route, ``merge=2`` gives blocks (w_l, y_l) with diagonal
    [[-Q_l, -I], [-I, R_{l+1}]], invertible iff I + R_{l+1} Q_l is: also where
    R_{l+1} = 0 (always for the last layer, for every layer with curvature='ggn')
    or Q_l is singular (first layer when the batch exceeds input_dim + 1).
    """
    if merge == 1:
        return list(system.diag), list(system.sub)
    sizes, num_blocks = system.block_sizes, len(system.diag)
    runs = [list(range(i, min(i + merge, num_blocks))) for i in range(0, num_blocks, merge)]
    keys = [tuple(sizes[i] for i in run) for run in runs]
    diag: list[Optional[torch.Tensor]] = [None] * len(runs)
    for group in _groups(keys):
        ends = [0, *accumulate(keys[group[0]])]
        out = system.diag[0].new_zeros(len(group), ends[-1], ends[-1])
        for j in range(len(ends) - 1):
            rows = slice(ends[j], ends[j + 1])
            out[:, rows, rows] = torch.stack([system.diag[runs[k][j]] for k in group])
            if j + 2 < len(ends):
                below = slice(ends[j + 1], ends[j + 2])
                s = torch.stack([system.sub[runs[k][j]] for k in group])
                out[:, below, rows] = s
                out[:, rows, below] = s.mT
        for k, d in zip(group, out.unbind()):
            diag[k] = d
    return diag, [system.sub[run[0] - 1] for run in runs[1:]]


def _eliminate_odd(diag: list, sub: list, positions: list) -> OddBlocks:
    """Batched LU of D_o and D_o^{-1} [S_{o-1}, S_o^T] for positions o of one shape."""
    D = torch.stack([diag[o] for o in positions])
    above = torch.stack([sub[o - 1].T for o in positions])
    if positions[0] + 1 < len(diag):
        below = torch.stack([sub[o] for o in positions])
    else:
        below = D.new_zeros(len(positions), 0, 0)
    (g, n, _), (_, n_l, head), (_, n_r, tail) = D.shape, above.shape, below.shape
    coupling = D.new_zeros(g, n, n_l + n_r)
    coupling[:, :head, :n_l] = above.mT
    coupling[:, n - tail:, n_l:] = below.mT
    lu, pivots, _ = torch.linalg.lu_factor_ex(D)
    # Row-major: LAPACK returns column-major solutions, and batched CPU matmul is
    # about 3x slower on those in the solve.
    solved = torch.linalg.lu_solve(lu, pivots, coupling).contiguous()
    return OddBlocks(positions, lu, pivots, above, below, solved)


def _subtract_eliminated(values: list, level: ReductionLevel, to_left: list,
                         to_right: list, square: bool) -> list:
    """The next level's blocks: ``values[e] - to_left[e + 1] - to_right[e - 1]``, e even.

    ``to_left[o]`` (odd o) goes into the tail rows of block o-1, ``to_right[o]``
    into the head rows of block o+1 (and the same columns if ``square``: the
    diagonal blocks).  Batched over each group of ``level.even``.
    """
    out: list[Optional[torch.Tensor]] = [None] * len(values[::2])
    for group in level.even:
        v = torch.stack([values[e] for e in group])
        n = v.shape[1]
        if group[0] + 1 < level.num_blocks:
            u = torch.stack([to_left[e + 1] for e in group])
            tail = slice(n - u.shape[1], n)
            v[:, tail, tail if square else slice(None)] -= u
        if group[0] > 0:
            u = torch.stack([to_right[e - 1] for e in group])
            head = slice(0, u.shape[1])
            v[:, head, head if square else slice(None)] -= u
        for e, ve in zip(group, v.unbind()):
            out[e // 2] = ve
    return out


def _reduce(diag: list, sub: list) -> tuple[ReductionLevel, list, list]:
    """One level: eliminate the odd blocks; returns the level and the Schur complement.

    Per odd block, ``above D_o^{-1} above^T`` goes into the left neighbour's
    tail corner, ``below D_o^{-1} below^T`` into the right one's head corner,
    and ``-below D_o^{-1} above^T`` is the new coupling between them.
    """
    m = len(diag)
    shapes = [tuple(d.shape) for d in diag] + [None]
    links = [None] + [tuple(s.shape) for s in sub] + [None]  # links[i]: sub[i - 1]
    odd = [_eliminate_odd(diag, sub, [2 * j + 1 for j in group])
           for group in _groups([(shapes[o], links[o], links[o + 1]) for o in range(1, m, 2)])]
    even = [[2 * j for j in group]
            for group in _groups([(shapes[e], links[e], links[e + 1]) for e in range(0, m, 2)])]
    level = ReductionLevel(m, odd, even)
    to_left: list[Optional[torch.Tensor]] = [None] * m
    to_right: list[Optional[torch.Tensor]] = [None] * m
    new_sub: list[Optional[torch.Tensor]] = [None] * (len(diag[::2]) - 1)
    for f in odd:
        (_, n, _), (_, n_l, head), tail = f.solved.shape, f.above.shape, f.below.shape[2]
        top = f.above @ f.solved[:, :head, :n_l]
        bottom = f.below @ f.solved[:, n - tail:]
        for o, u, w in zip(f.positions, top.unbind(), bottom[:, :, n_l:].unbind()):
            to_left[o], to_right[o] = u, w
        if bottom.shape[1]:
            for o, s in zip(f.positions, (-bottom[:, :, :n_l]).unbind()):
                new_sub[o // 2] = s
    return level, _subtract_eliminated(diag, level, to_left, to_right, True), new_sub


def cyclic_reduction(system: BlockTridiagonal, merge: int = 1) -> CyclicReductionFactor:
    """Factor a symmetric block-tridiagonal matrix by block cyclic reduction.

    Each of the ceil(log2 N) levels (N = number of blocks) eliminates the
    odd-indexed blocks of the current system at once, by batched LU of their
    diagonal blocks grouped by shape, and leaves the even ones' Schur
    complement (block tridiagonal, half the blocks); the last block is
    LU-factored.  ``merge`` > 1 first joins runs of that many consecutive
    blocks (:func:`merge_blocks`; use 2 for the structured route's reduced
    system, whose y-blocks can be zero).

    Cost O(sum_l n_l^3) when neighbouring blocks have comparable sizes (about
    1.4 times the flops of :func:`banded_lu` for equal sizes, 1.8 times for
    ``merge=2`` on pairs of equal blocks); in general block l is updated
    once per level it survives, 1 + the number of trailing zero bits of l, so
    block 0 log2 N times.  Storage O(sum_l n_l^2), linear in N.  No host
    synchronisation until a single pivot check at the end.

    Pivoting is only within each diagonal block D_o, never across blocks: this
    is Gaussian elimination in odd-even order without pivoting between blocks,
    stable for block diagonally dominant or definite matrices but not in
    general, and it breaks down on a singular D_o (e.g. a zero diagonal block)
    even when the matrix is invertible.  It can therefore be inaccurate, or
    fail, where pivoted :func:`banded_lu` is not: callers must check the solve
    (the refinement contract of :class:`HessianInverse`) and fall back to
    banded LU.  Raises :class:`SingularSystemError` on a zero or non-finite
    pivot.
    """
    diag, sub = merge_blocks(system, merge)
    levels, smallest = [], []
    while len(diag) > 1:
        level, diag, sub = _reduce(diag, sub)
        levels.append(level)
        smallest.extend(_smallest_pivot(f.lu) for f in level.odd)
    lu, pivots, _ = torch.linalg.lu_factor_ex(diag[0][None])
    smallest.append(_smallest_pivot(lu))
    per_group = torch.stack(smallest)
    min_pivot = float(per_group.min())  # the one host synchronisation
    if not min_pivot > 0.0:
        at = int(torch.nonzero(~(per_group > 0.0))[0])
        raise SingularSystemError(
            f"cyclic reduction met a zero (or non-finite) pivot (block group {at + 1} of "
            f"{len(smallest)}, counted level by level): it pivots only within diagonal blocks; "
            "use the banded LU, whose pivoting across blocks does not need them invertible")
    return CyclicReductionFactor(levels, (lu, pivots), system.block_sizes, merge, min_pivot)


def cyclic_reduction_solve(factor: CyclicReductionFactor, rhs: Sequence[torch.Tensor]
                           ) -> list[torch.Tensor]:
    """Solve with the factors of :func:`cyclic_reduction`; ``rhs[l]`` is (n_l, k).

    Down the levels each eliminated block's ``y_o = D_o^{-1} b_o`` updates its
    neighbours' right-hand sides by ``-above y_o[head]`` and
    ``-below y_o[tail]``; the root block is solved; up the levels
    ``x_o = y_o - solved [x_{o-1}[tail]; x_{o+1}[head]]``.  O(sum_l n_l^2) per
    column, the same batched calls per level as the factorisation.
    """
    merge, sizes = factor.merge, factor.block_sizes
    b = list(torch.cat(list(rhs)).split([sum(sizes[i:i + merge])
                                         for i in range(0, len(sizes), merge)]))
    solved_odd = []
    for level in factor.levels:
        to_left: list[Optional[torch.Tensor]] = [None] * level.num_blocks
        to_right: list[Optional[torch.Tensor]] = [None] * level.num_blocks
        ys = []
        for f in level.odd:
            y = torch.linalg.lu_solve(f.lu, f.pivots, torch.stack([b[o] for o in f.positions]))
            top, bottom = f.couple(y)
            for o, u, w in zip(f.positions, top.unbind(), bottom.unbind()):
                to_left[o], to_right[o] = u, w
            ys.append(y)
        solved_odd.append(ys)
        b = _subtract_eliminated(b, level, to_left, to_right, False)
    x = list(torch.linalg.lu_solve(*factor.root, b[0][None]).unbind())
    for level, ys in zip(reversed(factor.levels), reversed(solved_odd)):
        finer: list[Optional[torch.Tensor]] = [None] * level.num_blocks
        finer[::2] = x
        for f, y in zip(level.odd, ys):
            n_l, n_r = f.above.shape[1], f.below.shape[1]
            neighbours = torch.stack([finer[o - 1][-n_l:] for o in f.positions])
            if n_r:
                neighbours = torch.cat(
                    [neighbours, torch.stack([finer[o + 1][:n_r] for o in f.positions])], dim=1)
            x_odd = torch.baddbmm(y, f.solved, neighbours, alpha=-1)
            for o, xo in zip(f.positions, x_odd.unbind()):
                finer[o] = xo
        x = finer
    return list(torch.cat(x).split(factor.block_sizes))



def equilibrate(system: BlockTridiagonal) -> tuple[BlockTridiagonal, list[torch.Tensor]]:
    """Symmetric diagonal scaling ``S K S``, s_i = 1 / sqrt(max_j |K_ij|) (one sweep of
    LAPACK's syequb idea); returns the scaled system and the per-block scales.

    Eliminating x_l leaves entries ~ 1/eps (in R, where A_l has little
    curvature) beside O(1) couplings; scaled, the reduced system's condition
    number is back near the lifted system's (e.g. 1e12 -> 3e7 at eps = 1e-3),
    which is what pivoting and the condition check should see.
    """
    row_max = [d.abs().amax(1) for d in system.diag]
    for l, s in enumerate(system.sub):
        row_max[l + 1] = torch.maximum(row_max[l + 1], s.abs().amax(1))
        row_max[l] = torch.maximum(row_max[l], s.abs().amax(0))
    scales = [torch.where(m > 0, m, torch.ones_like(m)).rsqrt() for m in row_max]
    diag = [s[:, None] * d * s for s, d in zip(scales, system.diag)]
    sub = [scales[l + 1][:, None] * s * scales[l] for l, s in enumerate(system.sub)]
    return BlockTridiagonal(diag, sub), scales

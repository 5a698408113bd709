"""Block-tridiagonal linear algebra on stacked blocks: no knowledge of networks.

A symmetric block-tridiagonal matrix (:class:`BlockTridiagonal`: its N diagonal and
N - 1 sub-diagonal blocks as two stacked tensors), factored by Gaussian elimination with
partial pivoting by blocks (:func:`banded_lu`, LAPACK's banded ``gbtrf`` scheme) or by
block cyclic reduction (:func:`cyclic_reduction`); their solves; a symmetric
equilibration (:func:`equilibrate`) and a condition estimate
(:func:`reciprocal_condition`).  ``hessian_inverse.py`` builds its systems here
(docs/ALGORITHM.md, "The lifted system", "Parameter elimination", "Banded LU with
partial pivoting"); this module imports nothing of the project.

**Storage.** Blocks of unequal sizes n_l are padded to one size n = max n_l: block l's
entries are its first n_l rows and columns, the padding carries the identity on the
diagonal and zeros elsewhere (and zeros in every coupling).  The padded matrix is then,
up to a permutation, ``block_diag(A, I)``: it has the same solution on the real entries,
zero on the padding, the same pivots there (pivoting never picks a padding row for a
real column: it is zero in every real column), and its factorisation is a constant
number of batched calls per step or level.  The price is the flops of size-n blocks for
smaller ones (the ends of a chain).  Block vectors are stacked the same way, (N, n, k)
with zeros on the padding (:meth:`BlockTridiagonal.stack`, :meth:`~BlockTridiagonal.unstack`).

Host synchronisation: none in a factorisation or a solve; the pivot check of a
factorisation is one (:meth:`BandedLU.check`), or none where the caller folds
``smallest_pivot`` into its own check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["SingularSystemError", "BlockTridiagonal", "BandedLU", "banded_lu",
           "banded_lu_solve", "CyclicReductionFactor", "cyclic_reduction",
           "cyclic_reduction_solve", "solve", "equilibrate", "reciprocal_condition"]


class SingularSystemError(torch.linalg.LinAlgError):
    """A factorisation met an exactly zero (or non-finite) pivot."""


@dataclass
class BlockTridiagonal:
    """A symmetric block-tridiagonal matrix of N blocks, stored stacked (see the module).

    ``rows`` (N, n, 3n): block-row l in block-columns l-1, l, l+1 (zero beyond the
    ends), so that ``diag`` (N, n, n) and ``sub`` (N - 1, n, n) are views: ``sub[l]`` is
    the block in block-row l + 1, block-column l; its transpose, the super-diagonal, is
    stored too (:meth:`symmetrize` writes it from ``sub``).  ``sizes``: the true block
    sizes n_l <= n (identity padding beyond them).
    """

    rows: torch.Tensor
    sizes: tuple

    @classmethod
    def from_blocks(cls, diag: Sequence[torch.Tensor], sub: Sequence[torch.Tensor]
                    ) -> "BlockTridiagonal":
        """From lists of blocks ``diag[l]`` (n_l, n_l) and ``sub[l]`` (n_{l+1}, n_l)."""
        sizes = tuple(d.shape[0] for d in diag)
        out = cls.empty(sizes, diag[0])
        if len(set(sizes)) == 1:
            out.diag.copy_(torch.stack(list(diag)))
            if sub:
                out.sub.copy_(torch.stack(list(sub)))
        else:
            for l, d in enumerate(diag):
                out.diag[l, :sizes[l], :sizes[l]] = d
            for l, s in enumerate(sub):
                out.sub[l, :sizes[l + 1], :sizes[l]] = s
        return out.symmetrize()

    @classmethod
    def empty(cls, sizes: Sequence[int], like: torch.Tensor) -> "BlockTridiagonal":
        """Zero blocks of ``sizes`` (identity on the padding), to be filled in (diagonal
        and sub-diagonal blocks, then :meth:`symmetrize`)."""
        sizes = tuple(int(s) for s in sizes)
        N, n = len(sizes), max(sizes)
        out = cls(torch.zeros(N, n, 3 * n, dtype=like.dtype, device=like.device), sizes)
        if min(sizes) < n:
            out.diag.diagonal(dim1=-2, dim2=-1).copy_(~_mask(sizes, like.device))
        return out

    @property
    def diag(self) -> torch.Tensor:
        n = self.size
        return self.rows[:, :, n:2 * n]

    @property
    def sub(self) -> torch.Tensor:
        return self.rows[1:, :, :self.size]

    def symmetrize(self) -> "BlockTridiagonal":
        """Write the super-diagonal blocks as the transposes of ``sub`` (in place)."""
        if self.num_blocks > 1:
            self.rows[:-1, :, 2 * self.size:] = self.sub.mT
        return self

    @property
    def num_blocks(self) -> int:
        return self.rows.shape[0]

    @property
    def size(self) -> int:
        """n, the padded block size."""
        return self.rows.shape[1]

    @property
    def block_sizes(self) -> list:
        return list(self.sizes)

    @property
    def padded(self) -> bool:
        return min(self.sizes) < self.size

    def mask(self) -> torch.Tensor:
        """(N, n) bool: the real (not padding) entries of a stacked block vector."""
        return _mask(self.sizes, self.rows.device, self.size)

    def stack(self, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        """Blocks (n_l, k) as one (N, n, k) tensor, zero on the padding."""
        if not self.padded:
            return torch.stack(list(blocks))
        out = blocks[0].new_zeros(self.num_blocks, self.size, blocks[0].shape[-1])
        for l, b in enumerate(blocks):
            out[l, :self.sizes[l]] = b
        return out

    def unstack(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, n, k) -> blocks (n_l, k) (views)."""
        return [x[l, :s] for l, s in enumerate(self.sizes)]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The product with a stacked block vector x (N, n, k): one batched product of
        each block row with the window (x_{l-1}, x_l, x_{l+1})."""
        return torch.bmm(self.rows, _windows(x))

    def norm1(self) -> torch.Tensor:
        """The matrix 1-norm (largest absolute column sum over the real entries; the
        matrix is symmetric, so the largest row sum), 0-dim."""
        sums = self.rows.abs().sum(-1)
        if self.padded:
            sums = sums * self.mask()
        return sums.amax()


def _windows(x: torch.Tensor) -> torch.Tensor:
    """(N, n, ...) -> (N, 3n, ...): (x_{l-1}, x_l, x_{l+1}) stacked for each l, zero
    beyond the ends (overlapping views of one zero-padded copy)."""
    N, n = x.shape[:2]
    padded = torch.cat([x.new_zeros(1, *x.shape[1:]), x, x.new_zeros(1, *x.shape[1:])])
    inner = padded[0].numel()
    return padded.as_strided((N, 3 * n, *x.shape[2:]), (inner, *padded.stride()[1:]))


def _mask(sizes: Sequence[int], device, n: Optional[int] = None) -> torch.Tensor:
    n = max(sizes) if n is None else n
    return (torch.arange(n, device=device) <
            torch.tensor(list(sizes), device=device)[:, None])


def _pivot_range(lu: torch.Tensor, per_factor: bool = False) -> torch.Tensor:
    """(min, max) of |U_ii| over a stack of LU factors (..., r, c): (2,), or (..., 2)
    per factor.  NaN propagates to both; usable factors have min > 0 and max < inf."""
    pivots = lu.diagonal(dim1=-2, dim2=-1).abs()
    return torch.stack(torch.aminmax(pivots, dim=-1) if per_factor else torch.aminmax(pivots),
                       dim=-1)


def _usable_pivots(ranges: torch.Tensor) -> torch.Tensor:
    """min |U_ii| of each (min, max) pair (..., 2), 0 where some pivot is not finite."""
    return torch.where(ranges[..., 1] < torch.inf, ranges[..., 0], 0.0)


def _first_bad(ranges: torch.Tensor) -> int:
    """Index of the first (min, max) pair with a zero or non-finite pivot."""
    return int(torch.nonzero(~(_usable_pivots(ranges) > 0.0))[0])


class _Pivoted:
    """What both factorisations report: ``block_sizes``, the ``smallest_pivot`` (0-dim; 0
    when some pivot is zero or non-finite) and ``check``, which raises
    :class:`SingularSystemError` (one host sync) with ``_singular(at)``'s words, ``at``
    the first step or level that met a zero pivot."""

    @property
    def block_sizes(self) -> list:
        return list(self.sizes)

    @property
    def smallest_pivot(self) -> torch.Tensor:
        return _usable_pivots(self.pivot_ranges).amin()

    def check(self) -> None:
        if not float(self.smallest_pivot) > 0.0:
            raise SingularSystemError(self._singular(_first_bad(self.pivot_ranges)))


# --------------------------------------------------------------------------
# Banded LU with partial pivoting (docs/ALGORITHM.md, "Banded LU with partial pivoting")
# --------------------------------------------------------------------------
#
# Step l factors the panel [D_l; S_l] (block-column l, block-rows l and l+1: nothing
# else is nonzero below D_l) with row pivoting, P_l [D_l; S_l] = [L_1; L_2] U_ll.  The
# rows of blocks l and l+1 in block-columns l+1 and l+2 (the second is the fill that
# pivoting brings, rows of block l+1 reaching column l+2) are permuted alike; L_1^{-1}
# of their top is block-row l of U there, and the bottom minus L_2 times that is the
# next step's top rows: its D_{l+1} and block-row l+1's entry in column l+2.
#
# Each step's rows l, l+1 in columns l, l+1, l+2 (2n x 3n) are one of two small work
# buffers, and every step is the same nine calls on views of preallocated storage: the
# copy of block-row l+1 of the band, the panel's LU (into column-major storage,
# LAPACK's) and a contiguous copy of its first n rows (which LAPACK's triangular solves
# then take without a copy of their own), its row order (the permutation matrix times
# 0..2n-1: a product, not an argmax; three calls), a row gather of the columns to its
# right, a triangular solve for block-row l of U, and the update written straight into
# the next step's rows.


@dataclass
class BandedLU(_Pivoted):
    """The factors of :func:`banded_lu`, stacked over the N steps.

    - ``lu`` (N, 2n, n): compact LU of panel l (``lu_factor`` layout: unit lower L
      below the diagonal, U_ll on and above it), column-major; ``top`` (N, n, n) its
      first n rows (L_1 and U_ll), contiguous column-major copies.
    - ``perm`` (N, 2n): the panel's row order, ``(P_l X)[i] = X[perm[i]]`` for the rows
      of blocks l and l+1.
    - ``right`` (N, n, 2n): block-row l of U in block-columns l+1 and l+2.
    - ``pivot_ranges`` (N, 2): (min, max) of |U_ii| of each panel.
    """

    lu: torch.Tensor
    top: torch.Tensor
    perm: torch.Tensor
    right: torch.Tensor
    pivot_ranges: torch.Tensor
    sizes: tuple

    def _singular(self, at: int) -> str:
        return f"the block-tridiagonal system is exactly singular (zero pivot in block {at + 1})"


def banded_lu(system: BlockTridiagonal, check: bool = True) -> BandedLU:
    """Factor a block-tridiagonal matrix by Gaussian elimination with partial pivoting.

    Pivoting is over the whole panel of each step (true partial pivoting: nothing else
    is nonzero below the diagonal block), so any nonsingular matrix factors.  Time
    O(N n^3), storage O(N n^2); per step nine calls on preallocated storage, no host
    synchronisation; ``check`` ends with :meth:`BandedLU.check` (one), else the caller
    checks ``smallest_pivot``.
    """
    N, n = system.num_blocks, system.size
    rows = system.rows
    kw = dict(device=rows.device)
    # Step l's rows l, l+1 in columns l, l+1, l+2 (2n x 3n), alternately in two buffers:
    # rows l+1 are block-row l+1 of the band as stored, rows l the previous update (the
    # fill, column l+2 of rows l, stays zero).
    work = rows.new_zeros(2, 2 * n, 3 * n)
    work[0, :n, :2 * n] = rows[0, :, n:]
    pivots, info = torch.empty(N, n, dtype=torch.int32, **kw), torch.empty(N, dtype=torch.int32, **kw)
    perm = torch.empty(N, 2 * n, dtype=torch.int64, **kw)
    lu, top = rows.new_empty(N, n, 2 * n).mT, rows.new_empty(N, n, n).mT  # column-major
    right = rows.new_empty(N, n, 2 * n)
    # Per-step temporaries, allocated once: the permutation matrix, its row order as
    # floats, the permuted columns.
    P, order, permuted = rows.new_empty(2 * n, 2 * n), rows.new_empty(2 * n), rows.new_empty(2 * n, 2 * n)
    count, unused = torch.arange(2 * n, dtype=rows.dtype, **kw), rows.new_empty(0)
    for l in range(N):
        step, following = work[l % 2], work[(l + 1) % 2]
        if l + 1 < N:
            step[n:] = rows[l + 1]
        else:
            step[n:].zero_()
        torch.linalg.lu_factor_ex(step[:, :n], out=(lu[l], pivots[l], info[l]))
        top[l].copy_(lu[l, :n])
        torch.lu_unpack(lu[l], pivots[l], unpack_data=False, out=(P, unused, unused))
        perm[l].copy_(torch.mv(P.mT, count, out=order))
        torch.index_select(step[:, n:], 0, perm[l], out=permuted)
        torch.linalg.solve_triangular(top[l], permuted[:n], upper=False, unitriangular=True,
                                      out=right[l])
        torch.addmm(permuted[n:], lu[l, n:], right[l], alpha=-1, out=following[:n, :2 * n])
    factor = BandedLU(lu, top, perm, right, _pivot_range(top, True), system.sizes)
    if check:
        factor.check()
    return factor


def banded_lu_solve(factor: BandedLU, rhs: torch.Tensor) -> torch.Tensor:
    """Solve with the factors of :func:`banded_lu`: rhs (N, n, k) -> x (N, n, k).

    Forward, each panel's permutation and unit lower factor; backward, block upper
    triangular with two super-diagonals.  O(N n^2 k), five calls per block.
    """
    N, n, k = rhs.shape
    c = rhs.new_zeros(N + 1, n, k)
    c[:N] = rhs
    for l in range(N):
        rows = c[l:l + 2].view(2 * n, k).index_select(0, factor.perm[l])
        torch.linalg.solve_triangular(factor.top[l], rows[:n], upper=False,
                                      unitriangular=True, out=c[l])
        torch.addmm(rows[n:], factor.lu[l, n:], c[l], alpha=-1, out=c[l + 1])
    x = rhs.new_zeros(N + 2, n, k)
    for l in reversed(range(N)):
        r = torch.addmm(c[l], factor.right[l], x[l + 1:l + 3].view(2 * n, k), alpha=-1)
        torch.linalg.solve_triangular(factor.top[l], r, upper=True, out=x[l])
    return x[:N]


# --------------------------------------------------------------------------
# Block cyclic reduction (docs/ALGORITHM.md, "Banded LU with partial pivoting")
# --------------------------------------------------------------------------
#
# For deep, narrow systems on GPUs: log2 N levels of batched calls instead of N
# sequential steps, but no pivoting across blocks (callers must check the solve and
# fall back to the banded LU).  A level of N = 2M + 1 blocks (a block of identity is
# appended when N is even) eliminates the M odd-indexed blocks o from their own rows,
# x_o = D_o^{-1} (b_o - S_{o-1} x_{o-1} - S_o^T x_{o+1}), leaving on the M + 1 even
# blocks the block-tridiagonal Schur complement
#
#     D_e' = D_e - S_e^T D_{e+1}^{-1} S_e - S_{e-1} D_{e-1}^{-1} S_{e-1}^T
#     S_e' = -S_{e+1} D_{e+1}^{-1} S_e            (block-row e+2, block-column e),
#
# symmetric, reduced in turn until two blocks remain, which are factored together.
# With L = S[0::2] (block (o, o-1)), R = S[1::2] (block (o+1, o)) and
# Y = D_o^{-1} [L, R^T], a level is: one batched LU of the D_o, one batched solve for Y,
# and three batched products, whatever N.
#
# Couplings are compact: S_e links only the first c rows ("head") of block e+1 with the
# last c columns ("tail") of block e (c = n, unless runs of blocks were merged: then
# head and tail are the runs' first and last original blocks).  The formulas keep that
# shape at every level: S_e' joins the head of e+2 to the tail of e, and the updates of
# D_e touch only its tail-by-tail and head-by-head corners, so a merged system costs the
# flops of its couplings, not of full blocks.


@dataclass
class ReductionLevel:
    """One level of cyclic reduction (N = 2M + 1 blocks, padding included).

    ``lu``, ``pivots`` (M, b, b), (M, b): LU factors of the odd blocks D_o.  ``left``
    (M, c, c): S_{o-1}, block (o, o-1) (head of o, tail of o-1); ``right`` (M, c, c):
    S_o, block (o+1, o).  ``solved`` (M, b, 2c): D_o^{-1} [left, right^T], the two placed
    in the head rows and the tail rows.  ``pad``: whether the next level's block count
    got an identity block appended.
    """

    lu: torch.Tensor
    pivots: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    solved: torch.Tensor
    pad: bool


@dataclass
class CyclicReductionFactor(_Pivoted):
    """The factors of :func:`cyclic_reduction`.

    ``levels``: finest first.  ``root``: LU factors (lu, pivots) of the last one or two
    blocks, factored as one dense matrix.  ``merge``: consecutive blocks of the input
    joined into one block of the reduction.  ``first_pad``: whether the
    (merged) input got an identity block appended to make its count odd.
    ``pivot_ranges`` (levels + 1, 2): (min, max) of |U_ii| per level, the root last.
    """

    levels: list
    root: tuple
    sizes: tuple
    merge: int
    first_pad: bool
    pivot_ranges: torch.Tensor

    def _singular(self, at: int) -> str:
        return (f"cyclic reduction met a zero (or non-finite) pivot (level {at + 1} of "
                f"{len(self.pivot_ranges)}): it pivots only within diagonal blocks; use the "
                "banded LU, whose pivoting across blocks does not need them invertible")


def _merge_runs(diag: torch.Tensor, sub: torch.Tensor, merge: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of ``merge`` consecutive blocks as single blocks of size merge * n (N a
    multiple of ``merge``), the compact n x n couplings between runs kept: O(merge)
    batched copies, whatever N."""
    k, n = merge, diag.shape[-1]
    merged = diag.new_zeros(diag.shape[0] // k, k * n, k * n)
    for j in range(k):
        rows = slice(j * n, (j + 1) * n)
        merged[:, rows, rows] = diag[j::k]
        if j + 1 < k:
            below = slice((j + 1) * n, (j + 2) * n)
            merged[:, below, rows] = sub[j::k]
            merged[:, rows, below] = sub[j::k].mT
    return merged, sub[k - 1::k]


def _with_identity_block(diag: torch.Tensor, sub: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoupled identity block appended (N -> N + 1)."""
    eye = torch.eye(diag.shape[-1], dtype=diag.dtype, device=diag.device)[None]
    return torch.cat([diag, eye]), torch.cat([sub, sub.new_zeros(1, *sub.shape[1:])])


def _reduce(diag: torch.Tensor, sub: torch.Tensor) -> tuple[ReductionLevel, torch.Tensor,
                                                             torch.Tensor]:
    """One level on N = 2M + 1 blocks of size b with c x c couplings: the level's factors
    and the even blocks' Schur complement (M + 1 blocks, an identity block appended when
    that count is even > 2)."""
    N, b, c = diag.shape[0], diag.shape[-1], sub.shape[-1]
    M = N // 2
    pad = (M + 1) % 2 == 0 and M + 1 > 2
    left, right = sub[0::2], sub[1::2]
    lu, pivots, _ = torch.linalg.lu_factor_ex(diag[1::2])
    couplings = diag.new_zeros(M, b, 2 * c)
    couplings[:, :c, :c] = left
    couplings[:, b - c:, c:] = right.mT
    solved = torch.linalg.lu_solve(lu, pivots, couplings).contiguous()
    new_diag = diag.new_empty(M + 1 + pad, b, b)
    new_sub = diag.new_empty(M + pad, c, c)
    new_diag[:M + 1] = diag[0::2]
    new_diag[:M, b - c:, b - c:].baddbmm_(left.mT, solved[:, :c, :c], alpha=-1)
    new_diag[1:M + 1, :c, :c].baddbmm_(right, solved[:, b - c:, c:], alpha=-1)
    torch.baddbmm(new_sub[:M], right, solved[:, b - c:, :c], beta=0, alpha=-1,
                  out=new_sub[:M])
    if pad:
        new_diag[M + 1] = torch.eye(b, dtype=diag.dtype, device=diag.device)
        new_sub[M].zero_()
    return ReductionLevel(lu, pivots, left, right, solved, pad), new_diag, new_sub


def cyclic_reduction(system: BlockTridiagonal, merge: int = 1,
                     check: bool = True) -> CyclicReductionFactor:
    """Factor a symmetric block-tridiagonal matrix by block cyclic reduction.

    ceil(log2 N) - 1 levels (N = blocks after merging), each a constant number of
    batched calls over all its blocks, then one dense LU of the last two blocks.
    ``merge`` > 1 first joins runs of that many consecutive blocks into one (``merge=2``
    for systems whose every other diagonal block may be singular, e.g. zero).  Cost about
    1.4 times the banded LU's flops on equal blocks, 1.8 times for ``merge=2`` (the
    couplings stay compact); storage O(N n^2).  No host synchronisation until the pivot
    check (``check``, one; else the caller checks ``smallest_pivot``).

    Pivoting is only within each diagonal block D_o, never across blocks: this is
    Gaussian elimination in odd-even order, stable for block diagonally dominant or
    definite matrices but not in general; it breaks down on a singular D_o even when
    the matrix is invertible (a zero pivot raises :class:`SingularSystemError`), and it
    can lose accuracy where :func:`banded_lu` does not: callers must check the solve.
    """
    if not (isinstance(merge, int) and merge >= 1):
        raise ValueError(f"merge must be an integer >= 1, got {merge!r}")
    diag, sub = system.diag, system.sub
    if merge > 1:
        while diag.shape[0] % merge:
            diag, sub = _with_identity_block(diag, sub)
        diag, sub = _merge_runs(diag, sub, merge)
    first_pad = diag.shape[0] > 2 and diag.shape[0] % 2 == 0
    if first_pad:
        diag, sub = _with_identity_block(diag, sub)
    levels, ranges = [], []
    while diag.shape[0] > 2:
        level, diag, sub = _reduce(diag, sub)
        levels.append(level)
        ranges.append(_pivot_range(level.lu))
    if diag.shape[0] == 2:
        b, c = diag.shape[-1], sub.shape[-1]
        root = diag.new_zeros(2 * b, 2 * b)
        root[:b, :b], root[b:, b:] = diag[0], diag[1]
        root[b:b + c, b - c:b] = sub[0]
        root[b - c:b, b:b + c] = sub[0].mT
    else:
        root = diag[0]
    lu, pivots, _ = torch.linalg.lu_factor_ex(root)
    ranges.append(_pivot_range(lu))
    factor = CyclicReductionFactor(levels, (lu, pivots), system.sizes, merge, first_pad,
                                   torch.stack(ranges))
    if check:
        factor.check()
    return factor


def cyclic_reduction_solve(factor: CyclicReductionFactor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve with the factors of :func:`cyclic_reduction`: rhs (N, n, k) -> x (N, n, k).

    Down the levels each eliminated block's ``y_o = D_o^{-1} b_o`` updates its
    neighbours' right-hand sides (tail rows of the left one, head rows of the right
    one); the root is solved; up the levels ``x_o = y_o - solved [x_{o-1}[tail];
    x_{o+1}[head]]``.  O(N n^2 k), a constant number of batched calls per level.
    """
    N, n, k = rhs.shape
    b = rhs
    if factor.merge > 1:
        extra = -N % factor.merge
        if extra:
            b = torch.cat([b, b.new_zeros(extra, n, k)])
        b = b.reshape(-1, factor.merge * n, k)
    if factor.first_pad:
        b = torch.cat([b, b.new_zeros(1, *b.shape[1:])])
    m, ys = b.shape[1], []
    for level in factor.levels:
        M, c = level.lu.shape[0], level.left.shape[-1]
        y = torch.linalg.lu_solve(level.lu, level.pivots, b[1::2])
        coarse = b.new_empty(M + 1 + level.pad, m, k)
        coarse[:M + 1] = b[0::2]
        coarse[:M, m - c:].baddbmm_(level.left.mT, y[:, :c], alpha=-1)
        coarse[1:M + 1, :c].baddbmm_(level.right, y[:, m - c:], alpha=-1)
        if level.pad:
            coarse[M + 1].zero_()
        ys.append(y)
        b = coarse
    x = torch.linalg.lu_solve(*factor.root, b.reshape(-1, k)).reshape(b.shape).contiguous()
    for level, y in zip(reversed(factor.levels), reversed(ys)):
        M, c = level.lu.shape[0], level.left.shape[-1]
        # [x_{o-1}[tail]; x_{o+1}[head]] for every odd o: the tail of one even block and the
        # head of the next are adjacent rows, so these are overlapping windows (a view).
        windows = x.as_strided((M, 2 * c, k), (m * k, k, 1), x.storage_offset() + (m - c) * k)
        finer = x.new_empty(2 * M + 1, m, k)
        finer[0::2] = x[:M + 1]
        torch.baddbmm(y, level.solved, windows, alpha=-1, out=finer[1::2])
        x = finer
    if factor.first_pad:
        x = x[:-1]
    return x.reshape(-1, rhs.shape[1], k)[:N]


def solve(factor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve with either factorisation: rhs (N, n, k) -> x (N, n, k)."""
    if isinstance(factor, CyclicReductionFactor):
        return cyclic_reduction_solve(factor, rhs)
    return banded_lu_solve(factor, rhs)


# --------------------------------------------------------------------------
# Equilibration and the condition estimate
# --------------------------------------------------------------------------


def equilibrate(system: BlockTridiagonal, inplace: bool = False
                ) -> tuple[BlockTridiagonal, torch.Tensor]:
    """Symmetric diagonal scaling ``S A S``, s_i = 1 / sqrt(max_j |A_ij|) (one sweep of
    LAPACK's syequb idea); returns the scaled system (``system`` itself, scaled, if
    ``inplace``) and the scales (N, n), 1 on the padding.  A constant number of batched
    calls.
    """
    row_max = torch.linalg.vector_norm(system.rows, math.inf, dim=-1)
    scales = torch.where(row_max > 0, row_max, 1.0).rsqrt()
    if not inplace:
        system = BlockTridiagonal(system.rows.clone(), system.sizes)
    system.rows.mul_(scales.unsqueeze(-1)).mul_(_windows(scales.unsqueeze(-1)).mT)
    return system, scales


def reciprocal_condition(system: BlockTridiagonal, factor, iterations: int = 5) -> float:
    """Estimate 1 / cond_1 of a symmetric system from its factors (Hager-Higham, LAPACK
    gecon): at most ``iterations`` pairs of solves ``y = A^{-1} e``, ``z = A^{-1} sign(y)``
    give a lower bound on ||A^{-1}||_1, usually within a factor of 3 (A^{-T} = A^{-1}).
    One host synchronisation per pair.  0.0 when a solve is not finite.
    """
    mask = system.mask().unsqueeze(-1).to(system.diag.dtype)
    x = mask / mask.sum()
    estimate = 0.0
    for it in range(iterations):
        y = solve(factor, x)
        z = solve(factor, torch.sign(y))
        j = z.abs().reshape(-1).argmax()
        stats = torch.stack([torch.isfinite(y).all().to(y.dtype), y.abs().sum(),
                             z.reshape(-1)[j].abs(), (z * x).sum()]).tolist()
        if not stats[0]:
            return 0.0
        estimate = stats[1]
        if it > 0 and stats[2] <= stats[3]:
            break
        x = torch.zeros_like(x)
        x.view(-1)[j] = 1.0
    norm = float(system.norm1())
    return 1.0 / (norm * estimate) if estimate > 0 else 0.0

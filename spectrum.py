"""Exact spectral analysis of the curvature of a deep network, linear in depth.

For B the Hessian or the Gauss-Newton matrix of a tracked chain's loss
(:func:`hessian_inverse.hessian_operator`), the core's layer-wise LDL^T
``B + delta I = L^T diag(P_l) L`` (:class:`hessian_inverse.RiccatiFactor`,
docs/ALGORITHM.md, "Layer-wise LDL^T") gives, at about the cost of one
factorisation each and without any n x n matrix (n = all parameters):

- :func:`slogdet`: sign and log|det| of ``B + damping I`` (the Laplace evidence);
- :func:`count_eigenvalues`: how many eigenvalues lie below any threshold, and
  :func:`inertia`: how many are negative, zero and positive (the Morse index),
  by Sylvester's law of inertia on Bunch-Kaufman factors of the P_l;
- :func:`eigvalsh`: any eigenvalues, by index or interval, by bisection on counts;
- :func:`spectral_density`: the exact histogram of all n eigenvalues;
- :func:`inverse_diagonal`: diag((B + damping I)^{-1}) by a forward covariance sweep;
- :func:`sample`: exact draws from N(0, (B + damping I)^{-1}), the Laplace posterior.

Every function takes ``(model, loss, ...)`` like the core's entry points and
``curvature='hessian'`` or ``'ggn'``; :class:`Spectrum` holds one operator for
many queries.  Counts and determinants are computed in float64 whatever the
model's dtype (the blocks are computed in the model's dtype, then cast).
Derivations: docs/ALGORITHM.md, "Spectrum"; usage: docs/spectrum.md.  This
module uses the core; the core never uses it.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch

import hessian_inverse as hi
from hessian_inverse import (EliminationError, HessianInverseError, HessianOperator,
                             InaccurateSolveError, RiccatiFactor, SingularHessianError)

__all__ = ["Spectrum", "slogdet", "count_eigenvalues", "inertia", "eigvalsh",
           "spectral_density", "inverse_diagonal", "sample", "ROUNDING", "ZERO_TOLERANCE"]

F64 = torch.float64

#: The first step, relative to ||B||, by which a threshold is moved down where a pivot
#: block P_l is singular to working precision (docs/spectrum.md, "Accuracy"); the steps
#: double up to ``2**12 * ROUNDING`` (1e-6 ||B||).
ROUNDING = 2.0 ** -32
#: How many doublings of the step are tried.
MOVES = 12
#: :meth:`Spectrum.inverse_diagonal` refuses unless this many times the largest relative
#: error on its checked entries is within ``rtol``.
CHECK_MARGIN = 10.0
#: A pivot block with entries above ``GROWTH * ||B||`` has grown (see Spectrum.merge).
GROWTH = 1e4
#: Largest pivot block (parameters) formed by merging layers whose pivots cannot be
#: taken apart (stored densely: its square).
MERGE_LIMIT = 1024
#: :func:`inertia`'s default ``tol``, relative to ||B||: eigenvalues within it of the
#: shift count as zero (docs/spectrum.md, "Accuracy": nearer the shift, the recursion's
#: growth at rank-deficient inputs costs merges and moved thresholds).
ZERO_TOLERANCE = 1e-6


class Spectrum:
    """The spectral quantities of one operator's B (the Hessian or the GGN).

    ``operator``: a :class:`hessian_inverse.HessianOperator` (its blocks are cast to
    float64 here).  Build it from a model with :meth:`of`.  Every query factors
    ``B + delta I`` afresh (O(sum_l (a_l^3 + a_l p_l)) time, linear in depth); only
    the norm estimate is cached.
    """

    def __init__(self, operator: HessianOperator):
        self.dtype = operator.dtype
        self.operator = operator.to(F64)
        self.num_params = operator.num_params
        self._norm: Optional[float] = None
        #: the blocks the counts factor: the operator's, with layers merged where needed
        self.derivs = list(self.operator.derivs)
        # Refused here, before any work: blocks the recursion cannot take.
        RiccatiFactor.check_blocks(self.operator.derivs)
        hi.check_memory(hi.LayerSizes.of_derivatives(self.operator.derivs), "riccati",
                        "factorization", F64, self.operator.device, operator.memory_limit)

    @classmethod
    def of(cls, model: hi.TrackedChain, loss: Optional[torch.Tensor] = None,
           curvature: str = "hessian", memory_limit: Optional[int] = None) -> "Spectrum":
        """The spectrum of the curvature of ``model``'s last tracked loss."""
        return cls(hi.hessian_operator(model, loss, memory_limit=memory_limit,
                                       curvature=curvature))

    # ---------------------------------------------------------------- scale

    @property
    def norm(self) -> float:
        """An estimate of ||B||_2 from below: 8 steps of power iteration (cached)."""
        if self._norm is None:
            op = self.operator
            generator = torch.Generator(device=op.device).manual_seed(0)
            q = torch.randn(op.num_params, dtype=F64, device=op.device, generator=generator)
            norm = 0.0
            with torch.no_grad():
                for _ in range(8):
                    q = op.matmul(q / q.norm())
                    norm = float(q.norm())
                    if norm == 0.0:
                        break
            self._norm = norm
        return self._norm

    @property
    def rounding(self) -> float:
        """The counts' rounding tolerance ``ROUNDING * ||B||`` (absolute)."""
        return ROUNDING * max(self.norm, torch.finfo(F64).tiny)

    # ---------------------------------------------------------------- counting

    def factor(self, delta: float, kind: str = "ldl", gauge: bool = False) -> RiccatiFactor:
        """``B + delta I`` (``+ N N^T`` with ``gauge``) factored layer by layer, on the
        operator's blocks (kinds 'lu', 'cholesky': for solves) or on :attr:`derivs`
        (kind 'ldl': the counts' blocks, layers merged where needed)."""
        derivs = self.derivs if kind == "ldl" else self.operator.derivs
        return RiccatiFactor(derivs, delta, kind, self.operator.gauge if gauge else None)

    def merge(self, factor: RiccatiFactor) -> bool:
        """Where the highest layer whose pivot broke down has grown (entries of its P_l
        above ``GROWTH * ||B||``: a nearly singular pivot above, coupled to it), merge it
        with its neighbour above (the loss layer with the one below) into one dense
        layer, within ``MERGE_LIMIT`` parameters; whether it did.  A pivot that broke
        down without growth means a threshold near an eigenvalue: nothing to merge."""
        layer = int(factor.broken.nonzero()[-1])
        group, g = factor.pivot(layer)
        if not (group.P[g].numel() and group.P[g].abs().max() > GROWTH * self.norm):
            return False
        lower = layer if layer + 1 < len(self.derivs) else layer - 1
        if lower < 0:
            return False
        a, b = self.derivs[lower], self.derivs[lower + 1]
        if a.num_params + b.num_params > MERGE_LIMIT:
            return False
        self.derivs[lower:lower + 2] = [merge_layers(a, b)]
        return True

    def shifted(self, shift: float) -> tuple[RiccatiFactor, float]:
        """Bunch-Kaufman pivots of ``B - s I`` with no pivot block singular to working
        precision, for the first s of: the ``shift``, then s = shift - 2^k
        :attr:`rounding` for k = 0..2; then the same after merging the layer that broke
        down with its neighbour (:meth:`merge`, repeated while it can); then k = 3..MOVES.
        Returns the factor and s."""
        def first_ok(moves):
            for k in moves:
                s = shift if k is None else shift - 2.0 ** k * self.rounding
                factor = self.factor(-s)
                if factor.ok:
                    return factor, s
            return factor, None

        factor, used = first_ok((None, 0, 1, 2))
        while used is None and self.merge(factor):
            factor, used = first_ok((None, 0, 1, 2))
        if used is None:
            factor, used = first_ok(range(3, MOVES + 1))
        if used is None:
            layer = int(factor.broken.nonzero()[-1]) + 1
            raise EliminationError(
                f"layer {layer}: a pivot block P_l of B - s I is singular to working "
                f"precision at s = {shift:.17g} and at every threshold down to "
                f"{shift - 2.0 ** MOVES * self.rounding:.17g}; move the threshold")
        return factor, used

    def count_below(self, below: float) -> tuple[int, float]:
        """(number of eigenvalues of B strictly below s, s), s as in :meth:`shifted`."""
        factor, used = self.shifted(float(below))
        return int((factor.values() < 0).sum()), used

    def count(self, below) -> "int | torch.Tensor":
        """Eigenvalues strictly below ``below`` (a float, or a 1-D tensor of thresholds:
        a LongTensor of counts); a threshold that had to move is warned about."""
        values = torch.as_tensor(below, dtype=F64)
        if values.dim() > 1 or not torch.isfinite(values).all():
            raise HessianInverseError(
                f"below must be a finite number or a 1-D tensor of them, got {below!r}")
        counts, moved = [], []
        for value in values.reshape(-1).tolist():
            count, used = self.count_below(value)
            counts.append(count)
            if used != value:
                moved.append((value, used))
        if moved:
            warnings.warn(
                "a pivot block was singular at the threshold " + ", ".join(
                    f"{a:.6g} (counted below {b:.17g})" for a, b in moved)
                + "; eigenvalues between the two are not counted", RuntimeWarning, stacklevel=3)
        if values.dim() == 0:
            return counts[0]
        return torch.tensor(counts, dtype=torch.long)

    def inertia(self, shift: float = 0.0, tol: Optional[float] = None) -> tuple[int, int, int]:
        """(negative, zero, positive) eigenvalue counts of ``B - shift I``, zero meaning
        within ``tol`` (default ``ZERO_TOLERANCE * ||B||``) of the shift: two counts,
        at ``shift - tol`` and ``shift + tol``."""
        tol = ZERO_TOLERANCE * self.norm if tol is None else float(tol)
        if not (math.isfinite(tol) and tol >= 0) or not math.isfinite(shift):
            raise HessianInverseError(f"shift and tol must be finite, tol >= 0; got {shift!r}, "
                                      f"{tol!r}")
        below, low = self.count_below(shift - tol)
        up_to, high = self.count_below(shift + tol) if tol > 0 else (below, low)
        if (low, high) != (shift - tol, shift + tol):
            warnings.warn(f"inertia: a pivot block was singular at a threshold; zero means in "
                          f"[{low:.17g}, {high:.17g})", RuntimeWarning, stacklevel=2)
        return below, up_to - below, self.num_params - up_to

    # ---------------------------------------------------------------- determinant

    def slogdet(self, damping: float = 0.0, atol: float = 1e-6
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sign, log|det|) of ``B + damping I`` as float64 tensors (0 and -inf if singular).

        Where a pivot block is singular at ``damping`` even after merging layers
        (:meth:`merge`), the two neighbours damping +- t, t = :attr:`rounding`, decide: a
        different count of negative eigenvalues means an eigenvalue within t of -damping
        (singular: 0, -inf); otherwise log|det| is their mean (second order in t: error
        ``t^2 tr(M^{-2}) / 2``).  The accuracy contract:
        :func:`rounding_estimate`, a first-order bound on the rounding error of log|det|,
        must be at most ``atol``, else :class:`InaccurateSolveError`."""
        damping = _finite(damping, "damping")
        factor = self.factor(damping)
        while not factor.ok and self.merge(factor):
            factor = self.factor(damping)
        if factor.ok:
            factors = [factor]
        else:
            t = self.rounding
            factors = [self.factor(damping - t), self.factor(damping + t)]
            if not all(f.ok for f in factors):
                raise EliminationError(
                    f"a pivot block of B + damping I is singular at damping {damping:g} and "
                    f"at damping +- {t:.2e}; use another damping")
            if len({int((f.values() < 0).sum()) for f in factors}) > 1:
                return torch.tensor(0.0, dtype=F64), torch.tensor(-math.inf, dtype=F64)
        error = max(rounding_estimate(f) for f in factors)
        if not error <= atol:
            raise InaccurateSolveError(
                f"slogdet: the rounding error of log|det(B + {damping:g} I)| may reach "
                f"{error:.1e} > atol {atol:.0e} (pivots small against the terms summed into "
                "them: the layer-wise factorisation grew); use a larger damping, or a larger "
                "atol")
        signs, logs = zip(*(_sign_and_log(f.values()) for f in factors))
        return signs[0], sum(logs) / len(logs)

    # ---------------------------------------------------------------- eigenvalues

    def bracket(self) -> tuple[float, float]:
        """(lo, hi) with every eigenvalue in [lo, hi), verified by two counts; not
        centred on 0, so that bisection's first threshold misses the zero eigenvalues."""
        radius = 1.25 * self.norm + torch.finfo(F64).tiny
        for _ in range(60):
            lo, hi = -radius, 1.0625 * radius
            if self.count_below(lo)[0] == 0 and self.count_below(hi)[0] == self.num_params:
                return lo, hi
            radius *= 2
        raise SingularHessianError("no finite interval holds every eigenvalue of B "
                                   "(are the blocks finite?)")

    def eigvalsh(self, subset_by_index: Optional[Sequence[int]] = None,
                 subset_by_value: Optional[Sequence[float]] = None,
                 rtol: float = 1e-10) -> torch.Tensor:
        """Eigenvalues of B, ascending, selected as ``scipy.linalg.eigvalsh`` selects them,
        each within ``rtol * ||B||`` (bisection on counts: every count is shared by all
        the eigenvalues it separates)."""
        if subset_by_index is not None and subset_by_value is not None:
            raise HessianInverseError("give subset_by_index or subset_by_value, not both")
        if not (rtol > 0 and math.isfinite(rtol)):
            raise HessianInverseError(f"rtol must be a positive number, got {rtol!r}")
        n = self.num_params
        lo, hi = self.bracket()
        count_lo, count_hi = 0, n
        if subset_by_value is not None:
            a, b = (_finite(x, "subset_by_value") for x in subset_by_value)
            if not a < b:
                raise HessianInverseError(f"subset_by_value must be (a, b) with a < b, "
                                          f"got {subset_by_value!r}")
            first, _ = self.count_below(a) if a > lo else (0, None)
            last, _ = self.count_below(b) if b < hi else (n, None)
            wanted = range(first, last)
            lo, hi = max(lo, a), min(hi, b)
            count_lo, count_hi = first, last
        elif subset_by_index is not None:
            first, last = (int(i) for i in subset_by_index)
            if not 0 <= first <= last < n:
                raise HessianInverseError(
                    f"subset_by_index must be (lo, hi) with 0 <= lo <= hi < n = {n}, got "
                    f"{subset_by_index!r}")
            wanted = range(first, last + 1)
        else:
            wanted = range(n)
        width = 2 * rtol * self.norm
        values = torch.empty(len(wanted), dtype=F64)
        # (lo, hi, count below lo, count below hi): the eigenvalues count_lo..count_hi - 1
        stack = [(lo, hi, count_lo, count_hi)]
        while stack:
            a, b, ca, cb = stack.pop()
            keep = range(max(ca, wanted.start), min(cb, wanted.stop))
            if not len(keep):
                continue
            middle = (a + b) / 2
            if b - a <= width or not a < middle < b:
                values[keep.start - wanted.start:keep.stop - wanted.start] = middle
                continue
            cm, used = self.count_below(middle)
            if not a < used:       # moved below a: this interval cannot be split further
                values[keep.start - wanted.start:keep.stop - wanted.start] = middle
                continue
            cm = min(max(cm, ca), cb)
            stack += [(used, b, cm, cb), (a, used, ca, cm)]
        return values

    def density(self, edges) -> torch.Tensor:
        """Eigenvalues in each ``[edges[i], edges[i+1])``: one count per edge (LongTensor)."""
        edges = torch.as_tensor(edges, dtype=F64)
        if edges.dim() != 1 or edges.numel() < 2 or not torch.isfinite(edges).all() or not (
                edges[1:] > edges[:-1]).all():
            raise HessianInverseError("edges must be a 1-D increasing sequence of at least 2 "
                                      "finite numbers")
        counts = self.count(edges)
        return counts[1:] - counts[:-1]

    # ---------------------------------------------------------------- second moments

    def inverse_diagonal(self, damping: float, rtol: float = 1e-6, checks: int = 16
                         ) -> torch.Tensor:
        """diag((B + damping I)^{-1}) (n,), in ``model.parameters()`` order and the model's
        dtype; diag(B^+) at damping 0 with a softmax gauge (``(B + N N^T)^{-1} = B^+ + N N^T``
        when the null space is exactly the gauge).

        The forward covariance sweep (:func:`covariance_diagonal`) on the layer-wise factor
        of the core's ``path='riccati'`` solver.  The accuracy contract: ``checks`` entries
        (half where the sweep's two terms cancel most, half at random) are compared with
        refined solves ``(B + damping I)^{-1} e_i`` (the core's accuracy contract; a pivoted
        route if the layer-wise one misses it); ``CHECK_MARGIN`` times their largest
        relative difference must be at most ``rtol`` (the unchecked entries' errors were
        within that margin of the checked ones' on every tested chain), else
        :class:`InaccurateSolveError` with the figure."""
        damping = hi._check_damping(damping)
        op = self.operator
        try:
            inverse = hi.HessianInverse(op, damping, path="riccati", probe=False,
                                        factor_dtype=None)
        except SingularHessianError as err:
            raise SingularHessianError(f"inverse_diagonal: {err}") from None
        factor = inverse.solver.factor
        parts = covariance_diagonal(factor)
        diagonal = torch.cat([own + gain for own, gain in parts])
        if inverse.gauge is not None:
            N = inverse.gauge
            diagonal[-N.shape[0]:] -= N.square().sum(1)
        if checks and not CHECK_MARGIN * self._factor_error(inverse, factor) <= rtol:
            own = torch.cat([own for own, _ in parts])
            cancellation = (own.abs() + (diagonal - own).abs()) / diagonal.abs()
            error = self._check_entries(inverse, diagonal, cancellation, checks)
            if not CHECK_MARGIN * error <= rtol:
                raise InaccurateSolveError(
                    f"inverse_diagonal: relative error {error:.1e} on checked entries, times "
                    f"the margin {CHECK_MARGIN:g}, > rtol {rtol:.0e} (B + {damping:g} I is too "
                    "ill-conditioned for the layer-wise "
                    "factorisation, which does not pivot across layers); use a larger damping, "
                    "or a larger rtol")
        return diagonal.to(self.dtype)

    def _factor_error(self, inverse: "hi.HessianInverse", factor: RiccatiFactor,
                      probes: int = 4) -> float:
        """||F^{-1} (M - F)||_F estimated from ``probes`` Rademacher vectors z, F the
        factored matrix: rms of ``F^{-1}(z - M F^{-1} z)``.  It bounds the relative error
        of every diag(F^{-1}) entry when M is positive definite (that error is at most the
        spectral radius of F^{-1}(M - F))."""
        op = self.operator
        generator = torch.Generator(device=op.device).manual_seed(2)
        z = torch.randint(0, 2, (op.num_params, probes), generator=generator,
                          device=op.device).to(F64) * 2 - 1
        with torch.no_grad():
            residual = z - inverse._apply(torch.cat(factor.solve(op.split(z, "z"))))
        correction = torch.cat(factor.solve(op.split(residual, "residual")))
        return float(correction.square().sum(0).mean().sqrt())

    def _check_entries(self, inverse: "hi.HessianInverse", diagonal: torch.Tensor,
                       cancellation: torch.Tensor, checks: int) -> float:
        """Largest relative difference between ``diagonal`` and refined solves on
        ``checks`` entries (the most cancelled and random ones)."""
        n = self.num_params
        generator = torch.Generator().manual_seed(3)
        worst = cancellation.nan_to_num(math.inf).topk(min(n, (checks + 1) // 2)).indices.cpu()
        rest = torch.randperm(n, generator=generator)[:checks]
        index = torch.cat([worst, rest[~torch.isin(rest, worst)]])[:checks].to(diagonal.device)
        units = torch.zeros(n, len(index), dtype=F64, device=diagonal.device)
        units[index, torch.arange(len(index), device=diagonal.device)] = 1.0
        try:
            columns = inverse.solve(units)
        except (InaccurateSolveError, SingularHessianError):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                columns = hi.HessianInverse(self.operator, inverse.damping).solve(units)
        exact = columns[index, torch.arange(len(index), device=diagonal.device)]
        return float(((diagonal[index] - exact).abs() / exact.abs()).max())

    def sample(self, damping: float, num_samples: int = 1,
               generator: Optional[torch.Generator] = None,
               noise: Optional[torch.Tensor] = None, rtol: float = 1e-8) -> torch.Tensor:
        """Draws (num_samples, n) from N(0, (B + damping I)^{-1}): ``x = L^{-1} w``, w_l of
        covariance P_l^{-1} (docs/ALGORITHM.md, "Sampling"), in the model's dtype.
        ``noise`` (num_samples, n) standard normal, if given, is used instead of drawing it
        (the map x = S noise, S S^T = (B + damping I)^{-1}, is linear).

        The accuracy contract: the draws satisfy ``X^T (B + damping I) X = E^T E`` (E the
        noise) to ``rtol`` relative (one exact product per sample), else
        :class:`InaccurateSolveError`."""
        damping = hi._check_damping(damping)
        op = self.operator
        factor = self.factor(damping, "cholesky")
        if not factor.ok:
            layer = int(factor.broken.nonzero()[-1]) + 1
            raise SingularHessianError(
                f"B + {damping:g} I is not positive definite (layer {layer}'s pivot block "
                "failed its Cholesky factorisation), so N(0, (B + damping I)^{-1}) does not "
                "exist; use curvature='ggn' with damping > 0, or a larger damping")
        if noise is None:
            if int(num_samples) < 1:
                raise HessianInverseError(f"num_samples must be >= 1, got {num_samples!r}")
            noise = torch.randn(op.num_params, int(num_samples), generator=generator,
                                dtype=F64, device=op.device).T
        elif noise.dim() != 2 or noise.shape[1] != op.num_params:
            raise HessianInverseError(f"noise must be (num_samples, {op.num_params}), got "
                                      f"{tuple(noise.shape)}")
        E = noise.to(F64).T.contiguous()
        blocks = op.split(E, "noise")
        W = [group.inverse_root(torch.stack([blocks[l] for l in run]))
             for run, group in zip(factor.runs, factor.groups)]
        X = torch.cat([x.flatten(0, 1) for x in factor.substitute(W)])
        with torch.no_grad():
            gram = X.T @ (op.matmul(X) + damping * X)
        reference = E.T @ E
        error = float((gram - reference).norm() / reference.norm())
        if not error <= rtol:
            raise InaccurateSolveError(
                f"sample: the draws X miss X^T (B + {damping:g} I) X = E^T E by {error:.1e} "
                f"relative > rtol {rtol:.0e} (the layer-wise factorisation lost accuracy); use "
                "a larger damping, or a larger rtol")
        return X.T.to(self.dtype)


def covariance_diagonal(factor: RiccatiFactor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """diag(M^{-1}) per layer as its two terms (diag(P_l^{-1}), diag(K_l S_{l-1} K_l^T)),
    each (p_l,), from M = L^T diag(P_l) L: the covariance of the
    forward sweep x = L^{-1} w with w_l of covariance P_l^{-1}.  ``S_l = Cov(t_l)``:

        S_l = Phi_l S_{l-1} Phi_l^T + J_l P_l^{-1} J_l^T,
        diag(M^{-1})_l = diag(P_l^{-1}) + diag(K_l S_{l-1} K_l^T).

    Only the S sweep is sequential (two a x a products per layer); the rest is batched
    over runs of same-shape layers.
    """
    runs, groups = factor.runs, factor.groups
    num_layers = factor.num_layers
    phi = factor.transfers()
    own, tangent = [], [None] * num_layers
    for run, group in zip(runs, groups):
        diagonal, covariance = group.second_moments()
        own.append(diagonal)
        tangent[run[0]:run[-1] + 1] = covariance.unbind()
    S: list = [None] * num_layers                 # S[l] = Cov(t_l)
    for l in range(num_layers - 1):
        S[l] = tangent[l] if l == 0 else torch.addmm(tangent[l], phi[l] @ S[l - 1], phi[l].T)
    out = []
    for run, group, diagonal in zip(runs, groups, own):
        gain = (group.gain_quadratic(torch.stack([S[l - 1] for l in run]))
                if group.K is not None else torch.zeros_like(diagonal))
        out += list(zip(diagonal.unbind(), gain.unbind()))
    return out


def _dense(d) -> hi.LayerDerivatives:
    return d.densify() if isinstance(d, hi.AffineLayerBlocks) else d


def merge_layers(lower, upper) -> hi.LayerDerivatives:
    """Layers l and l + 1 as one layer with parameters [x_l; x_{l+1}] (dense blocks):
    ``t_{l+1} = J_{l+1} x_{l+1} + F_{l+1} (J_l x_l + F_l t_{l-1})`` and the two layers'
    second-order terms with t_l substituted.  The matrix B is the same, partitioned
    more coarsely, so its pivot block holds couplings the two could not pivot apart."""
    a, b = _dense(lower), _dense(upper)
    FJ = b.F @ a.J
    J = torch.cat([FJ, b.J], dim=1)
    CJ = b.C @ a.J
    A = torch.cat([torch.cat([a.A + a.J.T @ b.G @ a.J, CJ.T], dim=1),
                   torch.cat([CJ, b.A], dim=1)], dim=0)
    if a.F is None:
        return hi.LayerDerivatives(J=J, A=A)
    C = torch.cat([a.C + a.J.T @ b.G @ a.F, b.C @ a.F], dim=0)
    return hi.LayerDerivatives(J=J, A=A, F=b.F @ a.F, C=C, G=a.G + a.F.T @ b.G @ a.F)


def rounding_estimate(factor: RiccatiFactor) -> float:
    """First-order bound on the rounding error of log|det| from a factor with
    eigenvalue-revealing pivots: ``sum_l sum_k u S_l / |d_lk|``, d_lk the pivots of P_l and
    S_l the largest entry of any P_m, m >= l (the recursion carries its rounding down
    from the loss).  The Y_perp pivots are exact (closed form) and not counted."""
    scales = torch.cat([group.P.abs().amax(dim=(-2, -1)) if group.P.numel() else
                        group.P.new_zeros(group.P.shape[0]) for group in factor.groups])
    carried = scales.flip(0).cummax(0).values.flip(0)
    u = torch.finfo(F64).eps / 2
    total, start = 0.0, 0
    for group in factor.groups:
        values = group.factor.values()
        count = values.shape[0]
        total += float((u * carried[start:start + count, None] / values.abs()).sum())
        start += count
    return total


def _sign_and_log(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sign and log|.| of the product of ``values`` (float64), as torch.linalg.slogdet."""
    sign = torch.prod(values.sign())
    if sign == 0:
        return torch.tensor(0.0, dtype=F64), torch.tensor(-math.inf, dtype=F64)
    return sign.to(F64), values.abs().log().sum().to(F64)


def _finite(value, name: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise HessianInverseError(f"{name} must be a finite number, got {value!r}")
    return value


# --------------------------------------------------------------------------
# Entry points: (model, loss, ...) like the core's
# --------------------------------------------------------------------------


def slogdet(model: hi.TrackedChain, loss: Optional[torch.Tensor], damping: float = 0.0,
            curvature: str = "hessian", atol: float = 1e-6
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sign, log|det|) of ``B + damping I`` (float64 tensors, the convention of
    ``torch.linalg.slogdet``: sign 0 and log|det| -inf when singular).  B is the Hessian
    (``curvature='hessian'``) or the GGN (``'ggn'``) of the model's last tracked loss.
    Raises :class:`InaccurateSolveError` where the rounding bound exceeds ``atol``."""
    return Spectrum.of(model, loss, curvature).slogdet(damping, atol)


def count_eigenvalues(model: hi.TrackedChain, loss: Optional[torch.Tensor], below,
                      curvature: str = "hessian") -> "int | torch.Tensor":
    """The number of eigenvalues of B strictly below ``below`` (a float: an int; a 1-D
    tensor of thresholds: a LongTensor).  Exact whenever ``below`` is farther than
    ``ROUNDING * ||B||`` from every eigenvalue."""
    return Spectrum.of(model, loss, curvature).count(below)


def inertia(model: hi.TrackedChain, loss: Optional[torch.Tensor], shift: float = 0.0,
            curvature: str = "hessian", tol: Optional[float] = None) -> tuple[int, int, int]:
    """(negative, zero, positive) counts of the eigenvalues of ``B - shift I``, zero
    meaning within ``tol`` (default ``ZERO_TOLERANCE * ||B||``, ||B|| by power iteration).
    At shift 0 ``negative`` is the Morse index; the softmax gauge's and rank-deficient
    inputs' null directions are counted in ``zero``."""
    return Spectrum.of(model, loss, curvature).inertia(shift, tol)


def eigvalsh(model: hi.TrackedChain, loss: Optional[torch.Tensor],
             subset_by_index: Optional[Sequence[int]] = None,
             subset_by_value: Optional[Sequence[float]] = None, curvature: str = "hessian",
             rtol: float = 1e-10) -> torch.Tensor:
    """Eigenvalues of B (float64, ascending), selected as ``scipy.linalg.eigvalsh`` does:
    ``subset_by_index=(lo, hi)`` inclusive, ``subset_by_value=(a, b)`` half-open (a, b];
    each within ``rtol * ||B||``, by bisection on exact counts."""
    return Spectrum.of(model, loss, curvature).eigvalsh(subset_by_index, subset_by_value, rtol)


def spectral_density(model: hi.TrackedChain, loss: Optional[torch.Tensor], edges,
                     curvature: str = "hessian") -> torch.Tensor:
    """The exact histogram of the eigenvalues of B: counts in ``[edges[i], edges[i+1])``
    (LongTensor of len(edges) - 1; sums to n when the edges span the spectrum)."""
    return Spectrum.of(model, loss, curvature).density(edges)


def inverse_diagonal(model: hi.TrackedChain, loss: Optional[torch.Tensor], damping: float,
                     curvature: str = "hessian", rtol: float = 1e-6) -> torch.Tensor:
    """diag((B + damping I)^{-1}) (n,) in ``model.parameters()`` order, in the model's
    dtype, without n solves (diag(B^+) at damping 0 with a softmax gauge); raises
    :class:`InaccurateSolveError` where checked entries miss ``rtol``."""
    return Spectrum.of(model, loss, curvature).inverse_diagonal(damping, rtol)


def sample(model: hi.TrackedChain, loss: Optional[torch.Tensor], damping: float,
           num_samples: int = 1, curvature: str = "ggn",
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Exact draws (num_samples, n) from N(0, (B + damping I)^{-1}), B + damping I
    positive definite (the Laplace posterior of a Gaussian prior of precision damping)."""
    return Spectrum.of(model, loss, curvature).sample(damping, num_samples, generator)

"""Benchmark: exact (B + eps I)^{-1} v (B the Hessian or the Gauss-Newton matrix) against
the yardsticks, every route side by side, in one run.

Sections (each a markdown table on stdout):

  routes    On one problem (L=128, width 16, batch 8 in the full run): every route of
            ours (path 'auto', 'riccati', 'structured' with the banded LU, with float32
            factors and with cyclic reduction, 'generic'; the GGN's 'auto', 'output',
            'riccati', 'structured'), each split into derivatives / factorisation / solve
            and timed as one one-shot ``hessian_inverse_vector_product`` call, against the
            fastest exact Hessian-vector product (plain autograd double backward, forward
            included) and torch.func's ``jvp(grad)``; kernels and host synchronisations per
            call; beside them MINRES on autograd products, the dense route where it fits,
            and the paper author's method (an unpivoted block LDL^T over the dense
            per-layer blocks of the lifted system, re-implemented here as a yardstick:
            :func:`unpivoted_block_ldl`; with ``--author-src`` also the author's own code).
  ggn       L=32, width 16, batch 8, 10 classes: our exact GGN solve (each route) against
            conjugate gradients on exact GGN products to relative residual 1e-10, setup
            (the derivatives, or autograd's linearisation) included on both sides.
  kernels   L=256, width 16, batch 8: kernels (non-view aten ops) and host synchronisations
            of one one-shot solve per route, against one HVP; and the kernels of the
            cyclic-reduction factorisation at L = 64, 256, 1024 (log L levels).
  lu rate   The achieved GFLOP/s of ``banded_lu`` against ``torch.matmul`` of the same size.
  dense     Ours against torch.func.hessian + torch.linalg.solve at the largest depth it fits.
  depth     One-shot solve against the fastest HVP for L = 32..512 (fitted exponents).
  width     The default and generic routes against width; an image-sized input layer.
  targets   The performance targets, each met or not with the figure.

    python bench_hessian.py --threads 1 --markdown docs/performance.md   # full run, writes the page
    python bench_hessian.py --quick                  # smaller sizes, a few minutes on 2 cores
    python bench_hessian.py --layers 1024 --width 32 --batch 16 --device cuda   # one case
    python bench_hessian.py --out results.json       # every measurement (.json or .csv)
    python bench_hessian.py --author-src ../hessian/src   # also time the author's own code

Timing: one thread is advised (``--threads 1``) on a shared machine; with one thread on a
CPU every time is the process's CPU time (``--clock auto``; ``--clock wall`` for wall
time), which other jobs' share of the cores does not inflate.  Methods compared in a
table are timed round-robin (each repeat runs every method once), and each figure is the
median over repeats (in the GEMM-rate table the fastest of 5), so that a burst of load
elsewhere hits all of them alike; the ratios are the figures to read.  Kernels and host
synchronisations are counted by :class:`DispatchCounter` in a separate, untimed call: a
proxy for GPU launch cost that runs on any CPU.  Peak memory: on CUDA,
torch.cuda.max_memory_allocated above what the model and data use; on CPU, the rise of
the resident-set high-water mark (VmHWM) during one one-shot solve in a fresh subprocess
(started with glibc's MALLOC_MMAP_THRESHOLD_=65536 so that freed blocks go back to the OS
and the high-water mark tracks live memory).  L counts every layer of the chain (L - 1
tanh layers, then the output layer fused with the cross-entropy loss).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import types
import typing
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import block_tridiagonal as bt
import hessian_inverse as hi

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")

# Errors by which a method declines a problem (recorded as a note, the run goes on).
REFUSALS = (hi.SingularHessianError, hi.InsufficientMemoryError, hi.HessianInverseError,
            hi.InaccurateSolveError)


# --------------------------------------------------------------------------
# Measuring: time, kernels, host synchronisations
# --------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# The clock of every timing: wall time (time.perf_counter), or with ``--clock cpu`` (the
# default for one torch thread on a CPU) the process's CPU time (time.process_time), which
# other jobs sharing the cores do not inflate; with one thread and an idle machine the two
# agree.  Set by main().
CLOCK = {"name": "wall", "fn": time.perf_counter}


def timed(fn: Callable, device: torch.device):
    clock = CLOCK["fn"]
    synchronize(device)
    start = clock()
    out = fn()
    synchronize(device)
    return out, clock() - start


def _status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # VmHWM := VmRSS
        return True
    except OSError:
        return False



#: aten ops that read a device value back to the host (a synchronisation on a GPU).
SYNC_OPS = {"_local_scalar_dense", "equal", "nonzero", "masked_select", "unique", "_unique2",
            "unique_consecutive", "repeat_interleave"}
#: aten ops whose CUDA implementation checks a LAPACK info on the host (not their ``_ex``
#: variants): a synchronisation on a GPU, though not on a CPU.
CHECKED_LINALG = {"linalg_inv", "linalg_solve", "linalg_cholesky", "linalg_lu_factor",
                  "linalg_eigh", "_linalg_eigh", "linalg_svd", "_linalg_svd", "linalg_eig",
                  "cholesky", "inverse", "linalg_ldl_factor"}


class _HostReads(TorchFunctionMode):
    """Counts the Tensor methods that copy values to the host without an aten op."""

    def __init__(self, counter: "DispatchCounter"):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("tolist", "numpy"):
            self.counter.syncs += 1
        elif name in ("cpu", "to") and args and isinstance(args[0], torch.Tensor) and \
                args[0].device.type != "cpu":
            self.counter.syncs += 1
        return func(*args, **(kwargs or {}))


class DispatchCounter(TorchDispatchMode):
    """Counts, while active, the kernels (aten ops that are not views: a proxy for GPU
    launches) and the host synchronisations (reads of device values: ``item``, ``bool``,
    ``float``, ``tolist``, ``nonzero``, ...; ``checked`` counts linalg calls that
    synchronise on CUDA only).  ``with DispatchCounter() as c: ...``."""

    def __init__(self):
        super().__init__()
        self.kernels, self.syncs, self.checked = 0, 0, 0
        self.by_op: dict = {}
        self._reads = _HostReads(self)

    def __enter__(self):
        self._reads.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._reads.__exit__(*exc)
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if not func.is_view:
            self.kernels += 1
            self.by_op[name] = self.by_op.get(name, 0) + 1
        if name in SYNC_OPS:
            self.syncs += 1
        if name in CHECKED_LINALG:
            self.checked += 1
        return func(*args, **(kwargs or {}))


def count(fn: Callable) -> "DispatchCounter":
    """The kernels and synchronisations of one call of ``fn`` (untimed)."""
    with DispatchCounter() as counter:
        fn()
    return counter


# --------------------------------------------------------------------------
# Problems and independent yardsticks (autograd, nothing of the lifted system)
# --------------------------------------------------------------------------


@dataclass
class Problem:
    model: hi.DeepMLPWithTracking
    x: torch.Tensor
    t: torch.Tensor
    loss: torch.Tensor
    v: torch.Tensor
    layers: int
    width: int
    batch: int
    input_dim: int
    classes: int
    bias: bool = True

    @property
    def num_params(self) -> int:
        return self.v.numel()

    @property
    def device(self) -> torch.device:
        return self.v.device

    @property
    def spec(self) -> dict:
        return dict(layers=self.layers, width=self.width, batch=self.batch,
                    input_dim=self.input_dim, classes=self.classes,
                    dtype=str(self.v.dtype).replace("torch.", ""), device=str(self.device))


def make_problem(layers: int, width: int, batch: int, input_dim: int, device, dtype,
                 classes: int = 10, seed: int = 0, bias: bool = True) -> Problem:
    torch.manual_seed(seed)
    model = hi.DeepMLPWithTracking(input_dim, width, classes, layers - 1, "tanh", bias=bias)
    model = model.to(device=device, dtype=dtype)
    x = torch.randn(batch, input_dim, device=device, dtype=dtype)
    t = torch.randint(0, classes, (batch,), device=device)
    loss = model(x, t, track_activations=True)
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, device=device, dtype=dtype)
    return Problem(model, x, t, loss, v, layers, width, batch, input_dim, classes, bias)


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    """All parameters of ``model``, detached, as one flat vector (``parameters()`` order)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def of_flat_parameters(module: torch.nn.Module, *inputs) -> Callable:
    """``theta -> module(*inputs)`` with the parameters given as one flat vector."""
    names = [n for n, _ in module.named_parameters()]
    shapes = [p.shape for p in module.parameters()]
    sizes = [p.numel() for p in module.parameters()]

    def call(theta: torch.Tensor):
        params = {n: p.view(s) for n, p, s in zip(names, theta.split(sizes), shapes)}
        return torch.func.functional_call(module, params, inputs)

    return call


def double_backward_hvp(model, x, t) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> H v the plain autograd way, forward pass included: the loss, its gradient with
    ``create_graph=True``, then the gradient of ``<g, v>`` (Pearlmutter by double backward).
    The fastest exact HVP here, and the yardstick of every ratio."""
    params = list(model.parameters())
    sizes = [p.numel() for p in params]

    def hvp(vec):
        loss = model(x, t)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((g * w.view_as(g)).sum() for g, w in zip(grads, vec.split(sizes)))
        return torch.cat([h.reshape(-1) for h in torch.autograd.grad(dot, params)])

    return hvp


def func_hvp(model, x, t) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> H v by torch.func: ``jvp`` of ``grad`` of the flat-parameter loss (forward
    over reverse, the forward pass inside)."""
    loss = of_flat_parameters(model, x, t)
    theta = flat_parameters(model)
    grad = torch.func.grad(loss)
    return lambda vec: torch.func.jvp(grad, (theta,), (vec,))[1]


def autograd_ggn(model, x, t) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> J^T H_o J v by autograd (as curvlinops does): J v by torch.func.jvp of the
    logits (``model(x)``), H_o by jvp of the gradient of the loss in the logits, J^T by a
    vjp whose forward pass (the setup) runs once here."""
    logits = of_flat_parameters(model, x)
    theta = flat_parameters(model)
    out, pullback = torch.func.vjp(logits, theta)
    grad_o = torch.func.grad(lambda o: model.loss_layer.loss(o, t))

    def ggn(vec):
        jv = torch.func.jvp(logits, (theta,), (vec,))[1]
        return pullback(torch.func.jvp(grad_o, (out.detach(),), (jv,))[1])[0]

    return ggn


def double_backward_hvp_fn(problem: Problem) -> Callable[[torch.Tensor], torch.Tensor]:
    return double_backward_hvp(problem.model, problem.x, problem.t)


def func_hvp_fn(problem: Problem) -> Callable[[torch.Tensor], torch.Tensor]:
    return func_hvp(problem.model, problem.x, problem.t)


def autograd_ggn_fn(problem: Problem) -> Callable[[torch.Tensor], torch.Tensor]:
    return autograd_ggn(problem.model, problem.x, problem.t)


def curvature_product_fn(problem: Problem, curvature: str) -> Callable:
    return func_hvp_fn(problem) if curvature == "hessian" else autograd_ggn_fn(problem)


def dense_hessian(problem: Problem) -> torch.Tensor:
    """The n x n Hessian by torch.func.hessian of the flat-parameter loss (small n only)."""
    loss = of_flat_parameters(problem.model, problem.x, problem.t)
    return torch.func.hessian(loss)(flat_parameters(problem.model))


def relative_residual(problem: Problem, x: torch.Tensor, damping: float,
                      curvature: str = "hessian") -> float:
    """||(B + eps I) x - v|| / ||v|| with the autograd product of :func:`curvature_product_fn`."""
    product = curvature_product_fn(problem, curvature)
    r = product(x) + damping * x - problem.v
    return (r.norm() / problem.v.norm()).item()


def conjugate_gradients(apply: Callable, b: torch.Tensor, rtol: float,
                        max_products: int) -> tuple[torch.Tensor, int, bool]:
    """CG on a symmetric positive definite ``apply`` until ||b - A x|| <= rtol ||b||
    (the recursive residual).  Returns x, the number of products, and whether it got there."""
    x, r = torch.zeros_like(b), b.clone()
    p, rr, products = r.clone(), r.dot(r), 0
    goal = (rtol * b.norm()) ** 2
    while rr > goal and products < max_products:
        q = apply(p)
        products += 1
        alpha = rr / p.dot(q)
        x, r = x + alpha * p, r - alpha * q
        rr, rr_old = r.dot(r), rr
        p = r + (rr / rr_old) * p
    return x, products, bool(rr <= goal)


# --------------------------------------------------------------------------
# The paper author's method: re-implemented as a yardstick, and (optionally) the author's code
# --------------------------------------------------------------------------


@dataclass
class BlockLDL:
    """Factors of :func:`unpivoted_block_ldl`: ``inverse[l]`` = Dhat_l^{-1} and
    ``right[l]`` = Dhat_l^{-1} S_l^T."""

    inverse: list
    right: list


def unpivoted_block_ldl(diag: list, sub: list) -> BlockLDL:
    """The paper author's factorisation, as described (a yardstick, not ours).

    The lifted system's dense per-layer blocks (``diag[l]``, ``sub[l]`` in block-row l+1)
    are factored as ``L Dhat L^T`` with no pivoting across blocks: ``Dhat_0 = D_0``,
    ``Dhat_{l+1} = D_{l+1} - S_l Dhat_l^{-1} S_l^T``, each pivot block inverted explicitly
    (the partitioned inverse), ``L_{l+1,l} = S_l Dhat_l^{-1}``.  Per block of n rows: an
    inverse (2 n^3), ``Dhat_l^{-1} S_l^T`` (2 n^3) and the Schur update (2 n^3).  It needs
    every leading block ``Dhat_l`` invertible, which pivoting on the whole system (our
    banded LU) does not.
    """
    inverse, right = [], []
    pivot = diag[0]
    for l in range(len(diag)):
        inv = torch.linalg.inv(pivot)
        inverse.append(inv)
        if l + 1 < len(diag):
            w = inv @ sub[l].T
            right.append(w)
            pivot = diag[l + 1] - sub[l] @ w
    return BlockLDL(inverse, right)


def unpivoted_block_ldl_solve(f: BlockLDL, rhs: list) -> list:
    """Solve ``L Dhat L^T x = b``: forward, block diagonal, backward sweep."""
    z = list(rhs)
    for l in range(len(f.right)):
        z[l + 1] = z[l + 1] - f.right[l].T @ z[l]          # S_l Dhat_l^{-1} = right[l]^T
    x = [inv @ zl for inv, zl in zip(f.inverse, z)]
    for l in reversed(range(len(f.right))):
        x[l] = x[l] - f.right[l] @ x[l + 1]
    return x


def author_solve(problem: Problem, damping: float) -> tuple[torch.Tensor, dict]:
    """Derivatives (dense per-layer blocks), the lifted system, its unpivoted block LDL^T
    and one solve, timed separately; no refinement."""
    device = problem.device
    op, t_d = timed(lambda: hi.hessian_operator(problem.model, problem.loss, path="generic"),
                    device)
    derivs = op.derivs
    sizes = [d.num_params for d in derivs]

    def factor():
        system = hi.assemble_lifted_system(derivs, damping)
        diag, sub = system.diag, system.sub
        blocks = system.block_sizes
        return unpivoted_block_ldl(
            [diag[l, :n, :n] for l, n in enumerate(blocks)],
            [sub[l, :blocks[l + 1], :blocks[l]] for l in range(len(blocks) - 1)])

    f, t_f = timed(factor, device)

    def solve():
        parts = problem.v.unsqueeze(1).split(sizes)
        lifted = [torch.cat([b, b.new_zeros(2 * d.num_outputs, 1)]) for b, d in zip(parts, derivs)]
        x = unpivoted_block_ldl_solve(f, lifted)
        return torch.cat([xl[:p] for xl, p in zip(x, sizes)]).squeeze(1)

    x, t_s = timed(solve, device)
    return x, {"t_derivatives": t_d, "t_factorize": t_f, "t_solve": t_s,
               "t_total": t_d + t_f + t_s}


def load_author_code(src: str) -> tuple:
    """The paper author's modules (``hessian``, ``block_partitioned_matrices``) from a
    checkout's ``src/`` (github.com/a-rahimi/hessian; not part of this project).  Its
    annotations are evaluated lazily (Python 3.14); here they are postponed and
    ``functools.singledispatch`` reads only the dispatch argument's."""
    original = typing.get_type_hints

    def lenient(obj, *args, **kwargs):
        try:
            return original(obj, *args, **kwargs)
        except (NameError, TypeError):
            ann = {n: v for n, v in getattr(obj, "__annotations__", {}).items() if n != "return"}
            return {n: eval(v, obj.__globals__) if isinstance(v, str) else v
                    for n, v in ann.items()}

    typing.get_type_hints = lenient
    try:
        modules = {}
        for name in ("monkeypatch", "block_partitioned_matrices", "hessian"):
            path = os.path.join(src, f"{name}.py")
            if not os.path.exists(path):
                continue
            module = types.ModuleType(name)
            module.__file__ = path
            sys.modules[name] = module
            with open(path) as fh:
                code = compile("from __future__ import annotations\n" + fh.read(), path, "exec")
            exec(code, module.__dict__)
            modules[name] = module
        return modules["hessian"], modules["block_partitioned_matrices"]
    finally:
        typing.get_type_hints = original


def author_code_solve(problem: Problem, damping: float, src: str) -> tuple[torch.Tensor, dict]:
    """The author's own ``hessian_inverse_product`` on a copy of the problem (its
    ``SequenceOfDenseBlocks`` has no biases: the problem must be built with bias=False),
    in the problem's dtype (its default dtype set for the call)."""
    if problem.bias:
        raise ValueError("the author's network has no biases: build the problem with bias=False")
    ah, bpm = load_author_code(src)
    dtype, device = problem.v.dtype, problem.device
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        theirs = ah.SequenceOfDenseBlocks(problem.input_dim, problem.width, problem.classes,
                                          num_layers=problem.layers, activation=torch.tanh)
        theirs = theirs.to(device=device, dtype=dtype)
        with torch.no_grad():
            for mine, their in zip(problem.model.parameters(), theirs.parameters()):
                their.copy_(mine)
        sizes = [sum(p.numel() for p in layer.parameters()) for layer in theirs]
        b = bpm.Vertical([part.unsqueeze(1) for part in problem.v.split(sizes)])
        result, t = timed(lambda: theirs.hessian_inverse_product(problem.x, problem.t, b, damping),
                          device)
    finally:
        torch.set_default_dtype(previous)
    return result.to_tensor().reshape(-1).to(dtype), {"t_total": t}


# --------------------------------------------------------------------------
# Our routes
# --------------------------------------------------------------------------


@dataclass
class Route:
    """One way of calling ours: ``path``, ``curvature`` and extra keywords."""

    label: str
    curvature: str = "hessian"
    path: str = "auto"
    keywords: dict = field(default_factory=dict)
    max_repeats: int = 100

    def spec(self) -> dict:
        kw = {k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v)
              for k, v in self.keywords.items()}
        return dict(curvature=self.curvature, path=self.path, keywords=kw)


def _keywords_from_spec(kw: dict) -> dict:
    out = dict(kw)
    if isinstance(out.get("factor_dtype"), str) and out["factor_dtype"] != "auto":
        out["factor_dtype"] = getattr(torch, out["factor_dtype"])
    return out


def one_shot(problem: Problem, damping: float, route: Route) -> torch.Tensor:
    """What a user calls for one solve: derivatives, factorisation, refined solve."""
    return hi.hessian_inverse_vector_product(problem.model, problem.loss, problem.v, damping,
                                             curvature=route.curvature, path=route.path,
                                             **route.keywords)


def breakdown(problem: Problem, damping: float, route: Route) -> tuple[torch.Tensor, dict]:
    """The same split into derivatives (``hessian_operator``), factorisation (the inverse
    built as the one-shot call builds it: no separate acceptance probe) and the solve."""
    device = problem.device
    op_path = "generic" if route.path == "generic" else "structured"
    op, t_d = timed(lambda: hi.hessian_operator(problem.model, problem.loss,
                                                curvature=route.curvature, path=op_path), device)
    inv, t_f = timed(lambda: hi.HessianInverse(op, damping, path=route.path, probe=False,
                                               **route.keywords), device)
    x, t_s = timed(lambda: inv @ problem.v, device)
    info = {"t_derivatives": t_d, "t_factorize": t_f, "t_solve": t_s, "route": inv.route,
            "factorization": inv.factorization if inv.route in ("structured", "generic") else "",
            "factor_dtype": str(inv.factor_dtype).replace("torch.", ""),
            "backward_error": inv.backward_error}
    return x, info


def peak_bytes_of_one_shot(problem: Problem, damping: float, route: Route) -> Optional[int]:
    """Peak bytes above the model and data during one one-shot solve (module docstring)."""
    device = problem.device
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        one_shot(problem, damping, route)
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if device.type != "cpu":
        return None
    spec = dict(problem.spec, damping=damping, route=route.spec(),
                threads=torch.get_num_threads())
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    try:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--peak-child",
                              json.dumps(spec)], env=env, capture_output=True, text=True,
                             timeout=1800, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError):
        return None


def _peak_child(spec: dict) -> None:
    """In a fresh process: build the problem, warm up, then measure one solve's VmHWM rise."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    r = spec["route"]
    route = Route("child", r["curvature"], r["path"], _keywords_from_spec(r["keywords"]))
    small = make_problem(3, 4, 2, 4, "cpu", dtype, classes=3)
    try:
        one_shot(small, spec["damping"], route)
    except REFUSALS:
        pass
    problem = make_problem(spec["layers"], spec["width"], spec["batch"], spec["input_dim"],
                           "cpu", dtype, classes=spec["classes"])
    peak = None
    if _reset_high_water_mark():
        base = _status_kib("VmRSS")
        one_shot(problem, spec["damping"], route)
        peak = (_status_kib("VmHWM") - base) * 1024
    print(json.dumps({"peak_bytes": peak}))


# --------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------


@dataclass
class Record:
    section: str
    method: str
    layers: int
    width: int
    batch: int
    input_dim: int
    classes: int
    num_params: int
    dtype: str
    device: str
    curvature: str = "hessian"
    damping: Optional[float] = None
    route: Optional[str] = None
    factor_dtype: Optional[str] = None
    t_derivatives: Optional[float] = None
    t_factorize: Optional[float] = None
    t_solve: Optional[float] = None
    t_total: Optional[float] = None
    repeats: Optional[int] = None
    ratio_to_hvp: Optional[float] = None
    peak_bytes: Optional[int] = None
    residual: Optional[float] = None
    backward_error: Optional[float] = None
    products: Optional[int] = None
    converged: Optional[bool] = None
    factorization: Optional[str] = None
    kernels: Optional[int] = None
    syncs: Optional[int] = None
    checked_linalg: Optional[int] = None
    note: str = ""


def new_record(section: str, method: str, problem: Problem, **kw) -> Record:
    spec = problem.spec
    return Record(section, method, spec["layers"], spec["width"], spec["batch"],
                  spec["input_dim"], spec["classes"], problem.num_params, spec["dtype"],
                  spec["device"], **kw)


def median_or_none(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def round_robin(jobs: dict, repeats: int, log: Callable[[str], None]) -> dict:
    """Run every job once per repeat, in turn; per job the median of each timing key.

    A job is ``(fn, max_repeats)``; ``fn()`` returns ``(result, {key: seconds, ...})``.
    Returns ``{name: (medians, last result, number of runs, error or None)}``; a job that
    raises one of :data:`REFUSALS` is dropped with its error.
    """
    runs = {name: [] for name in jobs}
    last, errors = {}, {}
    for rep in range(repeats):
        for name, (fn, cap) in jobs.items():
            if name in errors or len(runs[name]) >= cap:
                continue
            try:
                result, info = fn()
            except REFUSALS as err:
                errors[name] = err
                log(f"  {name}: refused ({type(err).__name__}: {str(err)[:200]})")
                continue
            runs[name].append(info)
            last[name] = result
    out = {}
    for name in jobs:
        infos = runs[name]
        medians = {}
        for key in set().union(*infos) if infos else ():
            values = [i[key] for i in infos]
            medians[key] = (median_or_none(values) if all(
                isinstance(v, (int, float)) or v is None for v in values) else values[-1])
        out[name] = (medians, last.get(name), len(infos), errors.get(name))
    return out


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    damping: float
    quick: bool
    repeats: int
    dense_max_params: int
    minres_cap: int
    cg_cap: int
    generic_max_block: int
    memory: bool = True
    author_src: Optional[str] = None
    load_at_start: str = field(default_factory=lambda: " / ".join(
        f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown")
    records: list = field(default_factory=list)
    lu_rates: list = field(default_factory=list)
    targets: list = field(default_factory=list)

    def log(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)


def generic_block(problem: Problem) -> int:
    """The generic route's largest lifted block, p + 2a (the first or a hidden layer)."""
    w, d, b = problem.width, problem.input_dim, problem.batch
    return max(w * (d + 1), w * (w + 1) if problem.layers > 2 else 0) + 2 * b * w


def mlp_num_params(layers: int, width: int, input_dim: int, classes: int = 10) -> int:
    return (width * (input_dim + 1) + (layers - 2) * width * (width + 1)
            + classes * (width + 1))


DEFAULT = Route("auto (defaults)")


def hessian_routes(problem: Problem, generic: bool) -> list[Route]:
    """Every Hessian route of ours, for this problem's dtype."""
    exact = {"factor_dtype": None}
    routes = [DEFAULT, Route("riccati (layer-wise LDL^T)", path="riccati", keywords=exact),
              Route("structured, banded LU", path="structured",
                    keywords=dict(exact, factorization="banded"))]
    if problem.v.dtype == torch.float64:
        routes.append(Route("structured, float32 factors", path="structured",
                            keywords={"factor_dtype": torch.float32, "factorization": "banded"}))
    routes.append(Route("structured, cyclic reduction", path="structured",
                        keywords=dict(exact, factorization="cyclic")))
    if generic:
        routes.append(Route("generic", path="generic", keywords=dict(exact), max_repeats=1))
    return routes


def ggn_routes(generic: bool) -> list[Route]:
    exact = {"factor_dtype": None}
    routes = [Route("auto (defaults)", "ggn"), Route("output (Woodbury)", "ggn", "output"),
              Route("riccati (layer-wise LDL^T)", "ggn", "riccati", dict(exact)),
              Route("structured", "ggn", "structured", dict(exact))]
    if generic:
        routes.append(Route("generic", "ggn", "generic", dict(exact), max_repeats=1))
    return routes


def warm_up(s: Settings, routes: list[Route]) -> None:
    """First calls of each route on a tiny problem, so kernel set-up lands in no timing."""
    tiny = make_problem(3, 4, 2, 4, s.device, s.dtype, classes=3)
    for route in routes:
        try:
            one_shot(tiny, s.damping, route)
            breakdown(tiny, s.damping, route)
        except REFUSALS:
            pass
    for fn in (double_backward_hvp_fn, func_hvp_fn, autograd_ggn_fn):
        fn(tiny)(tiny.v)


# --------------------------------------------------------------------------
# Section: every route side by side on one problem
# --------------------------------------------------------------------------


def measure_minres(section: str, problem: Problem, damping: float, goal: float,
                   cap: int) -> Record:
    """scipy MINRES on v -> (H + eps I) v by the fastest autograd HVP, to ``goal`` or the cap."""
    from scipy.sparse.linalg import LinearOperator, minres

    device, dtype = problem.device, problem.v.dtype
    rec = new_record(section, "MINRES on autograd HVPs", problem, damping=damping)
    hvp = double_backward_hvp_fn(problem)
    n = problem.num_params

    def matvec(z):
        zt = torch.as_tensor(np.asarray(z).reshape(-1), dtype=dtype, device=device)
        return (hvp(zt) + damping * zt).detach().cpu().double().numpy()

    steps = [0]
    op = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    b = problem.v.detach().cpu().double().numpy()
    (sol, _), t = timed(lambda: minres(op, b, rtol=goal, maxiter=cap,
                                       callback=lambda _: steps.__setitem__(0, steps[0] + 1)),
                        device)
    x = torch.as_tensor(sol, dtype=dtype, device=device)
    rec.t_total, rec.products, rec.repeats = t, steps[0], 1
    rec.residual = relative_residual(problem, x, damping)
    rec.converged = bool(rec.residual <= 2 * goal)
    rec.note = (f"{steps[0]} products, asked for {goal:.0e} "
                + ("(converged)" if rec.converged else f"(cap {cap}: not converged)"))
    return rec


def measure_dense(section: str, problem: Problem, damping: float) -> Record:
    """torch.func.hessian of the flat-parameter loss, then torch.linalg.solve."""
    device = problem.device
    rec = new_record(section, "dense: torch.func.hessian + torch.linalg.solve", problem,
                     damping=damping, repeats=1)
    H, t_h = timed(lambda: dense_hessian(problem), device)

    def solve():
        H.diagonal().add_(damping)
        return torch.linalg.solve(H, problem.v)

    x, t_s = timed(solve, device)
    rec.note = f"H alone is {H.numel() * H.element_size() / 2**20:.0f} MB"
    H = None  # noqa: F841 (frees the n x n matrix before the residual check)
    rec.t_derivatives, rec.t_solve, rec.t_total = t_h, t_s, t_h + t_s
    rec.residual = relative_residual(problem, x, damping)
    return rec


def one_shot_job(problem: Problem, damping: float, route: Route) -> tuple:
    """One timed one-shot solve; on CUDA also its peak memory above what was allocated."""
    device = problem.device
    if device.type != "cuda":
        x, t = timed(lambda: one_shot(problem, damping, route), device)
        return x, {"t_total": t}
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    x, t = timed(lambda: one_shot(problem, damping, route), device)
    return x, {"t_total": t, "peak_bytes": torch.cuda.max_memory_allocated(device) - base}


def product_job(product: Callable, problem: Problem) -> Callable:
    """A round-robin job timing one product with ``problem.v``: the fastest of 3 calls
    (a product takes milliseconds, where one scheduler hiccup weighs most)."""
    def job():
        return None, {"t_total": min(timed(lambda: product(problem.v), problem.device)[1]
                                     for _ in range(3))}
    return job


#: The yardsticks of the routes table: name -> (product builder, curvature).
PRODUCTS = {
    "autograd HVP, double backward (the fastest exact HVP; forward included)":
        (double_backward_hvp_fn, "hessian"),
    "torch.func HVP, jvp of grad (forward included)": (func_hvp_fn, "hessian"),
    "autograd GGN product (torch.func jvp, vjp)": (autograd_ggn_fn, "ggn"),
}
FASTEST_HVP = next(iter(PRODUCTS))


def count_record(rec: Record, fn: Callable) -> None:
    """Kernels and synchronisations of one (untimed) call into ``rec``."""
    counted = count(fn)
    rec.kernels, rec.syncs, rec.checked_linalg = counted.kernels, counted.syncs, counted.checked


def run_routes(s: Settings, section: str, problem: Problem, repeats: int,
               extras: bool = True, ggn: bool = True) -> dict:
    """Every route of ours on ``problem``, the autograd products, and (``extras``) the
    paper author's method, MINRES and the dense route where they fit."""
    block = generic_block(problem)
    generic = block <= s.generic_max_block
    routes = [("hessian", r) for r in hessian_routes(problem, generic)]
    if ggn:
        routes += [("ggn", r) for r in ggn_routes(False)]
    warm_up(s, [r for _, r in routes])
    products = {name: build(problem) for name, (build, c) in PRODUCTS.items()
                if ggn or c == "hessian"}
    for product in products.values():
        product(problem.v)
    jobs = {name: (product_job(product, problem), 1000) for name, product in products.items()}
    for curvature, route in routes:
        def split(route=route):
            return breakdown(problem, s.damping, route)

        def whole(route=route):
            return one_shot_job(problem, s.damping, route)

        name = f"{curvature}: {route.label}"
        jobs[name + " [split]"] = (split, min(route.max_repeats, 3))
        jobs[name] = (whole, route.max_repeats)
    s.log(f"[{section}] n = {problem.num_params:,}: {len(routes)} routes x {repeats} repeats")
    timing = round_robin(jobs, repeats, s.log)
    hvp_t = timing[FASTEST_HVP][0]["t_total"]
    out = {"problem": problem, "hvp": hvp_t, "rows": [], "notes": []}
    for name, product in products.items():
        rec = new_record(section, name, problem, t_total=timing[name][0]["t_total"],
                         repeats=timing[name][2], curvature=PRODUCTS[name][1])
        rec.ratio_to_hvp = rec.t_total / hvp_t
        count_record(rec, lambda: product(problem.v))
        out["rows"].append(rec)
    for curvature, route in routes:
        name = f"{curvature}: {route.label}"
        medians, x, runs, err = timing[name]
        split_medians, _, _, split_err = timing[name + " [split]"]
        rec = new_record(section, f"ours, {'Hessian' if curvature == 'hessian' else 'GGN'}: "
                         f"{route.label}", problem, curvature=curvature, damping=s.damping,
                         repeats=runs)
        if err is not None or x is None:
            rec.note = f"refused: {type(err).__name__}: {str(err)[:120]}"
            out["rows"].append(rec)
            continue
        rec.t_total = medians.get("t_total")
        rec.ratio_to_hvp = rec.t_total / hvp_t if rec.t_total else None
        if split_err is None:
            rec.t_derivatives = split_medians.get("t_derivatives")
            rec.t_factorize = split_medians.get("t_factorize")
            rec.t_solve = split_medians.get("t_solve")
            rec.route = split_medians.get("route")
            rec.factor_dtype = split_medians.get("factor_dtype")
            rec.factorization = split_medians.get("factorization")
            rec.backward_error = split_medians.get("backward_error")
        rec.residual = relative_residual(problem, x, s.damping, curvature)
        count_record(rec, lambda route=route: one_shot(problem, s.damping, route))
        if "peak_bytes" in medians:
            rec.peak_bytes = int(medians["peak_bytes"])
        elif s.memory and (not s.quick or route is DEFAULT):
            rec.peak_bytes = peak_bytes_of_one_shot(problem, s.damping, route)
        if rec.route:
            rec.note = ("ran " + rec.route + (f", {rec.factorization}" if rec.factorization else "")
                        + (f", {rec.factor_dtype} factors" if rec.factor_dtype else ""))
        out["rows"].append(rec)
        s.log(f"  {rec.method}: one-shot {_s(rec.t_total)} s = {_x(rec.ratio_to_hvp)} HVP, "
              f"{rec.kernels} kernels, {rec.syncs} syncs, residual {_e(rec.residual)} ({rec.note})")
    if not generic:
        out["notes"].append(f"generic route and the author's method skipped: lifted blocks "
                            f"p + 2a = {block} > {s.generic_max_block}")
    if extras and generic:
        s.log(f"[{section}] the paper author's method (unpivoted block LDL^T)...")
        rec = new_record(section, "paper author's method: unpivoted block LDL^T, dense blocks "
                         "(our re-implementation)", problem, damping=s.damping, repeats=1)
        try:
            x, info = author_solve(problem, s.damping)
            for k, v in info.items():
                setattr(rec, k, v)
            rec.ratio_to_hvp = rec.t_total / hvp_t
            rec.residual = relative_residual(problem, x, s.damping)
            rec.note = "no refinement"
        except (torch.linalg.LinAlgError, RuntimeError) as err:
            rec.note = f"failed: {type(err).__name__}: {str(err)[:120]}"
        out["rows"].append(rec)
        out["author"] = rec
    if extras and s.minres_cap > 0:
        ours = [r for r in out["rows"] if r.method.startswith("ours, Hessian") and r.residual]
        goal = max(min([r.residual for r in ours] or [1e-12]), 1e-15)
        s.log(f"[{section}] MINRES to {goal:.0e} (cap {s.minres_cap})...")
        rec = measure_minres(section, problem, s.damping, goal, s.minres_cap)
        rec.ratio_to_hvp = rec.t_total / hvp_t
        out["rows"].append(rec)
    if extras:
        if problem.num_params <= s.dense_max_params:
            s.log(f"[{section}] dense...")
            rec = measure_dense(section, problem, s.damping)
            rec.ratio_to_hvp = rec.t_total / hvp_t
            out["rows"].append(rec)
        else:
            n, size = problem.num_params, problem.v.element_size()
            out["notes"].append(f"dense route skipped: n = {n:,} > {s.dense_max_params:,} "
                                f"(its Hessian alone is {n * n * size / 2**30:.1f} GiB)")
    s.records += out["rows"]
    return out


def run_author_code(s: Settings, problem: Problem) -> dict:
    """The author's own code against ours (default route) on a bias-free copy of
    ``problem``'s sizes, round-robin with the fastest HVP of that problem."""
    section = "author's code"
    bare = make_problem(problem.layers, problem.width, problem.batch, problem.input_dim,
                        s.device, s.dtype, classes=problem.classes, bias=False)
    hvp = double_backward_hvp_fn(bare)
    hvp(bare.v)
    author_code_solve(make_problem(3, 4, 2, 4, s.device, s.dtype, classes=3, bias=False),
                      s.damping, s.author_src)                          # warm-up, and import

    def theirs():
        return author_code_solve(bare, s.damping, s.author_src)

    def ours():
        return one_shot_job(bare, s.damping, DEFAULT)

    s.log(f"[{section}] the author's hessian_inverse_product (from {s.author_src})...")
    timing = round_robin({"theirs": (theirs, 3), "ours": (ours, 100),
                          "hvp": (product_job(hvp, bare), 1000)}, 3, s.log)
    rows = []
    hvp_t = timing["hvp"][0]["t_total"]
    for name, label in (("theirs", "the paper author's code (hessian_inverse_product)"),
                        ("ours", f"ours: {DEFAULT.label}")):
        medians, x, runs, err = timing[name]
        rec = new_record(section, label, bare, damping=s.damping, repeats=runs,
                         t_total=medians.get("t_total"))
        if err is None and x is not None:
            rec.ratio_to_hvp = rec.t_total / hvp_t
            rec.residual = relative_residual(bare, x, s.damping)
        else:
            rec.note = f"failed: {err}"
        rows.append(rec)
    s.records += rows
    return {"problem": bare, "rows": rows, "hvp": hvp_t}


def find(rows: list, method: str) -> Optional[Record]:
    for r in rows:
        if r.method == method:
            return r
    return None


# --------------------------------------------------------------------------
# Section: the GGN, exact against conjugate gradients
# --------------------------------------------------------------------------


def cg_tolerance(dtype: torch.dtype) -> float:
    """1e-10 in float64; float32 cannot get there, so its accuracy contract eps^(2/3)."""
    return 1e-10 if dtype == torch.float64 else max(1e-10, hi.default_rtol(dtype))


def run_ggn_vs_cg(s: Settings, problem: Problem, damping: float, repeats: int,
                  cg_rtol: Optional[float] = None) -> dict:
    """Each exact GGN route (one-shot: derivatives + factorisation + refined solve) against
    CG to ``cg_rtol`` on exact GGN products: ours (``op @ p``, setup = our derivatives)
    and autograd's (jvp + vjp, setup = the vjp's forward pass)."""
    section = f"ggn damping={damping:g}"
    cg_rtol = cg_tolerance(problem.v.dtype) if cg_rtol is None else cg_rtol
    routes = ggn_routes(not s.quick and generic_block(problem) <= s.generic_max_block)
    warm_up(s, routes)
    v = problem.v

    def cg_ours():
        def run():
            op = hi.hessian_operator(problem.model, problem.loss, curvature="ggn")
            return conjugate_gradients(lambda p: op @ p + damping * p, v, cg_rtol, s.cg_cap)
        (x, products, ok), t = timed(run, s.device)
        return (x, products, ok), {"t_total": t}

    def cg_autograd():
        def run():
            ggn = autograd_ggn_fn(problem)
            return conjugate_gradients(lambda p: ggn(p) + damping * p, v, cg_rtol, s.cg_cap)
        (x, products, ok), t = timed(run, s.device)
        return (x, products, ok), {"t_total": t}

    jobs = {}
    for route in routes:
        def whole(route=route):
            x, t = timed(lambda: one_shot(problem, damping, route), s.device)
            return x, {"t_total": t}
        jobs[route.label] = (whole, route.max_repeats)
    jobs["CG, our GGN products"] = (cg_ours, 1000)
    jobs["CG, autograd GGN products"] = (cg_autograd, 1000)
    s.log(f"[{section}] n = {problem.num_params:,}: {len(jobs)} methods x {repeats} repeats")
    timing = round_robin(jobs, repeats, s.log)
    rows = []
    for route in routes:
        medians, x, runs, err = timing[route.label]
        rec = new_record(section, f"ours, GGN: {route.label}", problem, curvature="ggn",
                         damping=damping, repeats=runs, t_total=medians.get("t_total"))
        if err is not None:
            rec.note = f"refused: {type(err).__name__}: {str(err)[:120]}"
        else:
            rec.residual = relative_residual(problem, x, damping, "ggn")
            inverse = hi.factorize(problem.model, problem.loss, damping, curvature="ggn",
                                   path=route.path, **route.keywords)
            rec.route = inverse.route
            count_record(rec, lambda route=route: one_shot(problem, damping, route))
            rec.note = f"ran {rec.route}"
        rows.append(rec)
    for name in ("CG, our GGN products", "CG, autograd GGN products"):
        medians, result, runs, err = timing[name]
        rec = new_record(section, name, problem, curvature="ggn", damping=damping,
                         repeats=runs, t_total=medians.get("t_total"))
        if result is not None:
            x, rec.products, rec.converged = result
            rec.residual = relative_residual(problem, x, damping, "ggn")
            rec.note = (f"{rec.products} products to {cg_rtol:.0e}"
                        + ("" if rec.converged else f" (cap {s.cg_cap}: not converged)"))
        rows.append(rec)
    s.records += rows
    for r in rows:
        s.log(f"  {r.method}: {_s(r.t_total)} s, residual {_e(r.residual)} {r.note}")
    return {"problem": problem, "damping": damping, "rows": rows, "cg_rtol": cg_rtol}


def ggn_speedup(out: dict) -> tuple[Optional[float], str]:
    """The fastest CG over our default (auto) route (and the figure to print, with the
    ratio to every CG)."""
    default = [r for r in out["rows"] if r.method == "ours, GGN: auto (defaults)" and r.t_total
               and r.residual is not None]
    cg = [r for r in out["rows"] if r.method.startswith("CG") and r.t_total]
    if not default or not cg:
        return None, "not measured"
    best, fastest_cg = default[0], min(cg, key=lambda r: r.t_total)
    ratio = fastest_cg.t_total / best.t_total
    return ratio, (f"{ratio:.1f}x against the fastest CG: auto ({best.route}) "
                   f"{_s(best.t_total)} s vs " + ", ".join(
                       f"{r.method} {_s(r.t_total)} s ({r.products} products, "
                       f"{_x(r.t_total / best.t_total)})" for r in cg))


# --------------------------------------------------------------------------
# Section: kernels and host synchronisations
# --------------------------------------------------------------------------


def run_kernel_counts(s: Settings, problem: Problem) -> dict:
    """Kernels and synchronisations of one one-shot solve per route against one HVP (no
    timing)."""
    section = "kernels"
    rows = []
    for name, (build, curvature) in PRODUCTS.items():
        product = build(problem)
        product(problem.v)
        rec = new_record(section, name, problem, curvature=curvature)
        count_record(rec, lambda: product(problem.v))
        rows.append(rec)
    routes = [("hessian", r) for r in hessian_routes(problem, False)
              if "float32" not in r.label] + [("ggn", r) for r in ggn_routes(False)]
    for curvature, route in routes:
        rec = new_record(section, f"ours, {'Hessian' if curvature == 'hessian' else 'GGN'}: "
                         f"{route.label}", problem, curvature=curvature, damping=s.damping)
        try:
            one_shot(problem, s.damping, route)
            count_record(rec, lambda route=route: one_shot(problem, s.damping, route))
            inverse = hi.factorize(problem.model, problem.loss, s.damping, curvature=curvature,
                                   path=route.path, **route.keywords)
            rec.route = inverse.route
            rec.note = f"ran {inverse.route}" + (
                f", {inverse.factorization}" if inverse.route in ("structured", "generic") else "")
        except REFUSALS as err:
            rec.note = f"refused: {type(err).__name__}"
        rows.append(rec)
        s.log(f"[{section}] {rec.method}: {rec.kernels} kernels, {rec.syncs} syncs")
    s.records += rows
    return {"problem": problem, "rows": rows}


def run_cyclic_counts(s: Settings, depths: list, width: int, batch: int) -> dict:
    """Kernels of the factorisations of the structured route's reduced system against depth:
    cyclic reduction (pairs merged) and the banded LU."""
    rows = []
    for L in depths:
        problem = make_problem(L, width, batch, width, s.device, s.dtype)
        inverse = hi.factorize(problem.model, problem.loss, s.damping, path="structured",
                               factorization="banded")
        system = inverse.solver.system
        cyclic = count(lambda: bt.cyclic_reduction(system, merge=2, check=False))
        banded = count(lambda: bt.banded_lu(system, check=False))
        factor = bt.cyclic_reduction(system, merge=2)
        rhs = torch.randn(system.num_blocks, system.size, 1, dtype=s.dtype, device=s.device)
        solve = count(lambda: bt.cyclic_reduction_solve(factor, rhs))
        rows.append({"layers": L, "blocks": system.num_blocks, "levels": len(factor.levels),
                     "cyclic": cyclic.kernels, "cyclic_solve": solve.kernels,
                     "banded": banded.kernels})
        s.log(f"[cyclic] L={L}: {rows[-1]}")
    return {"rows": rows, "width": width, "batch": batch}


# --------------------------------------------------------------------------
# Section: the factorisation's arithmetic rate against GEMM
# --------------------------------------------------------------------------


def banded_lu_flops(sizes: list) -> float:
    """Floating-point operations of :func:`block_tridiagonal.banded_lu` on blocks n_0..n_{N-1}.

    Multiplications and additions counted separately (a GEMM of m x k by k x n is 2 m k n).
    Step l factors the panel ``[D_l; S_l]`` of ``m = n_l + n_{l+1}`` rows and ``n = n_l``
    columns (``n_N = 0``) and updates the ``k = n_{l+1} + n_{l+2}`` columns to its right
    (block-columns l+1 and l+2, the second being the fill of row pivoting):

        LU with partial pivoting of the m x n panel:    m n^2 - n^3 / 3
        triangular solve L_11^{-1} (n x k):              n^2 k
        update of the rows below, (m - n) x k -= (m - n) x n @ n x k:   2 (m - n) n k

        flops = sum_l [ m_l n_l^2 - n_l^3 / 3 + n_l^2 k_l + 2 (m_l - n_l) n_l k_l ]

    For N blocks of equal size b that is about (5/3 + 2 + 4) b^3 = 23/3 b^3 per block.
    """
    total, N = 0.0, len(sizes)
    for l in range(N):
        n = sizes[l]
        below = sizes[l + 1] if l + 1 < N else 0
        k = below + (sizes[l + 2] if l + 2 < N else 0)
        m = n + below
        total += m * n * n - n ** 3 / 3 + n * n * k + 2 * below * n * k
    return total


def synthetic_system(block: int, blocks: int, dtype, device, seed: int = 0):
    """A symmetric block-tridiagonal system of ``blocks`` random dense blocks of ``block``."""
    g = torch.Generator().manual_seed(seed)

    def rnd():
        return torch.randn(block, block, generator=g, dtype=torch.float64)

    diag = [((lambda a: (a + a.T) / 2)(rnd())).to(device=device, dtype=dtype)
            for _ in range(blocks)]
    sub = [rnd().to(device=device, dtype=dtype) for _ in range(blocks - 1)]
    return bt.BlockTridiagonal.from_blocks(diag, sub)


def run_lu_rate(s: Settings, block_sizes: list, dtypes: list, blocks: int = 4,
                repeats: int = 5) -> list:
    """banded_lu's GFLOP/s on :func:`synthetic_system` against torch.matmul (b x b) @ (b x b)
    and against LAPACK's panel LU alone (``torch.linalg.lu_factor`` of the 2b x b panel),
    timed round-robin; each rate from the fastest of ``repeats`` timings (on a shared
    machine the fastest is the one least disturbed, for all three alike)."""
    rows = []
    for dtype in dtypes:
        for b in block_sizes:
            system = synthetic_system(b, blocks, dtype, s.device)
            a = torch.randn(b, b, dtype=dtype, device=s.device)
            c = torch.randn(b, b, dtype=dtype, device=s.device)
            panel = torch.randn(2 * b, b, dtype=dtype, device=s.device)
            inner = min(50, max(1, int(1e8 // (2 * b ** 3))))  # small GEMMs: several per timing
            bt.banded_lu(system), torch.matmul(a, c), torch.linalg.lu_factor(panel)
            t_lu, t_mm, t_panel = [], [], []
            for _ in range(repeats):
                t_lu.append(timed(lambda: bt.banded_lu(system), s.device)[1])
                t_mm.append(timed(lambda: [torch.matmul(a, c) for _ in range(inner)],
                                  s.device)[1] / inner)
                t_panel.append(timed(lambda: [torch.linalg.lu_factor(panel)
                                              for _ in range(inner)], s.device)[1] / inner)
            flops = banded_lu_flops(system.block_sizes)
            lu_rate = flops / min(t_lu) / 1e9
            mm_rate = 2 * b ** 3 / min(t_mm) / 1e9
            panel_rate = (2 * b * b * b - b ** 3 / 3) / min(t_panel) / 1e9
            row = {"dtype": str(dtype).replace("torch.", ""), "block": b, "blocks": blocks,
                   "gflop": flops / 1e9, "t_banded_lu": min(t_lu),
                   "banded_lu_gflops": lu_rate, "matmul_gflops": mm_rate,
                   "panel_lu_gflops": panel_rate, "fraction": lu_rate / mm_rate,
                   "device": str(s.device)}
            rows.append(row)
            s.log(f"[lu rate] {row['dtype']} b={b}: banded_lu {lu_rate:.1f} GFLOP/s, matmul "
                  f"{mm_rate:.1f}, panel LU {panel_rate:.1f}: {100 * row['fraction']:.0f}%")
    s.lu_rates += rows
    return rows


# --------------------------------------------------------------------------
# Sections: dense, depth, width, image-sized input
# --------------------------------------------------------------------------


def measure_one_shot(s: Settings, section: str, problem: Problem, repeats: int,
                     route: Route = DEFAULT, hvp: bool = True) -> tuple[Record, Optional[Record]]:
    """Our one-shot solve and (``hvp``) the fastest autograd HVP, round-robin; peak memory."""
    product = double_backward_hvp_fn(problem)

    def ours():
        return one_shot_job(problem, s.damping, route)

    jobs = {"ours": (ours, route.max_repeats)}
    if hvp:
        product(problem.v)
        jobs["hvp"] = (product_job(product, problem), 1000)
    timing = round_robin(jobs, repeats, s.log)
    medians, x, runs, err = timing["ours"]
    rec = new_record(section, f"ours: {route.label}", problem, damping=s.damping,
                     repeats=runs, t_total=medians.get("t_total"))
    hrec = None
    if hvp:
        hrec = new_record(section, FASTEST_HVP, problem, t_total=timing["hvp"][0]["t_total"],
                          repeats=timing["hvp"][2])
        hrec.ratio_to_hvp = 1.0
    if err is not None:
        rec.note = f"refused: {type(err).__name__}"
    else:
        rec.residual = relative_residual(problem, x, s.damping)
        if hrec:
            rec.ratio_to_hvp = rec.t_total / hrec.t_total
        if "peak_bytes" in medians:
            rec.peak_bytes = int(medians["peak_bytes"])
        elif s.memory:
            rec.peak_bytes = peak_bytes_of_one_shot(problem, s.damping, route)
    s.records += [r for r in (rec, hrec) if r]
    return rec, hrec


def run_dense_comparison(s: Settings, width: int, batch: int, depths: list) -> dict:
    """Ours against the dense route at the largest depth whose dense Hessian fits."""
    fitting = [L for L in depths if mlp_num_params(L, width, width) <= s.dense_max_params]
    if not fitting:
        return {}
    L = max(fitting)
    section = "dense comparison"
    problem = make_problem(L, width, batch, width, s.device, s.dtype)
    s.log(f"[{section}] L={L}, n = {problem.num_params:,}: dense route...")
    dense = measure_dense(section, problem, s.damping)
    ours, _ = measure_one_shot(s, section, problem, s.repeats, hvp=False)
    s.records.append(dense)
    return {"dense": dense, "ours": ours, "problem": problem}


#: Peak-memory rises below this are not fitted (the allocator's granularity).
MEMORY_FLOOR = 8 * 2 ** 20


def fit_exponent(xs, ys) -> float:
    lx, ly = np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float))
    return float(np.polyfit(lx, ly, 1)[0])


def run_depth_sweep(s: Settings, depths: list, width: int, batch: int) -> dict:
    rows = []
    for L in depths:
        s.log(f"[depth] L={L}")
        problem = make_problem(L, width, batch, width, s.device, s.dtype)
        ours, hvp = measure_one_shot(s, "depth sweep", problem, s.repeats)
        rows.append((L, problem.num_params, ours, hvp))
    timed_rows = [r for r in rows if r[2].t_total]
    exp_time = (fit_exponent([r[0] for r in timed_rows], [r[2].t_total for r in timed_rows])
                if len(timed_rows) > 1 else float("nan"))
    # Below a few MB the rise of resident memory is the allocator's granularity, not the
    # solve's: those depths are left out of the memory fit.
    mem = [r for r in rows if r[2].peak_bytes and r[2].peak_bytes >= MEMORY_FLOOR]
    exp_mem = (fit_exponent([r[0] for r in mem], [r[2].peak_bytes for r in mem])
               if len(mem) > 1 else float("nan"))
    return {"rows": rows, "exp_time": exp_time, "exp_memory": exp_mem,
            "fit_range": (rows[0][0], rows[-1][0]),
            "memory_range": (mem[0][0], mem[-1][0]) if mem else None,
            "width": width, "batch": batch}


def run_width_sweep(s: Settings, widths: list, layers: int, batch: int) -> dict:
    rows = []
    for w in widths:
        s.log(f"[width] width={w}")
        problem = make_problem(layers, w, batch, w, s.device, s.dtype)
        ours, _ = measure_one_shot(s, "width sweep", problem, s.repeats, hvp=False)
        generic = None
        block = generic_block(problem)
        if block <= s.generic_max_block:
            route = Route("generic", path="generic", max_repeats=1, keywords={"factor_dtype": None})
            generic, _ = measure_one_shot(s, "width sweep", problem, 1, route, hvp=False)
        rows.append((w, problem.num_params, ours, generic, block))
    return {"rows": rows, "layers": layers, "batch": batch}


def run_wide_input(s: Settings, input_dim: int, width: int, layers: int, batch: int) -> dict:
    s.log(f"[wide input] d={input_dim} w={width} L={layers} B={batch}")
    problem = make_problem(layers, width, batch, input_dim, s.device, s.dtype)
    ours, hvp = measure_one_shot(s, "wide input", problem, s.repeats)
    return {"ours": ours, "hvp": hvp, "problem": problem}


# --------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------


def _s(t: Optional[float]) -> str:
    if t is None:
        return ""
    return f"{t:.4f}" if t < 0.01 else (f"{t:.3f}" if t < 100 else f"{t:.0f}")


def _mb(b: Optional[int]) -> str:
    if b is None:
        return ""
    return f"{b / 2**20:.1f}" if b < 10 * 2**20 else f"{b / 2**20:,.0f}"


def _x(r: Optional[float]) -> str:
    if r is None:
        return ""
    return f"{r:.2f}x" if r < 10 else (f"{r:.1f}x" if r < 100 else f"{r:,.0f}x")


def _e(r: Optional[float]) -> str:
    return "" if r is None else f"{r:.1e}"


def md_table(header: list, rows: list, right: Optional[set] = None) -> str:
    """A markdown table; columns in ``right`` (indices) right-aligned (default: all but 0)."""
    right = set(range(1, len(header))) if right is None else right
    esc = lambda c: str(c).replace("|", "\\|")
    lines = ["| " + " | ".join(esc(h) for h in header) + " |",
             "| " + " | ".join("---:" if i in right else "---" for i in range(len(header))) + " |"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Section:
    title: str
    intro: str
    body: str

    def markdown(self) -> str:
        parts = [f"## {self.title}"]
        if self.intro:
            parts.append(self.intro)
        parts.append(self.body)
        return "\n\n".join(parts)


def case_name(p: Problem, full: bool = False) -> str:
    size = f"L = {p.layers}, width {p.width}, batch {p.batch}"
    if full or p.input_dim != p.width:
        size += f", input {p.input_dim}"
    if full or p.classes != 10:
        size += f", {p.classes} classes"
    return size


def _n(value) -> str:
    return "" if value is None else f"{value:,}"


def section_routes(s: Settings, out: dict, title: str) -> Section:
    p = out["problem"]
    rows = []
    for r in out["rows"]:
        rows.append([r.method, _s(r.t_derivatives), _s(r.t_factorize), _s(r.t_solve),
                     _s(r.t_total), _x(r.ratio_to_hvp), _n(r.kernels), _n(r.syncs),
                     _mb(r.peak_bytes), _e(r.residual), _e(r.backward_error), r.note])
    intro = (f"{case_name(p)} (n = {p.num_params:,} parameters), damping {s.damping:g}, "
             f"{str(p.v.dtype).replace('torch.', '')} on {p.device.type}. \"one-shot\" is one "
             "`hessian_inverse_vector_product` call (derivatives, factorisation and the "
             "refined solve of `v`, which is its own acceptance test); derivatives / "
             "factorisation / solve are the same work split into `hessian_operator`, the "
             "inverse and `inv @ v`. \"/ HVP\" divides by the fastest exact Hessian-vector "
             "product: plain autograd, the loss's gradient with `create_graph=True` and the "
             "gradient of `<g, v>`, forward pass included (the first row; torch.func's "
             "`jvp(grad)` is slower). \"kernels\" counts the aten ops that are not views in one "
             "call, \"syncs\" its reads of device values by the host (both by a "
             "`TorchDispatchMode`, in a separate untimed call). \"residual\" is "
             "`||(B + eps I) x - v|| / ||v||` by autograd products (B the Hessian, or for GGN "
             "rows the Gauss-Newton matrix); \"backward error\" is the library's own figure.")
    body = md_table(["method", "derivatives s", "factorisation s", "solve s", "one-shot s",
                     "/ HVP", "kernels", "syncs", "peak MB", "residual", "backward error",
                     "note"], rows, right=set(range(1, 11)))
    if out["notes"]:
        body += "\n\n" + "\n".join(f"- {n[0].upper() + n[1:]}." for n in out["notes"])
    return Section(title, intro, body)


def section_author(out: dict) -> Section:
    p = out["problem"]
    rows = [[r.method, _s(r.t_total), _x(r.ratio_to_hvp), _e(r.residual), r.note]
            for r in out["rows"]]
    theirs, ours = out["rows"]
    ratio = theirs.t_total / ours.t_total if theirs.t_total and ours.t_total else None
    intro = (f"{case_name(p)}, no biases (the author's network has none; n = "
             f"{p.num_params:,}), damping from the table above. The author's own "
             "`SequenceOfDenseBlocks.hessian_inverse_product` (github.com/a-rahimi/hessian, "
             "run from a checkout outside this project with `--author-src`) against our "
             f"one-shot solve: **{_x(ratio)}**. \"/ HVP\" as above.")
    return Section("The paper author's code", intro,
                   md_table(["method", "seconds", "/ HVP", "residual", "note"], rows,
                            right={1, 2, 3}))


def section_ggn(outs: list) -> Section:
    p = outs[0]["problem"]
    rows = []
    for out in outs:
        cg = [r for r in out["rows"] if r.method.startswith("CG") and r.t_total]
        fastest_cg = min(cg, key=lambda r: r.t_total) if cg else None
        for r in out["rows"]:
            rows.append([f"{out['damping']:g}", r.method, _s(r.t_total),
                         _x(fastest_cg.t_total / r.t_total) if fastest_cg and r.t_total else "",
                         "" if r.products is None else r.products, _n(r.kernels), _n(r.syncs),
                         _e(r.residual), r.note])
    intro = (f"{case_name(p, full=True)} (n = "
             f"{p.num_params:,}), {str(p.v.dtype)[6:]}. Each exact row is one one-shot "
             "`hessian_inverse_vector_product(..., curvature='ggn')` (derivatives included); "
             "each CG row starts from the model too: its setup (our derivatives, or the "
             "autograd linearisation) and every product are timed, until the relative "
             f"residual is {outs[0]['cg_rtol']:.0e}. \"fastest CG / this\" > 1 means faster "
             "than the fastest CG. Residuals by the autograd GGN product.")
    body = md_table(["damping", "method", "seconds", "fastest CG / this", "products",
                     "kernels", "syncs", "residual", "note"], rows, right={0, 2, 3, 4, 5, 6, 7})
    return Section("Gauss-Newton: exact solve against conjugate gradients", intro, body)


def section_kernels(out: dict, cyclic: dict) -> Section:
    p = out["problem"]
    hvp = find(out["rows"], FASTEST_HVP)
    rows = [[r.method, _n(r.kernels), _x(r.kernels / hvp.kernels) if r.kernels else "",
             _n(r.syncs), _n(r.checked_linalg), r.note] for r in out["rows"]]
    intro = (f"{case_name(p)} (n = {p.num_params:,}), damping {out['rows'][-1].damping:g}: one "
             "call each, counted by a `TorchDispatchMode` (no timing). \"kernels\" are the aten "
             "ops that are not views (on a GPU, about one launch each); \"/ HVP\" against the "
             "fastest HVP's; \"syncs\" the host reads of device values (`item`, `bool`, "
             "`tolist`, `nonzero`, ...); \"CUDA-checked\" the linalg calls that read a LAPACK "
             "status on the host on CUDA only (SVD, eigh: synchronisations there, not here).")
    body = md_table(["method", "kernels", "/ HVP", "syncs", "CUDA-checked", "note"], rows,
                    right={1, 2, 3, 4})
    c = cyclic
    crow = [[r["layers"], r["blocks"], r["levels"], _n(r["cyclic"]), _n(r["cyclic_solve"]),
             _n(r["banded"])] for r in c["rows"]]
    body += ("\n\nThe factorisations of the structured route's reduced system (2L blocks, pairs "
             f"merged for cyclic reduction; width {c['width']}, batch {c['batch']}: the counts "
             "do not depend on the block size): cyclic reduction issues a constant number of "
             "batched calls per level, log2 L levels; the banded LU nine calls per block.\n\n"
             + md_table(["L", "blocks", "levels", "cyclic reduction kernels",
                         "cyclic solve kernels", "banded LU kernels"], crow))
    return Section("Kernels and host synchronisations", intro, body)


def section_lu(rows: list) -> Section:
    intro = ("`banded_lu` (pivoted block LU; panel LU, triangular solve and update per "
             "block) on a synthetic block-tridiagonal system of 4 dense blocks, its flops "
             "counted by `banded_lu_flops` (about 23/3 b^3 per block of size b), against "
             "`torch.matmul` of two b x b matrices (2 b^3 flops) and LAPACK's LU of one "
             "2b x b panel alone (`torch.linalg.lu_factor`), timed round-robin, each rate "
             "from the fastest of 5 timings (the least disturbed, for all three alike).")
    body = md_table(["dtype", "block b", "GFLOP", "banded_lu s", "banded_lu GFLOP/s",
                     "matmul GFLOP/s", "panel LU GFLOP/s", "banded_lu / matmul"],
                    [[r["dtype"], r["block"], f"{r['gflop']:.2f}", _s(r["t_banded_lu"]),
                      f"{r['banded_lu_gflops']:.1f}", f"{r['matmul_gflops']:.1f}",
                      f"{r['panel_lu_gflops']:.1f}", f"{100 * r['fraction']:.0f}%"]
                     for r in rows], right=set(range(1, 8)))
    return Section("The factorisation against the GEMM rate", intro, body)


def section_dense(out: dict) -> Section:
    if not out:
        return Section("Against the dense route", "", "The dense Hessian fits at no depth tried.")
    d, o, p = out["dense"], out["ours"], out["problem"]
    intro = (f"{case_name(p)}, n = {p.num_params:,}: the largest depth tried where the dense "
             f"Hessian fits. Dense / ours = **{_x(d.t_total / o.t_total)}**.")
    body = md_table(["method", "Hessian or derivatives s", "solve s", "total s", "residual",
                     "note"],
                    [[d.method, _s(d.t_derivatives), _s(d.t_solve), _s(d.t_total),
                      _e(d.residual), d.note],
                     [f"ours, one-shot ({DEFAULT.label})", "", "", _s(o.t_total),
                      _e(o.residual), o.note]], right={1, 2, 3, 4})
    return Section("Against the dense route", intro, body)


def section_depth(out: dict) -> Section:
    rows = [[L, f"{n:,}", _s(o.t_total), _s(h.t_total), _x(o.ratio_to_hvp), _mb(o.peak_bytes),
             _e(o.residual)] for L, n, o, h in out["rows"]]
    lo, hi_ = out["fit_range"]
    memory = out["memory_range"]
    memory_fit = (f"peak memory like **L^{out['exp_memory']:.2f}** (over L = {memory[0]}.."
                  f"{memory[1]}, where it rises by {MEMORY_FLOOR // 2**20} MB or more: below "
                  "that the resident set moves by the allocator's granularity)"
                  if memory else "peak memory not measured")
    intro = (f"Width {out['width']}, batch {out['batch']}, one-shot solves with the defaults, "
             "against the fastest HVP. "
             f"Time grows like **L^{out['exp_time']:.2f}** (least-squares fit over L = "
             f"{lo}..{hi_}) and {memory_fit}.")
    body = md_table(["L", "n", "one-shot s", "fastest HVP s", "/ HVP", "peak MB", "residual"],
                    rows)
    return Section("Depth", intro, body)


def section_width(out: dict, wide: Optional[dict]) -> Section:
    rows = []
    for w, n, o, g, block in out["rows"]:
        rows.append([w, f"{n:,}", _s(o.t_total), _mb(o.peak_bytes), _e(o.residual),
                     _s(g.t_total) if g else f"(blocks of {block:,})",
                     _mb(g.peak_bytes) if g else "",
                     _x(g.t_total / o.t_total) if g and g.t_total and o.t_total else ""])
    intro = (f"L = {out['layers']}, batch {out['batch']}, one-shot solves; the generic route "
             "ran where its lifted blocks (p + 2a rows) fit the limit.")
    body = md_table(["width", "n", "ours s", "peak MB", "residual", "generic s", "generic MB",
                     "generic / ours"], rows)
    if wide:
        o, p = wide["ours"], wide["problem"]
        body += (f"\n\nAn image-sized input layer ({case_name(p)}, n = {p.num_params:,}): "
                 f"one-shot {_s(o.t_total)} s ({_x(o.ratio_to_hvp)} the fastest HVP), peak "
                 f"{_mb(o.peak_bytes)} MB, residual {_e(o.residual)}.")
    return Section("Width", intro, body)


def target(s: Settings, name: str, met: Optional[bool], figure: str) -> None:
    status = "n/a" if met is None else ("met" if met else "**not met**")
    s.targets.append({"target": name, "status": status, "figure": figure})


def section_targets(s: Settings, quick: bool) -> Section:
    intro = "The performance targets (one thread, ratios from this run)."
    if quick:
        intro += " **Quick run: smaller sizes, so these are indicative only.**"
    body = md_table(["target", "status", "figure"],
                    [[t["target"], t["status"], t["figure"]] for t in s.targets], right=set())
    return Section("Targets", intro, body)


def machine_description(s: Settings) -> str:
    """One line: the machine class, torch, device, threads."""
    cpu, flags, mem = platform.machine(), "", ""
    try:
        with open("/proc/cpuinfo") as fh:
            text = fh.read()
        names = [l.split(":", 1)[1].strip() for l in text.splitlines()
                 if l.startswith("model name")]
        cpu = names[0] if names else cpu
        flag_line = next((l for l in text.splitlines() if l.startswith("flags")), "")
        flags = "AVX-512" if "avx512f" in flag_line else ("AVX2" if "avx2" in flag_line else "")
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            kib = int(next(l for l in fh if l.startswith("MemTotal")).split()[1])
        mem = f", {kib / 2**20:.0f} GB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    threads = torch.get_num_threads()
    desc = (f"{os.cpu_count()}-core {platform.machine()} machine ({cpu}"
            f"{', ' + flags if flags else ''}{mem}), torch {torch.__version__}, "
            f"{threads} torch thread{'s' if threads > 1 else ''}")
    if s.device.type == "cuda":
        desc += f", GPU {torch.cuda.get_device_name(s.device)}"
    return desc


def write_records(path: str, s: Settings, command: str) -> None:
    records = [asdict(r) for r in s.records]
    if path.endswith(".json"):
        with open(path, "w") as fh:
            json.dump({"command": command, "machine": machine_description(s),
                       "records": records, "lu_rates": s.lu_rates, "targets": s.targets},
                      fh, indent=1)
    else:
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)


def page(s: Settings, sections: list, command: str, wall: float) -> str:
    """The whole of docs/performance.md."""
    clock_text = ("every time being CPU time of the process (`time.process_time`, one torch "
                  "thread), which the other jobs' share of the cores does not inflate; on an "
                  "idle machine it equals wall time" if CLOCK["name"] == "cpu" else
                  "every time being wall-clock time")
    head = f"""# Performance

What the exact inverse costs against the usual alternatives. Every figure on this
page comes from one run of

```bash
{command}
```

on a {machine_description(s)}, which took {wall / 60:.0f} minutes; the load average (1, 5, 15 min)
was {s.load_at_start} at the start. On a shared machine absolute times move between
runs, so read the **ratios**: the methods of each table were timed round-robin in the
same run (medians of the repeats; in the GEMM-rate table the fastest of 5), {clock_text}.
The yardstick is the fastest exact Hessian-vector product, plain autograd double
backward with the forward pass included. Kernel and host-synchronisation counts come
from a `TorchDispatchMode` in separate, untimed calls: a proxy, on any CPU, for the
launch cost on a GPU. The command rewrites this whole page; other uses:

```bash
python bench_hessian.py --quick                   # smaller sizes, a few minutes
python bench_hessian.py --out results.json        # every measurement (.json or .csv)
python bench_hessian.py --layers 256 --width 32 --batch 8 --classes 10   # one case
python bench_hessian.py --author-src PATH         # also the paper author's own code
./gpu_check.sh                                    # on a CUDA machine (see the script)
```

Setup: tanh MLPs whose output layer is fused with softmax cross-entropy (`L` counts
every layer), random inputs, one random vector `v`, {str(s.dtype).replace('torch.', '')},
damping {s.damping:g} unless a table says otherwise. "Peak MB" is the rise of resident
memory during one one-shot solve in a fresh process. The routes are described in the
[README](../README.md#which-route-runs-and-how-accurate-it-is) and in
[docs/ALGORITHM.md](ALGORITHM.md) ("Choosing the route", "Cost and memory"); training
sizes are in [training.md](training.md#feasible-sizes). In float32 the damping must be
large enough for the problem's conditioning (errors grow like float32 rounding times
the condition number of `B + eps I`).
"""
    return head + "\n" + "\n\n".join(sec.markdown() for sec in sections) + "\n"


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def _headline_targets(s: Settings, out: dict, author: Optional[dict]) -> None:
    p, hvp_t = out["problem"], out["hvp"]
    size = f"L={p.layers}, w{p.width}, B{p.batch}"
    rows = {r.method: r for r in out["rows"]}
    default = rows.get(f"ours, Hessian: {DEFAULT.label}")
    structured = rows.get("ours, Hessian: structured, banded LU")
    if default and default.t_total:
        extra = (f"; the structured route {_x(structured.ratio_to_hvp)}"
                 if structured and structured.t_total else "")
        target(s, f"{size}: one-shot solve <= 8x the fastest HVP (autograd double backward)",
               default.ratio_to_hvp <= 8, f"{_x(default.ratio_to_hvp)} ({_s(default.t_total)} s, "
               f"ran {default.route}, vs {_s(hvp_t)} s){extra}")
    re_impl = out.get("author")
    if re_impl and re_impl.t_total and default and default.t_total:
        ratio = re_impl.t_total / default.t_total
        figure = f"{_x(ratio)} ({_s(re_impl.t_total)} s vs {_s(default.t_total)} s)"
        if author:
            theirs, ours = author["rows"]
            if theirs.t_total and ours.t_total:
                figure += (f"; the author's own code {_x(theirs.t_total / ours.t_total)} "
                           f"({_s(theirs.t_total)} s vs {_s(ours.t_total)} s, no biases)")
        target(s, f"{size}: the paper author's method (unpivoted block LDL^T, our "
               "re-implementation) >= 12x slower than ours", ratio >= 12, figure)
    else:
        target(s, "the paper author's method >= 12x slower than ours", None,
               "not run at this size (see the routes table)")


def _kernel_targets(s: Settings, kernels: dict, cyclic: dict) -> None:
    p = kernels["problem"]
    rows = {r.method: r for r in kernels["rows"]}
    hvp = rows[FASTEST_HVP]
    for curvature in ("Hessian", "GGN"):
        r = rows.get(f"ours, {curvature}: auto (defaults)")
        if r and r.kernels:
            target(s, f"L={p.layers}: kernels per one-shot solve <= 2x an HVP's ({curvature}, "
                   "defaults)", r.kernels <= 2 * hvp.kernels,
                   f"{_x(r.kernels / hvp.kernels)} ({r.kernels:,} vs {hvp.kernels:,}; {r.note})")
    counted = [r for r in kernels["rows"] if r.method.startswith("ours") and r.syncs is not None]
    if counted:
        worst = max(counted, key=lambda r: r.syncs)
        target(s, "host synchronisations per one-shot solve <= 4", worst.syncs <= 4,
               ", ".join(f"{r.method[len('ours, '):]}: {r.syncs}" for r in counted))
    rows = cyclic["rows"]
    if len(rows) > 1:
        increments = [(b["cyclic"] - a["cyclic"]) / max(b["levels"] - a["levels"], 1)
                      for a, b in zip(rows, rows[1:])]
        flat = max(increments) <= min(increments) + 1e-9 if increments else True
        target(s, "cyclic factorisation: kernels grow no faster than log L", flat,
               ", ".join(f"L={r['layers']}: {r['cyclic']:,} ({r['levels']} levels)" for r in rows)
               + f"; banded LU {rows[-1]['banded']:,} at L={rows[-1]['layers']}")


def run_full(s: Settings, args) -> list:
    quick = s.quick
    sections = []
    headline_L = 32 if quick else 128
    problem = make_problem(headline_L, 16, 8, 16, s.device, s.dtype)
    head = run_routes(s, "routes", problem, s.repeats if quick else max(s.repeats, 5))
    sections.append(section_routes(s, head, "Every route on one problem"))
    author = None
    if s.author_src:
        author = run_author_code(s, problem)
        sections.append(section_author(author))
    _headline_targets(s, head, author)

    ggn_problem = make_problem(32, 16, 8, 8, s.device, s.dtype, classes=10)
    ggn_outs = [run_ggn_vs_cg(s, ggn_problem, d, max(s.repeats, 5 if not quick else 3),
                              args.cg_rtol) for d in (1e-2, 1e-3)]
    sections.append(section_ggn(ggn_outs))
    for out in ggn_outs:
        ratio, figure = ggn_speedup(out)
        target(s, f"GGN at L=32, w16, B8, 10 classes, damping {out['damping']:g}: exact "
               "(defaults) >= 5x faster than CG to 1e-10 on exact GGN products, setup included",
               None if ratio is None else ratio >= 5, figure)

    kernels = run_kernel_counts(s, make_problem(64 if quick else 256, 16, 8, 16, s.device,
                                                s.dtype))
    cyclic = run_cyclic_counts(s, [16, 64, 256] if quick else [64, 256, 1024], 8, 4)
    sections.append(section_kernels(kernels, cyclic))
    _kernel_targets(s, kernels, cyclic)

    blocks = args.lu_blocks or ([128, 256, 512] if quick else [128, 256, 512, 1024])
    lu_dtypes = [s.dtype] + ([torch.float32] if s.dtype == torch.float64 else [])
    sections.append(section_lu(run_lu_rate(s, blocks, lu_dtypes)))

    dense = run_dense_comparison(s, 16, 8, [4, 8, 12, 16, 24, 32, 40, 44, 48, 56, 64])
    sections.append(section_dense(dense))
    depths = [32, 64, 128] if quick else [32, 64, 128, 256, 512]
    depth = run_depth_sweep(s, depths, 16, 4)
    sections.append(section_depth(depth))
    target(s, f"depth: time exponent <= 1.1 (L = {depths[0]}..{depths[-1]})",
           depth["exp_time"] <= 1.1 if math.isfinite(depth["exp_time"]) else None,
           f"L^{depth['exp_time']:.2f}")
    target(s, "depth: peak memory linear (exponent <= 1.1)",
           depth["exp_memory"] <= 1.1 if math.isfinite(depth["exp_memory"]) else None,
           f"L^{depth['exp_memory']:.2f}")

    width = run_width_sweep(s, [8, 16, 32] if quick else [8, 16, 32, 64], 32, 4)
    wide = run_wide_input(s, 3072, 32, 8, 8)
    sections.append(section_width(width, wide))
    if dense:
        d, o = dense["dense"], dense["ours"]
        target(s, f">= 100x faster than dense at the largest depth it fits (L={d.layers})",
               d.t_total / o.t_total >= 100 if o.t_total else None,
               f"{_x(d.t_total / o.t_total)} ({_s(d.t_total)} s vs {_s(o.t_total)} s)")
    o = wide["ours"]
    target(s, "input 3072, w32, L8, B8: under 5 s and 2 GB",
           bool(o.t_total and o.t_total < 5 and (o.peak_bytes or 0) < 2 * 2**30)
           if o.t_total else None, f"{_s(o.t_total)} s, {_mb(o.peak_bytes)} MB peak")

    if s.device.type == "cuda":
        for dtype in (torch.float32, torch.float64):
            s.dtype = dtype
            p = make_problem(1024, 32, 16, 32, s.device, dtype)
            out = run_routes(s, f"gpu {dtype}", p, s.repeats, extras=False, ggn=False)
            sections.append(section_routes(s, out, f"GPU, {str(dtype)[6:]}: L = 1024, width 32, "
                                                   "batch 16"))
    else:
        target(s, "GPU: L=1024, w32, B16 and the ImageNet size, float32 and float64", None,
               "not measured here (no GPU): `./gpu_check.sh` on a CUDA machine")
    sections.append(section_targets(s, quick))
    return sections


def run_single(s: Settings, args) -> list:
    """One case: every route, kernels and syncs, the GGN against CG, and (``--lu-blocks``)
    the LU rate."""
    classes = args.classes
    problem = make_problem(args.layers or 128, args.width or 16, args.batch or 8,
                           args.input_dim or args.width or 16, s.device, s.dtype,
                           classes=classes)
    sections = []
    out = run_routes(s, "routes", problem, s.repeats, ggn=not args.no_ggn)
    sections.append(section_routes(s, out, f"Every route: {case_name(problem)}"))
    if not args.no_ggn:
        ggn = run_ggn_vs_cg(s, problem, s.damping, s.repeats, args.cg_rtol)
        sections.append(section_ggn([ggn]))
    if args.lu_blocks:
        lu_dtypes = [s.dtype] + ([torch.float32] if s.dtype == torch.float64 else [])
        sections.append(section_lu(run_lu_rate(s, args.lu_blocks, lu_dtypes)))
    return sections


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); use 1 on a busy machine")
    parser.add_argument("--repeats", type=int, default=None, help="runs per timing (median)")
    parser.add_argument("--out", default=None, help="write every measurement to .csv or .json")
    parser.add_argument("--markdown", default=None, metavar="PATH",
                        help="write the whole page (e.g. docs/performance.md) from this run")
    parser.add_argument("--dense-max-params", type=int, default=None,
                        help="largest n for the dense route (its Hessian is n^2 numbers)")
    parser.add_argument("--generic-max-block", type=int, default=None,
                        help="largest lifted block p + 2a for the generic route and the "
                             "author's method")
    parser.add_argument("--minres-cap", type=int, default=None,
                        help="MINRES iterations at most (0: skip MINRES)")
    parser.add_argument("--cg-cap", type=int, default=2000, help="CG products at most")
    parser.add_argument("--cg-rtol", type=float, default=None,
                        help="CG's relative residual (default 1e-10 in float64, eps^(2/3) in "
                             "float32)")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory runs")
    parser.add_argument("--author-src", default=None, metavar="PATH",
                        help="src/ of a checkout of github.com/a-rahimi/hessian: also time the "
                             "paper author's own code (not part of this project)")
    parser.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                        help="time by the wall clock or by the process's CPU time (auto: CPU "
                             "time with --threads 1 on a CPU, where other jobs' load would "
                             "inflate wall times; wall time otherwise)")
    single = parser.add_argument_group("single case (any of these: run only this case)")
    single.add_argument("--layers", type=int, default=None)
    single.add_argument("--width", type=int, default=None)
    single.add_argument("--batch", type=int, default=None)
    single.add_argument("--input-dim", type=int, default=None, help="default: the width")
    single.add_argument("--classes", type=int, default=10)
    single.add_argument("--no-ggn", action="store_true", help="skip the GGN vs CG comparison")
    parser.add_argument("--lu-blocks", default=None,
                        type=lambda t: [int(b) for b in t.split(",") if b],
                        help="block sizes of the LU-rate section, e.g. 128,256,512,1024")
    parser.add_argument("--peak-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak_child:
        _peak_child(json.loads(args.peak_child))
        return 0

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    CLOCK.update(name=clock, fn=time.process_time if clock == "cpu" else time.perf_counter)
    single_case = any(v is not None for v in (args.layers, args.width, args.batch, args.input_dim))
    quick = args.quick
    s = Settings(device=device, dtype=getattr(torch, args.dtype), damping=args.damping,
                 quick=quick, repeats=args.repeats or (2 if quick else 3),
                 dense_max_params=args.dense_max_params or (2500 if quick else 18000),
                 minres_cap=args.minres_cap if args.minres_cap is not None
                 else (100 if quick else 200),
                 cg_cap=args.cg_cap,
                 generic_max_block=args.generic_max_block or (600 if quick else 800),
                 memory=not args.no_memory, author_src=args.author_src)
    argv_list = list(argv) if argv is not None else sys.argv[1:]
    command = "python bench_hessian.py " + " ".join(shlex.quote(a) for a in argv_list)
    s.log(f"{command}\n{machine_description(s)}\nclock: {clock}")
    started = time.perf_counter()
    sections = run_single(s, args) if single_case else run_full(s, args)
    wall = time.perf_counter() - started

    print(f"<!-- {command} -->")
    print(f"<!-- {machine_description(s)}; clock {clock}; wall time {wall:.0f} s -->\n")
    print("\n\n".join(sec.markdown() for sec in sections))
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(page(s, sections, command.strip(), wall))
        print(f"\nwrote {args.markdown}")
    if args.out:
        write_records(args.out, s, command)
        print(f"wrote {len(s.records)} records to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

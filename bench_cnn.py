"""Benchmark: exact Hessian and Gauss-Newton solves for convolutional networks (issue 19's
targets) against conjugate gradients and MINRES on exact products, in one run.

Targets (docs/ALGORITHM.md, "Convolutional layers", "The parameter-space route"):

  (a) digits: 1x8x8 inputs, conv 8ch 3x3 pad 1 -> tanh -> conv 8ch 3x3 stride 2 pad 1 ->
      tanh -> flatten -> linear 10, batch 32 (n = 1,954).
  (b) CIFAR: 3x32x32, three conv 16ch 3x3 pad 1 (strides 1, 2, 2) + tanh, flatten,
      linear 10, batch 8 (n = 15,338).

For each target and curvature (the Hessian; the Gauss-Newton matrix GGN, also at
``--ggn-dampings``), one one-shot
``hessian_inverse_vector_product(model, loss, g, damping)`` (route 'auto': the
parameter-space route for the Hessian, the output-space route for the GGN), warm (after a
warm-up solve), its tracked forward pass included; g is the loss gradient.  Beside it:

  - the yardstick, one autograd Hessian-vector product (forward, ``autograd.grad`` with
    ``create_graph=True``, grad of <g, v>), and for the GGN one autograd GGN-vector
    product (jvp of the logits, the loss's Hessian in them, vjp:
    ``bench_hessian.autograd_ggn``), both independent of the library's blocks; every residual ||(B + eps I) x - g|| / ||g|| is measured with them;
  - conjugate gradients (and MINRES for the indefinite Hessian) on those exact products,
    their setup (forward and first backward) included: at equal time (the iterations that
    fit in our solve's time: the residual and error they reach) and at equal accuracy
    (the time and products they need to reach our residual, capped);
  - peak memory of our solve: the rise of the resident-set high-water mark (VmHWM) in a
    fresh subprocess (glibc's MALLOC_MMAP_THRESHOLD_=65536, so freed blocks go back to
    the OS), and the process's whole peak RSS.

    python bench_cnn.py --markdown docs/performance_cnn.md   # full run, writes the page
    python bench_cnn.py --quick                              # (a), and (b)'s GGN only

Timing: one torch thread (``--threads 1``), the process's CPU time (``time.process_time``),
which other jobs sharing the cores do not inflate; medians over ``--repeats``.  The ratios
to the autograd product are the figures to read.  This script imports the library and
the other benchmarks' helpers, never the test fixtures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import hessian_inverse as hi
from bench_hessian import _reset_high_water_mark, _status_kib, autograd_ggn

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")

#: (input shape, channels, strides, batch) of each target; 10 classes, tanh, padding 1.
TARGETS = {"a": ((1, 8, 8), [8, 8], [1, 2], 32),
           "b": ((3, 32, 32), [16, 16, 16], [1, 2, 2], 8)}
#: The issue's limits: seconds per warm solve (and bytes), by (target, curvature).
LIMITS = {("a", "hessian"): (3.0, None), ("a", "ggn"): (0.2, None),
          ("b", "ggn"): (0.2, None), ("b", "hessian"): (60.0, 4e9)}
CLOCK = time.process_time


@dataclass
class Target:
    name: str
    model: hi.ConvNetWithTracking
    x: torch.Tensor
    t: torch.Tensor
    g: torch.Tensor

    @property
    def n(self) -> int:
        return self.g.numel()


def make_target(name: str, seed: int, dtype=torch.float64) -> Target:
    shape, channels, strides, batch = TARGETS[name]
    torch.manual_seed(seed)
    model = hi.ConvNetWithTracking(shape, 10, channels, strides=strides, padding=1,
                                   activation="tanh").to(dtype)
    x = torch.randn(batch, *shape, dtype=dtype)
    t = torch.randint(0, 10, (batch,))
    loss = model(x, t)
    g = torch.cat([p.reshape(-1) for p in torch.autograd.grad(loss, list(model.parameters()))])
    return Target(name, model, x, t, g.detach())


# --------------------------------------------------------------------------
# Exact products independent of the library's blocks
# --------------------------------------------------------------------------


def hessian_product(target: Target) -> Callable[[torch.Tensor], torch.Tensor]:
    """Forward and first backward once (create_graph); each product one double backward."""
    params = list(target.model.parameters())
    sizes = [p.numel() for p in params]
    grads = torch.autograd.grad(target.model(target.x, target.t), params, create_graph=True)

    def product(v: torch.Tensor) -> torch.Tensor:
        parts = [c.view(p.shape) for c, p in zip(v.split(sizes), params)]
        out = torch.autograd.grad(grads, params, parts, retain_graph=True)
        return torch.cat([o.reshape(-1) for o in out])

    return product


def ggn_product(target: Target) -> Callable[[torch.Tensor], torch.Tensor]:
    """J_o^T H_o J_o v: jvp of the logits, the loss's Hessian in the logits by jvp of its
    gradient, vjp (:func:`bench_hessian.autograd_ggn`, as curvlinops)."""
    return autograd_ggn(target.model, target.x, target.t)


def damped(product: Callable, eps: float) -> Callable:
    return lambda v: product(v) + eps * v


def relative_residual(apply: Callable, x: torch.Tensor, b: torch.Tensor) -> float:
    return ((apply(x) - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------
# Krylov baselines, stopped by a residual goal or a budget (products, seconds)
# --------------------------------------------------------------------------


def conjugate_gradients(apply: Callable, b: torch.Tensor, goal: float,
                        stop: Callable[[int], bool]) -> tuple[torch.Tensor, int, bool]:
    """CG from 0 until ||b - A x|| <= goal ||b|| (recursive residual) or ``stop(products)``;
    also whether it met a direction of non-positive curvature (where CG is undefined)."""
    x, r = torch.zeros_like(b), b.clone()
    p, rr, k = r.clone(), r.dot(r), 0
    while rr > (goal * b.norm()) ** 2 and not stop(k):
        q = apply(p)
        k += 1
        curvature = p.dot(q)
        if not curvature > 0:
            return x, k, True
        alpha = rr / curvature
        x, r = x + alpha * p, r - alpha * q
        rr, rr_old = r.dot(r), rr
        p = r + (rr / rr_old) * p
    return x, k, False


def minres(apply: Callable, b: torch.Tensor, goal: float,
           stop: Callable[[int], bool]) -> tuple[torch.Tensor, int, bool]:
    """MINRES (Paige and Saunders, as scipy's, no preconditioner) for symmetric A."""
    x = torch.zeros_like(b)
    r1, r2, y = b.clone(), b.clone(), b.clone()
    beta1 = beta = b.norm().item()
    oldb, dbar, epsln, phibar, cs, sn = 0.0, 0.0, 0.0, beta1, -1.0, 0.0
    w, w2 = torch.zeros_like(b), torch.zeros_like(b)
    k = 0
    while phibar > goal * beta1 and not stop(k) and beta > 0:
        v = y / beta
        y = apply(v)
        k += 1
        if k >= 2:
            y = y - (beta / oldb) * r1
        alfa = v.dot(y).item()
        y = y - (alfa / beta) * r2
        r1, r2 = r2, y
        oldb, beta = beta, y.norm().item()
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln, dbar = sn * beta, -cs * beta
        gamma = max(math.hypot(gbar, beta), 1e-300)
        cs, sn = gbar / gamma, beta / gamma
        phi, phibar = cs * phibar, sn * phibar
        w1, w2 = w2, w
        w = (v - oldeps * w1 - delta * w2) / gamma
        x = x + phi * w
    return x, k, False


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


def ours(target: Target, eps: float, curvature: str) -> tuple[torch.Tensor, float, str]:
    """One one-shot solve, tracked forward included: (x, seconds, route)."""
    start = CLOCK()
    loss = target.model(target.x, target.t, track_activations=True)
    x = hi.hessian_inverse_vector_product(target.model, loss, target.g, damping=eps,
                                          curvature=curvature)
    seconds = CLOCK() - start
    sizes = hi.LayerSizes.of_model(target.model, target.model.tracked_forward(),
                                   hi.closed_form_flags(target.model,
                                                        target.model.tracked_forward()))
    route = hi.choose_route("auto", eps, True, curvature, sizes)
    return x, seconds, route


def product_seconds(target: Target, curvature: str, repeats: int) -> float:
    """Median time of one exact product, its forward (and first backward) included."""
    v = torch.randn_like(target.g)
    times = []
    for _ in range(repeats):
        start = CLOCK()
        (hessian_product if curvature == "hessian" else ggn_product)(target)(v)
        times.append(CLOCK() - start)
    return statistics.median(times)


def krylov(target: Target, eps: float, curvature: str, method: str, goal: float,
           seconds: Optional[float], max_products: int) -> dict:
    """A Krylov solve from scratch (setup included), stopped by ``goal`` or the budget."""
    start = CLOCK()
    apply = damped((hessian_product if curvature == "hessian" else ggn_product)(target), eps)

    def stop(k):
        return k >= max_products or (seconds is not None and CLOCK() - start >= seconds)

    solver = conjugate_gradients if method == "cg" else minres
    x, products, breakdown = solver(apply, target.g, goal, stop)
    elapsed = CLOCK() - start
    return {"x": x, "seconds": elapsed, "products": products, "breakdown": breakdown,
            "residual": relative_residual(apply, x, target.g)}


def peak_memory(name: str, seed: int, eps: float, curvature: str) -> dict:
    """VmHWM rise and peak RSS of one warm solve in a fresh subprocess (or {})."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    spec = json.dumps(dict(name=name, seed=seed, eps=eps, curvature=curvature,
                           threads=torch.get_num_threads()))
    try:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--peak-child", spec],
                             env=env, capture_output=True, text=True, timeout=3600, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return {}


def _peak_child(spec: dict) -> None:
    torch.set_num_threads(spec["threads"])
    warm = make_target("a", 1)
    ours(warm, spec["eps"], spec["curvature"])          # load the kernels first
    target = make_target(spec["name"], spec["seed"])
    if not _reset_high_water_mark():                     # VmHWM := VmRSS
        print(json.dumps({}))
        return
    base = _status_kib("VmRSS")
    ours(target, spec["eps"], spec["curvature"])
    hwm = _status_kib("VmHWM")
    print(json.dumps({"rise_bytes": (hwm - base) * 1024, "peak_rss_bytes": hwm * 1024}))


def measure(name: str, curvature: str, eps: float, seeds: list, repeats: int,
            krylov_cap: float, log: Callable) -> dict:
    rows = []
    for seed in seeds:
        target = make_target(name, seed)
        ours(target, eps, curvature)                     # warm-up
        runs = [ours(target, eps, curvature) for _ in range(repeats)]
        x, route = runs[0][0], runs[0][2]
        seconds = statistics.median(r[1] for r in runs)
        product = product_seconds(target, curvature, 5)
        apply = damped((hessian_product if curvature == "hessian" else ggn_product)(target), eps)
        residual = relative_residual(apply, x, target.g)
        row = dict(seed=seed, n=target.n, route=route, seconds=seconds, product=product,
                   residual=residual)
        methods = ["cg", "minres"] if curvature == "hessian" else ["cg"]
        for method in methods:
            same_time = krylov(target, eps, curvature, method, 0.0, seconds, 10 ** 9)
            same_time["error"] = ((same_time["x"] - x).norm() / x.norm()).item()
            cap = max(krylov_cap * seconds, 20 * product)
            goal = max(residual, 1e-14)
            same_accuracy = krylov(target, eps, curvature, method, goal, cap, 20000)
            same_accuracy["reached"] = same_accuracy["residual"] <= 2 * goal
            row[method] = dict(same_time={k: v for k, v in same_time.items() if k != "x"},
                               same_accuracy={k: v for k, v in same_accuracy.items()
                                              if k != "x"})
        log(f"  ({name}) {curvature} seed {seed}: {seconds:.3f} s ({route}), residual "
            f"{residual:.1e}, one product {product * 1e3:.1f} ms")
        rows.append(row)
    return {"target": name, "curvature": curvature, "damping": eps, "rows": rows}


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def _med(rows: list, key: Callable) -> float:
    return statistics.median(key(r) for r in rows)


def table(results: list, memory: dict) -> str:
    lines = ["| target | curvature | damping | n | route | ours (s) | x one product | residual | "
             "peak memory | issue's limit | met |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---|---|"]
    for res in results:
        rows, key = res["rows"], (res["target"], res["curvature"])
        seconds = _med(rows, lambda r: r["seconds"])
        ratio = _med(rows, lambda r: r["seconds"] / r["product"])
        residual = max(r["residual"] for r in rows)
        mem = memory.get((*key, res["damping"]), {})
        limit_s, limit_b = LIMITS[key]
        met = seconds <= limit_s and residual <= 1e-10 and (
            limit_b is None or (mem.get("peak_rss_bytes") or math.inf) <= limit_b)
        peak = (f"{mem['rise_bytes'] / 2**30:.2f} GiB rise, {mem['peak_rss_bytes'] / 2**30:.2f}"
                f" GiB RSS" if mem else "")
        limit = f"{limit_s:g} s" + (f", {limit_b / 1e9:g} GB" if limit_b else "")
        lines.append(f"| ({res['target']}) | {res['curvature']} | {res['damping']:g} | "
                     f"{rows[0]['n']:,} | "
                     f"{rows[0]['route']} | {seconds:.3f} | {ratio:.1f} | {residual:.1e} | "
                     f"{peak} | {limit} | {'yes' if met else 'NO'} |")
    return "\n".join(lines)


def krylov_table(results: list) -> str:
    lines = ["| target | curvature | damping | method | equal time: products, residual, error | "
             "equal accuracy: seconds (x ours), products, residual |",
             "|---|---|---:|---|---|---|"]
    for res in results:
        rows = res["rows"]
        seconds = _med(rows, lambda r: r["seconds"])
        for method in ("cg", "minres"):
            if method not in rows[0]:
                continue
            t = [r[method]["same_time"] for r in rows]
            a = [r[method]["same_accuracy"] for r in rows]
            reached = all(x["reached"] for x in a)
            if any(x["breakdown"] for x in a):
                lines.append(f"| ({res['target']}) | {res['curvature']} | {res['damping']:g} | "
                             f"{method.upper()} | negative curvature after "
                             f"{statistics.median(x['products'] for x in a):.0f} products "
                             "(H + eps I is indefinite) | - |")
                continue
            lines.append(
                f"| ({res['target']}) | {res['curvature']} | {res['damping']:g} | "
                f"{method.upper()} | "
                f"{statistics.median(x['products'] for x in t):.0f}, "
                f"{statistics.median(x['residual'] for x in t):.1e}, "
                f"{statistics.median(x['error'] for x in t):.1e} | "
                f"{statistics.median(x['seconds'] for x in a):.2f} "
                f"({statistics.median(x['seconds'] for x in a) / seconds:.0f}x), "
                f"{statistics.median(x['products'] for x in a):.0f}, "
                f"{statistics.median(x['residual'] for x in a):.1e}"
                f"{'' if reached else ' (not reached: capped)'} |")
    return "\n".join(lines)


def page(results: list, memory: dict, args, wall: float) -> str:
    machine = (f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
               f"{torch.get_num_threads()} thread(s), float64, CPU time")
    return "\n\n".join([
        "# Convolutional networks: measured",
        f"Generated by `python bench_cnn.py {' '.join(sys.argv[1:])}` ({machine}; "
        f"{wall / 60:.1f} minutes).  Seeds "
        f"{', '.join(map(str, args.seeds))}; medians over seeds.  Targets and methods: the "
        "docstring of bench_cnn.py; derivations: [ALGORITHM.md](ALGORITHM.md), "
        "\"Convolutional layers\" and \"The parameter-space route\".",
        "## Our solves against the issue's limits\n\n'x one product': our one-shot solve "
        "(tracked forward, derivatives, factorisation, refined solve) as a multiple of one "
        "autograd product of the same curvature (forward included).  'residual': "
        "||(B + eps I) x - g|| / ||g|| through that independent product.  Peak memory: "
        "the high-water-mark rise during the solve in a fresh process, and that process's "
        "whole peak RSS (libraries included).\n\n" + table(results, memory),
        "## Against Krylov methods on exact products\n\nCG (and MINRES for the indefinite "
        "Hessian) from zero on the autograd products, setup included.  Equal time: what "
        "they reach in our solve's time (residual; error ||x - x_ours|| / ||x_ours||).  "
        "Equal accuracy: the time they need to reach our residual, capped at "
        f"{args.krylov_cap:g}x our time (and 20 000 products).  CG stops at the first "
        "direction of negative curvature.\n\n" + krylov_table(results),
    ]) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="target (a) and (b)'s GGN only, one seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--damping", type=float, default=1e-3, help="for every case")
    parser.add_argument("--ggn-dampings", type=float, nargs="*", default=[1e-6],
                        help="further dampings for the Gauss-Newton cases (cheap ones)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--krylov-cap", type=float, default=10.0,
                        help="equal accuracy: stop the Krylov methods at this multiple of "
                             "our time")
    parser.add_argument("--markdown", help="write the page here (e.g. docs/performance_cnn.md)")
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--peak-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.peak_child:
        _peak_child(json.loads(args.peak_child))
        return 0
    if args.quick:
        args.seeds = args.seeds[:1]
    start = time.perf_counter()
    cases = [("a", "hessian", args.damping)] + [
        (name, "ggn", eps) for name in ("a", "b") for eps in [args.damping] + args.ggn_dampings
    ] + ([] if args.quick else [("b", "hessian", args.damping)])
    results, memory = [], {}
    for name, curvature, eps in cases:
        print(f"({name}) {curvature}, damping {eps:g}", flush=True)
        seeds = args.seeds[:1] if (name, curvature) == ("b", "hessian") else args.seeds
        repeats = 1 if (name, curvature) == ("b", "hessian") else args.repeats
        results.append(measure(name, curvature, eps, seeds, repeats,
                               args.krylov_cap, lambda s: print(s, flush=True)))
        if eps == args.damping:
            memory[(name, curvature, eps)] = peak_memory(name, seeds[0], eps, curvature)
    text = page(results, memory, args, time.perf_counter() - start)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": results, "memory": {f"{k[0]}-{k[1]}-{k[2]:g}": v
                                                      for k, v in memory.items()}}, fh,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

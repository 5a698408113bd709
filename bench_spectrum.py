"""Benchmark of ``spectrum.py``: exact spectral quantities of the curvature against the
fastest exact Hessian-vector product and against the approximations users run today.

Sections (markdown tables on stdout, one run, methods side by side):

  ratios     At L=128, width 16, batch 8, float64 (the full run): each spectrum function
             as one call (tracked forward pass included), as a multiple of the fastest
             exact HVP (plain autograd double backward, forward pass included) timed in the
             same run, with the issue's targets; ``torch.func``'s HVP for reference.
  slq        The exact Morse index and spectral density against stochastic Lanczos
             quadrature (SLQ, as PyHessian and curvlinops run it: Rademacher starts, full
             reorthogonalisation, Ritz values weighted by squared first components) on
             autograd HVPs, given the same CPU time; a plot of both densities (``--plot``).
  diagonal   diag((GGN + damping I)^{-1}) exactly against Hutchinson's estimator
             mean(z * (GGN + damping I)^{-1} z) with conjugate gradients on autograd GGN
             products, given the same CPU time.
  dense      torch.func.hessian + torch.linalg (slogdet, eigvalsh, inv) against ours at
             growing depth: time, peak memory (the rise of the resident set's high-water
             mark in a fresh subprocess each, glibc returning freed blocks at once), and the
             largest n the dense route reaches in the memory given (``--dense-memory-gib``).

    python bench_spectrum.py                   # the full run (a few minutes on one core)
    python bench_spectrum.py --quick           # L=32
    python bench_spectrum.py --markdown out.md --plot docs/spectrum_density.png

Timing: one torch thread; each figure is the process's CPU time (time.process_time),
median over ``--repeats`` round-robin repeats.  This script imports the library only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np
import torch

import hessian_inverse as hi
import spectrum as sp
from bench_hessian import (autograd_ggn, double_backward_hvp, flat_parameters, func_hvp,
                          of_flat_parameters)

F64 = torch.float64


# --------------------------------------------------------------------------
# The problem and the yardsticks (autograd only)
# --------------------------------------------------------------------------


def make_problem(layers: int, width: int, batch: int, classes: int = 10, seed: int = 0):
    """``DeepMLPWithTracking(width, width, classes, layers - 1, 'tanh')`` in float64, a
    random batch, random targets."""
    torch.manual_seed(seed)
    model = hi.DeepMLPWithTracking(width, width, classes, layers - 1, "tanh").to(F64)
    x = torch.randn(batch, width, dtype=F64)
    t = torch.randint(0, classes, (batch,))
    return model, x, t


def tracked_loss(model, x, t):
    return model(x, t, track_activations=True)


def timed(fn):
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def round_robin(jobs: dict, repeats: int) -> dict:
    """Median CPU seconds of each job, every repeat running every job once."""
    times = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            times[name].append(timed(job)[1])
    return {name: statistics.median(ts) for name, ts in times.items()}


def md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# ratios
# --------------------------------------------------------------------------


def run_ratios(args, out: dict) -> str:
    model, x, t = make_problem(args.layers, args.width, args.batch)
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, dtype=F64)
    hvp, torch_func_hvp = double_backward_hvp(model, x, t), func_hvp(model, x, t)
    damping = args.damping
    spectrum = sp.Spectrum.of(model, tracked_loss(model, x, t))
    below = -0.01 * spectrum.norm
    jobs = {
        "HVP (autograd double backward)": lambda: hvp(v),
        "HVP (torch.func jvp of grad)": lambda: torch_func_hvp(v),
        "one-shot solve (H + eps I)^-1 v": lambda: hi.hessian_inverse_vector_product(
            model, tracked_loss(model, x, t), v, damping),
        "count_eigenvalues": lambda: sp.count_eigenvalues(model, tracked_loss(model, x, t),
                                                          below),
        "one count, operator held": lambda: spectrum.count_below(below),
        "slogdet (H + eps I)": lambda: sp.slogdet(model, tracked_loss(model, x, t), damping),
        "inverse_diagonal (H + eps I)": lambda: sp.inverse_diagonal(
            model, tracked_loss(model, x, t), damping),
        "inverse_diagonal (GGN + eps I)": lambda: sp.inverse_diagonal(
            model, tracked_loss(model, x, t), damping, curvature="ggn"),
        "inverse_diagonal (GGN + eps I), unchecked": lambda: sp.Spectrum.of(
            model, tracked_loss(model, x, t), "ggn").inverse_diagonal(damping, checks=0),
        "100 samples (GGN + eps I)": lambda: sp.sample(model, tracked_loss(model, x, t),
                                                       damping, 100),
    }
    for job in jobs.values():            # warm up (and surface refusals before timing)
        job()
    times = round_robin(jobs, args.repeats)
    hvp_t = times["HVP (autograd double backward)"]
    # one eigenvalue: the lowest, by bisection, counts tallied
    calls = []
    count_below = spectrum.count_below
    spectrum.count_below = lambda s: calls.append(s) or count_below(s)
    spectrum.bracket()
    bracket_counts = len(calls)
    lowest, eig_t = timed(lambda: spectrum.eigvalsh(subset_by_index=(0, 0), rtol=1e-10))
    counts = len(calls) - bracket_counts
    spectrum.count_below = count_below
    one_shot = times["one-shot solve (H + eps I)^-1 v"]
    rows = [[name, f"{sec:.4f}", f"{sec / hvp_t:.1f}x"] for name, sec in times.items()]
    rows.append([f"lowest eigenvalue to rtol 1e-10 ({counts} counts + {bracket_counts} for "
                 "the bracket)", f"{eig_t:.3f}", f"{eig_t / hvp_t:.1f}x"])
    count_x = times["count_eigenvalues"] / hvp_t
    held_x = times["one count, operator held"] / hvp_t
    samples_budget = one_shot + 100 * hvp_t
    targets = [
        ["one count <= 5x HVP", f"{count_x:.1f}x (operator held: {held_x:.1f}x)",
         "met" if count_x <= 5 else "not met"],
        ["slogdet <= one one-shot solve", f"{times['slogdet (H + eps I)']:.3f} s vs "
         f"{one_shot:.3f} s", "met" if times["slogdet (H + eps I)"] <= one_shot else "not met"],
        ["inverse_diagonal <= 15x HVP",
         f"H {times['inverse_diagonal (H + eps I)'] / hvp_t:.1f}x, GGN "
         f"{times['inverse_diagonal (GGN + eps I)'] / hvp_t:.1f}x (unchecked "
         f"{times['inverse_diagonal (GGN + eps I), unchecked'] / hvp_t:.1f}x)",
         "met" if max(times["inverse_diagonal (GGN + eps I)"],
                      times["inverse_diagonal (H + eps I)"]) <= 15 * hvp_t else "not met"],
        ["100 samples <= one solve + 100 HVPs",
         f"{times['100 samples (GGN + eps I)']:.3f} s vs {samples_budget:.3f} s",
         "met" if times["100 samples (GGN + eps I)"] <= samples_budget else "not met"],
        ["one eigenvalue to rtol 1e-10 in <= 60 counts", f"{counts} counts",
         "met" if counts <= 60 else "not met"],
    ]
    out["ratios"] = {"times": times, "n": n, "eigenvalue_counts": counts,
                     "lowest": lowest.item(), "damping": damping}
    return (f"### Ratios (L={args.layers}, width {args.width}, batch {args.batch}, float64, "
            f"n = {n:,}, eps = {damping:g}, threshold {below:.3g})\n\n"
            + md_table(["method", "CPU s", "/ HVP"], rows) + "\n\n"
            + md_table(["target", "measured", ""], targets))


# --------------------------------------------------------------------------
# SLQ against the exact Morse index and density
# --------------------------------------------------------------------------


def lanczos_nodes(matvec, n: int, steps: int, generator) -> tuple[np.ndarray, np.ndarray]:
    """Ritz values and squared first components of ``steps`` Lanczos steps (full
    reorthogonalisation) from a Rademacher start: one SLQ quadrature."""
    q = (torch.randint(0, 2, (n,), generator=generator) * 2 - 1).to(F64)
    basis, alpha, beta = [q / q.norm()], [], []
    for j in range(steps):
        w = matvec(basis[j])
        alpha.append(float(basis[j] @ w))
        Q = torch.stack(basis, 1)
        w = w - Q @ (Q.T @ w)
        w = w - Q @ (Q.T @ w)
        beta.append(float(w.norm()))
        if j + 1 == steps or beta[-1] < 1e-12 * max(map(abs, alpha)):
            break
        basis.append(w / beta[-1])
    T = np.diag(alpha) + np.diag(beta[:len(alpha) - 1], 1) + np.diag(beta[:len(alpha) - 1], -1)
    nodes, vectors = np.linalg.eigh(T)
    return nodes, vectors[0] ** 2


def run_slq(args, out: dict) -> tuple[str, dict]:
    model, x, t = make_problem(args.layers, args.width, args.batch)
    n = sum(p.numel() for p in model.parameters())
    hvp = double_backward_hvp(model, x, t)
    spectrum_, exact_t = timed(lambda: sp.Spectrum.of(model, tracked_loss(model, x, t)))
    (lo, hi_), t_bracket = timed(spectrum_.bracket)
    edges = np.linspace(lo, hi_, args.bins + 1)
    (negative, zero, positive), t_inertia = timed(spectrum_.inertia)
    density, t_density = timed(lambda: spectrum_.density(torch.tensor(edges)))
    density = density.numpy()
    budget = exact_t + t_bracket + t_density          # the exact density, all included
    morse_budget = exact_t + t_inertia
    generator = torch.Generator().manual_seed(0)
    quadratures, spent = [], 0.0
    while spent < budget or not quadratures:
        result, sec = timed(lambda: lanczos_nodes(hvp, n, args.slq_steps, generator))
        quadratures.append((result, spent + sec))
        spent += sec

    tol = sp.ZERO_TOLERANCE * spectrum_.norm

    def estimates(upto):
        """SLQ with the quadratures finished within ``upto`` seconds (at least one)."""
        used = [(q, at) for q, at in quadratures if at <= upto] or quadratures[:1]
        negative_est = n * np.mean([w[nodes < -tol].sum() for (nodes, w), _ in used])
        hist = n * np.mean([np.histogram(nodes, edges, weights=w)[0]
                            for (nodes, w), _ in used], 0)
        return len(used), used[-1][1], negative_est, hist

    k_morse, t_morse, negative_morse, _ = estimates(morse_budget)
    k, t_slq, negative_slq, hist = estimates(budget)
    l1 = float(np.abs(hist - density).sum() / n)
    rows = [["exact (ours): Morse index (inertia at 0)", f"{morse_budget:.2f}", negative, "0",
             ""],
            [f"SLQ ({k_morse} x {args.slq_steps} steps)", f"{t_morse:.2f}",
             f"{negative_morse:.1f}", f"{negative_morse - negative:+.1f}", ""],
            [f"exact (ours): density, {args.bins} bins", f"{budget:.2f}", negative, "0", "0"],
            [f"SLQ ({k} x {args.slq_steps} steps)", f"{t_slq:.2f}",
             f"{negative_slq:.1f}", f"{negative_slq - negative:+.1f}", f"{l1:.3f}"]]
    out["slq"] = {"n": n, "negative": negative, "zero": zero, "positive": positive,
                  "negative_slq": negative_slq, "density_l1": l1, "budget": budget,
                  "vectors": k, "edges": edges.tolist(), "exact": density.tolist(),
                  "slq": hist.tolist()}
    text = (f"### Exact Morse index and density vs SLQ (n = {n:,}; inertia at 0: "
            f"{negative} negative, {zero} zero, {positive} positive, zero meaning within "
            f"{tol:.1e}; SLQ's negative: its weight below -{tol:.1e})\n\n"
            + md_table(["method", "CPU s", "negative eigenvalues", "error",
                        "density error (L1 / n)"], rows))
    text += ("\n\nSLQ is given the exact computation's CPU time (its quadratures finished "
             "within it; at least one); the density error is sum |SLQ - exact| / n over the "
             "bins.")
    return text, out["slq"]


def plot_density(data: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    edges = np.array(data["edges"])
    centers, width = (edges[1:] + edges[:-1]) / 2, edges[1] - edges[0]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(centers, data["exact"], width=width, color="tab:blue", alpha=0.6,
           label="exact (spectrum.spectral_density)")
    ax.step(centers, np.maximum(data["slq"], 1e-1), where="mid", color="tab:red",
            label=f"SLQ, same CPU time ({data['vectors']} vectors; < 0.1 drawn at 0.1)")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue of the Hessian")
    ax.set_ylabel("eigenvalues per bin")
    ax.set_title(f"Hessian spectrum, n = {data['n']:,}: exact histogram vs SLQ")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------
# Hutchinson against the exact inverse diagonal
# --------------------------------------------------------------------------


def conjugate_gradients(apply, b, rtol: float, max_steps: int):
    x, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), r @ r
    for step in range(max_steps):
        Ap = apply(p)
        a = rr / (p @ Ap)
        x, r = x + a * p, r - a * Ap
        rr_new = r @ r
        if rr_new.sqrt() <= rtol * b.norm():
            return x, step + 1
        p, rr = r + (rr_new / rr) * p, rr_new
    return x, max_steps


def run_diagonal(args, out: dict) -> str:
    model, x, t = make_problem(args.layers, args.width, args.batch)
    n = sum(p.numel() for p in model.parameters())
    damping = args.damping
    exact, exact_t = timed(lambda: sp.inverse_diagonal(model, tracked_loss(model, x, t),
                                                       damping, curvature="ggn"))
    ggn = autograd_ggn(model, x, t)
    apply = lambda u: ggn(u) + damping * u                                  # noqa: E731
    generator = torch.Generator().manual_seed(0)
    total, probes, products, spent = torch.zeros(n, dtype=F64), 0, 0, 0.0
    while spent < exact_t or not probes:
        z = (torch.randint(0, 2, (n,), generator=generator) * 2 - 1).to(F64)
        (solution, steps), sec = timed(lambda: conjugate_gradients(apply, z, 1e-6, 500))
        total, probes, products, spent = total + z * solution, probes + 1, products + steps, \
            spent + sec
    estimate = total / probes
    error = ((estimate - exact) / exact).abs()
    # what the data changed: the prior variance 1/eps minus the posterior variance
    reduction = 1 / damping - exact
    reduction_error = ((estimate - exact).norm() / reduction.norm()).item()
    out["diagonal"] = {"n": n, "exact_seconds": exact_t, "probes": probes,
                       "median_error": error.median().item(), "max_error": error.max().item(),
                       "reduction_error": reduction_error}
    rows = [["exact (ours, checked)", f"{exact_t:.2f}", "-", "-", "-", "-"],
            [f"Hutchinson + CG to 1e-6 ({products} GGN products)", f"{spent:.2f}", probes,
             f"{error.median().item():.2e}", f"{error.max().item():.2f}",
             f"{reduction_error:.2f}"]]
    return (f"### diag((GGN + {damping:g} I)^-1): exact vs Hutchinson at equal time "
            f"(n = {n:,}; the variance reduction is 1/eps - diag, what the data taught)\n\n"
            + md_table(["method", "CPU s", "probes", "median relative error",
                        "max relative error", "error of the reduction (norm-wise)"],
                       rows))


# --------------------------------------------------------------------------
# dense
# --------------------------------------------------------------------------


def dense_child(spec: dict) -> None:
    """In a fresh process: the dense route (or ours) on one problem; prints JSON."""
    torch.set_num_threads(1)
    model, x, t = make_problem(spec["layers"], spec["width"], spec["batch"])
    n = sum(p.numel() for p in model.parameters())
    damping = spec["damping"]
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")                                  # VmHWM := VmRSS
    base = _status_kib("VmRSS")
    start = time.process_time()
    if spec["method"] == "dense":
        loss, theta = of_flat_parameters(model, x, t), flat_parameters(model)
        H = torch.func.hessian(loss)(theta)
        M = H + damping * torch.eye(n, dtype=F64)
        torch.linalg.slogdet(M)
        torch.linalg.eigvalsh(H)
        torch.linalg.inv(M).diagonal()
    else:
        spectrum = sp.Spectrum.of(model, tracked_loss(model, x, t))
        spectrum.slogdet(damping)
        spectrum.count_below(-0.01 * spectrum.norm)
        spectrum.inverse_diagonal(damping, rtol=math.inf)
    seconds = time.process_time() - start
    print(json.dumps({"n": n, "seconds": seconds, "peak_kib": _status_kib("VmHWM") - base}))


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def run_dense(args, out: dict) -> str:
    rows, fits = [], []
    for layers in args.dense_layers:
        cells = {}
        for method in ("dense", "ours"):
            spec = dict(layers=layers, width=args.width, batch=args.batch,
                        damping=args.damping, method=method)
            result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                    capture_output=True, text=True,
                                    env=dict(os.environ, OMP_NUM_THREADS="1",
                                             MALLOC_MMAP_THRESHOLD_="65536"))
            if result.returncode:
                cells[method] = ("failed", "", None)
                continue
            data = json.loads(result.stdout.strip().splitlines()[-1])
            cells[method] = (f"{data['seconds']:.2f}", f"{data['peak_kib'] / 2**20:.3f}",
                             data["n"])
            if method == "dense":
                fits.append((data["n"], data["peak_kib"] * 1024))
        n = cells["ours"][2] or cells["dense"][2]
        rows.append([layers, f"{n:,}"] + list(cells["dense"][:2]) + list(cells["ours"][:2]))
    n_big, bytes_big = fits[-1]
    per_entry = bytes_big / n_big ** 2
    budget = args.dense_memory_gib * 2 ** 30
    n_max = int(math.sqrt(budget / per_entry))
    out["dense"] = {"rows": rows, "bytes_per_entry": per_entry, "n_max": n_max}
    return ("### Dense route (torch.func.hessian; slogdet, eigvalsh, inv) vs ours (slogdet, "
            "a count, inverse_diagonal), each in a fresh process\n\n"
            + md_table(["L", "n", "dense CPU s", "dense peak GiB", "ours CPU s",
                        "ours peak GiB"], rows)
            + f"\n\nThe dense route's peak is {per_entry:.0f} bytes per entry of H at the "
            f"largest size measured: in {args.dense_memory_gib:g} GiB it would reach "
            f"n = {n_max:,} (extrapolated, not run: its time grows like n^3).")


# --------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=128)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--damping", type=float, default=1e-2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bins", type=int, default=40)
    p.add_argument("--slq-steps", type=int, default=80)
    p.add_argument("--dense-layers", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--dense-memory-gib", type=float, default=24.0,
                   help="memory for the largest-n figure (default: this machine's RAM)")
    p.add_argument("--sections", nargs="+", default=["ratios", "slq", "diagonal", "dense"])
    p.add_argument("--quick", action="store_true", help="L=32, 3 repeats")
    p.add_argument("--markdown", default=None, help="also write the tables to this file")
    p.add_argument("--plot", default=None, help="PNG of the exact density beside SLQ's")
    p.add_argument("--out", default=None, help="every figure as JSON")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
    if args.child:
        return dense_child(json.loads(args.child))
    if args.quick:
        args.layers, args.repeats = 32, 3
    out, parts = {}, []
    header = (f"bench_spectrum.py, torch {torch.__version__}, {torch.get_num_threads()} thread, "
              f"CPU seconds (time.process_time), medians of {args.repeats} round-robin repeats")
    print(header, flush=True)
    for section in args.sections:
        if section == "ratios":
            parts.append(run_ratios(args, out))
        elif section == "slq":
            text, data = run_slq(args, out)
            parts.append(text)
            if args.plot:
                plot_density(data, args.plot)
        elif section == "diagonal":
            parts.append(run_diagonal(args, out))
        elif section == "dense":
            parts.append(run_dense(args, out))
        print("\n" + parts[-1], flush=True)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(header + "\n\n" + "\n\n".join(parts) + "\n")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()

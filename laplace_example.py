"""The Laplace evidence of a trained classifier, exactly, where the dense route cannot go.

A tanh MLP is trained on scikit-learn's bundled handwritten digits (no download).
Its Laplace approximation under a Gaussian prior N(0, I / delta) has posterior
precision ``Lambda = N B + delta I`` (B the curvature of the mean training loss,
estimated on a curvature batch, N the training-set size) and log evidence

    log Z(delta) = -N loss(theta) - delta ||theta||^2 / 2 + (n/2) log delta
                   - (1/2) log det Lambda,
    log det Lambda = n log N + log det(B + (delta / N) I),

the last term from :func:`spectrum.slogdet`.  The prior precision is chosen by
maximising log Z over a grid, for the GGN and for the Hessian (whose Laplace
approximation needs Lambda positive definite: an indefinite one is reported, with
its number of negative eigenvalues from :func:`spectrum.inertia`); the posterior
marginal variances ``diag(Lambda^{-1}) = diag((B + delta/N I)^{-1}) / N`` come from
:func:`spectrum.inverse_diagonal`.  At the default size (n = 63,050) the dense
Hessian alone needs 32 GB.

    python laplace_example.py                      # a few minutes on one core
    python laplace_example.py --markdown out.md --plot docs/laplace_evidence.png
    python laplace_example.py --quick              # a small net, seconds
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

import hessian_inverse as hi
import spectrum as sp


def load_digits():
    """The bundled 8x8 digits, standardised, a fixed 80/20 split."""
    from sklearn.datasets import load_digits as sk_digits
    data = sk_digits()
    x = torch.tensor(data.data, dtype=torch.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def train(model, x, y, steps: int, lr: float, weight_decay: float):
    """Full-batch Adam on the mean cross-entropy plus ``weight_decay ||theta||^2 / 2``."""
    from tqdm import tqdm
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with tqdm(range(steps), desc="training", unit="step", file=sys.stderr,
              disable=not sys.stderr.isatty()) as bar:
        for _ in bar:
            opt.zero_grad()
            loss = model(x, y)
            total = loss + weight_decay / 2 * sum(p.square().sum() for p in model.parameters())
            total.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")


def log_evidence(spectrum, delta: float, N: int, nll: float, sq_norm: float) -> dict:
    """Laplace log evidence at prior precision delta (or why there is none: the Hessian's
    N B + delta I must be positive definite; the GGN's always is)."""
    n = spectrum.num_params
    negative = spectrum.count(-delta / N) if spectrum.operator.curvature == "hessian" else 0
    if negative:
        return {"delta": delta, "note": f"indefinite ({negative} negative eigenvalue"
                f"{'s' if negative > 1 else ''})"}
    try:
        sign, logdet = spectrum.slogdet(delta / N)
    except hi.InaccurateSolveError as err:
        return {"delta": delta, "note": "refused: " + str(err).split(":")[1].split(" (")[0]}
    value = (-nll - delta * sq_norm / 2 + n / 2 * math.log(delta)
             - (n * math.log(N) + logdet.item()) / 2)
    return {"delta": delta, "log_evidence": value}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=16, help="in total, the output layer included")
    p.add_argument("--curvature-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--grid", type=float, nargs="+",
                   default=[10.0 ** (k / 2) for k in range(-4, 9)])
    p.add_argument("--quick", action="store_true", help="width 6, 3 layers, 60 steps")
    p.add_argument("--markdown", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.steps = 6, 3, 60
    torch.set_num_threads(1)
    torch.manual_seed(0)
    xtr, ytr, xte, yte = load_digits()
    N = len(ytr)
    model = hi.DeepMLPWithTracking(64, args.width, 10, args.layers - 1, "tanh").double()
    n = sum(q.numel() for q in model.parameters())
    start = time.process_time()
    train(model, xtr, ytr, args.steps, args.lr, args.weight_decay)
    with torch.no_grad():
        nll = N * model(xtr, ytr).item()
        accuracy = (model.loss_layer.logits(_features(model, xte)).argmax(1) == yte).float()
    sq_norm = sum(q.detach().square().sum().item() for q in model.parameters())
    lines = [f"digits: N = {N} training images, test accuracy {accuracy.mean():.3f}; "
             f"MLP 64 -> {args.width} x {args.layers - 1} -> 10, n = {n:,} parameters "
             f"(a dense n x n float64 matrix: {n * n * 8 / 2**30:.1f} GiB); curvature batch "
             f"{args.curvature_batch}; training {time.process_time() - start:.1f} CPU s"]
    batch = torch.arange(args.curvature_batch)
    loss = model(xtr[batch], ytr[batch], track_activations=True)
    results = {}
    for curvature in ("ggn", "hessian"):
        start = time.process_time()
        spectrum = sp.Spectrum.of(model, loss, curvature)
        rows = [log_evidence(spectrum, delta, N, nll, sq_norm) for delta in args.grid]
        valid = [r for r in rows if "log_evidence" in r]
        best = max(valid, key=lambda r: r["log_evidence"]) if valid else None
        results[curvature] = {"rows": rows, "best": best,
                              "seconds": time.process_time() - start, "spectrum": spectrum}
    table = ["| prior precision | log Z, GGN | log Z, Hessian |", "|---|---|---|"]
    for g, h in zip(results["ggn"]["rows"], results["hessian"]["rows"]):
        cell = [f"{r['log_evidence']:.1f}" if "log_evidence" in r else r["note"]
                for r in (g, h)]
        table.append(f"| {g['delta']:.3g} | {cell[0]} | {cell[1]} |")
    lines.append("\n".join(table))
    for curvature, result in results.items():
        best = result["best"]
        lines.append(f"{curvature}: {len(args.grid)} log-determinants in "
                     f"{result['seconds']:.1f} CPU s; best prior precision "
                     + (f"{best['delta']:.3g} (log Z = {best['log_evidence']:.1f})" if best
                        else "none (no valid Laplace approximation on the grid)"))
    best = results["ggn"]["best"]
    if best is not None:
        start = time.process_time()
        variances = results["ggn"]["spectrum"].inverse_diagonal(best["delta"] / N) / N
        seconds = time.process_time() - start
        per_layer = variances.split([sum(q.numel() for q in layer.parameters())
                                     for layer in model.layers])
        table = ["| layer | parameters | median posterior std | min | max | prior std |",
                 "|---|---|---|---|---|---|"]
        prior = 1 / math.sqrt(best["delta"])
        for l, v in enumerate(per_layer, 1):
            std = v.sqrt()
            if l in (1, 2, len(per_layer) - 1, len(per_layer)) or len(per_layer) <= 6:
                table.append(f"| {l} | {v.numel():,} | {std.median():.4g} | {std.min():.4g} | "
                             f"{std.max():.4g} | {prior:.4g} |")
            elif l == 3:
                table.append("| ... | | | | | |")
        lines.append(f"Posterior marginal standard deviations (GGN, prior precision "
                     f"{best['delta']:.3g}): inverse_diagonal in {seconds:.1f} CPU s\n\n"
                     + "\n".join(table))
    text = "\n\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text + "\n")
    if args.plot:
        plot(results, args.plot, n)
    results.update(model=model, batch=(xtr[batch], ytr[batch]), N=N, nll=nll,
                   sq_norm=sq_norm)
    return results


def _features(model, x):
    z = model.prepare_input(x)
    for layer in model.layers[:-1]:
        z = layer(z)
    return z


def plot(results: dict, path: str, n: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for curvature, style in (("ggn", "o-"), ("hessian", "s--")):
        rows = [r for r in results[curvature]["rows"] if "log_evidence" in r]
        name = "GGN" if curvature == "ggn" else "Hessian (where N B + delta I > 0)"
        if rows:
            ax.plot([r["delta"] for r in rows], [-r["log_evidence"] for r in rows], style,
                    label=name)
        best = results[curvature]["best"]
        if best is not None:
            ax.plot([best["delta"]], [-best["log_evidence"]], "k*", markersize=12)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("prior precision delta")
    ax.set_ylabel("- log evidence (lower is better)")
    ax.set_title(f"Exact Laplace evidence, n = {n:,} (*: the best on the grid)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

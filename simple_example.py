"""Standard gradient descent against Hessian-preconditioned descent (second-order
steps through the exact inverse Hessian or Gauss-Newton matrix) on a small
tall-skinny MLP.

    python simple_example.py                    # CIFAR-10 if present or downloadable, else digits
    python simple_example.py --dataset digits --steps 20 --hessian-batch-size 16
    python simple_example.py --methods all      # all four methods (a few minutes on a CPU)
    python simple_example.py --quick            # a few seconds: a smoke test

Methods (--methods, comma-separated, or all): gd (plain gradient descent),
newton (damped Newton on the Hessian), ggn (damped Gauss-Newton, i.e.
Levenberg-Marquardt on the generalized Gauss-Newton matrix) and tr (trust
region on the Hessian). All start from the same weights and see the same data
for the same number of steps. Gradient descent uses the full training set per
step (--batch-size 0); the second-order steps use the same gradient and take
their curvature from --hessian-batch-size examples drawn afresh each step
(sub-sampled Newton). Printed: a table per method (training loss, test
accuracy, optimizer seconds), then a summary with the steps and seconds each
method needed to reach a target loss (default: the first method's final loss).
A plot of loss against steps and against seconds is saved as a PNG.
"""

import argparse
import copy
import socket
import sys
import time

import torch
import torch.nn.functional as F

from damped_newton import DampedNewton
from hessian_inverse import InsufficientMemoryError
from train_utils import (DTYPES, HelpFormatter, UsageError, build_model, curvature_too_large, evaluate,
                         resolve_device, seed_everything, train_step)

# --quick: small enough for a test or a first look; explicit flags still win.
QUICK = dict(steps=3, hidden_dim=8, num_layers=3, hessian_batch_size=8, log_every=1)

# --methods: short name -> the name printed in the tables and the plot.
METHODS = {"gd": "gradient descent", "newton": "damped Newton", "ggn": "Gauss-Newton",
           "tr": "trust region"}
DEFAULT_METHODS = "gd,newton,ggn"


def parse_methods(text):
    """``gd,newton,...`` or ``all`` -> the list of short names, in the order given."""
    names = list(METHODS) if text.strip() == "all" else [m.strip() for m in text.split(",")]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(unknown) or repr(text)}; choose from "
            f"{', '.join(METHODS)} (comma-separated) or all")
    return list(dict.fromkeys(names))  # repeats run once


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--dataset", default="auto", choices=["auto", "cifar10", "digits"],
                   help="auto: CIFAR-10 if available, else scikit-learn's bundled digits")
    p.add_argument("--data-dir", default="data", help="where CIFAR-10 is (or is downloaded to)")
    p.add_argument("--image-size", type=int, default=8,
                   help="CIFAR-10 images are downscaled to S x S and flattened")
    p.add_argument("--train-size", type=int, default=0, help="use this many training examples (0: all)")
    p.add_argument("--hidden-dim", type=int, default=16, help="width of every hidden layer")
    p.add_argument("--num-layers", type=int, default=6, help="total, the output layer included")
    p.add_argument("--activation", default="tanh",
                   choices=["tanh", "sigmoid", "softplus", "gelu", "silu", "relu"],
                   help="hidden activation")
    p.add_argument("--dtype", default="float64", choices=sorted(DTYPES), help="parameter dtype")
    p.add_argument("--methods", type=parse_methods, default=DEFAULT_METHODS,
                   help="comma-separated, from " + ", ".join(f"{k} ({v})" for k, v in METHODS.items())
                        + "; or all")
    p.add_argument("--steps", type=int, default=40, help="steps for each method")
    p.add_argument("--batch-size", type=int, default=0,
                   help="examples per gradient (0: the full training set)")
    p.add_argument("--lr", type=float, default=1.0, help="gradient descent learning rate")
    p.add_argument("--newton-lr", type=float, default=1.0,
                   help="scale of the damped Newton and Gauss-Newton steps")
    p.add_argument("--damping", type=float, default=1.0,
                   help="initial damping of newton and ggn (then adapted)")
    p.add_argument("--radius", type=float, default=1.0,
                   help="initial trust-region radius of tr (then adapted)")
    p.add_argument("--max-radius", type=float, default=100.0, help="largest trust-region radius")
    p.add_argument("--hessian-batch-size", type=int, default=16,
                   help="examples for the curvature of each Newton step; the cost is "
                        "cubic in this times --hidden-dim")
    p.add_argument("--max-step-norm", type=float, default=None,
                   help="cap on the second-order steps' norm")
    p.add_argument("--target-loss", type=float, default=None,
                   help="loss to reach (None: the first method's final loss)")
    p.add_argument("--log-every", type=int, default=5, help="steps between table rows")
    p.add_argument("--out", default="simple_example.png", help="where the plot goes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights and the batches")
    p.add_argument("--quick", action="store_true", help=f"small settings for a smoke test: {QUICK}")
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    for name in ("steps", "hessian_batch_size", "log_every", "image_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if isinstance(args.methods, str):  # the default string is not run through type=
        args.methods = parse_methods(args.methods)
    if not 0 < args.radius <= args.max_radius:
        p.error("need 0 < --radius <= --max-radius")
    return args


def load_cifar10(args):
    """CIFAR-10 from --data-dir (downloaded there if missing), downscaled and flattened."""
    from torchvision.datasets import CIFAR10

    def get(train):
        try:
            return CIFAR10(args.data_dir, train=train, download=False)
        except RuntimeError:  # not there: try the network, briefly
            old = socket.getdefaulttimeout()
            socket.setdefaulttimeout(20)
            try:
                return CIFAR10(args.data_dir, train=train, download=True)
            finally:
                socket.setdefaulttimeout(old)

    def prepare(ds):
        x = torch.tensor(ds.data).permute(0, 3, 1, 2).double() / 255
        if args.image_size < 32:
            x = F.interpolate(x, size=args.image_size, mode="area")
        return x.flatten(1), torch.tensor(ds.targets)

    (xtr, ytr), (xte, yte) = prepare(get(True)), prepare(get(False))
    return xtr, ytr, xte, yte, f"CIFAR-10 at {args.image_size}x{args.image_size}"


def load_digits(args):
    """scikit-learn's bundled 8x8 handwritten digits, a fixed 80/20 split."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x, y = torch.tensor(data.data, dtype=torch.float64), torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]], "digits (8x8)"


def load_data(args):
    if args.dataset != "digits":
        try:
            return load_cifar10(args)
        except Exception as err:  # missing, no network, corrupt: all mean "not available"
            reason = f"{type(err).__name__}: {err}".splitlines()[0][:160]
            if args.dataset == "cifar10":
                raise UsageError(
                    f"CIFAR-10 is not in {args.data_dir} and could not be downloaded ({reason}). "
                    f"Put cifar-10-batches-py/ in --data-dir, or use --dataset digits.") from None
            print(f"note: CIFAR-10 is not available ({reason}); using scikit-learn's bundled "
                  "handwritten digits instead (1797 8x8 images, no download).")
    return load_digits(args)


def main(argv=None):
    args = get_args(argv)
    try:
        run(args)
    except UsageError as err:
        sys.exit(f"error: {err}")


def run(args):
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    seed_everything(args.seed)
    xtr, ytr, xte, yte, name = load_data(args)
    if args.train_size:
        xtr, ytr = xtr[:args.train_size], ytr[:args.train_size]
    mean, std = xtr.mean(0), xtr.std(0) + 1e-3  # standardise with training statistics
    xtr, xte = [((x - mean) / std).to(device, dtype) for x in (xtr, xte)]
    ytr, yte = ytr.to(device), yte.to(device)
    num_classes = int(ytr.max()) + 1
    model = build_model(xtr.shape[1], num_classes, args.hidden_dim, args.num_layers,
                        args.activation, device, dtype)
    init = copy.deepcopy(model.state_dict())
    batch = args.batch_size or len(ytr)
    print(f"{name}: {len(ytr)} training / {len(yte)} test examples; MLP {xtr.shape[1]} -> "
          f"{args.hidden_dim} x {args.num_layers - 1} -> {num_classes} ({args.activation}, "
          f"{sum(p.numel() for p in model.parameters())} parameters), {args.dtype} on {device}; "
          f"{args.steps} steps of {batch} examples each")

    results = {}
    for short in args.methods:
        method = METHODS[short]
        model.load_state_dict(init)
        optimizer, settings = make_optimizer(short, model, args)
        order = torch.Generator().manual_seed(args.seed)  # same batches for every method
        newton = isinstance(optimizer, DampedNewton)
        tr = newton and optimizer.param_groups[0]["mode"] == "trust_region"
        print(f"\n{method} ({settings})")
        print(f"{'step':>5} {'train loss':>11} {'test acc':>9} {'seconds':>9}"
              + (f" {'damping':>9}" if newton else "") + (f" {'radius':>9}" if tr else "")
              + (f" {'rejected':>9}" if newton else ""))
        history = [dict(step=0, seconds=0.0, **measure(model, xtr, ytr, xte, yte))]
        seconds = 0.0
        for step in range(1, args.steps + 1):
            idx = torch.randperm(len(ytr), generator=order)[:batch].to(device)
            cidx = idx[torch.randperm(len(idx), generator=order)[:args.hessian_batch_size].to(device)]
            t0 = time.perf_counter()
            try:
                train_step(model, optimizer, xtr[idx], ytr[idx], (xtr[cidx], ytr[cidx]))
            except InsufficientMemoryError as err:
                raise curvature_too_large(err, model, "--hessian-batch-size",
                                          args.hessian_batch_size) from None
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
            history.append(dict(step=step, seconds=seconds, **measure(model, xtr, ytr, xte, yte)))
            if step % args.log_every == 0 or step == args.steps:
                h = history[-1]
                print(f"{step:>5} {h['loss']:>11.4f} {h['acc']:>9.3f} {seconds:>9.2f}"
                      + (f" {optimizer.damping:>9.2g}" if newton else "")
                      + (f" {optimizer.radius:>9.2g}" if tr else "")
                      + (f" {optimizer.stats['rejected']:>9}" if newton else ""))
        results[method] = dict(history=history, stats=optimizer.stats if newton else None,
                               trust_region=tr)

    summarize(results, args)
    plot(results, args.out, name)
    print(f"\nplot saved to {args.out}")


def make_optimizer(short, model, args):
    """The optimizer for method ``short`` and a one-line description of its settings."""
    if short == "gd":
        return torch.optim.SGD(model.parameters(), lr=args.lr), f"lr {args.lr}"
    common = dict(max_step_norm=args.max_step_norm, gradient_lr=args.lr)
    curvature = f"curvature on {args.hessian_batch_size} examples"
    if short == "tr":
        return (DampedNewton(model, mode="trust_region", radius=args.radius,
                             max_radius=args.max_radius, **common),
                f"Hessian, {curvature}, initial radius {args.radius}")
    kind = {"newton": "hessian", "ggn": "ggn"}[short]
    return (DampedNewton(model, curvature=kind, lr=args.newton_lr, damping=args.damping, **common),
            f"{'Hessian' if kind == 'hessian' else 'GGN'}, lr {args.newton_lr}, {curvature}, "
            f"initial damping {args.damping}")


@torch.no_grad()
def measure(model, xtr, ytr, xte, yte):
    """Full training loss and test accuracy (not timed)."""
    return dict(loss=evaluate(model, [(xtr, ytr)])["loss"], acc=evaluate(model, [(xte, yte)])["top1"])


def reach(history, target):
    """(step, seconds) of the first entry whose loss is <= target, or None."""
    return next(((h["step"], h["seconds"]) for h in history if h["loss"] <= target), None)


def summarize(results, args):
    first, r0 = next(iter(results.items()))
    target = args.target_loss if args.target_loss is not None else r0["history"][-1]["loss"]
    why = "" if args.target_loss is not None else f" ({first}'s final loss)"
    print(f"\nsummary after {args.steps} steps; target loss {target:.4f}{why}")
    header = (f"{'method':<17} {'final loss':>10} {'best loss':>10} {'final acc':>9} "
              f"{'best acc':>9} {'steps to target':>15} {'s to target':>11} {'total s':>8} {'s/step':>8}")
    print(header)
    print("-" * len(header))
    reached = {}
    for method, r in results.items():
        h = r["history"]
        hit = reach(h, target)
        reached[method] = hit
        total = h[-1]["seconds"]
        print(f"{method:<17} {h[-1]['loss']:>10.4f} {min(x['loss'] for x in h):>10.4f} "
              f"{h[-1]['acc']:>9.3f} {max(x['acc'] for x in h):>9.3f} "
              f"{(str(hit[0]) if hit else 'not reached'):>15} "
              f"{(f'{hit[1]:.2f}' if hit else '-'):>11} {total:>8.2f} {total / args.steps:>8.4f}")
    for method, r in results.items():
        if r["stats"]:
            s = r["stats"]
            line = (f"{method}: {s['accepted']} second-order steps accepted, {s['rejected']} "
                    f"rejected and retried, {s['non_descent']} non-descent and {s['singular']} "
                    f"singular proposals, {s['gradient_fallbacks']} gradient fallbacks; ")
            if r["trust_region"]:
                line += (f"radius shrunk {s['radius_shrinks']} and grown {s['radius_expansions']} "
                         f"times, final {s['radius']:.3g}; {s['hard_cases']} hard cases")
            else:
                line += f"final damping {s['damping']:.3g}"
            print(line)
    hits = {m: h for m, h in reached.items() if h}
    if len(results) > 1 and hits:
        def best(i):
            low = min(h[i] for h in hits.values())
            return " and ".join(m for m, h in hits.items() if h[i] == low)
        print(f"to reach {target:.4f}: fewest steps: {best(0)}; least time: {best(1)}")
    print(f"to reach {target:.4f}: " + "; ".join(
        f"{m}: " + (f"{h[0]} steps, {h[1]:.2f} s" if h else "not reached")
        for m, h in reached.items()))


def plot(results, path, name):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for method, r in results.items():
        h = r["history"]
        by_step.plot([x["step"] for x in h], [x["loss"] for x in h], marker=".", label=method)
        by_time.plot([x["seconds"] for x in h[1:]], [x["loss"] for x in h[1:]], marker=".",
                     label=method)
    by_step.set(xlabel="step", ylabel="training loss", title=f"{name}: loss per step")
    by_time.set(xlabel="optimizer seconds, from step 1 (log scale)", ylabel="training loss",
                xscale="log",
                title="loss against wall time")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

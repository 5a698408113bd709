"""Tuned first-order optimizers against exact second-order steps on a small tall-skinny MLP
(or, with --model cnn, a small CNN).

    python simple_example.py                    # all methods, 3 seeds: CIFAR-10 if present, else digits
    python simple_example.py --quick            # a few seconds: a smoke test
    python simple_example.py --model cnn --dataset digits   # two conv stages of 8 channels
    python simple_example.py --methods adam,lbfgs,ggn --seeds 5 --results out.json
    python simple_example.py --regime full-batch # where exact second order should win (docs/training.md)

Methods (--methods, comma-separated, or all):

- first order: gd (gradient descent), sgdm (SGD, momentum 0.9), adam, lbfgs
  (L-BFGS, strong Wolfe line search, one iteration per step). Each is tuned
  by a small grid (its learning rate; L-BFGS its history size) on the first
  seed, by the final training loss after the same number of steps; the
  chosen value is printed and used for every seed.
- second order, all DampedNewton (damped_newton.py): newton (damped Newton
  on the Hessian), ggn (the same on the Gauss-Newton matrix) and tr (trust
  region on the Hessian). They are not tuned: the damping starts scaled to
  the curvature and adapts. Their curvature comes from --hessian-batch-size
  examples drawn afresh each step (sub-sampled Newton).

Every method starts from the same weights and sees the same batches (full
batch by default) for the same number of steps, on every seed. The target
loss is the final training loss (median over seeds) of the best tuned
first-order method, unless --target-loss is given. Printed: the tuning, a
summary (final loss and test accuracy with their spread over seeds, steps
and optimizer seconds to the target), the second-order methods' counters,
and where the plot (loss against steps and against seconds) went.
--results writes the curves and the summary as JSON.
"""

import argparse
import json
import math
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from damped_newton import DampedNewton
from hessian_inverse import InsufficientMemoryError
from train_utils import (ARCHITECTURES, DTYPES, HelpFormatter, UsageError, build_model,
                         curvature_too_large, logits, resolve_device, seed_everything)

# --quick: small enough for a test or a first look; explicit flags still win.
QUICK = dict(steps=3, hidden_dim=8, num_layers=3, hessian_batch_size=8, seeds=1)
# --model cnn: issue 19's digits CNN (conv 8ch, conv 8ch stride 2, classifier); the
# trust region is not offered (its definiteness test is layer-wise: no convolutions yet).
CNN = dict(hidden_dim=8, num_layers=3)

# --regime: the problem of docs/training.md, "Where exact second order should win".
# A small full-batch problem trained to high accuracy: the curvature is the whole batch's,
# exact and noise-free, so Newton's fast local convergence can show. The GGN's curvature
# vanishes with the loss, so the damping floor is lowered to let it.
REGIMES = {
    "full-batch": dict(dataset="digits", train_size=32, num_layers=4, hidden_dim=8,
                       hessian_batch_size=32, steps=100, first_order_steps=3000, seeds=3,
                       min_damping=1e-15),
}

# name: (printed name, hyperparameter, grid, constructor)
FIRST_ORDER = {
    "gd": ("gradient descent", "lr", (0.1, 0.3, 1.0, 3.0, 10.0),
           lambda params, v: torch.optim.SGD(params, lr=v)),
    "sgdm": ("SGD + momentum", "lr", (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
             lambda params, v: torch.optim.SGD(params, lr=v, momentum=0.9)),
    "adam": ("Adam", "lr", (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0),
             lambda params, v: torch.optim.Adam(params, lr=v)),
    # torch's max_eval defaults to max_iter * 5 / 4 = 1 with max_iter=1: the line search
    # could not evaluate a single trial point, and L-BFGS would stall.
    "lbfgs": ("L-BFGS", "history_size", (5, 10, 50, 200),
              lambda params, v: torch.optim.LBFGS(params, lr=1.0, max_iter=1, max_eval=25,
                                                  history_size=v, tolerance_grad=0.0,
                                                  tolerance_change=0.0,
                                                  line_search_fn="strong_wolfe")),
}
SECOND_ORDER = {"newton": "damped Newton", "ggn": "Gauss-Newton", "tr": "trust region"}
METHODS = {**{k: v[0] for k, v in FIRST_ORDER.items()}, **SECOND_ORDER}
DEFAULT_METHODS = "all"


class Parser(argparse.ArgumentParser):
    """Errors in one line, naming the flag and what it needs."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_methods(text):
    """``gd,adam,...`` or ``all`` -> the list of short names, in the order given."""
    names = list(METHODS) if text.strip() == "all" else [m.strip() for m in text.split(",")]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(unknown) or repr(text)}; choose from "
            f"{', '.join(METHODS)} (comma-separated) or all")
    return list(dict.fromkeys(names))  # repeats run once


def get_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--dataset", default="auto", choices=["auto", "cifar10", "digits"],
                   help="auto: CIFAR-10 if available, else scikit-learn's bundled digits")
    p.add_argument("--data-dir", default="data", help="where CIFAR-10 is (or is downloaded to)")
    p.add_argument("--image-size", type=int, default=8,
                   help="CIFAR-10 images are downscaled to S x S and flattened")
    p.add_argument("--train-size", type=int, default=0, help="use this many training examples (0: all)")
    p.add_argument("--model", default="mlp", choices=ARCHITECTURES,
                   help=f"mlp, or cnn: --num-layers - 1 conv stages of --hidden-dim channels "
                        f"(3x3, stride 2 down to 4x4 images; defaults {CNN})")
    p.add_argument("--hidden-dim", type=int, default=16, help="width of every hidden layer")
    p.add_argument("--num-layers", type=int, default=6, help="total, the output layer included")
    p.add_argument("--activation", default="tanh",
                   choices=["tanh", "sigmoid", "softplus", "gelu", "silu", "relu"],
                   help="hidden activation")
    p.add_argument("--dtype", default="float64", choices=sorted(DTYPES), help="parameter dtype")
    p.add_argument("--methods", type=parse_methods, default=DEFAULT_METHODS,
                   help="comma-separated, from " + ", ".join(f"{k} ({v})" for k, v in METHODS.items())
                        + "; or all")
    p.add_argument("--steps", type=int, default=40, help="steps of every second-order method")
    p.add_argument("--first-order-steps", type=int, default=None,
                   help="steps of every first-order method (default: --steps)")
    p.add_argument("--seeds", type=int, default=3,
                   help="runs per method, seeded --seed, --seed + 1, ... (weights and batches)")
    p.add_argument("--seed", type=int, default=0, help="the first seed")
    p.add_argument("--batch-size", type=int, default=0,
                   help="examples per gradient (0: the full training set)")
    p.add_argument("--lr", type=float, default=None,
                   help="gradient descent learning rate (default: tuned by the grid)")
    p.add_argument("--newton-lr", type=float, default=1.0,
                   help="fraction of the quadratic model's step taken by newton and ggn, in (0, 2)")
    p.add_argument("--damping", type=float, default=None,
                   help="initial damping of newton and ggn (default: scaled to the curvature)")
    p.add_argument("--min-damping", type=float, default=1e-8,
                   help="floor of newton's and ggn's dampings (DampedNewton's min_damping)")
    p.add_argument("--curvature-reuse", type=int, default=1,
                   help="steps one factorisation may serve in newton and ggn while it stays good")
    p.add_argument("--radius", type=float, default=1.0,
                   help="initial trust-region radius of tr (then adapted)")
    p.add_argument("--max-radius", type=float, default=100.0, help="largest trust-region radius")
    p.add_argument("--hessian-batch-size", type=int, default=16,
                   help="examples for the curvature of each second-order step; the cost is "
                        "cubic in this times --hidden-dim")
    p.add_argument("--max-step-norm", type=float, default=None,
                   help="cap on the second-order steps' norm")
    p.add_argument("--target-loss", type=float, default=None,
                   help="loss to reach (default: the best tuned first-order method's final loss)")
    p.add_argument("--out", default="simple_example.png", help="where the plot goes")
    p.add_argument("--results", default=None, help="write the curves and summary to this JSON file")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads, the same for every method (0: torch's default); "
                        "at these sizes one thread is fastest")
    p.add_argument("--regime", default=None, choices=sorted(REGIMES),
                   help="preset flags for a problem of docs/training.md: "
                        + "; ".join(f"{k}: {v}" for k, v in REGIMES.items()))
    p.add_argument("--quick", action="store_true", help=f"small settings for a smoke test: {QUICK}")
    args = p.parse_args(argv)
    if args.regime or args.quick or args.model == "cnn":
        p.set_defaults(**{**(CNN if args.model == "cnn" else {}),
                          **(REGIMES[args.regime] if args.regime else {}),
                          **(QUICK if args.quick else {})})
        args = p.parse_args(argv)
    if isinstance(args.methods, str):  # the default string is not run through type=
        args.methods = parse_methods(args.methods)
    if args.model == "cnn" and "tr" in args.methods:
        if "--methods" in (argv if argv is not None else sys.argv[1:]):
            p.error("--methods tr: the trust region's definiteness test is layer-wise and does "
                    "not support convolutional layers yet; choose newton or ggn")
        args.methods = [m for m in args.methods if m != "tr"]
    if args.first_order_steps is None:
        args.first_order_steps = args.steps
    check_args(p, args)
    return args


def check_args(p, args):
    """Refuse bad flags before any work, one line each."""
    def positive(name, value, kind="a number > 0"):
        if value is not None and not (math.isfinite(value) and value > 0):
            p.error(f"--{name} must be {kind}, got {value}")

    for name in ("steps", "first_order_steps", "seeds", "hessian_batch_size", "image_size",
                 "hidden_dim", "num_layers", "curvature_reuse"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads < 0:
        p.error(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    for name in ("batch_size", "train_size"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0 (0: all), got {getattr(args, name)}")
    positive("lr", args.lr)
    positive("damping", args.damping, "a number > 0 (omit it to scale the damping to the "
                                      "curvature)")
    positive("min-damping", args.min_damping)
    if args.damping is not None and args.damping < args.min_damping:
        p.error(f"--damping must be >= --min-damping, got {args.damping} < {args.min_damping}")
    positive("radius", args.radius)
    positive("max-step-norm", args.max_step_norm)
    positive("target-loss", args.target_loss)
    if not (math.isfinite(args.newton_lr) and 0 < args.newton_lr < 2):
        p.error(f"--newton-lr must be in (0, 2) (1 takes the quadratic model's step), got "
                f"{args.newton_lr}")
    if not args.radius <= args.max_radius:
        p.error(f"need --radius <= --max-radius, got {args.radius} > {args.max_radius}")
    if args.image_size > 32:
        p.error(f"--image-size must be <= 32 (CIFAR-10 images are 32 x 32), got {args.image_size}")
    smallest = min(x for x in (args.train_size, args.batch_size) if x) if (
        args.train_size or args.batch_size) else None
    if smallest is not None and args.hessian_batch_size > smallest:
        p.error(f"--hessian-batch-size {args.hessian_batch_size} is larger than the "
                f"{smallest} examples a step sees (--train-size / --batch-size)")
    for name in ("out", "results"):
        path = getattr(args, name)
        if path is not None and not Path(path).resolve().parent.is_dir():
            p.error(f"--{name} {path}: the folder {Path(path).resolve().parent} does not exist")


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


def image_shape(dim):
    """(C, H, W) of flattened square images: 8x8 digits are (1, 8, 8), CIFAR-10 (3, S, S)
    (3 S^2 is never a square)."""
    side = math.isqrt(dim)
    return (1, side, side) if side * side == dim else (3, math.isqrt(dim // 3),
                                                       math.isqrt(dim // 3))


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
    except KeyboardInterrupt:
        print(f"\n{Path(sys.argv[0]).name}: interrupted; nothing was written after this point "
              "(no --results file, no new plot).", file=sys.stderr)
        raise SystemExit(130) from None


class Problem:
    """The data (on the device, standardised), the initial weights per seed, the batches."""

    def __init__(self, args):
        device, dtype = resolve_device(args.device), DTYPES[args.dtype]
        xtr, ytr, xte, yte, self.name = load_data(args)
        if args.train_size:
            xtr, ytr = xtr[:args.train_size], ytr[:args.train_size]
        if args.hessian_batch_size > len(ytr):
            raise UsageError(f"--hessian-batch-size {args.hessian_batch_size} is larger than the "
                             f"training set ({len(ytr)} examples)")
        mean, std = xtr.mean(0), xtr.std(0) + 1e-3  # standardise with training statistics
        self.xtr, self.xte = [((x - mean) / std).to(device, dtype) for x in (xtr, xte)]
        self.ytr, self.yte = ytr.to(device), yte.to(device)
        self.device, self.dtype, self.args = device, dtype, args
        self.num_classes = int(ytr.max()) + 1
        self.batch = min(args.batch_size or len(ytr), len(ytr))

    def model(self, seed):
        seed_everything(seed)
        a = self.args
        return build_model(self.xtr.shape[1], self.num_classes, a.hidden_dim, a.num_layers,
                           a.activation, self.device, self.dtype, a.model,
                           image_shape(self.xtr.shape[1]))

    @torch.no_grad()
    def measure(self, model):
        """Full training loss and test accuracy (not timed)."""
        loss = F.cross_entropy(logits(model, self.xtr), self.ytr).item()
        accuracy = (logits(model, self.xte).argmax(1) == self.yte).double().mean().item()
        return loss, accuracy


def make_optimizer(name, model, value, args):
    """The optimizer for method ``name`` (``value``: the tuned hyperparameter of a
    first-order method) and its hyperparameters as a dict."""
    if name in FIRST_ORDER:
        _, key, _, build = FIRST_ORDER[name]
        settings = {key: value}
        if name == "sgdm":
            settings["momentum"] = 0.9
        if name == "lbfgs":
            settings.update(lr=1.0, max_iter=1, max_eval=25, line_search_fn="strong_wolfe")
        return build(model.parameters(), value), settings
    common = dict(max_step_norm=args.max_step_norm)
    settings = dict(curvature_batch=args.hessian_batch_size, max_step_norm=args.max_step_norm)
    if name == "tr":
        settings.update(curvature="hessian", mode="trust_region", radius=args.radius,
                        max_radius=args.max_radius)
        return DampedNewton(model, mode="trust_region", curvature="hessian", radius=args.radius,
                            max_radius=args.max_radius, **common), settings
    curvature = "hessian" if name == "newton" else "ggn"
    settings.update(curvature=curvature, mode="damped", lr=args.newton_lr,
                    damping=args.damping if args.damping is not None else "scaled to the curvature",
                    min_damping=args.min_damping, curvature_reuse=args.curvature_reuse)
    return DampedNewton(model, curvature=curvature, lr=args.newton_lr, damping=args.damping,
                        min_damping=args.min_damping, curvature_reuse=args.curvature_reuse,
                        **common), settings


def train(problem, name, value, seed, steps, progress=None):
    """One run: per-step training loss, cumulative optimizer seconds, final test accuracy."""
    args, xtr, ytr = problem.args, problem.xtr, problem.ytr
    model = problem.model(seed)
    optimizer, settings = make_optimizer(name, model, value, args)
    second = isinstance(optimizer, DampedNewton)
    whole = second and args.hessian_batch_size >= problem.batch  # curvature on the whole batch
    order = torch.Generator().manual_seed(seed)  # the same batches for every method
    loss, accuracy = problem.measure(model)
    losses, seconds, elapsed = [loss], [0.0], 0.0
    for _ in range(steps):
        if problem.batch < len(ytr):
            idx = torch.randperm(len(ytr), generator=order)[:problem.batch].to(problem.device)
            x, y = xtr[idx], ytr[idx]
        else:
            x, y = xtr, ytr
        curvature = None
        if second and not whole:
            cidx = torch.randperm(len(y), generator=order)[:args.hessian_batch_size]
            xc, yc = x[cidx.to(problem.device)], y[cidx.to(problem.device)]
            curvature = lambda: model(xc, yc, track_activations=True)  # noqa: E731

        def closure():
            optimizer.zero_grad()
            value = model(x, y, track_activations=whole)
            value.backward()
            return value

        start = time.perf_counter()
        try:
            optimizer.step(closure, curvature) if second else optimizer.step(closure)
        except InsufficientMemoryError as err:
            raise curvature_too_large(err, model, "--hessian-batch-size",
                                      args.hessian_batch_size) from None
        if problem.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - start
        loss, accuracy = problem.measure(model)
        losses.append(loss if math.isfinite(loss) else math.inf)
        seconds.append(elapsed)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4g}", refresh=False)
    stats = optimizer.stats if second else None
    return dict(loss=losses, seconds=seconds, test_accuracy=accuracy, stats=stats,
                hyperparameters=settings)


def bar(total, desc):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step", leave=False, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


def tune(problem, name, seed, steps):
    """The grid value with the lowest final training loss on ``seed``, and all finals."""
    label, key, grid, _ = FIRST_ORDER[name]
    if name == "gd" and problem.args.lr is not None:
        return problem.args.lr, {}
    finals = {}
    with bar(len(grid) * steps, f"tuning {name}") as progress:
        for value in grid:
            finals[value] = train(problem, name, value, seed, steps, progress)["loss"][-1]
    best = min(grid, key=lambda v: (finals[v], grid.index(v)))
    return best, finals


def reach(run, target):
    """(steps, seconds) at which a run's loss first is <= target, or (None, None)."""
    for k, (loss, sec) in enumerate(zip(run["loss"], run["seconds"])):
        if loss <= target:
            return k, sec
    return None, None


def median_curve(runs, key):
    length = min(len(r[key]) for r in runs)
    return [statistics.median(r[key][k] for r in runs) for k in range(length)]


def spread(values, fmt):
    """``median [min, max]`` of the values that are not None, with how many there are."""
    known = [v for v in values if v is not None]
    if not known:
        return "not reached"
    text = fmt.format(statistics.median(known))
    if len(values) > 1:
        text += " [" + ", ".join(fmt.format(v) for v in (min(known), max(known))) + "]"
    if len(known) < len(values):
        text += f" ({len(known)}/{len(values)})"
    return text


def run(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    problem = Problem(args)
    seeds = [args.seed + k for k in range(args.seeds)]
    n = sum(p.numel() for p in problem.model(seeds[0]).parameters())
    print(f"{problem.name}: {len(problem.ytr)} training / {len(problem.yte)} test examples; "
          f"{args.model.upper()} {problem.xtr.shape[1]} -> {args.hidden_dim} x "
          f"{args.num_layers - 1} -> "
          f"{problem.num_classes} ({args.activation}, {n} parameters), {args.dtype} on "
          f"{problem.device}; {problem.batch} examples per step; {args.first_order_steps} "
          f"first-order and {args.steps} second-order steps; seeds {seeds}")

    tuned = {}
    first = [m for m in args.methods if m in FIRST_ORDER]
    if first:
        print(f"\ntuning on seed {seeds[0]} (final training loss after "
              f"{args.first_order_steps} steps):")
    for name in first:
        value, finals = tune(problem, name, seeds[0], args.first_order_steps)
        tuned[name] = value
        key = FIRST_ORDER[name][1]
        grid = ", ".join(f"{v:g}: {f:.4g}" for v, f in finals.items())
        edge = finals and value in (min(finals), max(finals))
        print(f"  {name:<7} {key} = {value:g}" + (f"   (grid {grid})" if finals else
                                                  "   (--lr, not tuned)")
              + ("   note: at the edge of the grid, so possibly under-tuned" if edge else ""))

    results = {}
    for name in args.methods:
        steps = args.first_order_steps if name in FIRST_ORDER else args.steps
        runs = []
        with bar(len(seeds) * steps, name) as progress:
            for seed in seeds:
                runs.append(train(problem, name, tuned.get(name), seed, steps, progress))
        results[name] = runs

    target, why = args.target_loss, "--target-loss"
    if target is None:
        finals = {m: statistics.median(r["loss"][-1] for r in results[m]) for m in first}
        if finals:
            best = min(finals, key=finals.get)
            target, why = finals[best], f"the final loss of the best tuned first-order " \
                                        f"method, {best} (median over {len(seeds)} seeds)"
    summarize(results, tuned, target, why, args, seeds)
    plot(results, target, args.out, problem.name, len(seeds))
    print(f"\nplot saved to {args.out}")
    if args.results:
        write_results(results, target, args.results)
        print(f"results written to {args.results}")


def summarize(results, tuned, target, why, args, seeds):
    print(f"\nsummary over seeds {seeds}: median [min, max]" +
          (f"; target loss {target:.4g} ({why})" if target is not None else ""))
    header = (f"{'method':<17} {'setting':<18} {'final loss':>26} {'test acc':>21} "
              f"{'steps to target':>19} {'s to target':>21} {'s/step':>8}")
    print(header)
    print("-" * len(header))
    for name, runs in results.items():
        key = FIRST_ORDER[name][1] if name in FIRST_ORDER else None
        setting = (f"{key} {tuned[name]:g}" if key else
                   runs[0]["hyperparameters"].get("curvature", "")
                   + f", batch {args.hessian_batch_size}")
        hits = [reach(r, target) if target is not None else (None, None) for r in runs]
        per_step = statistics.median(r["seconds"][-1] / (len(r["seconds"]) - 1) for r in runs)
        print(f"{METHODS[name]:<17} {setting:<18} "
              f"{spread([r['loss'][-1] for r in runs], '{:.4g}'):>26} "
              f"{spread([r['test_accuracy'] for r in runs], '{:.3f}'):>21} "
              f"{spread([h[0] for h in hits], '{:g}'):>19} "
              f"{spread([h[1] for h in hits], '{:.2f}'):>21} {per_step:>8.4f}")
    for name, runs in results.items():
        if runs[0]["stats"] is None:
            continue
        total = {k: sum(r["stats"][k] for r in runs) for k in runs[0]["stats"]
                 if isinstance(runs[0]["stats"][k], int)}
        line = (f"{METHODS[name]} (all seeds): {total['accepted']} steps accepted, "
                f"{total['rejected']} rejected and retried, {total['non_descent']} non-descent "
                f"and {total['singular']} singular proposals, {total['gradient_fallbacks']} "
                f"gradient fallbacks; ")
        if name == "tr":
            line += (f"radius shrunk {total['radius_shrinks']} and grown "
                     f"{total['radius_expansions']} times; {total['hard_cases']} hard cases")
        else:
            line += (f"{total['factorizations']} factorisations, {total['reused']} steps on a "
                     f"reused one; final damping "
                     + ", ".join(f"{r['stats']['damping']:.2g}" for r in runs))
        print(line)


def plot(results, target, path, name, num_seeds):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, runs in results.items():
        loss = median_curve(runs, "loss")
        low = [min(r["loss"][k] for r in runs) for k in range(len(loss))]
        high = [max(r["loss"][k] for r in runs) for k in range(len(loss))]
        line, = by_step.plot(range(len(loss)), loss, label=METHODS[method])
        if num_seeds > 1:
            by_step.fill_between(range(len(loss)), low, high, color=line.get_color(), alpha=0.15)
        seconds = median_curve(runs, "seconds")
        by_time.plot(seconds[1:], loss[1:], color=line.get_color(), label=METHODS[method])
    for ax in (by_step, by_time):
        if target is not None:
            ax.axhline(target, color="black", linestyle="--", linewidth=0.8, label="target")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    spread_note = f", median and range over {num_seeds} seeds" if num_seeds > 1 else ""
    by_step.set(xlabel="step (log scale)", ylabel="training loss", xscale="symlog",
                xlim=(0, None), title=f"{name}: loss per step{spread_note}")
    by_time.set(xlabel="optimizer seconds, from step 1 (log scale)", ylabel="training loss",
                xscale="log", title="loss against wall time (medians)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(results, target, path):
    """The JSON of ``--results``: median curves over the seeds, read off for the target."""
    methods = {}
    for name, runs in results.items():
        loss, seconds = median_curve(runs, "loss"), median_curve(runs, "seconds")
        hit = reach(dict(loss=loss, seconds=seconds), target) if target is not None else (None,) * 2
        methods[name] = dict(
            loss=[x if math.isfinite(x) else None for x in loss], seconds=seconds,
            test_accuracy=statistics.median(r["test_accuracy"] for r in runs),
            steps_to_target=hit[0], seconds_to_target=hit[1],
            hyperparameters=runs[0]["hyperparameters"])
    text = json.dumps({"target": target, "methods": methods}, indent=1)
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    main()

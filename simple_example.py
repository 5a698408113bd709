"""Tuned first-order optimizers against exact second-order steps on a small tall-skinny MLP
(or, with --model cnn, a small CNN).

    python simple_example.py                      # digits (or CIFAR-10), 7 methods, 3 seeds
    python simple_example.py --quick              # a few seconds: a smoke test
    python simple_example.py --model cnn          # two conv stages of 8 channels, no tr
    python simple_example.py --regime full-batch  # 32 digits trained to 1e-10 (docs/training.md)
    python simple_example.py --regime regression  # least squares: Levenberg-Marquardt
    python simple_example.py --methods adam,lbfgs,ggn --seeds 5 --results out.json

Methods (--methods, comma-separated, or all: the first seven):

- first order: gd (gradient descent), sgdm (SGD, momentum 0.9), adam, lbfgs
  (torch.optim.LBFGS as its users run it: strong Wolfe line search, 20
  iterations per call). Each is tuned by its grid (the learning rate; L-BFGS
  its history size) on the first seed, by the final training loss within the
  budget; every grid point's result is printed, with its edges, and the choice
  is used for every seed.
- second order, all DampedNewton (damped_newton.py): newton (damped Newton on
  the Hessian), ggn (the same on the Gauss-Newton matrix: Levenberg-Marquardt)
  and tr (trust region on the Hessian). Not tuned: the damping starts scaled to
  the curvature and adapts. Their curvature comes from --hessian-batch-size
  examples drawn afresh each step (the whole batch when it is at least as large).
- lsq (regression only): scipy.optimize.least_squares, method 'trf', with the
  exact per-sample Jacobian, its default tolerances.

Fairness: every method starts from the same weights and sees the same data on a
seed; every run has the same budget (--time-budget CPU seconds, and its step
cap); the target losses (--targets) are fixed in advance, not taken from any
method's result. Printed: the tuning grids, and per method the final loss and
test metric, and the steps, loss/gradient evaluations and CPU seconds to each
target, as median [min, max] over the seeds, the second-order counters, and
where the plot (loss against seconds and against steps, every seed) went.
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

from damped_newton import DAMPING_UPDATES, DampedNewton
from hessian_inverse import DeepMLPWithTracking, InsufficientMemoryError
from train_utils import (ARCHITECTURES, DTYPES, HelpFormatter, UsageError, build_model,
                         curvature_too_large, resolve_device, seed_everything)

# --quick: small enough for a test or a first look; explicit flags still win.
QUICK = dict(steps=3, first_order_steps=3, hidden_dim=8, num_layers=3, hessian_batch_size=8,
             seeds=1, time_budget=None)

# --model cnn: issue 19's digits CNN (conv 8ch, conv 8ch stride 2, classifier); the
# trust region is not offered (its definiteness test is layer-wise: no convolutions yet).
CNN = dict(hidden_dim=8, num_layers=3)

# --regime: the problems of docs/training.md. Each sets flags; explicit flags still win.
REGIMES = {
    # A small classification problem trained full-batch to high accuracy: the curvature is
    # the whole batch's, exact and noise-free. No hand-set damping floor (min_damping None).
    "full-batch": dict(dataset="digits", train_size=32, num_layers=4, hidden_dim=8,
                       hessian_batch_size=32, steps=300, first_order_steps=20000, seeds=3,
                       min_damping=None, damping_update="nielsen", time_budget=5.0,
                       targets="1e-4,1e-6,1e-8,1e-10", stop_loss=1e-14),
    # Nonlinear least squares with fewer residuals than parameters: a zero-residual fit
    # exists, where Levenberg-Marquardt converges fast (issue 20's targets).
    "regression": dict(dataset="teacher", train_size=512, input_dim=8, outputs=1,
                       num_layers=8, hidden_dim=16, hessian_batch_size=512, steps=200,
                       first_order_steps=100000, seeds=3, damping_update="nielsen",
                       momentum=False, time_budget=20.0, targets="1e-4,1e-6,1e-8",
                       stop_loss=1e-20,
                       methods="adam,lbfgs,ggn,lsq",
                       grids={"adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
                              "lbfgs": (10, 30, 100, 300, 1000)}),
}

# name: (printed name, hyperparameter, grid, constructor)
FIRST_ORDER = {
    "gd": ("gradient descent", "lr", (0.1, 0.3, 1.0, 3.0, 10.0),
           lambda params, v: torch.optim.SGD(params, lr=v)),
    "sgdm": ("SGD + momentum", "lr", (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
             lambda params, v: torch.optim.SGD(params, lr=v, momentum=0.9)),
    "adam": ("Adam", "lr", (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0),
             lambda params, v: torch.optim.Adam(params, lr=v)),
    # As users run it: strong Wolfe, 20 iterations per call (torch's max_eval default, 25).
    # The tolerances are 0 so that a call never stops early: the budget decides.
    "lbfgs": ("L-BFGS", "history_size", (1, 3, 10, 30, 100),
              lambda params, v: torch.optim.LBFGS(params, lr=1.0, max_iter=LBFGS_ITERATIONS,
                                                  history_size=v, tolerance_grad=0.0,
                                                  tolerance_change=0.0,
                                                  line_search_fn="strong_wolfe")),
}
LBFGS_ITERATIONS = 20
SECOND_ORDER = {"newton": "damped Newton", "ggn": "Gauss-Newton", "tr": "trust region"}
METHODS = {**{k: v[0] for k, v in FIRST_ORDER.items()}, **SECOND_ORDER}
PEERS = {"lsq": "scipy trf"}  # regression only
ALL_METHODS = {**METHODS, **PEERS}
DEFAULT_METHODS = "all"
DEFAULT_TARGETS = "0.1,0.01,0.001,1e-6"


class Parser(argparse.ArgumentParser):
    """Errors in one line, naming the flag and what it needs."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_methods(text):
    """``gd,adam,...`` or ``all`` -> the list of short names, in the order given."""
    names = list(METHODS) if text.strip() == "all" else [m.strip() for m in text.split(",")]
    unknown = [m for m in names if m not in ALL_METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(unknown) or repr(text)}; choose from "
            f"{', '.join(ALL_METHODS)} (comma-separated) or all")
    return list(dict.fromkeys(names))  # repeats run once


def parse_targets(text):
    """``1e-4,1e-8`` -> the sorted list of target losses (largest first)."""
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"targets must be numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"targets must be numbers > 0, got {text!r}")
    return sorted(set(values), reverse=True)


def parse_grid(text):
    """``adam=1e-3,1e-2`` -> ("adam", (0.001, 0.01)): a first-order method's own grid."""
    name, _, values = text.partition("=")
    if name not in FIRST_ORDER:
        raise argparse.ArgumentTypeError(f"--grid needs METHOD=V1,V2,... with METHOD one of "
                                         f"{', '.join(FIRST_ORDER)}; got {text!r}")
    kind = int if name == "lbfgs" else float
    try:
        grid = tuple(kind(v) for v in values.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid {name}: values must be {kind.__name__}s, "
                                         f"got {values!r}") from None
    if not grid or not all(v > 0 for v in grid):
        raise argparse.ArgumentTypeError(f"--grid {name}: values must be > 0, got {values!r}")
    return name, grid


def get_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--dataset", default="auto", choices=["auto", "cifar10", "digits", "teacher"],
                   help="auto: CIFAR-10 if available, else scikit-learn's bundled digits; "
                        "teacher: regression on a random teacher network's outputs")
    p.add_argument("--data-dir", default="data", help="where CIFAR-10 is (or is downloaded to)")
    p.add_argument("--image-size", type=int, default=8,
                   help="CIFAR-10 images are downscaled to S x S and flattened")
    p.add_argument("--train-size", type=int, default=0,
                   help="use this many training examples (0: all)")
    p.add_argument("--input-dim", type=int, default=8, help="inputs of the teacher data set")
    p.add_argument("--outputs", type=int, default=1, help="outputs of the teacher data set")
    p.add_argument("--teacher-scale", type=float, default=1.5,
                   help="the teacher's weights are N(0, 1) x this / sqrt(fan-in)")
    p.add_argument("--model", default="mlp", choices=ARCHITECTURES,
                   help=f"mlp, or cnn: --num-layers - 1 conv stages of --hidden-dim channels "
                        f"(3x3, stride 2 down to 4x4 images; defaults {CNN}); classification")
    p.add_argument("--hidden-dim", type=int, default=16, help="width of every hidden layer")
    p.add_argument("--num-layers", type=int, default=6, help="total, the output layer included")
    p.add_argument("--activation", default="tanh",
                   choices=["tanh", "sigmoid", "softplus", "gelu", "silu", "relu"],
                   help="hidden activation")
    p.add_argument("--dtype", default="float64", choices=sorted(DTYPES), help="parameter dtype")
    p.add_argument("--methods", type=parse_methods, default=DEFAULT_METHODS,
                   help="comma-separated, from " + ", ".join(f"{k} ({v})" for k, v in
                                                             ALL_METHODS.items())
                        + "; or all (the first seven)")
    p.add_argument("--steps", type=int, default=200,
                   help="step cap of every second-order method and of lsq")
    p.add_argument("--first-order-steps", type=int, default=3000,
                   help="iteration cap of every first-order method (L-BFGS: iterations, "
                        f"{LBFGS_ITERATIONS} per call)")
    p.add_argument("--time-budget", type=float, default=3.0,
                   help="CPU seconds of optimizer work per run, the same for every method "
                        "(0: the step caps only)")
    p.add_argument("--targets", type=parse_targets, default=parse_targets(DEFAULT_TARGETS),
                   help="training losses to reach, fixed in advance (comma-separated); the "
                        "summary's columns are for the smallest (default " + DEFAULT_TARGETS + ")")
    p.add_argument("--stop-loss", type=float, default=None,
                   help="end a run once its training loss is at most this (the float64 floor: "
                        "beyond it a step's progress is rounding noise)")
    p.add_argument("--target-loss", type=float, default=None,
                   help="a single target loss instead of --targets")
    p.add_argument("--grid", type=parse_grid, action="append", default=None,
                   help="METHOD=V1,V2,...: a first-order method's tuning grid (repeatable)")
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
    p.add_argument("--min-damping", type=float, default=None,
                   help="floor of newton's and ggn's dampings (DampedNewton's min_damping; "
                        "default: none)")
    p.add_argument("--damping-update", default="factor", choices=DAMPING_UPDATES,
                   help="newton's and ggn's damping rule: factor (Hessian-free) or nielsen "
                        "(Levenberg-Marquardt, for full-batch least squares)")
    p.add_argument("--no-momentum", dest="momentum", action="store_false",
                   help="newton and ggn without the previous step in their 2 x 2 model")
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
    p.add_argument("--out", default="simple_example.png", help="where the plot goes")
    p.add_argument("--results", default=None, help="write the curves and summary to this JSON file")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads of torch and of the BLAS under numpy and scipy, the same "
                        "for every method (0: their defaults); at these sizes one thread is "
                        "fastest, and CPU seconds count every thread's spinning")
    p.add_argument("--regime", default=None, choices=sorted(REGIMES),
                   help="preset flags for a problem of docs/training.md: "
                        + "; ".join(f"{k}: {v}" for k, v in REGIMES.items()))
    p.add_argument("--quick", action="store_true", help=f"small settings for a smoke test: {QUICK}")
    args = p.parse_args(argv)
    if args.regime or args.quick or args.model == "cnn":
        preset = dict(CNN) if args.model == "cnn" else {}
        preset.update(REGIMES[args.regime] if args.regime else {})
        preset.pop("grids", None)  # not a flag: the tuning grids, applied below
        if args.quick:
            preset.update(QUICK)
            if args.regime == "regression":  # a full batch of 64
                preset.update(train_size=64, hessian_batch_size=64, hidden_dim=4)
        p.set_defaults(**preset)
        args = p.parse_args(argv)
    if isinstance(args.methods, str):  # the default string is not run through type=
        args.methods = parse_methods(args.methods)
    if args.model == "cnn" and "tr" in args.methods:
        if "--methods" in (argv if argv is not None else sys.argv[1:]):
            p.error("--methods tr: the trust region's definiteness test is layer-wise and does "
                    "not support convolutional layers yet; choose newton or ggn")
        args.methods = [m for m in args.methods if m != "tr"]
    args.targets_given = "--target-loss" if args.target_loss is not None else "fixed in advance"
    if args.target_loss is not None:
        args.targets = [args.target_loss]
    grids = {name: grid for name, (_, _, grid, _) in FIRST_ORDER.items()}
    grids.update(REGIMES[args.regime].get("grids", {}) if args.regime else {})
    grids.update(dict(args.grid or []))
    args.grids = grids
    if args.time_budget == 0:
        args.time_budget = None
    check_args(p, args)
    return args


def check_args(p, args):
    """Refuse bad flags before any work, one line each."""
    def positive(name, value, kind="a number > 0"):
        if value is not None and not (math.isfinite(value) and value > 0):
            p.error(f"--{name} must be {kind}, got {value}")

    if args.model == "cnn" and args.dataset == "teacher":
        p.error("--model cnn is for images (digits, CIFAR-10); --dataset teacher is a "
                "regression on vectors: use --model mlp")
    for name in ("steps", "first_order_steps", "seeds", "hessian_batch_size", "image_size",
                 "hidden_dim", "num_layers", "curvature_reuse", "input_dim", "outputs"):
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
    if args.damping is not None and args.min_damping is not None and \
            args.damping < args.min_damping:
        p.error(f"--damping must be >= --min-damping, got {args.damping} < {args.min_damping}")
    positive("radius", args.radius)
    positive("max-step-norm", args.max_step_norm)
    positive("target-loss", args.target_loss)
    positive("stop-loss", args.stop_loss)
    positive("time-budget", args.time_budget, "a number of seconds > 0 (0: none)")
    positive("teacher-scale", args.teacher_scale)
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
    if "lsq" in args.methods and args.dataset != "teacher":
        p.error("lsq (scipy's least_squares) needs a least-squares problem: --dataset teacher "
                "(or --regime regression)")
    if "lsq" in args.methods and args.batch_size:
        p.error("lsq fits the whole training set: drop --batch-size")
    for name in ("out", "results"):
        path = getattr(args, name)
        if path is not None and not Path(path).resolve().parent.is_dir():
            p.error(f"--{name} {path}: the folder {Path(path).resolve().parent} does not exist")


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------


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


def teacher_network(args):
    """The teacher: the student's architecture, weights N(0, scale^2 / fan-in), biases
    N(0, 0.01), fixed (generator seed 0) whatever --seed: the seeds vary the students."""
    gen = torch.Generator().manual_seed(0)
    teacher = DeepMLPWithTracking(args.input_dim, args.hidden_dim, args.outputs,
                                  args.num_layers - 1, args.activation, loss="mse").double()
    with torch.no_grad():
        for layer in teacher.layers:
            linear = layer.linear
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen, dtype=torch.float64)
                                * args.teacher_scale / math.sqrt(linear.in_features))
            linear.bias.copy_(0.1 * torch.randn(linear.bias.shape, generator=gen,
                                                dtype=torch.float64))
    return teacher, gen


def load_teacher(args):
    """Regression data: N(0, I) inputs, targets the teacher's outputs (no noise, so a
    student of the same architecture can fit them exactly)."""
    teacher, gen = teacher_network(args)
    size = args.train_size or 512
    x = torch.randn(2 * size, args.input_dim, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = teacher(x)
    name = (f"teacher-student regression (teacher weights {args.teacher_scale:g}/sqrt(fan-in), "
            f"{args.input_dim} inputs, {args.outputs} output{'s' * (args.outputs > 1)})")
    return x[:size], y[:size], x[size:], y[size:], name


def image_shape(dim):
    """(C, H, W) of flattened square images: 8x8 digits are (1, 8, 8), CIFAR-10 (3, S, S)
    (3 S^2 is never a square)."""
    side = math.isqrt(dim)
    return (1, side, side) if side * side == dim else (3, math.isqrt(dim // 3),
                                                       math.isqrt(dim // 3))


def load_data(args):
    if args.dataset == "teacher":
        return load_teacher(args)
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
    """The data (on the device; classification inputs standardised), the initial weights
    per seed, the batches, and the loss and test metric."""

    def __init__(self, args):
        device, dtype = resolve_device(args.device), DTYPES[args.dtype]
        self.regression = args.dataset == "teacher"
        xtr, ytr, xte, yte, self.name = load_data(args)
        if args.train_size:
            xtr, ytr = xtr[:args.train_size], ytr[:args.train_size]
        if args.hessian_batch_size > len(ytr):
            raise UsageError(f"--hessian-batch-size {args.hessian_batch_size} is larger than the "
                             f"training set ({len(ytr)} examples)")
        if not self.regression:  # standardise with training statistics
            mean, std = xtr.mean(0), xtr.std(0) + 1e-3
            xtr, xte = (xtr - mean) / std, (xte - mean) / std
        self.xtr, self.xte = xtr.to(device, dtype), xte.to(device, dtype)
        cast = dict(dtype=dtype) if self.regression else {}
        self.ytr, self.yte = ytr.to(device, **cast), yte.to(device, **cast)
        self.device, self.dtype, self.args = device, dtype, args
        self.num_outputs = ytr.shape[1] if self.regression else int(ytr.max()) + 1
        self.batch = min(args.batch_size or len(ytr), len(ytr))
        self.metric = "test MSE" if self.regression else "test acc"

    def model(self, seed):
        seed_everything(seed)
        a = self.args
        if self.regression:
            return DeepMLPWithTracking(self.xtr.shape[1], a.hidden_dim, self.num_outputs,
                                       a.num_layers - 1, a.activation, loss="mse").to(
                device=self.device, dtype=self.dtype)
        return build_model(self.xtr.shape[1], self.num_outputs, a.hidden_dim, a.num_layers,
                           a.activation, self.device, self.dtype, a.model,
                           image_shape(self.xtr.shape[1]))

    def loss(self, out, y):
        return F.mse_loss(out, y) if self.regression else F.cross_entropy(out, y)

    @torch.no_grad()
    def measure(self, model):
        """Full training loss and the test metric (not timed)."""
        loss = self.loss(model(self.xtr), self.ytr).item()
        test = model(self.xte)
        if self.regression:
            return loss, self.loss(test, self.yte).item()
        return loss, (test.argmax(1) == self.yte).double().mean().item()


# ----------------------------------------------------------------------------
# One run of one method
# ----------------------------------------------------------------------------


def make_optimizer(name, model, value, args):
    """The optimizer for method ``name`` (``value``: the tuned hyperparameter of a
    first-order method) and its hyperparameters as a dict."""
    if name in FIRST_ORDER:
        _, key, _, build = FIRST_ORDER[name]
        settings = {key: value}
        if name == "sgdm":
            settings["momentum"] = 0.9
        if name == "lbfgs":
            settings.update(lr=1.0, max_iter=LBFGS_ITERATIONS, line_search_fn="strong_wolfe",
                            tolerance_grad=0.0, tolerance_change=0.0)
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
                    min_damping=args.min_damping, damping_update=args.damping_update,
                    momentum=args.momentum, curvature_reuse=args.curvature_reuse)
    return DampedNewton(model, curvature=curvature, lr=args.newton_lr, damping=args.damping,
                        min_damping=args.min_damping, damping_update=args.damping_update,
                        momentum=args.momentum, curvature_reuse=args.curvature_reuse,
                        **common), settings


def counters(optimizer, calls):
    """(iterations, loss/gradient evaluations) so far, from the optimizer's own counts."""
    if isinstance(optimizer, DampedNewton):
        return optimizer.stats["n_iter"], optimizer.stats["func_evals"]
    if isinstance(optimizer, torch.optim.LBFGS):
        state = optimizer.state[optimizer.param_groups[0]["params"][0]]
        return state.get("n_iter", 0), state.get("func_evals", 0)
    return calls, calls


class Clock:
    """CPU seconds of the optimizer's work (one thread: what the methods cost); on CUDA,
    wall seconds after a synchronisation."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def now(self):
        if self.cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()


def new_curve(loss, metric):
    return dict(loss=[loss], seconds=[0.0], steps=[0], evaluations=[0], test_metric=metric)


def record(curve, loss, seconds, steps, evaluations):
    curve["loss"].append(loss if math.isfinite(loss) else math.inf)
    curve["seconds"].append(seconds)
    curve["steps"].append(steps)
    curve["evaluations"].append(evaluations)


def stopped(curve, args):
    return args.stop_loss is not None and curve["loss"][-1] <= args.stop_loss


def train(problem, name, value, seed, steps, progress=None, seconds=None):
    """One run until ``steps`` iterations or ``seconds`` CPU seconds: the curve (training
    loss, cumulative optimizer seconds, iterations, evaluations), the test metric, the
    optimizer's counters and settings."""
    if name == "lsq":
        return train_least_squares(problem, seed, steps, progress, seconds)
    args, xtr, ytr = problem.args, problem.xtr, problem.ytr
    model = problem.model(seed)
    optimizer, settings = make_optimizer(name, model, value, args)
    second = isinstance(optimizer, DampedNewton)
    whole = second and args.hessian_batch_size >= problem.batch  # curvature on the whole batch
    order = torch.Generator().manual_seed(seed)  # the same batches for every method
    clock = Clock(problem.device)
    curve = new_curve(*problem.measure(model))
    elapsed, calls, done = 0.0, 0, 0
    while done < steps and (seconds is None or elapsed < seconds) and not stopped(curve, args):
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

        start = clock.now()
        try:
            optimizer.step(closure, curvature) if second else optimizer.step(closure)
        except InsufficientMemoryError as err:
            raise curvature_too_large(err, model, "--hessian-batch-size",
                                      args.hessian_batch_size) from None
        elapsed += clock.now() - start
        calls += 1
        iterations, evaluations = counters(optimizer, calls)
        loss, metric = problem.measure(model)
        record(curve, loss, elapsed, iterations, evaluations)
        curve["test_metric"] = metric
        if progress is not None:
            progress.update(iterations - done)
            progress.set_postfix(loss=f"{loss:.3g}", s=f"{elapsed:.1f}", refresh=False)
        done = iterations
    stats = optimizer.stats if second else None
    return dict(**curve, stats=stats, hyperparameters=settings)


def train_least_squares(problem, seed, steps, progress=None, seconds=None):
    """scipy.optimize.least_squares, method 'trf' (its default tolerances, exact per-sample
    Jacobian by torch.func), on the residuals (outputs - targets) / sqrt(B C), so that
    its cost, half the sum of squares, is half the training MSE.  The curve is sampled at
    its iterations (callback): the cost of the accepted point, the Jacobian evaluations as
    steps, residual plus Jacobian evaluations as evaluations.  The timed work includes the
    conversions between numpy and torch and the Jacobians."""
    from scipy.optimize import least_squares
    from torch.func import functional_call, jacrev, vmap

    model = problem.model(seed)
    x, y = problem.xtr, problem.ytr
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    scale = 1.0 / math.sqrt(y.numel())

    def outputs(theta, xs):
        params = {n: t.view(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
        return functional_call(model, params, (xs,))  # model(x): the outputs

    per_example = vmap(jacrev(lambda theta, xi: outputs(theta, xi[None])[0]), in_dims=(None, 0))

    def residuals(theta):
        with torch.no_grad():
            t = torch.as_tensor(theta, dtype=problem.dtype, device=problem.device)
            return ((outputs(t, x) - y) * scale).reshape(-1).cpu().numpy()

    def jacobian(theta):
        t = torch.as_tensor(theta, dtype=problem.dtype, device=problem.device)
        return (per_example(t, x) * scale).reshape(y.numel(), -1).cpu().double().numpy()

    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu().numpy()
    curve = new_curve(*problem.measure(model))
    clock = Clock(problem.device)
    start = clock.now()
    work = dict(paused=0.0)

    def callback(intermediate_result):
        pause = clock.now()
        elapsed = pause - start - work["paused"]
        done = int(intermediate_result.nit)
        record(curve, 2.0 * float(intermediate_result.cost), elapsed, done,
               int(intermediate_result.nfev) + done + 1)  # residuals + Jacobians
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{curve['loss'][-1]:.3g}", s=f"{elapsed:.1f}",
                                 refresh=False)
        work["paused"] += clock.now() - pause
        if done >= steps or (seconds is not None and elapsed >= seconds) or \
                stopped(curve, problem.args):
            raise StopIteration

    result = least_squares(residuals, theta0, jac=jacobian, method="trf", callback=callback)
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p.copy_(torch.as_tensor(result.x[offset:offset + p.numel()]).view_as(p))
            offset += p.numel()
    curve["test_metric"] = problem.measure(model)[1]
    settings = dict(method="trf", jacobian="exact, per example", ftol=1e-8, xtol=1e-8, gtol=1e-8,
                    stopped=result.message)
    return dict(**curve, stats=None, hyperparameters=settings)


def least_squares_lm_refusal(problem):
    """What MINPACK's 'lm' says about this problem (None if it accepts it)."""
    residuals = problem.ytr.numel()
    params = sum(p.numel() for p in problem.model(0).parameters())
    if residuals >= params:
        return None
    from scipy.optimize import least_squares
    import numpy as np
    try:
        least_squares(lambda t: np.zeros(residuals), np.zeros(params), method="lm")
    except ValueError as err:
        return str(err)
    return None


def bar(total, desc):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step", leave=False, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


# ----------------------------------------------------------------------------
# Tuning, the targets, the summary
# ----------------------------------------------------------------------------


def tune(problem, name, seed, steps, seconds=None):
    """The grid value with the lowest final training loss on ``seed`` within the budget
    (``steps`` iterations, ``seconds`` CPU seconds), and every grid value's final loss."""
    label, key, _, _ = FIRST_ORDER[name]
    grid = problem.args.grids[name]
    if name == "gd" and problem.args.lr is not None:
        return problem.args.lr, {}
    finals = {}
    with bar(len(grid) * steps, f"tuning {name}") as progress:
        for value in grid:
            finals[value] = train(problem, name, value, seed, steps, progress, seconds)["loss"][-1]
    best = min(grid, key=lambda v: (finals[v], grid.index(v)))
    return best, finals


def reach(run, target):
    """(steps, evaluations, seconds) at which a run's loss first is <= target, or Nones."""
    for k, loss in enumerate(run["loss"]):
        if loss <= target:
            return run["steps"][k], run["evaluations"][k], run["seconds"][k]
    return None, None, None


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
        import scipy.linalg  # noqa: F401 - loads scipy's own BLAS, so that the limit reaches it
        from threadpoolctl import threadpool_limits  # scikit-learn's dependency

        threadpool_limits(args.threads)  # numpy's and scipy's BLAS (least_squares), like torch
    problem = Problem(args)
    seeds = [args.seed + k for k in range(args.seeds)]
    n = sum(p.numel() for p in problem.model(seeds[0]).parameters())
    budget = (f"{args.time_budget:g} CPU s per run, at most " if args.time_budget else "") + \
        f"{args.first_order_steps} first-order iterations and {args.steps} second-order steps" + \
        (f", or until the loss is {args.stop_loss:g}" if args.stop_loss else "")
    print(f"{problem.name}: {len(problem.ytr)} training / {len(problem.yte)} test examples; "
          f"{args.model.upper()} {problem.xtr.shape[1]} -> {args.hidden_dim} x "
          f"{args.num_layers - 1} -> "
          f"{problem.num_outputs} ({args.activation}, {n} parameters), {args.dtype} on "
          f"{problem.device}, {args.threads or torch.get_num_threads()} thread(s); "
          f"{problem.batch} examples per step; budget {budget}; targets "
          + ", ".join(f"{t:g}" for t in args.targets) + f" (fixed); seeds {seeds}")
    if "lsq" in args.methods:
        refusal = least_squares_lm_refusal(problem)
        if refusal:
            print(f"note: scipy's least_squares(method='lm') (MINPACK) refuses this problem: "
                  f"{refusal} ({problem.ytr.numel()} residuals, {n} variables); lsq runs 'trf'.")

    tuned = {}
    first = [m for m in args.methods if m in FIRST_ORDER]
    if first:
        print(f"\ntuning on seed {seeds[0]} (final training loss within the budget):")
    for name in first:
        value, finals = tune(problem, name, seeds[0], args.first_order_steps, args.time_budget)
        tuned[name] = value
        key = FIRST_ORDER[name][1]
        grid = ", ".join(f"{v:g}: {f:.4g}" for v, f in finals.items())
        edge = finals and value in (min(finals), max(finals))
        low, high = (min(finals), max(finals)) if finals else (None, None)
        print(f"  {name:<7} {key} = {value:g}" +
              (f"   (grid {low:g}..{high:g}: {grid})" if finals else "   (--lr, not tuned)")
              + ("   note: at the edge of the grid, so possibly under-tuned" if edge else ""))
    for name in args.methods:
        if name in SECOND_ORDER:
            print(f"  {name:<7} not tuned (DampedNewton's defaults; damping scaled to the "
                  "curvature, adapted)")
        elif name == "lsq":
            print(f"  {name:<7} not tuned (scipy's defaults: ftol = xtol = gtol = 1e-8)")

    results = {}
    for name in args.methods:
        steps = args.first_order_steps if name in FIRST_ORDER else args.steps
        runs = []
        with bar(len(seeds) * steps, name) as progress:
            for seed in seeds:
                runs.append(train(problem, name, tuned.get(name), seed, steps, progress,
                                  args.time_budget))
        results[name] = runs

    summarize(results, tuned, args, seeds, problem)
    plot(results, args.targets, args.out, problem.name, len(seeds))
    print(f"\nplot saved to {args.out}")
    if args.results:
        write_results(results, args.targets, args.results, problem)
        print(f"results written to {args.results}")


def setting_of(name, runs, tuned, args):
    if name in FIRST_ORDER:
        return f"{FIRST_ORDER[name][1].split('_')[0]} {tuned[name]:g}"
    if name == "lsq":
        return "trf, exact J"
    h = runs[0]["hyperparameters"]
    text = h.get("curvature", "")
    if h.get("damping_update") == "nielsen":
        text += ", Nielsen"
    return text + f", batch {args.hessian_batch_size}"


def summarize(results, tuned, args, seeds, problem):
    target = min(args.targets)
    print(f"\nsummary over seeds {seeds}: median [min, max]; target loss {target:g} "
          f"({args.targets_given}); seconds are CPU seconds of optimizer work")
    header = (f"{'method':<17} {'setting':<22} {'final loss':>27} {problem.metric:>24} "
              f"{'steps to target':>20} {'evals to target':>20} {'s to target':>21} "
              f"{'s/step':>8}")
    print(header)
    print("-" * len(header))
    for name, runs in results.items():
        hits = [reach(r, target) for r in runs]
        per_step = statistics.median(r["seconds"][-1] / max(r["steps"][-1], 1) for r in runs)
        metric = "{:.3g}" if problem.regression else "{:.3f}"
        print(f"{ALL_METHODS[name]:<17} {setting_of(name, runs, tuned, args):<22} "
              f"{spread([r['loss'][-1] for r in runs], '{:.3g}'):>27} "
              f"{spread([r['test_metric'] for r in runs], metric):>24} "
              f"{spread([h[0] for h in hits], '{:g}'):>20} "
              f"{spread([h[1] for h in hits], '{:g}'):>20} "
              f"{spread([h[2] for h in hits], '{:.2f}'):>21} {per_step:>8.4f}")
    print("\nCPU seconds to each target (median over the seeds that reach it; how many of "
          f"{len(seeds)}):")
    print(f"{'method':<17} " + " ".join(f"{t:>16g}" for t in args.targets))
    for name, runs in results.items():
        cells = []
        for t in args.targets:
            hits = [reach(r, t)[2] for r in runs]
            known = [h for h in hits if h is not None]
            cells.append(f"{statistics.median(known):.2f} ({len(known)}/{len(runs)})" if known
                         else "-")
        print(f"{ALL_METHODS[name]:<17} " + " ".join(f"{c:>16}" for c in cells))
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
    for name, runs in results.items():
        if name == "lsq":
            reasons = [str(r["hyperparameters"]["stopped"]) for r in runs]
            print("scipy trf (all seeds): stopped by " +
                  "; ".join(f"{why} ({reasons.count(why)}x)" for why in dict.fromkeys(reasons)))


def plot(results, targets, path, name, num_seeds):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_step) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (method, runs) in enumerate(results.items()):
        color = colors[k % len(colors)]
        for i, r in enumerate(runs):
            label = ALL_METHODS[method] if i == 0 else None
            by_time.plot(r["seconds"][1:], r["loss"][1:], color=color, label=label,
                         linewidth=1.0, alpha=0.85)
            by_step.plot(r["steps"], r["loss"], color=color, label=label, linewidth=1.0,
                         alpha=0.85)
    for ax in (by_time, by_step):
        for t in targets:
            ax.axhline(t, color="black", linestyle="--", linewidth=0.6)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    seeds = f", {num_seeds} seeds (one line each)" if num_seeds > 1 else ""
    fig.suptitle(f"{name}{seeds}; dashed: the targets", fontsize=10)
    by_time.set(xlabel="CPU seconds of optimizer work (log scale)", ylabel="training loss",
                xscale="log", title="loss against CPU seconds")
    by_step.set(xlabel="steps (iterations; log scale)", ylabel="training loss",
                xscale="symlog", xlim=(0, None), title="loss against steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(results, targets, path, problem):
    """The JSON of ``--results``: every run's curve, and per target the steps,
    evaluations and seconds at which each run reached it (None: not reached)."""
    methods = {}
    for name, runs in results.items():
        methods[name] = dict(
            runs=[{k: r[k] for k in ("loss", "seconds", "steps", "evaluations")} for r in runs],
            test_metric=[r["test_metric"] for r in runs],
            reached={f"{t:g}": [dict(zip(("steps", "evaluations", "seconds"), reach(r, t)))
                                for r in runs] for t in targets},
            hyperparameters=runs[0]["hyperparameters"],
            stats=[r["stats"] for r in runs])
    data = dict(target=min(targets), targets=targets, metric=problem.metric, methods=methods)
    text = json.dumps(_finite(data), indent=1, default=str)
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def _finite(value):
    """JSON has no infinities: a non-finite loss (a diverged run) is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    main()

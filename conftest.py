"""Shared test oracles, model builders and script fixtures (docs/ALGORITHM.md, "Test oracles").

Nothing here uses the lifted system or the layer oracle of ``hessian_inverse``:
the references are independent of the code under test.  The dense Hessian
comes from ``torch.func.hessian`` (or ``torch.autograd.functional.hessian``)
of the loss as a function of the flattened parameter vector, and the
Hessian-vector product from ``torch.func.jvp`` of ``torch.func.grad``.  Dense
matrices are formed on purpose, for small models only.  ``hessian_inverse`` is
used here only for its model classes (``DeepMLPWithTracking``), to build the
models the tests run on.

Plain helpers are imported by the test files (``from conftest import ...``: the
layout is flat, and pytest puts the root directory on ``sys.path``);
``image_folder`` is a fixture, used by name.  ``bench_hessian.py`` imports the
dense oracle and the flat-parameter helpers from here too.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, hessian, jacrev

import hessian_inverse as hi

F64 = torch.float64


# ----------------------------------------------------------------------------
# Independent oracles over the flat parameter vector
# ----------------------------------------------------------------------------


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    """All parameters of ``model``, detached, as one flat vector (in ``parameters()`` order)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def loss_of_flat_parameters(model: torch.nn.Module, *inputs):
    """``theta -> model(*inputs)`` with the parameters given as one flat vector."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def loss(theta: torch.Tensor) -> torch.Tensor:
        params = {n: t.view(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
        return functional_call(model, params, inputs)

    return loss


def dense_hessian(model: torch.nn.Module, *inputs, vectorize: bool = True) -> torch.Tensor:
    """The n x n Hessian of ``model(*inputs)`` in its parameters (test oracle).

    ``vectorize=False`` uses ``torch.autograd.functional.hessian`` (a loop of
    reverse-over-reverse products, no vmap): slower, but immune to vmap batching
    rules; in torch 2.14 ``torch.func.hessian`` is wrong for ``layer_norm``.
    """
    loss, theta = loss_of_flat_parameters(model, *inputs), flat_parameters(model)
    if vectorize:
        return torch.func.hessian(loss)(theta)
    return torch.autograd.functional.hessian(loss, theta)


def autograd_hvp(model: torch.nn.Module, inputs: tuple, v: torch.Tensor) -> torch.Tensor:
    """``H v`` by forward-over-reverse autograd (Pearlmutter), v of shape (n,) or (n, k)."""
    loss = loss_of_flat_parameters(model, *inputs)
    theta = flat_parameters(model)

    def hvp(vec):
        return torch.func.jvp(torch.func.grad(loss), (theta,), (vec,))[1]

    if v.dim() == 1:
        return hvp(v)
    return torch.stack([hvp(col) for col in v.T], dim=1)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).norm() / ref.norm()).item()


class Logits(nn.Module):
    """The chain up to the loss layer's logits, as an ordinary module."""

    def __init__(self, chain):
        super().__init__()
        self.chain = chain

    def forward(self, x):
        z = self.chain.prepare_input(x)
        for layer in self.chain.layers[:-1]:
            z = layer(z)
        return self.chain.loss_layer.logits(z)


class SineSquaredError(nn.Module):
    """A user's loss layer without a gauge: logits ``sin(W z + b)`` (nonlinear in its
    parameters), mean squared error against the targets."""

    def __init__(self, width, out):
        super().__init__()
        self.linear = nn.Linear(width, out)

    def logits(self, z):
        return torch.sin(self.linear(z))

    def loss(self, outputs, targets):
        return ((outputs - targets) ** 2).mean()

    def forward(self, z, targets):
        return self.loss(self.logits(z), targets)


def dense_ggn(model, x, loss_in_logits):
    """``J^T H_loss J``: J by jacrev of the logits, H_loss by hessian in the logits."""
    logits_of_flat_parameters = loss_of_flat_parameters(Logits(model), x)
    theta = flat_parameters(model)

    def logits(th):
        return logits_of_flat_parameters(th).reshape(-1)

    o = logits(theta)
    J = jacrev(logits)(theta)
    H_loss = hessian(loss_in_logits)(o)
    return J.T @ H_loss @ J


def cross_entropy_in_logits(batch, t):
    return lambda o: F.cross_entropy(o.view(batch, -1), t)


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------


def make_mlp(seed, num_layers, width, batch, activation="tanh", input_dim=4, classes=3,
             dtype=F64, input_scale=1.0, weight_scale=None, bias=True):
    """A tracked MLP of ``num_layers`` chain layers, its data, and its tracked loss.

    ``num_layers`` counts every layer of the chain (``num_layers - 1`` hidden
    layers, then the output layer fused with the cross-entropy loss).  Random
    draws, in order: the parameters (after ``torch.manual_seed(seed)``), the
    inputs, the targets.
    """
    torch.manual_seed(seed)
    model = hi.DeepMLPWithTracking(input_dim, width, classes, num_layers - 1, activation,
                                   bias=bias).to(dtype)
    if weight_scale is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(weight_scale)
    x = input_scale * torch.randn(batch, input_dim, dtype=dtype)
    t = torch.randint(0, classes, (batch,))
    loss = model(x, t, track_activations=True)
    return model, x, t, loss


class SquaredErrorLoss(nn.Module):
    """A loss layer without closed forms: an affine read-out fused with a mean
    squared error against real targets, mean ||W z + c - y||^2 / 2."""

    def __init__(self, width, outputs):
        super().__init__()
        self.linear = nn.Linear(width, outputs)

    def forward(self, z, targets):
        return 0.5 * ((self.linear(z) - targets) ** 2).sum(-1).mean()


# ----------------------------------------------------------------------------
# The optimizer: a small full-batch problem, closures, a baseline
# ----------------------------------------------------------------------------


def teacher_problem(dtype=torch.float64, n=32, seed=0):
    """A small full-batch classification problem and a fresh student MLP."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen, dtype=dtype)
    y = (x @ torch.randn(5, 3, generator=gen, dtype=dtype)).argmax(1)
    torch.manual_seed(seed)
    model = hi.DeepMLPWithTracking(5, 4, 3, num_hidden_layers=2).to(dtype)
    return model, x, y


def closure_for(model, opt, x, y, tracked=True):
    def closure():
        opt.zero_grad()
        loss = model(x, y, track_activations=tracked)
        loss.backward()
        return loss
    return closure


def spoiled_closure(model, opt, x, y):
    """A closure whose second call (the first step's trial point) reports a loss 10 too high."""
    honest, calls = closure_for(model, opt, x, y), []

    def closure():
        calls.append(1)
        return honest() + 10.0 if len(calls) == 2 else honest()

    return closure


def gradient_descent_losses(model0, x, y, steps, rates=(0.3, 1.0, 3.0, 10.0)):
    """Final full-batch loss of ``steps`` SGD steps from a copy of ``model0``, per rate."""
    losses = {}
    for lr in rates:
        model = copy.deepcopy(model0)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(steps):
            opt.step(closure_for(model, opt, x, y, tracked=False))
        losses[f"gd lr={lr}"] = float(model(x, y).detach())
    return losses


def assert_continue_identically(model, opt, twin, twin_opt, x, y, steps=3):
    """A resumed optimizer (twin) takes exactly the steps the original takes."""
    for _ in range(steps):
        opt.step(closure_for(model, opt, x, y))
        twin_opt.step(closure_for(twin, twin_opt, x, y))
    assert torch.equal(flat_parameters(model), flat_parameters(twin))
    assert twin_opt.stats == opt.stats


# ----------------------------------------------------------------------------
# The scripts: a generated ImageFolder and a tiny train_imagenet.py run
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """train/ and val/ with 3 classes of 10x10 PNGs, told apart by colour."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 3)):
        for c in range(3):
            folder = root / split / f"n0000{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (10, 10, 3)).astype(np.uint8)
                pixels[..., c] += 160
                Image.fromarray(pixels).save(folder / f"img{i}.png")
    return root


TINY = ["--image-size", "4", "--hidden-dim", "4", "--num-layers", "3", "--batch-size", "8",
        "--workers", "0", "--device", "cpu", "--hessian-batch-size", "4"]


def imagenet(data, ckpt, *extra):
    """Run train_imagenet.py on ``data`` with a tiny model; return its last checkpoint."""
    import train_imagenet

    train_imagenet.main(["--data-dir", str(data), "--checkpoint-dir", str(ckpt)] + TINY
                        + [str(e) for e in extra])
    return torch.load(ckpt / "last.pt", weights_only=True)

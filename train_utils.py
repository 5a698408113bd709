"""What ``simple_example.py`` and ``train_imagenet.py`` share: device and model
set-up, one training step for either optimizer, evaluation, and the advice
printed when a Hessian configuration does not fit in memory.

Kept out of ``hessian_inverse.py`` because it is script plumbing, not part of
the solver's API.
"""

from __future__ import annotations

import argparse
import random
import warnings
from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from damped_newton import DampedNewton
from hessian_inverse import DeepMLPWithTracking, TrackedChain

# torch.func's vmap path warns about torch.jit.script once per process; not ours to act on.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's layout and shows every default."""


class UsageError(Exception):
    """A problem with the command line, the data or the machine, worded for the user."""


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this PyTorch build has no CUDA support" if torch.version.cuda is None else
                   f"PyTorch {torch.__version__} sees no CUDA device (driver missing, or "
                   "CUDA_VISIBLE_DEVICES hides the GPUs)")
            raise UsageError(f"--device {name} was requested but CUDA is not available: {why}. "
                             "Use --device cpu (or auto).")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type != "cpu":
        raise UsageError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(input_dim: int, num_classes: int, hidden_dim: int, num_layers: int,
                activation: str, device: torch.device, dtype: torch.dtype) -> TrackedChain:
    """The tall-skinny MLP with ``num_layers`` layers in total (the output layer included)."""
    if num_layers < 1:
        raise UsageError(f"--num-layers must be >= 1 (it counts the output layer), got {num_layers}")
    if hidden_dim < 1:
        raise UsageError(f"--hidden-dim must be >= 1, got {hidden_dim}")
    model = DeepMLPWithTracking(input_dim, hidden_dim, num_classes, num_layers - 1,
                                activation=activation)
    return model.to(device=device, dtype=dtype)


def logits(model: TrackedChain, x: torch.Tensor) -> torch.Tensor:
    """The output layer's logits (the model's forward stops at the fused loss)."""
    z = model.prepare_input(x)
    for layer in model.layers[:-1]:
        z = layer(z)
    return model.loss_layer.logits(z)


def train_step(model: TrackedChain, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, curvature_batch: Optional[tuple] = None) -> tuple[float, int]:
    """One optimizer step on the batch ``(x, y)``: returns (loss before the step, # correct).

    Works for any ``torch.optim`` optimizer.  For :class:`DampedNewton` the
    curvature is taken on ``curvature_batch`` (default: the whole batch) by a
    tracked forward pass; the closure may be evaluated again to test the step.
    """
    first = {}

    def closure():
        optimizer.zero_grad()
        out = logits(model, x)
        loss = model.loss_layer.loss(out, y)
        loss.backward()
        first.setdefault("correct", int((out.argmax(1) == y).sum()))
        return loss

    if isinstance(optimizer, DampedNewton):
        xc, yc = curvature_batch if curvature_batch is not None else (x, y)
        loss = optimizer.step(closure, lambda: model(xc, yc, track_activations=True))
    else:
        loss = optimizer.step(closure)
    return float(loss.detach()), first["correct"]


@torch.no_grad()
def evaluate(model: TrackedChain, batches: Iterable, topk: tuple = (1,)) -> dict:
    """Mean loss and top-k accuracies (fractions) over ``(x, y)`` batches."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    total, loss_sum = 0, 0.0
    hits = {k: 0 for k in topk}
    for x, y in batches:
        x = x.to(device=device, dtype=dtype, non_blocking=True)
        y = y.to(device=device, non_blocking=True)
        out = logits(model, x)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        ranked = out.topk(min(max(topk), out.shape[1]), dim=1).indices
        for k in topk:
            hits[k] += int((ranked[:, :k] == y[:, None]).any(1).sum())
        total += len(y)
    return {"loss": loss_sum / max(total, 1), **{f"top{k}": hits[k] / max(total, 1) for k in topk}}


def curvature_too_large(err: BaseException, model: TrackedChain, batch_option: str,
                        batch_size: int) -> UsageError:
    """Turn an out-of-memory error of a Newton step into advice on which option to lower.

    Newton steps on these MLPs take the structured solver, whose memory per
    layer grows with ``(curvature batch x width)^2``; the parameter count
    (image size included) enters only linearly.  So the curvature batch and
    the width are the options that help.
    """
    width = max(layer.linear.out_features for layer in model.layers)
    return UsageError(f"the Hessian configuration does not fit in memory: {err}\n"
                      f"To fix it, lower {batch_option} (now {batch_size}) or --hidden-dim: "
                      f"memory grows with (batch x width)^2 per layer, and the widest "
                      f"layer here (classes included) has {width} units.")

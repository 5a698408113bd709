"""What ``simple_example.py`` and ``train_imagenet.py`` share: device and model
set-up, one training step for either optimizer, evaluation, and the advice
printed when a Hessian configuration does not fit in memory; and what
``train_imagenet.py`` needs to run as several processes under ``torchrun``
(:class:`Processes`, :func:`fingerprint`, :func:`collective_failure`).

Kept out of ``hessian_inverse.py`` because it is script plumbing, not part of
the solver's API.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import math
import os
import random
import re
import warnings
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from damped_newton import DampedNewton
from hessian_inverse import ConvNetWithTracking, DeepMLPWithTracking, TrackedChain

# torch.func's vmap path warns about torch.jit.script once per process; not ours to act on.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's layout and shows every default (once: a help text
    that names its own default keeps it)."""

    def _get_help_string(self, action):
        if "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


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


#: What ``--model`` / ``--arch`` build: the tall-skinny MLP, or a small CNN.
ARCHITECTURES = ("mlp", "cnn")


def cnn_strides(size: int, stages: int) -> list:
    """Stride 1 for the first stage, then 2 while the images are wider than 4 pixels."""
    strides = []
    for stage in range(stages):
        stride = 2 if stage and size > 4 else 1
        strides.append(stride)
        size = (size + stride - 1) // stride
    return strides


def build_model(input_dim: int, num_classes: int, hidden_dim: int, num_layers: int,
                activation: str, device: torch.device, dtype: torch.dtype,
                arch: str = "mlp", image_shape: Optional[Sequence[int]] = None) -> TrackedChain:
    """The tall-skinny MLP with ``num_layers`` layers in total (the output layer included),
    or (``arch='cnn'``) ``num_layers - 1`` convolutional stages of ``hidden_dim`` channels
    (3 x 3, padding 1, strides :func:`cnn_strides`) on ``image_shape`` (C, H, W) images
    (flattened inputs are reshaped), then the classifier."""
    if num_layers < (2 if arch == "cnn" else 1):
        raise UsageError(f"--num-layers must be >= {2 if arch == 'cnn' else 1} (it counts the "
                         f"output layer{' and a CNN needs a convolution' if arch == 'cnn' else ''}"
                         f"), got {num_layers}")
    if hidden_dim < 1:
        raise UsageError(f"--hidden-dim must be >= 1, got {hidden_dim}")
    if arch == "cnn":
        model = ConvNetWithTracking(image_shape, num_classes, [hidden_dim] * (num_layers - 1),
                                    strides=cnn_strides(image_shape[-1], num_layers - 1),
                                    padding=1, activation=activation)
    else:
        model = DeepMLPWithTracking(input_dim, hidden_dim, num_classes, num_layers - 1,
                                    activation=activation)
    return model.to(device=device, dtype=dtype)


def train_step(model: TrackedChain, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, curvature_batch: Optional[tuple] = None, *,
               net: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
               processes: Optional["Processes"] = None,
               precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
               ) -> tuple[float, int]:
    """One optimizer step on the batch ``(x, y)``: returns (loss before the step, # correct).

    Works for any ``torch.optim`` optimizer.  For :class:`DampedNewton` the
    curvature is taken on ``curvature_batch`` (default: the whole batch) by a
    tracked forward pass; the closure may be evaluated again to test the step.

    Several processes (``torchrun``): ``net`` is the ``DistributedDataParallel``
    wrapper of ``model`` (whose ``model(x)`` gives the logits), so ``backward()`` leaves the all-reduced mean
    gradient in ``p.grad``; with ``processes`` the loss the closure returns is
    the mean over processes (so ``DampedNewton``'s reduction-ratio test sees the
    same number on every process) and the count of correct answers their sum.
    ``precision`` wraps the closure's forward (``torch.autocast`` for mixed
    precision); the curvature's tracked forward never runs under it.
    """
    first, calls = {}, []
    net = net if net is not None else model
    if processes is not None:
        processes.steps += 1

    def closure():
        optimizer.zero_grad()
        with precision():
            out = net(x)
            loss = model.loss_layer.loss(out, y)  # cross-entropy: float32 under autocast
        loss.backward()
        calls.append(1)
        if "correct" not in first:
            first["correct"] = int((out.argmax(1) == y).sum())
        if processes is not None and processes.world > 1:
            mean_loss, first["global_correct"] = processes.sum(
                [float(loss.detach()) / processes.world, first["correct"]],
                at=(processes.steps, len(calls)))
            return torch.tensor(mean_loss, dtype=loss.dtype, device=loss.device)
        return loss

    if isinstance(optimizer, DampedNewton):
        xc, yc = curvature_batch if curvature_batch is not None else (x, y)
        loss = optimizer.step(closure, lambda: model(xc, yc, track_activations=True))
    else:
        loss = optimizer.step(closure)
    return float(loss.detach()), int(first.get("global_correct", first["correct"]))


@torch.no_grad()
def evaluation_sums(model: TrackedChain, batches: Iterable, topk: tuple = (1,)) -> dict:
    """Summed loss, top-k hits and the example count over ``(x, y)`` batches (float values)."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    total, loss_sum = 0, 0.0
    hits = {k: 0 for k in topk}
    for x, y in batches:
        x = x.to(device=device, dtype=dtype, non_blocking=True)
        y = y.to(device=device, non_blocking=True)
        out = model(x)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        ranked = out.topk(min(max(topk), out.shape[1]), dim=1).indices
        for k in topk:
            hits[k] += int((ranked[:, :k] == y[:, None]).any(1).sum())
        total += len(y)
    return {"loss": loss_sum, **{f"top{k}": float(hits[k]) for k in topk}, "count": float(total)}


def evaluate(model: TrackedChain, batches: Iterable, topk: tuple = (1,),
             processes: Optional["Processes"] = None) -> dict:
    """Mean loss and top-k accuracies (fractions) over ``(x, y)`` batches.

    With ``processes``, each process passes its own shard of the data and every
    process gets the means over all of them.
    """
    sums = evaluation_sums(model, batches, topk)
    if processes is not None:
        sums = dict(zip(sums, processes.sum(list(sums.values()))))
    total = max(sums.pop("count"), 1.0)
    return {key: value / total for key, value in sums.items()}


def curvature_too_large(err: BaseException, model: TrackedChain, batch_option: str,
                        batch_size: int) -> UsageError:
    """Turn an out-of-memory error of a Newton step into advice on which option to lower.

    Newton steps on these MLPs take routes whose memory per layer grows with
    ``(curvature batch x width)^2``; the parameter count (image size included)
    enters only linearly.  On a CNN the parameter-space route's grows with the
    square of the convolutions' parameters (channels^2), the Gauss-Newton
    output-space route's with the curvature batch squared.  So the curvature
    batch and the width are the options that help (the error names the block).
    """
    width = max((getattr(getattr(layer, "linear", None), "out_features", 0) or
                 getattr(getattr(layer, "conv", None), "out_channels", 0))
                for layer in model.layers)
    return UsageError(f"the Hessian configuration does not fit in memory: {err}\n"
                      f"To fix it, lower {batch_option} (now {batch_size}) or --hidden-dim: "
                      f"memory grows with (batch x width)^2 per layer (with the channels^2 of "
                      f"a CNN), and the widest layer here (classes included) has {width} units.")


# ----------------------------------------------------------------------------
# Several processes (torchrun): one per GPU, or several on a CPU
# ----------------------------------------------------------------------------


class ProcessesDisagree(UsageError):
    """The processes are no longer taking the same steps."""


class Processes:
    """This process's place among the ``torchrun`` processes (rank 0 of 1 without torchrun).

    ``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; then
    :meth:`start` joins the process group (NCCL on CUDA, gloo on the CPU) and
    the collectives below act on all processes.  Without it they return their
    input, so single-process code needs no branches.
    """

    def __init__(self, environ=os.environ):
        self.launched = "WORLD_SIZE" in environ and "RANK" in environ
        self.world = int(environ.get("WORLD_SIZE", 1)) if self.launched else 1
        self.rank = int(environ.get("RANK", 0)) if self.launched else 0
        self.local_rank = int(environ.get("LOCAL_RANK", 0)) if self.launched else 0
        self.device = torch.device("cpu")  # where collectives' tensors live
        self.steps = 0  # train_step calls: the same on every process

    @property
    def main(self) -> bool:
        """Rank 0: the process that prints, logs and writes checkpoints."""
        return self.rank == 0

    def resolve_device(self, name: str) -> torch.device:
        """:func:`resolve_device`, with ``cuda`` meaning this process's GPU under torchrun."""
        if not self.launched:
            return resolve_device(name)
        if name in ("auto", "cuda") and (name == "cuda" or torch.cuda.is_available()):
            resolve_device("cuda")  # the clear error if there is none
            if self.local_rank >= torch.cuda.device_count():
                raise UsageError(f"process {self.local_rank} on this node has no GPU: "
                                 f"{torch.cuda.device_count()} visible; start at most that many "
                                 "processes per node (torchrun --nproc_per_node)")
            return torch.device("cuda", self.local_rank)
        device = resolve_device(name)
        if device.type == "cuda" and self.world > 1:
            raise UsageError(f"--device {name}: under torchrun every process takes its own GPU "
                             "(cuda:LOCAL_RANK); use --device cuda")
        return device

    def start(self, device: torch.device, timeout: float = 300.0) -> None:
        """Join the process group of all processes (no-op without torchrun).

        ``timeout`` (seconds): how long a collective waits for the other
        processes before it fails (a process that died or stopped), instead
        of torch's default of 30 minutes.
        """
        if not self.launched:
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout))
        self.device = device if device.type == "cuda" else torch.device("cpu")

    def stop(self) -> None:
        if self.launched and dist.is_initialized():
            dist.destroy_process_group()

    def sum(self, values: Sequence[float], at: Optional[tuple[int, int]] = None) -> list[float]:
        """Element-wise sum of ``values`` over all processes (float64).

        ``at=(step, evaluation)`` also checks, in the same all-reduce, that every
        process is at the same evaluation of the same step (raises
        :class:`ProcessesDisagree` on every process otherwise).
        """
        if self.world == 1:
            return [float(v) for v in values]
        tag = [] if at is None else [float((at[0] % 1000) * 16 + min(at[1], 15))]
        t = torch.tensor([float(v) for v in values] + tag + [x * x for x in tag],
                         dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        out = t.tolist()
        if at is not None:
            total, squares = out[-2], out[-1]  # all equal iff sum^2 == world * sum of squares
            if total * total != self.world * squares:
                raise ProcessesDisagree(
                    f"at step {at[0]} the processes are at different loss evaluations: their "
                    "Newton solves gave different results (a non-deterministic kernel?), so they "
                    "decided differently on a step; continue from the last checkpoint with "
                    "--resume, and please report this")
            out = out[:-2]
        return out

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Overwrite ``tensor`` with rank 0's, in place; returns it."""
        if self.world > 1:
            dist.broadcast(tensor, src=0)
        return tensor

    def gather(self, obj) -> list:
        """Every process's ``obj`` (picklable), in rank order, on every process."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def first_of_global_batch(self, x: torch.Tensor, y: torch.Tensor, count: int
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``count`` examples of the global batch, identical on every process.

        The global batch is the processes' batches interleaved, in the order
        one process with a ``DistributedSampler`` of one replica would see them:
        position ``j`` is example ``j // world`` of rank ``j % world``'s batch.
        Every process's batch has the same length (the sampler pads).
        """
        if self.world == 1:
            return x[:count], y[:count]
        k = min(math.ceil(count / self.world), len(y))
        parts = []
        for local in (x[:k].contiguous(), y[:k].contiguous()):
            gathered = [torch.empty_like(local) for _ in range(self.world)]
            dist.all_gather(gathered, local)
            # (world, k, ...) -> (k, world, ...) -> global order
            parts.append(torch.stack(gathered, 1).flatten(0, 1)[:count])
        return parts[0], parts[1]


def collective_failure(err: BaseException) -> Optional[str]:
    """What went wrong, if ``err`` is a collective that failed (None for anything else).

    gloo raises plain RuntimeErrors: "Connection closed by peer" when another
    process died, "Timed out waiting ..." when it did not answer within the
    process group's timeout (stopped, hung, or far behind).
    """
    text = str(err)
    known = isinstance(err, getattr(dist, "DistError", ())) or (
        isinstance(err, RuntimeError) and
        re.search(r"gloo|nccl|closed by peer|reset by peer|timed out", text, re.I))
    if not known:
        return None
    if re.search(r"timed? ?out", text, re.I):
        return "another process did not answer within --dist-timeout (stopped or hung?)"
    if re.search(r"closed by peer|reset by peer|broken pipe", text, re.I):
        return "the connection to another process was lost (it died?)"
    return "a collective operation failed: " + text.strip().splitlines()[0][:160]


def sha256_of(value) -> str:
    """A SHA-256 of tensors' bytes and plain values, nested in dicts, lists and tuples.

    Dict keys are taken in sorted order; tensors by their bytes on the CPU
    (so the same values give the same digest on any device).
    """
    h = hashlib.sha256()

    def feed(value):
        if isinstance(value, torch.Tensor):
            h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                h.update(str(key).encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                feed(item)
        else:
            h.update(repr(value).encode())

    feed(value)
    return h.hexdigest()


def fingerprint(model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """A SHA-256 of the parameters' bytes and the optimizer's state: equal iff bit-identical."""
    return sha256_of([list(model.state_dict().values()), optimizer.state_dict()])[:16]

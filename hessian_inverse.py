"""Exact inverse-Hessian-vector products for deep networks, linear in depth.

Implements A. Rahimi, "The Hessian of tall-skinny networks is easy to invert"
(arXiv:2601.06096).  Read it beside ``docs/ALGORITHM.md``, whose sections the
comments cite by name; the module runs top to bottom in that order:

- The chain: ``z_l = f_l(z_{l-1}; x_l)``, l = 1..L, the last layer fused with
  the loss (:class:`TrackedChain`, :class:`DeepMLPWithTracking`,
  :class:`ConvNetWithTracking`).
- The derivative oracle: per layer ``J_l``, ``F_l`` and the second derivatives
  ``A_l``, ``C_l``, ``G_l`` of ``b_l . f_l`` (:func:`compute_layer_derivatives`),
  or blocks known by their action (:class:`LayerBlocks`): closed forms for affine,
  convolutional, flattening and pooling layers (:class:`AffineLayerBlocks`,
  :class:`ConvLayerBlocks`, :class:`LinearLayerBlocks`), autograd products for any
  other large layer (:class:`AutogradLayerBlocks`); all in one
  backward sweep (:func:`chain_derivatives`) that stacks runs of equal layers
  (:class:`LayerGroup`: "Stacked layers"), so that only what is sequential in depth
  loops over layers.
- The Hessian-vector product through those blocks
  (:func:`structured_hessian_vector_product`).
- The lifted system: ``(H + eps I) x = g`` as a symmetric block-tridiagonal
  system in (x_l, y_l, w_l) (:func:`assemble_lifted_system`), factored by
  block-banded LU with partial pivoting (``block_tridiagonal.banded_lu``).
- Parameter elimination (beyond the paper): with damping > 0, each affine
  layer's parameters are eliminated by the push-through identity, leaving a
  reduced system in (w_l, y_l) (:func:`assemble_reduced_system`): cost linear
  in the parameter count.  The layer-wise LDL^T (:class:`RiccatiFactor`), the
  output-space route (:class:`OutputSpaceSolver`) and, for networks with few
  parameters and huge states (CNNs), the parameter-space route
  (:class:`ParameterSpaceSolver`).
- One memory guard and cost model, the operators users hold (:class:`HessianOperator`,
  :class:`HessianInverse`, whose solver is the lifted, the eliminated, the layer-wise
  or the output-space one), one function that chooses the route (:func:`choose_route`,
  by :class:`DeviceModel`), and the entry
  points (:func:`hessian_operator`, :func:`factorize`,
  :func:`hessian_inverse_vector_product`, :func:`hessian_vector_product`).

With ``damping == 0`` a softmax classifier's always-singular Hessian is solved
exactly on its known null space (Moore-Penrose, "The softmax gauge");
``curvature='ggn'`` swaps H for the generalized Gauss-Newton matrix.  Nothing of
size n x n (n = all parameters) is formed, except by the parameter-space route,
whose Schur complement is square in the hidden layers' parameters by design
(chosen where that is the cheaper size).  The trust-region solver
(``trust_region.py``) and the optimizer (``damped_newton.py``) build on this
module; it does not import them.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
import weakref
from dataclasses import dataclass, field, fields, replace
from itertools import accumulate
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, jvp, vmap

from block_tridiagonal import (BlockTridiagonal, SingularSystemError, banded_lu,
                               cyclic_reduction, equilibrate, reciprocal_condition)
from block_tridiagonal import solve as solve_factored

__all__ = [
    # models
    "ACTIVATIONS", "AffineActivation", "AffineCrossEntropy", "AffineSquaredError",
    "TrackedChain", "DeepMLPWithTracking", "LOSSES", "ConvActivation", "ConvNetWithTracking",
    # the derivative oracle
    "LayerDerivatives", "compute_layer_derivatives",
    # operators and entry points
    "CURVATURES", "PATHS", "HessianOperator", "HessianInverse", "hessian_operator",
    "factorize", "hessian_inverse_vector_product", "hessian_vector_product",
    # errors
    "HessianInverseError", "NotTrackedError", "TrainingModeError", "SingularHessianError",
    "EliminationError", "InaccurateSolveError", "InsufficientMemoryError",
]

#: Curvatures the operators accept: the Hessian, or the generalized Gauss-Newton matrix.
CURVATURES = ("hessian", "ggn")
#: Values of the ``path`` keyword: which solver runs (see :func:`choose_route`).
PATHS = ("auto", "riccati", "structured", "generic", "output", "parameter")


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class HessianInverseError(ValueError):
    """Bad input to the Hessian routines (wrong shape, dtype, device, values)."""


class NotTrackedError(RuntimeError):
    """The model has no usable tracked forward pass to differentiate."""


class TrainingModeError(NotTrackedError, HessianInverseError):
    """A layer in training mode (Dropout, BatchNorm with running statistics) makes the
    forward pass random or stateful: both a :class:`NotTrackedError` (no usable tracked
    pass) and a :class:`HessianInverseError` (an unsupported option of a layer)."""


class SingularHessianError(torch.linalg.LinAlgError):
    """``H + damping I`` (or the gauge-fixed ``H + P_N``) is singular."""


class EliminationError(SingularHessianError):
    """A layer's ``A_l + eps I`` is singular: its parameters cannot be eliminated."""


class InaccurateSolveError(SingularHessianError):
    """A solve missed its accuracy contract (relative residual above ``rtol``)."""


class InsufficientMemoryError(MemoryError):
    """The computation would not fit in the memory of the model's device."""


class _Checks:
    """Conditions evaluated on the device and verified together: one host synchronisation.

    ``add(ok, error)``: ``ok`` a bool tensor (all of it must hold), ``error(ok)`` builds
    the exception to raise.  :meth:`verify` raises the first failing one, in the order
    added, so that a stale input is reported before what it broke downstream.
    """

    def __init__(self, *items):
        self.items = list(items)

    def add(self, ok: torch.Tensor, error: Callable[[torch.Tensor], Exception]) -> "_Checks":
        self.items.append((ok, error))
        return self

    def verify(self) -> None:
        items, self.items = self.items, []
        if items:
            flags = torch.stack([ok.all() for ok, _ in items]).tolist()
            for (ok, error), flag in zip(items, flags):
                if not flag:
                    raise error(ok)


# --------------------------------------------------------------------------
# The chain (docs/ALGORITHM.md, "The chain")
# --------------------------------------------------------------------------


def _identity(u: torch.Tensor) -> torch.Tensor:
    return u


#: Elementwise activations by name.  ``relu`` is accepted with a caveat: its
#: Hessian exists only almost everywhere, and its curvature term is zero there.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "gelu": F.gelu,
    "silu": F.silu,
    "identity": _identity,
    "relu": F.relu,
}


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise HessianInverseError(
            f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


class AffineActivation(nn.Module):
    """Hidden layer ``z -> sigma(W z + c)`` on a batch ``(B, in) -> (B, out)``."""

    def __init__(self, in_features: int, out_features: int, activation: str = "tanh",
                 bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.activation = activation
        self._sigma = _activation(activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self._sigma(self.linear(z))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class AffineCrossEntropy(nn.Module):
    """Output layer fused with the loss: ``mean_n CE(W z_n + c, target_n)``.

    ``logits`` and ``loss`` are exposed separately so that curvature variants
    (Gauss-Newton) can split the layer.  Inputs of more than two dimensions (a
    convolutional stage's (B, C, H, W)) are flattened to (B, in_features).
    """

    def __init__(self, in_features: int, num_classes: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes, bias=bias)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C) logits of a batch of (B, in_features) inputs, or of (B, ...) inputs
        flattened row-major (a convolutional stage's output)."""
        return self.linear(z.flatten(1) if z.dim() > 2 else z)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)

    def forward(self, z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(self.logits(z), targets)

    def null_directions(self) -> torch.Tensor:
        """Orthonormal basis N (p x k) of the softmax gauge.

        See docs/ALGORITHM.md, "The softmax gauge".

        Adding the same number to every logit of an example leaves the loss
        unchanged, so ``dW = 1 u^T`` and ``dc = 1 d`` are exact null directions
        of the Hessian for any data and weights: one per input unit plus one for
        the bias.  Coordinates follow ``self.parameters()`` flattened (W row-major).
        """
        weight = self.linear.weight
        num_classes, width = weight.shape
        kw = dict(dtype=weight.dtype, device=weight.device)
        ones = torch.ones(num_classes, 1, **kw) / math.sqrt(num_classes)
        basis = torch.kron(ones, torch.eye(width, **kw))  # (C*h, h): entry (i,k),k = 1/sqrt(C)
        if self.linear.bias is not None:
            basis = torch.block_diag(basis, ones)
        return basis


class AffineSquaredError(nn.Module):
    """Output layer fused with the mean squared error: ``mean_{n,i} (W z_n + c - y_n)_i^2``.

    ``F.mse_loss`` (its default mean over all B x C entries); targets are float
    (B, C), converted to the outputs' dtype.  The regression counterpart of
    :class:`AffineCrossEntropy`, split the same way (``logits`` are the predictions).
    Unlike the softmax it has no gauge: no direction leaves the loss unchanged, so
    there is no ``null_directions``.  A Gaussian negative log-likelihood with a fixed
    variance s^2 is this loss times C / (2 s^2) plus a constant: the same curvature,
    scaled.
    """

    def __init__(self, in_features: int, num_outputs: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_features, num_outputs, bias=bias)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not (isinstance(targets, torch.Tensor) and targets.is_floating_point()
                and targets.shape == outputs.shape):
            found = (f"{tuple(targets.shape)} {targets.dtype}" if isinstance(targets, torch.Tensor)
                     else type(targets).__name__)
            raise HessianInverseError(
                f"the squared-error loss needs float targets of the outputs' shape "
                f"{tuple(outputs.shape)}, got {found} (for one output, pass y[:, None]; "
                "a broadcast would compare every prediction with every target)")
        # F.mse_loss's value, written out: torch 2.14's forward-mode derivative of
        # mse_loss's backward fails ("ZeroTensors are immutable"), and the generic
        # derivative oracle differentiates forward-over-reverse.
        return (outputs - targets.to(outputs.dtype)).square().mean()

    def forward(self, z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(self.logits(z), targets)


#: The fused loss layers of :class:`DeepMLPWithTracking`, by the name its ``loss`` takes.
LOSSES = {"cross_entropy": AffineCrossEntropy, "mse": AffineSquaredError}


@dataclass
class TrackedForward:
    """What a tracked forward pass records, checked before every use.

    - ``inputs``: each layer's input z_0 .. z_{L-1}, detached.  Any that shares
      memory with the caller's ``x`` (z_0 always) is a copy, so changing ``x``
      in place afterwards cannot change them.
    - ``targets``: a copy.
    - ``loss_ref``: a weak reference to the returned loss tensor.
    - ``parameters``: the parameter values the pass ran with, as one flat byte
      copy, and ``layout`` their (shape, dtype, device).  Every use compares
      them with the current values bit for bit (one comparison), which catches
      every way of changing a parameter (an optimizer step, fused or not,
      ``p.data = ...``, ``vector_to_parameters``, ``model.double()``).
    - ``stochastic``: modules that made the pass random or stateful
      (Dropout or BatchNorm in training mode), by name.
    """

    inputs: list
    targets: torch.Tensor
    loss_ref: Callable
    parameters: torch.Tensor
    layout: tuple
    stochastic: list


def _record(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``z`` detached, copied if it shares memory with the caller's input ``x``."""
    z = z.detach()
    shares = (isinstance(x, torch.Tensor) and z.numel() and x.numel() and
              z.untyped_storage().data_ptr() == x.untyped_storage().data_ptr())
    return z.clone() if shares else z


def _layout(tensors: Sequence[torch.Tensor]) -> tuple:
    return tuple((t.shape, t.dtype, t.device) for t in tensors)


def _flat_bytes(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The bits of a list of tensors as one flat uint8 tensor (a copy)."""
    return torch.cat([t.detach().reshape(-1).view(torch.uint8) for t in tensors])


def _unchanged(current: Sequence[torch.Tensor], layout: tuple, saved: torch.Tensor
               ) -> torch.Tensor:
    """Whether tensors still have the layout and every bit of a snapshot (a bool tensor,
    not synchronised): one comparison over the flat bytes."""
    if _layout(current) != layout:
        return torch.zeros((), dtype=torch.bool)
    if not current:
        return torch.ones((), dtype=torch.bool)
    return (_flat_bytes(current) == saved).all()


def _stochastic_modules(model: nn.Module) -> list:
    """Names of modules whose training-mode forward is random or updates state."""
    found = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        random_drop = isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0
        running_stats = (isinstance(module, nn.modules.batchnorm._BatchNorm) and
                         module.track_running_stats)
        if random_drop or running_stats:
            parts = name.split(".")
            layer = (f"layer {int(parts[1]) + 1}: " if len(parts) > 1 and parts[0] == "layers"
                     and parts[1].isdigit() else "")
            found.append(f"{name} ({layer}{type(module).__name__})")
    return found


class TrackedChain(nn.Module):
    """A chain of layers ``z_l = f_l(z_{l-1}; x_l)`` ending in a fused loss layer.

    ``layers`` are modules mapping a batch of activations to the next batch;
    ``loss_layer`` maps ``(z_{L-1}, targets)`` to a scalar.  Any smooth
    modules will do: the derivative oracle is generic autograd.
    ``model.parameters()`` lists the layers' parameters in chain order, which is
    the order of the flattened Hessian.

    ``model(x, targets)`` is an ordinary differentiable function (usable with
    ``torch.func.functional_call``); ``track_activations=True`` additionally
    records each layer's input (and a copy of the parameters, to check later
    that they did not change) for the Hessian routines.  ``model(x)``, without
    targets, returns the loss layer's outputs (its ``logits``) instead: predictions,
    and the module to wrap in ``DistributedDataParallel``.
    """

    def __init__(self, layers: Sequence[nn.Module], loss_layer: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(list(layers) + [loss_layer])
        self._tracked: Optional[TrackedForward] = None

    @property
    def loss_layer(self) -> nn.Module:
        return self.layers[-1]

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """Map a raw input batch to z_0 (identity here; subclasses may flatten)."""
        return x

    def forward(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None,
                track_activations: bool = False) -> torch.Tensor:
        if targets is None:
            if track_activations:
                raise HessianInverseError("track_activations=True needs the targets: the "
                                          "Hessian is that of the loss, model(x, targets)")
            return self.logits(x)
        z = self.prepare_input(x)
        inputs = []
        for layer in self.layers[:-1]:
            if track_activations:
                inputs.append(_record(z, x))
            z = layer(z)
        loss = self.loss_layer(z, targets)
        if track_activations:
            inputs.append(_record(z, x))
            self._tracked = TrackedForward(
                inputs=inputs,
                targets=targets.detach().clone(),
                loss_ref=weakref.ref(loss),
                parameters=_flat_bytes(list(self.parameters())),
                layout=_layout(list(self.parameters())),
                stochastic=_stochastic_modules(self),
            )
        return loss

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The loss layer's outputs for the batch ``x`` (its ``logits``), no loss."""
        logits = getattr(self.loss_layer, "logits", None)
        if not callable(logits):
            raise HessianInverseError(
                f"model(x) without targets returns the loss layer's outputs, but "
                f"{type(self.loss_layer).__name__} has no logits method; call model(x, targets)")
        z = self.prepare_input(x)
        for layer in self.layers[:-1]:
            z = layer(z)
        return logits(z)

    def tracked_forward(self, loss: Optional[torch.Tensor] = None,
                        checks: Optional[_Checks] = None) -> TrackedForward:
        """The recorded forward pass, checked to be current and to match ``loss``.

        The bit-for-bit comparison of the parameters is added to ``checks`` when given
        (verified with the caller's other checks: one host synchronisation), else
        verified here.
        """
        tracked = self._tracked
        rerun = "run loss = model(x, targets, track_activations=True) again"
        if tracked is None:
            raise NotTrackedError(
                "the model has no tracked forward pass: call "
                "loss = model(x, targets, track_activations=True) before asking for "
                "Hessian products"
            )
        if loss is not None and tracked.loss_ref() is not loss:
            raise NotTrackedError(
                "`loss` is not the output of the model's last tracked forward pass; "
                "call loss = model(x, targets, track_activations=True) and pass that loss"
            )
        stale = NotTrackedError(
            "the parameters changed since the tracked forward pass (their values, dtype "
            "or device: an optimizer step, p.data = ..., vector_to_parameters, "
            f"model.double(), ...); the recorded activations are stale: {rerun} at the "
            "current parameters")
        current = list(self.parameters())
        if _layout(current) != tracked.layout:
            raise stale
        pending = _Checks() if checks is None else checks
        pending.add(_unchanged(current, tracked.layout, tracked.parameters), lambda _: stale)
        if checks is None:
            pending.verify()
        stochastic = tracked.stochastic or _stochastic_modules(self)
        if stochastic:
            raise TrainingModeError(
                f"{', '.join(stochastic)} in training mode makes the forward pass random or "
                "stateful, so its Hessian is not a well-defined function of the parameters: "
                f"call model.eval() and {rerun}"
            )
        return tracked


class DeepMLPWithTracking(TrackedChain):
    """The paper's tall-skinny MLP.

    ``num_hidden_layers`` layers ``tanh(W z + c)`` (input -> hidden, then
    hidden -> hidden), then one output affine layer fused with the loss: L =
    num_hidden_layers + 1 layers in the chain.  ``loss='cross_entropy'`` (default):
    the mean cross-entropy over ``num_classes`` logits, class-index or probability
    targets (:class:`AffineCrossEntropy`); ``loss='mse'``: the mean squared error of
    ``num_classes`` outputs against float targets (B, num_classes)
    (:class:`AffineSquaredError`).  Inputs of any shape ``(B, ...)`` are flattened to
    ``(B, input_dim)``.
    """

    def __init__(self, input_dim: int, hidden_dim: int, num_classes: int,
                 num_hidden_layers: int, activation: str = "tanh", bias: bool = True,
                 loss: str = "cross_entropy"):
        _activation(activation)
        if loss not in LOSSES:
            raise HessianInverseError(f"unknown loss {loss!r}; expected one of {sorted(LOSSES)}")
        if min(input_dim, num_classes) < 1 or num_hidden_layers < 0 or (
                num_hidden_layers > 0 and hidden_dim < 1):
            raise HessianInverseError(
                "expected input_dim, num_classes >= 1, num_hidden_layers >= 0 and "
                f"hidden_dim >= 1; got input_dim={input_dim}, hidden_dim={hidden_dim}, "
                f"num_classes={num_classes}, num_hidden_layers={num_hidden_layers}"
            )
        widths = [input_dim] + [hidden_dim] * num_hidden_layers
        hidden = [AffineActivation(widths[i], widths[i + 1], activation, bias)
                  for i in range(num_hidden_layers)]
        super().__init__(hidden, LOSSES[loss](widths[-1], num_classes, bias))
        self.activation = activation
        self.loss = loss

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


# --------------------------------------------------------------------------
# Convolutional networks (docs/ALGORITHM.md, "Convolutional layers")
# --------------------------------------------------------------------------


def _refuse_options(name: str, groups, dilation, padding_mode, padding) -> None:
    """:class:`HessianInverseError` naming the layer and each option without closed forms."""
    unsupported = [f"{option}={value!r}" for option, value, ok in (
        ("groups", groups, groups == 1),
        ("dilation", dilation, all(d == 1 for d in ((dilation,) if isinstance(dilation, int)
                                                    else dilation))),
        ("padding_mode", padding_mode, padding_mode == "zeros"),
        ("padding", padding, not isinstance(padding, str))) if not ok]
    if unsupported:
        hint = (" (give the zero padding as numbers: padding=k // 2 keeps the size of an odd "
                "kernel k at stride 1)" if isinstance(padding, str) else "")
        raise HessianInverseError(
            f"{name}: {', '.join(unsupported)} is not supported by the closed-form "
            f"convolution (groups=1, dilation=1, zero padding given as numbers){hint}. Wrap "
            "the convolution as a plain module instead, e.g. nn.Sequential(nn.Conv2d(...), "
            "nn.Tanh()), which the Hessian routines differentiate exactly by autograd "
            "products.")


def _checked_size(value, what: str, layer: str):
    """An int or a tuple of ints (as Conv1d/Conv2d take them), checked non-negative."""
    values = (value,) if isinstance(value, int) else tuple(value)
    if not values or not all(isinstance(v, int) and v >= 0 for v in values):
        raise HessianInverseError(f"{layer}: {what} must be a non-negative int or a tuple of "
                                  f"them, got {value!r}")
    return value if isinstance(value, int) else values


class ConvActivation(nn.Module):
    """Hidden layer ``z -> sigma(conv(z, W) + c)``: a Conv1d on (B, C_in, L) inputs
    (``dim=1``) or a Conv2d on (B, C_in, H, W) inputs (``dim=2``), then a pointwise
    activation from :data:`ACTIVATIONS`.

    Any kernel size, stride and zero padding.  Options without closed forms are
    refused with :class:`HessianInverseError` (here and, if changed on ``self.conv``
    later, at the forward pass): ``groups`` other than 1, ``dilation`` other than 1,
    a ``padding_mode`` other than ``'zeros'``, string paddings ('same').  A plain
    ``nn.Sequential(nn.Conv2d(...), nn.Tanh())`` with any options is differentiated
    exactly by autograd products instead (docs/ALGORITHM.md, "Matrix-free layers").
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1,
                 padding=0, activation: str = "tanh", bias: bool = True, dim: int = 2,
                 groups: int = 1, dilation=1, padding_mode: str = "zeros"):
        super().__init__()
        name = f"ConvActivation({in_channels}, {out_channels})"
        if dim not in (1, 2):
            raise HessianInverseError(f"{name}: dim must be 1 (Conv1d) or 2 (Conv2d), got {dim!r}")
        _refuse_options(name, groups, dilation, padding_mode, padding)
        conv = nn.Conv1d if dim == 1 else nn.Conv2d
        self.conv = conv(in_channels, out_channels, _checked_size(kernel_size, "kernel_size", name),
                         _checked_size(stride, "stride", name),
                         _checked_size(padding, "padding", name), 1, 1, bias)
        self.activation = activation
        self._sigma = _activation(activation)

    def check_options(self) -> None:
        """Refuse options the closed forms do not cover (changed on ``self.conv`` since
        construction), naming the layer and the option."""
        conv = self.conv
        _refuse_options(f"ConvActivation({conv.in_channels}, {conv.out_channels})",
                        conv.groups, conv.dilation, conv.padding_mode, conv.padding)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.check_options()
        return self._sigma(self.conv(z))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


#: Parameter-free pooling between stages of :class:`ConvNetWithTracking`, by name.
POOLS = {"avg": (nn.AvgPool1d, nn.AvgPool2d), "max": (nn.MaxPool1d, nn.MaxPool2d)}


class ConvNetWithTracking(TrackedChain):
    """A small CNN as a chain: convolutional stages, then the classifier.

    ``input_shape`` (C, L) gives Conv1d stages, (C, H, W) Conv2d ones.  Stage i is
    ``ConvActivation(channels[i-1], channels[i], kernel_size, strides[i], padding,
    activation)``, followed by ``pool`` ('avg' or 'max', kernel and stride 2) if given;
    then ``nn.Flatten()`` and :class:`AffineCrossEntropy` over the flattened features.
    ``strides`` is an int (all stages) or one per stage.  Inputs of any shape
    ``(B, ...)`` with ``prod(input_shape)`` numbers per example (e.g. flattened
    images) are reshaped to ``(B, *input_shape)``.  Every layer has closed forms
    (docs/ALGORITHM.md, "Convolutional layers").
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int],
                 kernel_size: int = 3, strides=1, padding: int = 1, activation: str = "tanh",
                 pool: Optional[str] = None, bias: bool = True):
        _activation(activation)
        input_shape = tuple(int(s) for s in input_shape)
        channels = [int(c) for c in channels]
        strides = [int(strides)] * len(channels) if isinstance(strides, int) else list(strides)
        if len(input_shape) not in (2, 3) or min(input_shape) < 1:
            raise HessianInverseError(
                f"input_shape must be (channels, length) or (channels, height, width), got "
                f"{input_shape}")
        if not channels or min(channels) < 1 or len(strides) != len(channels) or num_classes < 1:
            raise HessianInverseError(
                f"expected at least one stage, channels >= 1, one stride per stage and "
                f"num_classes >= 1; got channels={channels}, strides={strides}, "
                f"num_classes={num_classes}")
        if pool is not None and pool not in POOLS:
            raise HessianInverseError(f"pool must be None or one of {sorted(POOLS)}, got {pool!r}")
        dim = len(input_shape) - 1
        stages: list = []
        widths = [input_shape[0]] + channels
        for i, stride in enumerate(strides):
            stages.append(ConvActivation(widths[i], widths[i + 1], kernel_size, stride, padding,
                                         activation, bias, dim))
            if pool is not None:
                stages.append(POOLS[pool][dim - 1](2))
        z = torch.zeros(1, *input_shape)
        for i, stage in enumerate(stages):
            try:
                with torch.no_grad():
                    z = stage(z)
            except RuntimeError as err:
                raise HessianInverseError(
                    f"stage {i + 1} ({type(stage).__name__}) does not fit its input of shape "
                    f"{tuple(z.shape[1:])} (from input_shape {input_shape}): {err}. Use fewer "
                    "stages, stride 1, more padding or a larger input") from None
        super().__init__(stages + [nn.Flatten()], AffineCrossEntropy(z.numel(), num_classes, bias))
        self.input_shape, self.activation = input_shape, activation

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x[0].numel() != math.prod(self.input_shape):
            raise HessianInverseError(
                f"expected a batch of inputs of shape (B, {', '.join(map(str, self.input_shape))})"
                f" (or flattened, (B, {math.prod(self.input_shape)})); got {tuple(x.shape)}")
        return x.reshape(x.shape[0], *self.input_shape)

# --------------------------------------------------------------------------
# The derivative oracle (docs/ALGORITHM.md, "The derivative oracle")
# --------------------------------------------------------------------------


@dataclass
class LayerDerivatives:
    """Derivatives of one layer ``z_l = f_l(z_{l-1}; x_l)`` at the tracked point.

    Shapes (p = parameters of the layer, a_in / a_out = activations in / out,
    batch included, flattened row-major):

    - ``J`` (a_out, p): df/dx.
    - ``F`` (a_out, a_in): df/dz_{l-1}.  ``None`` for the first layer.
    - ``A`` (p, p): d2(b.f)/dx dx, symmetric (paper: D_D D_xx).
    - ``C`` (p, a_in): d2(b.f)/dx dz (paper: D_D D_zx).  ``None`` for the first layer.
    - ``G`` (a_in, a_in): d2(b.f)/dz dz, symmetric (paper: D_M D_zz).  ``None`` for the first layer.

    ``b`` (a_out,) is the backprop adjoint dz_L/dz_l the second derivatives are
    contracted with.
    """

    J: torch.Tensor
    A: torch.Tensor
    F: Optional[torch.Tensor] = None
    C: Optional[torch.Tensor] = None
    G: Optional[torch.Tensor] = None

    @property
    def num_params(self) -> int:
        return self.J.shape[1]

    @property
    def num_outputs(self) -> int:
        return self.J.shape[0]


def _flat_function(layer: nn.Module, z_shape: torch.Size, extra_inputs: tuple):
    """``f(theta, z_flat) -> z_out_flat`` for a module with flattened parameters."""
    named = list(layer.named_parameters())
    names = [name for name, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]

    def f(theta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        params = {n: t.view(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
        out = functional_call(layer, params, (z.view(z_shape),) + extra_inputs)
        return out.reshape(-1)

    return f


def _flat_parameters(layer: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """The layer's parameters, detached and flattened in ``parameters()`` order."""
    return torch.cat([like.new_zeros(0)] + [p.detach().reshape(-1) for p in layer.parameters()])


def compute_layer_derivatives(layer: nn.Module, z_prev: torch.Tensor, adjoint: torch.Tensor,
                              *extra_inputs: torch.Tensor,
                              input_derivatives: bool = True) -> LayerDerivatives:
    """The derivative oracle for one layer (docs/ALGORITHM.md, "The derivative oracle").

    Args:
        layer: any module mapping ``z_prev`` (and ``extra_inputs``, e.g. targets
            for a loss layer) to the layer output, smooth in its parameters and input.
        z_prev: the layer's input batch, any shape; flattened row-major (a_in values).
        adjoint: ``b_l`` (a_out,), dz_L/dz_l; 1-element for the scalar loss layer.
        input_derivatives: compute F, C, G (not needed for the first layer,
            whose input is data).

    Returns:
        :class:`LayerDerivatives` computed exactly with ``torch.func``: J and F by
        reverse mode, and A, C, G as the Hessian of ``s = b . f`` in (x, z).
        These are the paper's six derivative kinds, contracted with b as the
        algorithm uses them.
    """
    theta = _flat_parameters(layer, z_prev)
    z = z_prev.detach().reshape(-1)
    f = _flat_function(layer, z_prev.shape, tuple(t.detach() for t in extra_inputs))
    b = adjoint.detach().reshape(-1)
    p = theta.numel()
    if not input_derivatives:
        J = jacrev(f)(theta, z)
        A = _dense_hessian(lambda t: b @ f(t, z), theta)
        return LayerDerivatives(J=J, A=A)
    J, Fz = jacrev(f, argnums=(0, 1))(theta, z)
    S = _dense_hessian(lambda tz: b @ f(tz[:p], tz[p:]), torch.cat([theta, z]))
    return LayerDerivatives(J=J, F=Fz, A=S[:p, :p], C=S[:p, p:], G=S[p:, p:])


def _dense_hessian(s: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Hessian of a scalar function of a small vector: forward-over-reverse, vmapped.

    Written as ``jvp`` of ``grad`` rather than ``torch.func.hessian``
    (``jacfwd(jacrev)``): in torch 2.14 the latter's nested vmap returns a wrong
    mixed block for ``layer_norm`` (checked against finite differences).
    """
    eye = torch.eye(x.numel(), dtype=x.dtype, device=x.device)
    return vmap(lambda e: jvp(grad(s), (x,), (e,))[1])(eye)


def _check_curvature(curvature: str, loss_layer: Optional[nn.Module] = None) -> None:
    """Validate ``curvature``; for ``'ggn'`` the loss layer must split into logits and loss."""
    if curvature not in CURVATURES:
        raise HessianInverseError(
            f"curvature must be one of {CURVATURES}, got {curvature!r}")
    if curvature == "ggn" and loss_layer is not None:
        missing = [m for m in ("logits", "loss") if not callable(getattr(loss_layer, m, None))]
        if missing:
            raise HessianInverseError(
                f"curvature='ggn' needs the loss layer to split into outputs and loss, but "
                f"{type(loss_layer).__name__} has no {' or '.join(missing)} method. Add "
                "`logits(z) -> outputs` (everything with parameters) and "
                "`loss(outputs, targets) -> scalar` (parameter-free), with "
                "forward(z, targets) == loss(logits(z), targets); see AffineCrossEntropy."
            )


class _LogitsView(nn.Module):
    """``z -> layer.logits(z)`` as a module, so ``functional_call`` can reach it."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.inner = layer

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.inner.logits(z)


def compute_layer_jacobians(layer: nn.Module, z_prev: torch.Tensor,
                            input_derivatives: bool = True) -> LayerDerivatives:
    """First-order part of the oracle only: ``J`` and ``F``, with ``A, C, G = 0``.

    This is a hidden layer under Gauss-Newton (docs/ALGORITHM.md, "Gauss-Newton"): the
    curvature of the network's own nonlinearity is dropped.  Shapes as in
    :class:`LayerDerivatives`; the zero blocks keep the lifted system's layout.
    """
    theta = _flat_parameters(layer, z_prev)
    z = z_prev.detach().reshape(-1)
    f = _flat_function(layer, z_prev.shape, ())
    p, a_in = theta.numel(), z.numel()
    zeros = theta.new_zeros
    if not input_derivatives:
        return LayerDerivatives(J=jacrev(f)(theta, z), A=zeros(p, p))
    J, Fz = jacrev(f, argnums=(0, 1))(theta, z)
    return LayerDerivatives(J=J, F=Fz, A=zeros(p, p), C=zeros(p, a_in), G=zeros(a_in, a_in))


def compute_loss_layer_ggn_derivatives(layer: nn.Module, z_prev: torch.Tensor,
                                       targets: torch.Tensor,
                                       input_derivatives: bool = True) -> LayerDerivatives:
    """The fused loss layer's blocks for the Gauss-Newton matrix.

    See docs/ALGORITHM.md, "Gauss-Newton".

    The layer is split as ``o = phi(z; theta)`` (``layer.logits``, m outputs
    flattened) and ``ell(o)`` (``layer.loss(o, targets)``).  With
    ``J_theta = do/dtheta`` (m, p), ``J_z = do/dz`` (m, a_in), ``g_o = dell/do``
    (m,) and ``H_o = d2 ell/do2`` (m, m), the blocks are

        J = g_o^T J_theta (1, p),            F = g_o^T J_z (1, a_in),
        A = J_theta^T H_o J_theta (p, p),    C = J_theta^T H_o J_z (p, a_in),
        G = J_z^T H_o J_z (a_in, a_in).

    With every hidden layer's A, C, G set to zero (:func:`compute_layer_jacobians`),
    the Hessian-vector product becomes ``J_tot^T H_o J_tot v``: the tangent sweep
    carries ``J_tot v`` to the logits, the loss layer applies ``H_o`` there, and
    the adjoint sweep applies ``J_tot^T`` through the ``F^T`` and ``J^T`` blocks.
    That is the generalized Gauss-Newton matrix, positive semi-definite for a
    convex loss such as cross-entropy.  ``H_o`` is formed densely (m = batch x
    classes), like the generic oracle's ``G``.
    """
    theta = _flat_parameters(layer, z_prev)
    z = z_prev.detach().reshape(-1)
    targets = targets.detach()
    phi = _flat_function(_LogitsView(layer), z_prev.shape, ())
    with torch.no_grad():
        logits_shape = layer.logits(z_prev.detach()).shape
    o = phi(theta, z).detach()

    def ell(o_flat: torch.Tensor) -> torch.Tensor:
        return layer.loss(o_flat.view(logits_shape), targets)

    g_o = torch.func.grad(ell)(o)
    H_o = jacrev(torch.func.grad(ell))(o)  # reverse over reverse: m is small
    if not input_derivatives:
        J_theta = jacrev(phi)(theta, z)
        return LayerDerivatives(J=(g_o @ J_theta)[None], A=J_theta.T @ (H_o @ J_theta))
    J_theta, J_z = jacrev(phi, argnums=(0, 1))(theta, z)
    HJ_theta, HJ_z = H_o @ J_theta, H_o @ J_z
    return LayerDerivatives(J=(g_o @ J_theta)[None], F=(g_o @ J_z)[None],
                            A=J_theta.T @ HJ_theta, C=J_theta.T @ HJ_z, G=J_z.T @ HJ_z)

# --------------------------------------------------------------------------
# Structured layers (docs/ALGORITHM.md, "Structured layers")
# --------------------------------------------------------------------------
#
# For a layer z_l = phi(u), u = W z + c per example, write K = du/d(W, c),
# Wb = du/dz = I_B kron W, S = dz_l/du, r = S^T b_l and D = d2(b_l . z_l)/du2
# (one block per example).  Then
#
#     J = S K,   F = S Wb,   A = K^T D K,   C = K^T D Wb + E,   G = Wb^T D Wb,
#
# with E = d2(r . u)/d(W, c) dz: every block is a product of small factors.


class LinearMap:
    """A matrix known by its action: ``M @ X`` and ``M.T @ X``, X (cols, k) or (cols,).

    Stands where :class:`LayerDerivatives` holds a dense block; the
    Hessian-vector product only multiplies by its blocks.
    """

    def __init__(self, shape: tuple, apply: Callable, apply_t: Callable, like):
        self.shape = tuple(shape)
        self._apply, self._apply_t = apply, apply_t
        self.dtype, self.device = like.dtype, like.device

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 1:
            return self._apply(x.unsqueeze(1))[:, 0]
        return self._apply(x)

    @property
    def T(self) -> "LinearMap":
        return LinearMap(self.shape[::-1], self._apply_t, self._apply, self)

    def dense(self) -> torch.Tensor:
        return self @ torch.eye(self.shape[1], dtype=self.dtype, device=self.device)


class LayerBlocks:
    """The protocol of per-layer blocks known by their action (docs/ALGORITHM.md,
    "Structured layers" and "Convolutional layers").

    A subclass gives ``J``, ``F``, ``A``, ``C``, ``G`` as :class:`LinearMap` (``F``,
    ``C``, ``G`` None for the first layer, whose input is data), ``num_params``,
    ``num_outputs`` and ``_like`` (a tensor of its dtype and device); it may override
    ``gauss_newton``.  Everything that only multiplies by the blocks (the
    Hessian-vector product, the output-space and parameter-space routes) takes any
    of them; ``densify`` writes them out as :class:`LayerDerivatives` for the routes
    that factor dense blocks.  Tensors are dataclass fields, so that
    ``HessianOperator.to`` can cast them.
    """

    def _map(self, rows: int, cols: int, apply: Callable, apply_t: Callable) -> LinearMap:
        return LinearMap((rows, cols), apply, apply_t, self._like)

    def _zero_map(self, rows: int, cols: int) -> LinearMap:
        def zero(x):
            return x.new_zeros(rows, x.shape[-1])

        def zero_t(x):
            return x.new_zeros(cols, x.shape[-1])
        return self._map(rows, cols, zero, zero_t)

    def gauss_newton(self, is_loss_layer: bool) -> "LayerBlocks":
        """The blocks of the Gauss-Newton matrix ("Gauss-Newton"): a parameter-free
        linear layer has no curvature of its own, so by default the blocks themselves."""
        return self

    def densify(self) -> LayerDerivatives:
        """The same blocks as dense tensors (what the generic oracle computes)."""
        dense = {name: getattr(self, name) for name in ("J", "A", "F", "C", "G")}
        return LayerDerivatives(**{name: block.dense() if block is not None else None
                                   for name, block in dense.items()})


class ChainRuleBlocks(LayerBlocks):
    """The blocks of ``z_l = s(u)``, ``u = K x + Wb z`` (affine in the parameters x and
    in the input z) by the chain rule ("Structured layers"):

        J = S K,   F = S Wb,   A = K^T D K,   C = K^T D Wb + E,   G = Wb^T D Wb.

    A subclass provides the primitives ``K``, ``K_t``, ``Wb``, ``Wb_t``, ``S``,
    ``S_t``, ``D``, ``E``, ``E_t`` on (rows, k) matrices, ``num_inputs``,
    ``input_derivatives`` and the fields ``u_gradient`` (r) and ``u_hessian`` (D's
    entries).  ``curved`` False (a hidden layer under Gauss-Newton: r = 0, D = 0)
    makes A, C, G zero maps, computed without products.
    """

    curved = True

    @property
    def J(self) -> LinearMap:
        return self._map(self.num_outputs, self.num_params,
                         lambda x: self.S(self.K(x)), lambda w: self.K_t(self.S_t(w)))

    @property
    def A(self) -> LinearMap:
        if not self.curved:
            return self._zero_map(self.num_params, self.num_params)

        def apply(x):
            return self.K_t(self.D(self.K(x)))
        return self._map(self.num_params, self.num_params, apply, apply)

    @property
    def F(self) -> Optional[LinearMap]:
        if not self.input_derivatives:
            return None
        return self._map(self.num_outputs, self.num_inputs,
                         lambda t: self.S(self.Wb(t)), lambda w: self.Wb_t(self.S_t(w)))

    @property
    def C(self) -> Optional[LinearMap]:
        if not self.input_derivatives:
            return None
        if not self.curved:
            return self._zero_map(self.num_params, self.num_inputs)
        return self._map(self.num_params, self.num_inputs,
                         lambda t: self.K_t(self.D(self.Wb(t))) + self.E(t),
                         lambda x: self.Wb_t(self.D(self.K(x))) + self.E_t(x))

    @property
    def G(self) -> Optional[LinearMap]:
        if not self.input_derivatives:
            return None
        if not self.curved:
            return self._zero_map(self.num_inputs, self.num_inputs)

        def apply(t):
            return self.Wb_t(self.D(self.Wb(t)))
        return self._map(self.num_inputs, self.num_inputs, apply, apply)

    def tangent(self, v: Optional[torch.Tensor], t: Optional[torch.Tensor]):
        """The product's forward step with the chain rule's own recursion
        ("The Hessian-vector product"): du = K v + Wb t, t_l = S du; returns (state for
        :meth:`adjoint`, t_l).  ``v`` (p, k), ``t`` (a_in, k), either None for zero."""
        du = _sum(None if v is None else self.K(v), None if t is None else self.Wb(t))
        return (t, du), None if du is None else self.S(du)

    def adjoint(self, v: Optional[torch.Tensor], state, u: Optional[torch.Tensor],
                first_order: bool = False):
        """The backward step: q = D du + S^T u, (H v)_l = K^T q + E t_{l-1},
        u_{l-1} = Wb^T q + E^T v (four products where the blocks take twelve).
        ``first_order``: J^T u and F^T u only.  Returns ((H v)_l or None, u_{l-1} or None)."""
        t_prev, du = state
        curved = self.curved and not first_order
        q = _sum(self.D(du) if curved and du is not None else None,
                 None if u is None else self.S_t(u))
        out = _sum(None if q is None else self.K_t(q),
                   self.E(t_prev) if curved and t_prev is not None else None)
        back = None
        if self.input_derivatives:
            back = _sum(None if q is None else self.Wb_t(q),
                        self.E_t(v) if curved and v is not None else None)
        return out, back

    def gauss_newton(self, is_loss_layer: bool) -> "ChainRuleBlocks":
        """GGN keeps only the loss's curvature in the logits ("Gauss-Newton"): every
        layer loses the E term (r = 0: d2u/dx dz contracted with the backprop
        gradient), hidden layers lose the activation curvature (D = 0).  The fused
        loss layer keeps its D, the softmax Hessian in its logits (affine in x and z)."""
        kept = self.u_hessian if is_loss_layer else torch.zeros_like(self.u_hessian)
        return replace(self, u_gradient=torch.zeros_like(self.u_gradient), u_hessian=kept)


@dataclass
class AffineLayerBlocks(ChainRuleBlocks):
    """Closed-form derivatives of ``z_l = phi(u)``, ``u = W z + c`` per example.

    B examples (every leading position of the input), m inputs and h outputs each;
    parameters are W (row-major) then c, activations are flattened row-major.

    - ``inputs`` Z (B, m): the layer's input z_{l-1}.
    - ``weight`` W (h, m); ``bias``: whether the layer has c.
    - ``out_map`` S: dz_l/du, (a_out, B h).  Stored as its diagonal sigma'(u)
      (B h,) for a hidden layer (a_out = B h); the loss gradient in the logits
      as one row (1, B h) for the fused loss layer (a_out = 1).
    - ``u_gradient`` r (B, h): b_l . dz_l/du.  Multiplies d2u/dW dz, giving
      the term E[(i, k), (n, k')] = r[n, i] delta_kk' of C.
    - ``u_hessian`` D: d2(b_l . z_l)/du2, one (h, h) block per example: (B, h, h),
      or (B, h) holding the diagonals when they are diagonal (hidden layers).
    - ``input_derivatives``: False for the first layer (its input is data).
    - ``u_hessian_root``: R (B, r, h) with R_n^T R_n = D_n, when the loss layer's closed
      forms supply it (the softmax: r = h - 1, by a Householder reflector; the squared
      error: r = h); None where the output-space route derives it from D
      (:func:`softmax_curvature_root`).

    r and D are the only second-order terms; Gauss-Newton
    ("Gauss-Newton") is this with r = 0 in every layer and D = 0 except in the loss
    layer.  The blocks of :class:`LayerDerivatives` are the properties ``J``,
    ``F``, ``A``, ``C``, ``G`` (as :class:`LinearMap`); ``densify`` writes them out.
    Storage is O(B m + h m + B h^2) at most: linear in the parameter count.
    """

    inputs: torch.Tensor
    weight: torch.Tensor
    bias: bool
    out_map: torch.Tensor
    u_gradient: torch.Tensor
    u_hessian: torch.Tensor
    input_derivatives: bool = True
    diagonal: bool = False
    u_hessian_root: Optional[torch.Tensor] = None

    # Every tensor may carry leading dimensions (a stack of layers of the same
    # shape, processed together); the methods act on each layer of the stack, and a
    # direction carries the same leading dimensions.

    @property
    def num_examples(self) -> int:
        return self.inputs.shape[-2]

    @property
    def num_params(self) -> int:
        h, m = self.weight.shape[-2:]
        return h * (m + int(self.bias))

    @property
    def num_outputs(self) -> int:
        return self.out_map.shape[-1] if self.diagonal else self.out_map.shape[-2]

    @property
    def num_inputs(self) -> int:
        return self.inputs.shape[-2] * self.inputs.shape[-1]

    def augmented_inputs(self) -> torch.Tensor:
        """[Z, 1] (B, m + 1), or Z without a bias: K is ``augmented_inputs kron I_h``."""
        if not self.bias:
            return self.inputs
        return torch.cat([self.inputs, torch.ones_like(self.inputs[..., :1])], dim=-1)

    def gram(self) -> torch.Tensor:
        """(B, B) Gram matrix of the augmented inputs: K K^T = gram kron I_h."""
        zt = self.augmented_inputs()
        return zt @ zt.mT

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Parameter directions (p, k) as their W part (h, m, k) and c part (h, 1, k)."""
        h, m = self.weight.shape[-2:]
        lead, k = x.shape[:-2], x.shape[-1]
        x_w = x[..., :h * m, :].reshape(*lead, h, m, k)
        return x_w, x[..., h * m:, :].reshape(*lead, h, 1, k) if self.bias else None

    def _join(self, w_part: torch.Tensor, c_part: Optional[torch.Tensor]) -> torch.Tensor:
        """Inverse of ``_split``: (h, m, k) and (h, k) -> (p, k)."""
        flat = w_part.flatten(-3, -2)
        return torch.cat([flat, c_part], dim=-2) if self.bias else flat

    def _examples(self, u: torch.Tensor) -> torch.Tensor:
        """(B h, k) -> (B, h, k)."""
        return u.unflatten(-2, (self.num_examples, -1))

    def K(self, x: torch.Tensor) -> torch.Tensor:
        """du/d(W, c) x: (p, k) -> (B h, k).  One GEMM: Z (B, m) @ x_W^T (m, h k)."""
        x_w, x_c = self._split(x)
        h, m, k = x_w.shape[-3:]
        u = (self.inputs @ x_w.movedim(-3, -2).reshape(*x_w.shape[:-3], m, h * k))
        u = u.unflatten(-1, (h, k))
        if x_c is not None:
            u = u + x_c.transpose(-3, -2)
        return u.flatten(-3, -2)

    def K_t(self, u: torch.Tensor) -> torch.Tensor:
        """K^T u: (B h, k) -> (p, k).  One GEMM: Z^T (m, B) @ u (B, h k)."""
        per = self._examples(u)  # (B, h, k)
        x_w = (self.inputs.mT @ per.flatten(-2, -1)).unflatten(-1, per.shape[-2:])
        return self._join(x_w.movedim(-2, -3), per.sum(-3) if self.bias else None)

    def Wb(self, t: torch.Tensor) -> torch.Tensor:
        """du/dz t = (I_B kron W) t: (B m, k) -> (B h, k)."""
        return _per_example(self.weight, t)

    def Wb_t(self, u: torch.Tensor) -> torch.Tensor:
        """(I_B kron W)^T u: (B h, k) -> (B m, k)."""
        return _per_example(self.weight.mT, u)

    def S(self, u: torch.Tensor) -> torch.Tensor:
        """dz_l/du u: (B h, k) -> (a_out, k)."""
        return self.out_map.unsqueeze(-1) * u if self.diagonal else self.out_map @ u

    def S_t(self, w: torch.Tensor) -> torch.Tensor:
        """S^T w: (a_out, k) -> (B h, k)."""
        return self.out_map.unsqueeze(-1) * w if self.diagonal else self.out_map.mT @ w

    def S_dense(self) -> torch.Tensor:
        """S as an (a_out, B h) matrix."""
        return torch.diag_embed(self.out_map) if self.diagonal else self.out_map

    def D(self, u: torch.Tensor) -> torch.Tensor:
        """The u-curvature, block diagonal over examples: (B h, k) -> (B h, k)."""
        if self.diagonal:
            return self.u_hessian.flatten(-2, -1).unsqueeze(-1) * u
        return (self.u_hessian @ self._examples(u)).flatten(-3, -2)

    def D_blocks(self) -> torch.Tensor:
        """D as (B, h, h) blocks."""
        return torch.diag_embed(self.u_hessian) if self.diagonal else self.u_hessian

    def E(self, t: torch.Tensor) -> torch.Tensor:
        """d2(r . u)/d(W, c) dz t: (B m, k) -> (p, k); zero in the c rows.

        (E t)[i, k] = sum_n r[n, i] t[n, k].
        """
        h, m = self.weight.shape[-2:]
        k = t.shape[-1]
        e_w = (self.u_gradient.mT @ t.unflatten(-2, (self.num_examples, -1)).flatten(-2, -1))
        e_w = e_w.unflatten(-1, (m, k))
        return self._join(e_w, e_w.new_zeros(*e_w.shape[:-3], h, k) if self.bias else None)

    def E_t(self, x: torch.Tensor) -> torch.Tensor:
        """E^T x: (p, k) -> (B m, k)."""
        x_w, _ = self._split(x)
        k = x.shape[-1]
        return (self.u_gradient @ x_w.flatten(-2, -1)).unflatten(-1, (-1, k)).flatten(-3, -2)

    @property
    def _like(self) -> torch.Tensor:
        return self.weight


def _per_example(M: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(I_B kron M) x for M (..., r, c) and x (..., B c, k): one GEMM, x^T (B k, c) @ M^T."""
    r, c = M.shape[-2:]
    k = x.shape[-1]
    xt = x.unflatten(-2, (-1, c)).mT  # (..., B, k, c)
    out = (xt.reshape(*xt.shape[:-3], -1, c) @ M.mT).unflatten(-2, (-1, k))
    return out.mT.flatten(-3, -2)


def _add_per_example(out: torch.Tensor, M: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out += (I_B kron M) x`` in place (one layer: M (r, c), x (B c, k), out (B r, k))."""
    r, c = M.shape
    if x.shape[-1] == 1:
        return out.view(-1, r).addmm_(x.view(-1, c), M.T).view(out.shape)
    return out.add_(_per_example(M, x))


def gauss_newton_blocks(blocks: LayerBlocks, is_loss_layer: bool) -> LayerBlocks:
    """The closed-form blocks of the Gauss-Newton matrix (docs/ALGORITHM.md, "Gauss-Newton"):
    :meth:`LayerBlocks.gauss_newton`."""
    return blocks.gauss_newton(is_loss_layer)


def _tanh_derivatives(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.tanh(u)
    first = 1 - t * t
    return first, -2 * t * first


def _sigmoid_derivatives(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.sigmoid(u)
    first = s * (1 - s)
    return first, first * (1 - 2 * s)


#: sigma' and sigma'' in closed form where they are exactly what autograd gives.
_CLOSED_FORM_DERIVATIVES = {"tanh": _tanh_derivatives, "sigmoid": _sigmoid_derivatives,
                            "identity": lambda u: (torch.ones_like(u), torch.zeros_like(u))}


def _pointwise_derivatives(activation: str, u: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """sigma'(u) and sigma''(u) of an elementwise activation: closed form, else forward mode."""
    if activation in _CLOSED_FORM_DERIVATIVES:
        return _CLOSED_FORM_DERIVATIVES[activation](u)
    sigma, ones = ACTIVATIONS[activation], torch.ones_like(u)

    def first(x):
        return jvp(sigma, (x,), (ones,))[1]

    return jvp(first, (u,), (ones,))


def _affine_inputs(linear: nn.Linear, z_prev: torch.Tensor):
    """(Z, W, c, u): the layer input as (B, m), the detached parameters, and u = W z + c.

    W is a copy: the blocks keep it, and a detached view would share memory with
    the parameter, so an in-place update (an optimizer step) would change them.
    """
    weight = linear.weight.detach().clone()
    bias = linear.bias.detach() if linear.bias is not None else None
    Z = z_prev.detach().reshape(-1, weight.shape[1])
    return Z, weight, bias, F.linear(Z, weight, bias)


def affine_cross_entropy_blocks(layer: AffineCrossEntropy, z_prev: torch.Tensor,
                                targets: torch.Tensor, input_derivatives: bool = True
                                ) -> AffineLayerBlocks:
    """Closed forms for the fused loss ``mean_n CE(W z_n + c, t_n)`` (b_L = 1).

    Per example, with p = softmax(u) and y the one-hot (or probability) target
    of mass mu = sum(y): gradient r = (mu p - y) / B, which is also S as one
    row, and Hessian D = mu (diag(p) - p p^T) / B.
    """
    Z, weight, bias, u = _affine_inputs(layer.linear, z_prev)
    B, num_classes = u.shape
    y = (targets.to(u.dtype) if targets.is_floating_point()  # one-hot without a host read
         else (targets[:, None] == torch.arange(num_classes, device=u.device)).to(u.dtype))
    mass = y.sum(-1, keepdim=True)
    p = torch.softmax(u, dim=-1)
    r = (mass * p - y) / B
    D = mass[..., None] * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / B
    return AffineLayerBlocks(inputs=Z, weight=weight, bias=bias is not None,
                             out_map=r.reshape(1, -1), u_gradient=r, u_hessian=D,
                             input_derivatives=input_derivatives,
                             u_hessian_root=_softmax_root(p, mass / B))


def _softmax_root(p: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """R (B, C - 1, C) with R_n^T R_n = scale_n (diag(p_n) - p_n p_n^T), exactly.

    With s = sqrt(p) (a unit vector, sum p = 1), diag(p) - p p^T = diag(s)(I - s s^T)diag(s),
    and I - s s^T = H^T E H for the Householder reflector H = I - 2 w w^T / |w|^2,
    w = s + e_C (H s = -e_C), E = I without its last entry: R_n = sqrt(scale_n)
    H[:C-1] diag(s).  No eigendecomposition, no host synchronisation; O(B C^2).
    """
    s = p.sqrt()
    w = s.clone()
    w[:, -1] += 1.0
    H = (torch.eye(p.shape[-1], dtype=p.dtype, device=p.device) -
         2 * w[:, :, None] * w[:, None, :] / w.square().sum(-1)[:, None, None])
    return scale.sqrt()[:, :, None] * H[:, :-1] * s[:, None, :]


def affine_squared_error_blocks(layer: AffineSquaredError, z_prev: torch.Tensor,
                                targets: torch.Tensor, input_derivatives: bool = True
                                ) -> AffineLayerBlocks:
    """Closed forms for the fused loss ``mean_{n,i} (W z_n + c - y_n)_i^2`` (b_L = 1).

    With k = 2 / (B C): gradient r = k (u - y), which is also S as one row; Hessian
    D_n = k I_C for every example, and its root R_n = sqrt(k) I_C (C rows: no gauge).
    """
    Z, weight, bias, u = _affine_inputs(layer.linear, z_prev)
    B, C = u.shape
    k = 2.0 / (B * C)
    r = k * (u - targets.detach().to(u.dtype))
    eye = torch.eye(C, dtype=u.dtype, device=u.device).expand(B, C, C)
    return AffineLayerBlocks(inputs=Z, weight=weight, bias=bias is not None,
                             out_map=r.reshape(1, -1), u_gradient=r, u_hessian=k * eye,
                             input_derivatives=input_derivatives,
                             u_hessian_root=math.sqrt(k) * eye)


#: The closed forms of each fused loss layer type, (layer, z, targets, input_derivatives).
_LOSS_BLOCKS = {AffineCrossEntropy: affine_cross_entropy_blocks,
                AffineSquaredError: affine_squared_error_blocks}


def has_closed_form(layer: nn.Module, is_loss_layer: bool, z_prev: torch.Tensor,
                    targets: Optional[torch.Tensor] = None, check_range: bool = True) -> bool:
    """Whether closed forms describe this layer exactly.

    Exact types only (a subclass may change ``forward``): as a hidden layer
    ``AffineActivation``, or a type in :data:`HIDDEN_CLOSED_FORMS` (``ConvActivation``,
    flattening, pooling) that accepts ``z_prev``; as the loss layer on (B, m) inputs
    (or (B, ...) flattened to m), ``AffineCrossEntropy`` with class-index targets in
    range or (B, C) probability targets, and ``AffineSquaredError`` with (B, C) float
    targets.
    """
    if not is_loss_layer:
        form = HIDDEN_CLOSED_FORMS.get(type(layer))
        return type(layer) is AffineActivation or (form is not None
                                                   and form.applies(layer, z_prev))
    if (type(layer) not in _LOSS_BLOCKS or z_prev.dim() < 2 or targets is None
            or z_prev[0].numel() != layer.linear.in_features):
        return False
    num_classes = layer.linear.out_features
    if type(layer) is AffineSquaredError:
        return targets.is_floating_point() and tuple(targets.shape) == (z_prev.shape[0],
                                                                         num_classes)
    if targets.is_floating_point():
        return tuple(targets.shape) == (z_prev.shape[0], num_classes)
    return (tuple(targets.shape) == (z_prev.shape[0],) and
            (not check_range or bool(((targets >= 0) & (targets < num_classes)).all())))


def closed_form_flags(model: TrackedChain, tracked: TrackedForward,
                      checks: Optional[_Checks] = None) -> list[bool]:
    """Per layer, whether :func:`has_closed_form` holds at the tracked point.

    With ``checks``, class-index targets are taken by shape and their range is added to
    ``checks`` (out of range is an error either way: cross-entropy refuses them too).
    """
    layers = list(model.layers)
    flags = [has_closed_form(layer, l == len(layers) - 1, tracked.inputs[l], tracked.targets,
                             checks is None) for l, layer in enumerate(layers)]
    targets = tracked.targets
    if checks is not None and flags[-1] and not targets.is_floating_point():
        classes = layers[-1].linear.out_features
        checks.add((targets >= 0) & (targets < classes), lambda _: HessianInverseError(
            f"targets must be class indices in [0, {classes}) for the loss layer's "
            f"{classes} classes; got values from {int(targets.min())} to {int(targets.max())}"))
    return flags

# --------------------------------------------------------------------------
# Convolutional layers in closed form (docs/ALGORITHM.md, "Convolutional layers")
# --------------------------------------------------------------------------
#
# A convolution is an affine layer whose examples are (batch, output position)
# pairs: with Zh the im2col patches of the input plus a ones column, K = Zh kron
# I_C_out, so ConvLayerBlocks only replaces ChainRuleBlocks' primitives by
# convolutions: K x = conv(z, dW) + dc, K^T by conv2d_weight, Wb t = conv(t, W),
# Wb^T by conv2d_input, E t = conv2d_weight(t, r), E^T by conv2d_input.  k right-
# hand sides ride along as extra channels or extra examples: one call each.
# Conv1d runs as a Conv2d of height 1 (same flattening, same parameter order).


def _columns_in(x: torch.Tensor, shape: Sequence[int], dim: int) -> torch.Tensor:
    """(prod(shape), k) columns -> one tensor of ``shape`` with the k columns folded
    into dimension ``dim`` (0: more examples, k B; 1: more channels, k C)."""
    k = x.shape[-1]
    t = x.reshape(*shape, k).movedim(-1, dim)
    return t.reshape(*shape[:dim], k * shape[dim], *shape[dim + 1:])


def _columns_out(y: torch.Tensor, shape: Sequence[int], k: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`_columns_in`: ``shape`` with k folded into ``dim`` -> (prod(shape), k)."""
    t = y.reshape(*shape[:dim], k, *shape[dim:]).movedim(dim, -1)
    return t.reshape(-1, k)


@dataclass
class ConvLayerBlocks(ChainRuleBlocks):
    """Closed-form derivatives of ``z_l = sigma(u)``, ``u = conv(z, W) + c``.

    - ``inputs`` z (B, C_in, H, W) (height 1 for a Conv1d), ``weight`` W (C_out, C_in,
      kh, kw) (a copy), ``bias``, ``stride`` and ``padding`` (2-tuples).
    - ``out_map`` sigma'(u), ``u_gradient`` r = b sigma'(u), ``u_hessian`` b sigma''(u):
      (B, C_out, H', W') each: S and D are diagonal.
    - ``input_derivatives``: False for the first layer; ``curved``: False under
      Gauss-Newton for a hidden layer (A, C, G are then zero).

    Parameters are W row-major, then c; activations (B, C, H, W) row-major.  Storage
    O(a_in + a_out + p): nothing of size activations squared.
    """

    inputs: torch.Tensor
    weight: torch.Tensor
    bias: bool
    stride: tuple
    padding: tuple
    out_map: torch.Tensor
    u_gradient: torch.Tensor
    u_hessian: torch.Tensor
    input_derivatives: bool = True
    curved: bool = True

    kind = "conv"

    @property
    def num_params(self) -> int:
        return self.weight.numel() + (self.weight.shape[0] if self.bias else 0)

    @property
    def num_outputs(self) -> int:
        return self.out_map.numel()

    @property
    def num_inputs(self) -> int:
        return self.inputs.numel()

    def _conv(self, z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, weight, None, self.stride, self.padding)

    def _weight_grad(self, z: torch.Tensor, weight_shape, u: torch.Tensor) -> torch.Tensor:
        return torch.nn.grad.conv2d_weight(z, weight_shape, u, self.stride, self.padding)

    def _input_grad(self, z_shape, weight: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.nn.grad.conv2d_input(z_shape, weight, u, self.stride, self.padding)

    def _split_params(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(p, k) -> the W part (C_out, C_in, kh, kw, k) and the c part (C_out, k) or None."""
        n_w, k = self.weight.numel(), x.shape[-1]
        w = x[:n_w].reshape(*self.weight.shape, k)
        return w, x[n_w:] if self.bias else None

    def _join_params(self, w: torch.Tensor, c: Optional[torch.Tensor]) -> torch.Tensor:
        flat = w.reshape(self.weight.numel(), -1)
        return torch.cat([flat, c]) if c is not None else flat

    def K(self, x: torch.Tensor) -> torch.Tensor:
        """du/d(W, c) x = conv(z, dW) + dc: (p, k) -> (a_out, k); the k directions are
        k C_out output channels of one convolution."""
        w, c = self._split_params(x)
        k = x.shape[-1]
        u = self._conv(self.inputs, w.movedim(-1, 0).flatten(0, 1))
        out = _columns_out(u, self.out_map.shape, k, 1)
        if c is not None:
            B, C_out = self.out_map.shape[:2]
            out = (out.view(B, C_out, -1, k) + c[None, :, None, :]).view(-1, k)
        return out

    def K_t(self, u: torch.Tensor) -> torch.Tensor:
        """K^T u: (a_out, k) -> (p, k): dW = conv2d_weight(z, u), dc = u summed over
        examples and positions."""
        k = u.shape[-1]
        w = self._weight_grad(self.inputs, (k * self.weight.shape[0], *self.weight.shape[1:]),
                              _columns_in(u, self.out_map.shape, 1))
        w = w.unflatten(0, (k, self.weight.shape[0])).movedim(0, -1)
        c = (u.view(*self.out_map.shape[:2], -1, k).sum((0, 2)) if self.bias else None)
        return self._join_params(w, c)

    def Wb(self, t: torch.Tensor) -> torch.Tensor:
        """du/dz t = conv(t, W): (a_in, k) -> (a_out, k); the k tangents as k B examples."""
        k = t.shape[-1]
        u = self._conv(_columns_in(t, self.inputs.shape, 0), self.weight)
        return _columns_out(u, self.out_map.shape, k, 0)

    def Wb_t(self, u: torch.Tensor) -> torch.Tensor:
        """Wb^T u = conv2d_input(u, W): (a_out, k) -> (a_in, k)."""
        k = u.shape[-1]
        shape = (k * self.inputs.shape[0], *self.inputs.shape[1:])
        t = self._input_grad(shape, self.weight, _columns_in(u, self.out_map.shape, 0))
        return _columns_out(t, self.inputs.shape, k, 0)

    def S(self, u: torch.Tensor) -> torch.Tensor:
        return self.out_map.reshape(-1, 1) * u

    S_t = S

    def D(self, u: torch.Tensor) -> torch.Tensor:
        return self.u_hessian.reshape(-1, 1) * u

    def E(self, t: torch.Tensor) -> torch.Tensor:
        """d2(r . u)/d(W, c) dz t = conv2d_weight(t, r): (a_in, k) -> (p, k), zero in the
        c rows; the k tangents as k C_in input channels."""
        k = t.shape[-1]
        C_out, C_in = self.weight.shape[:2]
        w = self._weight_grad(_columns_in(t, self.inputs.shape, 1),
                              (C_out, k * C_in, *self.weight.shape[2:]), self.u_gradient)
        w = w.unflatten(1, (k, C_in)).movedim(1, -1)
        return self._join_params(w, w.new_zeros(C_out, k) if self.bias else None)

    def E_t(self, x: torch.Tensor) -> torch.Tensor:
        """E^T x = conv2d_input(r, dW): (p, k) -> (a_in, k)."""
        w, _ = self._split_params(x)
        k = x.shape[-1]
        C_out, C_in = self.weight.shape[:2]
        shape = (self.inputs.shape[0], k * C_in, *self.inputs.shape[2:])
        t = self._input_grad(shape, w.movedim(-1, 1).flatten(1, 2), self.u_gradient)
        return _columns_out(t, self.inputs.shape, k, 1)

    @property
    def _like(self) -> torch.Tensor:
        return self.weight

    def gauss_newton(self, is_loss_layer: bool) -> "ConvLayerBlocks":
        return replace(super().gauss_newton(is_loss_layer), curved=is_loss_layer)

    def example_gram(self, phi: torch.Tensor):
        """The output route's step under example-blocked Phi_l (B, r, C_out H' W')
        (docs/ALGORITHM.md, "Convolutional layers"): with psi = Phi_l S_l, the rows of
        U_l = psi K are per-example weight gradients, Y = psi_n Zh_n (m = B r rows, p_l
        columns), so U_l U_l^T = Y Y^T; Phi_{l-1} = psi Wb per example (conv2d_input of
        the B r rows as examples).  Cost O(m P q C_out + m^2 p_l), P positions, q = C_in
        kh kw.  Returns (U_l U_l^T, Phi_{l-1} or None, Y), or None if the batch differs."""
        B, r = phi.shape[:2]
        if B != self.inputs.shape[0]:
            return None
        C_out, C_in = self.weight.shape[:2]
        psi = phi.view(B, r, C_out, -1) * self.out_map.view(B, 1, C_out, -1)
        patches = F.unfold(self.inputs, self.weight.shape[2:], padding=self.padding,
                           stride=self.stride)                                  # (B, q, P)
        Y = torch.bmm(psi.reshape(B, r * C_out, -1), patches.mT).reshape(B * r, -1)  # (n, i, o, j)
        if self.bias:
            Y = torch.cat([Y, psi.sum(-1).reshape(B * r, C_out)], dim=1)
        if not self.input_derivatives:
            return Y @ Y.T, None, Y
        rows = psi.reshape(B * r, *self.out_map.shape[1:])
        prev = self._input_grad((B * r, *self.inputs.shape[1:]), self.weight, rows)
        return Y @ Y.T, prev.reshape(B, r, -1), Y


def conv_activation_blocks(layer: ConvActivation, z_prev: torch.Tensor,
                           adjoint: Optional[torch.Tensor],
                           input_derivatives: bool = True) -> ConvLayerBlocks:
    """Closed forms for ``sigma(conv(z, W) + c)``: S = diag(sigma'(u)), r = b sigma'(u),
    D = diag(b sigma''(u)), as for an affine layer ("Structured layers").  ``adjoint``
    b_l, or None for the Gauss-Newton matrix (r = D = 0)."""
    conv = layer.conv
    weight = conv.weight.detach().clone()
    z = z_prev.detach()
    stride, padding = tuple(conv.stride), tuple(conv.padding)
    if weight.dim() == 3:  # Conv1d as a Conv2d of height 1
        weight, z = weight.unsqueeze(2), z.unsqueeze(2)
        stride, padding = (1,) + stride, (0,) + padding
    bias = conv.bias.detach() if conv.bias is not None else None
    u = F.conv2d(z, weight, bias, stride, padding)
    first, second = _pointwise_derivatives(layer.activation, u)
    if adjoint is None:
        zero = torch.zeros_like(u)
        return ConvLayerBlocks(z, weight, bias is not None, stride, padding, first, zero, zero,
                               input_derivatives, curved=False)
    b = adjoint.detach().reshape(u.shape)
    return ConvLayerBlocks(z, weight, bias is not None, stride, padding, first, b * first,
                           b * second, input_derivatives)

# --------------------------------------------------------------------------
# Parameter-free linear layers: flattening and pooling (docs/ALGORITHM.md,
# "Convolutional layers")
# --------------------------------------------------------------------------


@dataclass
class LinearLayerBlocks(LayerBlocks):
    """A parameter-free layer linear in its input, applied to each example alike
    (``nn.Flatten``, average pooling): ``F t = f(t)``, ``F^T`` by one vector-Jacobian
    product (exact: f is linear), J and A empty, C empty, G = 0.  Never densified by
    the routes that only multiply.

    ``module``: the layer; ``in_shape``, ``out_shape``: its input and output shapes,
    batch first; ``like``: an empty tensor of the dtype and device.
    """

    module: nn.Module
    in_shape: tuple
    out_shape: tuple
    like: torch.Tensor
    input_derivatives: bool = True

    kind = "linear"
    num_params = 0

    @property
    def _like(self) -> torch.Tensor:
        return self.like

    @property
    def num_outputs(self) -> int:
        return math.prod(self.out_shape)

    @property
    def num_inputs(self) -> int:
        return math.prod(self.in_shape)

    def forward_map(self, t: torch.Tensor) -> torch.Tensor:
        """f on a batch of inputs (N, *in_shape[1:]) -> (N, *out_shape[1:])."""
        return self.module(t)

    def adjoint_map(self, w: torch.Tensor) -> torch.Tensor:
        """f^T on a batch of output cotangents (N, *out_shape[1:]) -> (N, *in_shape[1:])."""
        zeros = w.new_zeros(w.shape[0], *self.in_shape[1:])
        return torch.func.vjp(self.module, zeros)[1](w)[0]

    @property
    def J(self) -> LinearMap:
        return self._zero_map(self.num_outputs, 0)

    @property
    def A(self) -> LinearMap:
        return self._zero_map(0, 0)

    @property
    def F(self) -> Optional[LinearMap]:
        if not self.input_derivatives:
            return None

        def apply(t):
            y = self.forward_map(_columns_in(t, self.in_shape, 0))
            return _columns_out(y, self.out_shape, t.shape[-1], 0)

        def apply_t(w):
            y = self.adjoint_map(_columns_in(w, self.out_shape, 0))
            return _columns_out(y, self.in_shape, w.shape[-1], 0)
        return self._map(self.num_outputs, self.num_inputs, apply, apply_t)

    @property
    def C(self) -> Optional[LinearMap]:
        return self._zero_map(0, self.num_inputs) if self.input_derivatives else None

    @property
    def G(self) -> Optional[LinearMap]:
        return (self._zero_map(self.num_inputs, self.num_inputs) if self.input_derivatives
                else None)

    def example_gram(self, phi: torch.Tensor):
        """The output route's step ("Convolutional layers"): no parameters (Y is m x 0),
        and Phi_{l-1} = Phi_l F per example, the B r rows as examples of f^T."""
        B, r = phi.shape[:2]
        Y = phi.new_zeros(B * r, 0)
        if B != self.in_shape[0] or not self.input_derivatives:
            return None if B != self.in_shape[0] else (None, None, Y)
        prev = self.adjoint_map(phi.reshape(B * r, *self.out_shape[1:]))
        return None, prev.reshape(B, r, -1), Y


@dataclass
class MaxPoolBlocks(LinearLayerBlocks):
    """Max-pooling at the tracked point: F picks, per example and channel, the input
    position of each window's maximum (``indices`` (B, C, out positions) into the
    flattened input positions), so ``F t`` gathers and ``F^T w`` scatter-adds.  Exact
    almost everywhere (off ties); the layer has no curvature of its own."""

    indices: torch.Tensor = None

    def forward_map(self, t: torch.Tensor) -> torch.Tensor:
        n, C = t.shape[:2]
        index = self.indices.repeat(n // self.indices.shape[0], 1, 1)
        return t.reshape(n, C, -1).gather(2, index).reshape(n, *self.out_shape[1:])

    def adjoint_map(self, w: torch.Tensor) -> torch.Tensor:
        n, C = w.shape[:2]
        index = self.indices.repeat(n // self.indices.shape[0], 1, 1)
        out = w.new_zeros(n, C, math.prod(self.in_shape[2:]))
        return out.scatter_add_(2, index, w.reshape(n, C, -1)).reshape(n, *self.in_shape[1:])

    def example_gram(self, phi: torch.Tensor):
        """Per example's own indices: the B r rows are r rows of each of B examples."""
        B, r = phi.shape[:2]
        Y = phi.new_zeros(B * r, 0)
        if B != self.in_shape[0] or not self.input_derivatives:
            return None if B != self.in_shape[0] else (None, None, Y)
        rows = phi.reshape(B, r, self.out_shape[1], -1).transpose(0, 1).reshape(
            B * r, *self.out_shape[1:])
        prev = self.adjoint_map(rows).reshape(r, B, -1).transpose(0, 1)
        return None, prev.reshape(B, r, -1), Y


def linear_layer_blocks(layer: nn.Module, z_prev: torch.Tensor, adjoint: torch.Tensor,
                        input_derivatives: bool = True) -> LinearLayerBlocks:
    z = z_prev.detach()
    with torch.no_grad():
        out_shape = tuple(layer(z[:1]).shape[1:])
    return LinearLayerBlocks(layer, tuple(z.shape), (z.shape[0],) + out_shape, z.new_zeros(0),
                             input_derivatives)


def max_pool_blocks(layer: nn.Module, z_prev: torch.Tensor, adjoint: torch.Tensor,
                    input_derivatives: bool = True) -> MaxPoolBlocks:
    z = z_prev.detach()
    pool = copy.copy(layer)
    pool.return_indices = True
    with torch.no_grad():
        out, indices = pool(z)
    return MaxPoolBlocks(layer, tuple(z.shape), tuple(out.shape), z.new_zeros(0),
                         input_derivatives, indices.reshape(*out.shape[:2], -1))


@dataclass(frozen=True)
class ClosedForm:
    """How a hidden layer of one exact type gets its blocks: ``blocks(layer, z_prev,
    adjoint, input_derivatives)``, when ``applies(layer, z_prev)``."""

    blocks: Callable
    applies: Callable = lambda layer, z_prev: True


def _flattens_examples(layer: nn.Flatten, z_prev: torch.Tensor) -> bool:
    """nn.Flatten acts on each example alike unless it also flattens the batch."""
    return z_prev.dim() >= 2 and layer.start_dim % z_prev.dim() >= 1


def _pools_batch(layer: nn.Module, z_prev: torch.Tensor) -> bool:
    """Pooling of a batched input: (B, C, L) for the 1d kinds, (B, C, H, W) for 2d."""
    return z_prev.dim() == (3 if "1d" in type(layer).__name__ else 4)


#: Hidden layers with closed forms besides ``AffineActivation`` (whose runs
#: :func:`chain_derivatives` stacks), by exact type (:func:`has_closed_form`).
HIDDEN_CLOSED_FORMS: dict = {
    ConvActivation: ClosedForm(conv_activation_blocks),
    nn.Flatten: ClosedForm(linear_layer_blocks, _flattens_examples),
    nn.Identity: ClosedForm(linear_layer_blocks),
    **{pool: ClosedForm(linear_layer_blocks, _pools_batch) for pool in (
        nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)},
    **{pool: ClosedForm(max_pool_blocks, _pools_batch) for pool in (
        nn.MaxPool1d, nn.MaxPool2d)},
}

# --------------------------------------------------------------------------
# Matrix-free layers: any module by autograd products (docs/ALGORITHM.md,
# "Matrix-free layers")
# --------------------------------------------------------------------------


def _jvp_columns(fn: Callable, primal: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """(d fn / d primal) X for the k columns of X (n, k): forward mode, vmapped."""
    return vmap(lambda v: jvp(fn, (primal,), (v,))[1], in_dims=1, out_dims=1)(X)


def _vjp_columns(fn: Callable, primal: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """(d fn / d primal)^T W for the k columns of W (m, k): reverse mode, vmapped."""
    pull = torch.func.vjp(fn, primal)[1]
    return vmap(lambda w: pull(w)[0], in_dims=1, out_dims=1)(W)


@dataclass
class AutogradLayerBlocks(LayerBlocks):
    """The blocks of any smooth layer as autograd products, never formed.

    With ``f(x, z)`` the layer on flat parameters and input, and ``s = b . f``
    (``adjoint`` b = b_l): ``J``, ``F`` by forward mode, their transposes by reverse
    mode, and ``A``, ``C``, ``G`` as forward-over-reverse products of s (the
    Hessian-vector product of the layer alone), vmapped over the k columns: memory
    O(k (a_in + a_out) + p), nothing of size activations squared.  ``curvature``:
    'hessian'; 'ggn' for a hidden layer under Gauss-Newton (A, C, G zero); or, for a
    loss layer under Gauss-Newton, 'ggn-loss': with logits ``o = logits(x, z)`` and
    ``H_o`` the loss's Hessian in them, ``A = J_x^T H_o J_x``, ``C = J_x^T H_o J_z``,
    ``G = J_z^T H_o J_z`` ("Gauss-Newton").

    ``theta`` (p,), ``inputs`` z_{l-1} (any shape), ``adjoint`` (a_out,); ``function``,
    ``logits``, ``loss`` are the flat-parameter functions (:func:`_flat_function`).
    """

    theta: torch.Tensor
    inputs: torch.Tensor
    adjoint: torch.Tensor
    function: Callable
    num_outputs: int
    input_derivatives: bool = True
    curvature: str = "hessian"
    logits: Optional[Callable] = None
    loss: Optional[Callable] = None

    kind = "autograd"

    @property
    def _like(self) -> torch.Tensor:
        return self.inputs

    @property
    def num_params(self) -> int:
        return self.theta.numel()

    @property
    def num_inputs(self) -> int:
        return self.inputs.numel()

    def _in_theta(self, fn: Callable) -> Callable:
        z = self.inputs.reshape(-1)
        return lambda th: fn(th, z)

    def _in_z(self, fn: Callable) -> Callable:
        return lambda z: fn(self.theta, z)

    def _first_order(self, fn: Callable, wrt: str, rows: int) -> LinearMap:
        """d fn / d(theta or z) (rows outputs) as a map."""
        f, primal = ((self._in_theta(fn), self.theta) if wrt == "theta"
                     else (self._in_z(fn), self.inputs.reshape(-1)))
        return self._map(rows, primal.numel(), lambda x: _jvp_columns(f, primal, x),
                         lambda w: _vjp_columns(f, primal, w))

    @property
    def J(self) -> LinearMap:
        return self._first_order(self.function, "theta", self.num_outputs)

    @property
    def F(self) -> Optional[LinearMap]:
        if not self.input_derivatives:
            return None
        return self._first_order(self.function, "z", self.num_outputs)

    def _second(self, rows: str, cols: str) -> LinearMap:
        """The block d2 s / d rows d cols (rows, cols in 'theta', 'z') as a map."""
        sizes = {"theta": self.num_params, "z": self.num_inputs}
        if self.curvature == "ggn":
            return self._zero_map(sizes[rows], sizes[cols])
        if self.curvature == "ggn-loss":
            return self._gauss_newton_block(rows, cols)
        b, f, z = self.adjoint.reshape(-1), self.function, self.inputs.reshape(-1)

        def gradient(wrt: str) -> Callable:  # (theta, z) -> d s / d wrt
            if wrt == "theta":
                return lambda th, zz: grad(lambda t: b @ f(t, zz))(th)
            return lambda th, zz: grad(lambda y: b @ f(th, y))(zz)

        def along(outer: str, inner: str) -> Callable:  # X -> d/d inner (d s / d outer) X
            g = gradient(outer)
            if inner == "theta":
                return lambda X: _jvp_columns(lambda th: g(th, z), self.theta, X)
            return lambda X: _jvp_columns(lambda y: g(self.theta, y), z, X)
        return self._map(sizes[rows], sizes[cols], along(rows, cols), along(cols, rows))

    def _gauss_newton_block(self, rows: str, cols: str) -> LinearMap:
        """J_rows^T H_o J_cols for the loss layer split into logits and loss."""
        o = self.logits(self.theta, self.inputs.reshape(-1)).detach()
        logits = {wrt: self._first_order(self.logits, wrt, o.numel()) for wrt in ("theta", "z")}

        def h_o(y):
            return _jvp_columns(torch.func.grad(self.loss), o, y)

        sizes = {"theta": self.num_params, "z": self.num_inputs}
        return self._map(sizes[rows], sizes[cols],
                         lambda x: logits[rows].T @ h_o(logits[cols] @ x),
                         lambda x: logits[cols].T @ h_o(logits[rows] @ x))

    @property
    def A(self) -> LinearMap:
        return self._second("theta", "theta")

    @property
    def C(self) -> Optional[LinearMap]:
        return self._second("theta", "z") if self.input_derivatives else None

    @property
    def G(self) -> Optional[LinearMap]:
        return self._second("z", "z") if self.input_derivatives else None


def autograd_layer_blocks(layer: nn.Module, z_prev: torch.Tensor,
                          adjoint: Optional[torch.Tensor], targets: torch.Tensor,
                          is_loss_layer: bool, input_derivatives: bool,
                          curvature: str) -> AutogradLayerBlocks:
    """:class:`AutogradLayerBlocks` of one layer at the tracked point (``adjoint`` None
    for a hidden layer under Gauss-Newton, which needs none)."""
    z = z_prev.detach()
    extra = (targets.detach(),) if is_loss_layer else ()
    theta = _flat_parameters(layer, z)
    # a snapshot: a copy of the module keeps its buffers' values and its mode as they are
    # now (a later training-mode pass may change both); the parameters come from theta
    layer = copy.deepcopy(layer)
    function = _flat_function(layer, z.shape, extra)
    kind, logits, loss = curvature, None, None
    if curvature == "ggn" and is_loss_layer:
        kind = "ggn-loss"
        logits = _flat_function(_LogitsView(layer), z.shape, ())
        with torch.no_grad():
            shape = layer.logits(z).shape
        loss = lambda o: layer.loss(o.view(shape), extra[0])  # noqa: E731
    if adjoint is None:
        with torch.no_grad():
            adjoint = z.new_zeros(function(theta, z.reshape(-1)).numel())
    b = adjoint.detach().reshape(-1)
    return AutogradLayerBlocks(theta, z, b, function, b.numel() if not is_loss_layer else 1,
                               input_derivatives, kind, logits, loss)

# --------------------------------------------------------------------------
# Stacked layers and the derivative sweep (docs/ALGORITHM.md, "Stacked layers")
# --------------------------------------------------------------------------

#: The fields of :class:`AffineLayerBlocks` that carry the layer dimension of a stack.
_STACKED = ("inputs", "weight", "out_map", "u_gradient", "u_hessian", "u_hessian_root")


@dataclass
class LayerGroup:
    """Consecutive layers processed as one.

    ``start``, ``stop``: their chain indices.  ``blocks``: the closed-form
    :class:`AffineLayerBlocks` of layers of one shape stacked along a leading dimension
    (a run of equal hidden layers is one group, whatever the depth), or one layer's dense
    :class:`LayerDerivatives` (``stop = start + 1``).  ``has_r``, ``has_d``: whether the
    closed forms' second-order terms r (the E blocks) and D are nonzero: both for the
    Hessian, D alone in the Gauss-Newton loss layer, neither in its hidden layers.
    Directions for a group are (G, p, k): G = ``count`` layers of p = ``params`` each.
    """

    start: int
    stop: int
    blocks: object
    has_r: bool = True
    has_d: bool = True
    _layers: Optional[tuple] = field(default=None, repr=False, compare=False)

    def per_layer(self) -> tuple:
        """(W_l, W_l^T, sigma'_l as (B, h)) of each layer of a hidden stack: views made once,
        for the loops that are sequential in depth."""
        if self._layers is None:
            d = self.blocks
            self._layers = (d.weight.unbind(), d.weight.mT.unbind(),
                            d.out_map.view(self.count, d.num_examples, -1).unbind())
        return self._layers

    @property
    def closed(self) -> bool:
        return isinstance(self.blocks, AffineLayerBlocks)

    @property
    def count(self) -> int:
        return self.stop - self.start

    @property
    def params(self) -> int:
        return self.blocks.num_params

    @property
    def outputs(self) -> int:
        return self.blocks.num_outputs

    def layer(self, i: int):
        """Layer ``start + i``'s blocks: views into the stack."""
        if not self.closed:
            return self.blocks
        b = self.blocks
        return replace(b, **{f: getattr(b, f)[i] for f in _STACKED if getattr(b, f) is not None})

    def tensors(self) -> list:
        """(name, tensor) of every block stored."""
        return [(f.name, getattr(self.blocks, f.name)) for f in fields(self.blocks)
                if isinstance(getattr(self.blocks, f.name), torch.Tensor)]

    def to(self, dtype: torch.dtype) -> "LayerGroup":
        cast = {name: t.to(dtype) for name, t in self.tensors() if t.is_floating_point()}
        return replace(self, blocks=replace(self.blocks, **cast), _layers=None)


def stack_blocks(blocks: Sequence[AffineLayerBlocks]) -> AffineLayerBlocks:
    """Closed-form blocks of same-shape layers stacked along a new leading dimension
    (a view for one layer)."""
    first = blocks[0]
    return replace(first, **{f: (getattr(first, f)[None] if len(blocks) == 1 else
                                 torch.stack([getattr(b, f) for b in blocks]))
                             for f in _STACKED if getattr(first, f) is not None})


def _one_layer_group(l: int, d) -> LayerGroup:
    """A group of the single layer ``l`` (its closed forms get a stack dimension of 1)."""
    return LayerGroup(l, l + 1, stack_blocks([d]) if isinstance(d, AffineLayerBlocks) else d)


def _signature(d) -> Optional[tuple]:
    if not isinstance(d, AffineLayerBlocks):
        return None
    return (d.inputs.shape, d.weight.shape, d.out_map.shape, d.u_hessian.shape, d.bias,
            d.diagonal, d.input_derivatives)


def group_layers(derivs: Sequence) -> list[LayerGroup]:
    """Per-layer blocks as :class:`LayerGroup` s: runs of consecutive closed-form layers
    of one shape stacked (copies), every other layer a group of its own."""
    runs: list = []
    for l, d in enumerate(derivs):
        key = _signature(d)
        if runs and key is not None and key == _signature(derivs[runs[-1][0]]):
            runs[-1].append(l)
        else:
            runs.append([l])
    return [LayerGroup(run[0], run[-1] + 1, stack_blocks([derivs[l] for l in run])
                       if isinstance(derivs[run[0]], AffineLayerBlocks) else derivs[run[0]])
            for run in runs]


def _runs(model: TrackedChain, closed: Sequence[bool]) -> list[tuple[int, int]]:
    """Chain index ranges of the groups: maximal runs of closed-form hidden layers of one
    shape and activation (the first layer, whose input is data, on its own), single layers
    otherwise."""
    layers, last = list(model.layers), len(model.layers) - 1
    runs, previous = [], None
    for l, layer in enumerate(layers):
        key = None
        if closed[l] and l != last and type(layer) is AffineActivation:
            lin = layer.linear
            key = (lin.in_features, lin.out_features, lin.bias is not None, layer.activation,
                   l == 0)
        if runs and key is not None and key == previous:
            runs[-1][1] = l + 1
        else:
            runs.append([l, l + 1])
        previous = key
    return [tuple(r) for r in runs]


def _hidden_group(layers: Sequence[AffineActivation], inputs: Sequence[torch.Tensor],
                  first: bool, adjoint: Optional[torch.Tensor]):
    """Closed forms of a run of equal ``sigma(W z + c)`` layers, stacked.

    The forward quantities are batched over the run (u = Z W^T + c by one batched GEMM,
    sigma' and sigma'' elementwise); only the adjoint ``b_{l-1} = Wb_l^T (sigma'_l b_l)``
    is a loop, two calls per layer.  ``adjoint``: b at the run's last output, or None for
    the Gauss-Newton matrix (no second-order terms: r = D = 0).  Returns the stacked
    :class:`AffineLayerBlocks` and the adjoint at the run's input.
    """
    W = torch.stack([layer.linear.weight.detach() for layer in layers])    # (G, h, m), a copy
    Z = torch.stack([z.detach().reshape(-1, W.shape[-1]) for z in inputs])  # (G, B, m)
    bias = layers[0].linear.bias is not None
    u = (torch.baddbmm(torch.stack([layer.linear.bias.detach() for layer in layers])[:, None],
                       Z, W.mT) if bias else Z @ W.mT)
    first_derivative, second = _pointwise_derivatives(layers[0].activation, u)
    if adjoint is None:
        zero = torch.zeros_like(u)
        return AffineLayerBlocks(Z, W, bias, first_derivative.flatten(-2), zero, zero,
                                 not first, True), None
    b = torch.empty_like(u)
    b[-1] = adjoint.reshape(b.shape[1:])
    entering = None
    for i in reversed(range(len(layers))):
        scaled = first_derivative[i] * b[i]
        if i:
            torch.mm(scaled, W[i], out=b[i - 1])
        elif not first:
            entering = (scaled @ W[0]).reshape(-1)
    return AffineLayerBlocks(Z, W, bias, first_derivative.flatten(-2), b * first_derivative,
                             b * second, not first, True), entering


def _layer_derivatives(layer: nn.Module, z_prev: torch.Tensor, adjoint: Optional[torch.Tensor],
                       targets: torch.Tensor, is_loss: bool, first: bool, curvature: str,
                       closed_form: bool, matrix_free: bool = False):
    """One layer's blocks other than a hidden affine closed-form run: the closed-form loss
    layer or a hidden layer of :data:`HIDDEN_CLOSED_FORMS`, autograd products where
    ``matrix_free`` (:class:`AutogradLayerBlocks`), else dense autograd blocks.
    ``adjoint``: b_l, or None under Gauss-Newton for a hidden layer (not needed)."""
    if closed_form and not is_loss:
        return HIDDEN_CLOSED_FORMS[type(layer)].blocks(layer, z_prev, adjoint, not first)
    if closed_form:
        d = _LOSS_BLOCKS[type(layer)](layer, z_prev, targets, not first)
        return gauss_newton_blocks(d, True) if curvature == "ggn" else d
    if matrix_free:
        return autograd_layer_blocks(layer, z_prev, adjoint, targets, is_loss, not first,
                                     curvature)
    if curvature == "ggn":
        return (compute_loss_layer_ggn_derivatives(layer, z_prev, targets, not first)
                if is_loss else compute_layer_jacobians(layer, z_prev, not first))
    extra = (targets,) if is_loss else ()
    return compute_layer_derivatives(layer, z_prev, adjoint, *extra, input_derivatives=not first)


def chain_derivatives(model: TrackedChain, tracked: TrackedForward, curvature: str = "hessian",
                      closed: Optional[Sequence[bool]] = None,
                      checks: Optional[_Checks] = None,
                      matrix_free: Optional[Sequence[bool]] = None) -> list[LayerGroup]:
    """All layers' derivatives in one backward sweep (l = L..1), as :class:`LayerGroup` s.

    The adjoint starts at b_L = 1 and is propagated as b_{l-1} = F_l^T b_l, exactly
    backprop, so every layer's second derivatives are contracted with the right adjoint
    (not needed for ``curvature='ggn'``, whose hidden layers are first order and whose
    loss layer's curvature is restricted to its logits: docs/ALGORITHM.md,
    "Gauss-Newton").  Runs of equal ``AffineActivation`` layers flagged in ``closed``
    (from :func:`closed_form_flags`) get stacked :class:`AffineLayerBlocks`, other
    flagged layers their closed forms (:data:`HIDDEN_CLOSED_FORMS`), layers flagged in
    ``matrix_free`` :class:`AutogradLayerBlocks`; the others dense
    :class:`LayerDerivatives`.  The check that every block is finite is added to
    ``checks`` (verified here when None).
    """
    layers = list(model.layers)
    last = len(layers) - 1
    closed = [False] * len(layers) if closed is None else closed
    matrix_free = [False] * len(layers) if matrix_free is None else matrix_free
    z_last = tracked.inputs[-1]
    adjoint = torch.ones(1, dtype=z_last.dtype, device=z_last.device)
    hessian = curvature == "hessian"
    groups: list = []
    autograd_layers = [l for l, c in enumerate(closed) if not c]
    rng_before = _rng_state(z_last.device) if autograd_layers else None
    for start, stop in reversed(_runs(model, closed)):
        if closed[start] and start != last and type(layers[start]) is AffineActivation:
            blocks, adjoint = _hidden_group(layers[start:stop], tracked.inputs[start:stop],
                                            start == 0, adjoint if hessian else None)
            groups.append(LayerGroup(start, stop, blocks, hessian, hessian))
            continue
        checked = (contextlib.nullcontext() if closed[start]  # closed forms are deterministic
                   else _no_random_draws(layers[start], start))
        with checked:  # products of matrix-free blocks run the layer: inside the check too
            d = _layer_derivatives(layers[start], tracked.inputs[start],
                                   adjoint if hessian or start == last else None,
                                   tracked.targets, start == last, start == 0, curvature,
                                   closed[start], matrix_free[start])
            if hessian and start > 0:
                adjoint = d.F.T @ adjoint
            elif matrix_free[start]:
                (d.F if d.F is not None else d.J).T @ d._like.new_ones(d.num_outputs)
        group = _one_layer_group(start, d)
        group.has_r = hessian
        groups.append(group)
    groups.reverse()
    if rng_before is not None and not torch.equal(rng_before, _rng_state(z_last.device)):
        for l in reversed(autograd_layers):  # a draw outside vmap: whose forward, top down
            state = _rng_state(z_last.device)
            with torch.no_grad():
                layers[l](tracked.inputs[l], *((tracked.targets,) if l == last else ()))
            if not torch.equal(state, _rng_state(z_last.device)):
                with _no_random_draws(layers[l], l):
                    raise RuntimeError("randomness")
    pending = _Checks() if checks is None else checks
    _check_finite_blocks(groups, pending)
    if checks is None:
        pending.verify()
    return groups


def _rng_state(device: torch.device) -> torch.Tensor:
    """The default generator's state (a host tensor: reading it does not synchronise)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


@contextlib.contextmanager
def _no_random_draws(layer: nn.Module, l: int):
    """Refuse layers whose forward draws random numbers (``F.dropout`` called directly).

    Their derivatives are not a function of the parameters: the oracle's vmap refuses
    the draw (caught here, per layer), and a Jacobian taken outside vmap would
    differentiate another random mask than the tracked pass used (caught by
    :func:`chain_derivatives` comparing the generator's state once per sweep, then
    running each suspect's forward to find it).  ``nn.Dropout`` modules are caught
    earlier (:meth:`TrackedChain.tracked_forward`).
    """
    try:
        yield
    except RuntimeError as err:
        if "randomness" not in str(err):
            raise
        raise HessianInverseError(
            f"layer {l + 1} ({type(layer).__name__}) draws random numbers in its forward (e.g. F.dropout called directly), "
            "so its Hessian is not a function of the parameters: use an nn.Dropout module "
            "(model.eval() turns it off) or remove the call") from None


def _check_finite_blocks(groups: Sequence[LayerGroup], checks: _Checks) -> None:
    """NaN/Inf in any block: one flag for the chain; the failing layer is looked up only
    when it fails."""

    def error(_):
        for g in groups:
            for i in range(g.count):
                for name, t in g.tensors():
                    block = t[i] if g.closed else t
                    if not bool(torch.isfinite(block).all()):
                        return HessianInverseError(
                            f"layer {g.start + i + 1}: derivative block {name} has NaN/Inf "
                            "entries; the tracked forward pass is not finite (check inputs, "
                            "weights and loss)")
        return HessianInverseError("a derivative block overflows")

    checks.add(_all_finite([t for g in groups for _, t in g.tensors()]), error)


def _all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Whether every entry of every tensor is finite, as a bool tensor (no host sync):
    0 * x is 0 for finite x and NaN otherwise, and a sum of zeros cannot overflow."""
    return torch.stack([(t * 0).sum() for t in tensors]).sum() == 0


def _views(groups: Sequence[LayerGroup], x: torch.Tensor) -> list[torch.Tensor]:
    """A flat (n, k) tensor as each group's (G, p, k) block: views, no copy."""
    out, offset = [], 0
    for g in groups:
        size = g.count * g.params
        out.append(x[offset:offset + size].view(g.count, g.params, x.shape[-1]))
        offset += size
    return out


def _flat(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-group (G, p, k) blocks back into one (n, k) tensor."""
    return torch.cat([b.reshape(-1, b.shape[-1]) for b in blocks])

# --------------------------------------------------------------------------
# The Hessian-vector product (docs/ALGORITHM.md, "The Hessian-vector product")
# --------------------------------------------------------------------------
#
# For a stacked affine group the product needs, per layer, only the recursions
#     du_l = K_l v_l + Wb_l t_{l-1},       t_l = S_l du_l                  (forward)
#     q_l = D_l du_l + S_l^T u_l,          u_{l-1} = Wb_l^T q_l + E_l^T v_l (backward)
# (two calls each way); K v, D du, E^T v and at the end (H v)_l = K_l^T q_l +
# E_l t_{l-1} are batched over the group.  With J = S K, F = S Wb, A = K^T D K,
# C = K^T D Wb + E, G = Wb^T D Wb these are the three lines of the product.


def _by_column(x: torch.Tensor, B: int) -> torch.Tensor:
    """(..., B w, k) -> (..., k, B, w), a view: the layout of the loops over layers, where a
    layer's product with W is one GEMM of (k B, w) rows."""
    return x.unflatten(-2, (B, -1)).movedim(-1, -3)


def _by_row(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_by_column`: (..., k, B, w) -> (..., B w, k) (a view when k = 1)."""
    return x.movedim(-3, -1).flatten(-3, -2)


def _sum(*terms: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The sum of the terms that are not None (None standing for zero); None if none is."""
    present = [t for t in terms if t is not None]
    total = present[0] if present else None
    for t in present[1:]:
        total = total + t
    return total


def _times(block, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``block @ x``, with None for a zero x (nothing computed)."""
    return None if x is None else block @ x


def _tangents(group: LayerGroup, v: Optional[torch.Tensor], t: Optional[torch.Tensor]):
    """The forward sweep through a group: ``v`` (G, p, k) its directions (None: zero, for
    the parameter route's columns of one layer), ``t`` (a_in, k) the tangent of its input
    (None for the first layer, or zero).  Returns (state for :func:`_adjoints`, the
    tangent of its output)."""
    d = group.blocks
    if not group.closed and isinstance(d, ChainRuleBlocks):  # a convolution
        return d.tangent(None if v is None else v[0], t)
    if not group.closed:
        return (t, None), _sum(_times(d.J, None if v is None else v[0]), _times(d.F, t))
    du = d.K(v)  # (G, B h, k)
    if t is None or not d.diagonal:
        if t is not None:
            _add_per_example(du[0], d.weight[0], t)
        out = d.S(du)
        return (None if t is None else t[None], du), out[-1]
    # Hidden layers: du_l += Wb_l t_{l-1}, t_l = S_l du_l, two calls per layer on (k, B, w).
    B, (h, m), k = d.num_examples, d.weight.shape[-2:], t.shape[-1]
    _, Wt, s = group.per_layer()
    du = _by_column(du, B).contiguous()
    tangents = du.new_empty(group.count + 1, *du.shape[1:]) if m == h else None
    previous = _by_column(t, B)
    if tangents is not None and group.has_r:  # E t_{l-1} reads the entering tangent
        tangents[0] = previous
    for i in range(group.count):
        du[i].view(k * B, h).addmm_(previous.reshape(k * B, m), Wt[i])
        previous = torch.mul(s[i], du[i], out=None if tangents is None else tangents[i + 1])
    entering = t[None] if tangents is None else _by_row(tangents[:-1])
    return (entering, _by_row(du)), _by_row(previous)


def _adjoints(group: LayerGroup, v: Optional[torch.Tensor], state, u: Optional[torch.Tensor],
              first_order: bool = False):
    """The backward sweep through a group: ``u`` (a_out, k) the adjoint at its output
    (None: zero).  Returns the group's product (G, p, k) and the adjoint at its input
    (None for the first layer).  ``first_order``: only ``J^T u`` and ``F^T u`` (the
    transposed tangent map; ``v`` and ``state`` unused)."""
    d = group.blocks
    if not group.closed:
        t_prev = state[0] if state is not None else None
        v0 = None if v is None else v[0]
        if isinstance(d, ChainRuleBlocks):  # a convolution: the recursion, not the blocks
            out, back = d.adjoint(v0, state, u, first_order)
            if out is None:
                out = d._like.new_zeros(d.num_params, (v0 if v0 is not None else u).shape[-1])
            return out[None], back
        out = _times(d.J.T, u)
        if not first_order:
            out = _sum(out, _times(d.A, v0), _times(d.C, t_prev) if d.C is not None else None)
        if out is None:  # nothing reaches this layer (a zero direction)
            like = next(x for x in (u, v0, t_prev) if x is not None) if (
                u is not None or v0 is not None or t_prev is not None) else None
            out = torch.zeros(d.num_params, 1 if like is None else like.shape[-1],
                              dtype=d.J.dtype, device=d.J.device)
        if d.F is None:
            return out[None], None
        back = _times(d.F.T, u)
        if not first_order:
            back = _sum(back, _times(d.C.T, v0), _times(d.G, t_prev))
        return out[None], back
    t_prev, du = state if state is not None else (None, None)
    use_r = group.has_r and not first_order
    q = d.D(du) if group.has_d and not first_order else None
    ev = d.E_t(v) if use_r and d.input_derivatives else None  # (G, B m, k)
    if not d.diagonal or u is None:  # the loss layer (u_L = 0, G = 1) or the top of a chain
        if u is not None:
            q = d.S_t(u[None]) if q is None else q + d.S_t(u[None])
        elif q is None:
            q = d.weight.new_zeros(group.count, d.num_outputs, v.shape[-1])
        back = d.Wb_t(q)[-1] if d.input_derivatives else None
        if back is not None and ev is not None:
            back = back + ev[-1]
    else:
        # Hidden layers: q_l = D_l du_l + S_l^T u_l, u_{l-1} = Wb_l^T q_l + E_l^T v_l, two
        # calls per layer on (k, B, w).
        B, (h, m), k = d.num_examples, d.weight.shape[-2:], u.shape[-1]
        W, _, s = group.per_layer()
        fresh = q is None
        q = d.weight.new_empty(group.count, k, B, h) if fresh else _by_column(q, B).contiguous()
        ev = None if ev is None else _by_column(ev, B).contiguous()
        u = _by_column(u, B)
        for i in reversed(range(group.count)):
            if fresh:
                torch.mul(s[i], u, out=q[i])
            else:
                q[i].addcmul_(s[i], u)
            if i or d.input_derivatives:
                if ev is not None:
                    u = ev[i]
                    u.view(k * B, m).addmm_(q[i].view(k * B, h), W[i])
                else:
                    u = (q[i].view(k * B, h) @ W[i]).view(k, B, m)
        back = _by_row(u) if d.input_derivatives else None
        q = _by_row(q)
    out = d.K_t(q)
    if use_r and t_prev is not None:
        out = out + d.E(t_prev)
    return out, back


def _sweeps(groups: Sequence[LayerGroup], views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The product on per-group (G, p, k) directions: forward, then backward.  A None
    direction is zero: skipped by blocks known by their action, zeros for stacks."""
    k = next(v.shape[-1] for v in views if v is not None)
    views = [v if v is not None or not g.closed else
             g.blocks.weight.new_zeros(g.count, g.params, k) for g, v in zip(groups, views)]
    states, t = [], None
    for group, v in zip(groups, views):
        state, t = _tangents(group, v, t)
        states.append(state)
    out: list = [None] * len(groups)
    u = None
    for j in reversed(range(len(groups))):
        out[j], u = _adjoints(groups[j], views[j], states[j], u)
    return out


def structured_hessian_vector_product(derivs: Sequence, v_blocks: Sequence[torch.Tensor]
                                      ) -> list[torch.Tensor]:
    """``(H v)_l`` for every layer (docs/ALGORITHM.md, "The Hessian-vector product").

    ``derivs``: per-layer :class:`LayerDerivatives` or blocks (:class:`LayerBlocks`);
    ``v_blocks[l]`` is (p_l, k), or None for a zero block whose products are skipped
    (the parameter-space route forms Hessian columns of one layer at a time).  Forward tangent ``t_l = J_l v_l + F_l t_{l-1}``,
    backward adjoint ``u_{l-1} = C_l^T v_l + G_l t_{l-1} + F_l^T u_l`` (u_L = 0), then
    ``(H v)_l = A_l v_l + C_l t_{l-1} + J_l^T u_l``.  (:class:`HessianOperator` runs the
    same sweeps on its stacked groups.)
    """
    groups = [_one_layer_group(l, d) for l, d in enumerate(derivs)]
    return [o[0] for o in _sweeps(groups, [None if v is None else v[None] for v in v_blocks])]

# --------------------------------------------------------------------------
# The lifted system (docs/ALGORITHM.md, "The lifted system")
# --------------------------------------------------------------------------


def assemble_lifted_system(derivs: Sequence[LayerDerivatives], damping: float,
                           gauge: Optional[torch.Tensor] = None) -> BlockTridiagonal:
    """The lifted system (docs/ALGORITHM.md, "The lifted system"), unknowns ordered (x_l, y_l, w_l).

    Diagonal block l (sizes p_l, a_l, a_l)::

        [ A_l + eps I     0         J_l^T ]
        [ 0               G_{l+1}   -I    ]
        [ J_l             -I        0     ]

    Sub-diagonal block (rows of layer l, columns of layer l-1): ``C_l`` in
    (x_l, y_{l-1}) and ``F_l`` in (w_l, y_{l-1}); zero elsewhere.

    ``gauge`` (p_L, k), an orthonormal basis of known null directions of the
    last layer's parameters, adds ``N N^T`` to its x-block ("The softmax gauge").
    """
    num_layers = len(derivs)
    system = BlockTridiagonal.empty([d.num_params + 2 * d.num_outputs for d in derivs],
                                    derivs[0].J)
    for l, d in enumerate(derivs):
        p, a = d.num_params, d.num_outputs
        block = system.diag[l]
        block[:p, :p] = d.A
        block[:p, :p].diagonal().add_(damping)
        if gauge is not None and l == num_layers - 1:
            block[:p, :p] += gauge @ gauge.T
        block[:p, p + a:p + 2 * a] = d.J.T
        block[p + a:p + 2 * a, :p] = d.J
        if l + 1 < num_layers:
            block[p:p + a, p:p + a] = derivs[l + 1].G
        block[p:p + a, p + a:p + 2 * a].diagonal().fill_(-1.0)
        block[p + a:p + 2 * a, p:p + a].diagonal().fill_(-1.0)
        if l > 0:
            pp, ap = derivs[l - 1].num_params, derivs[l - 1].num_outputs
            system.sub[l - 1, :p, pp:pp + ap] = d.C
            system.sub[l - 1, p + a:p + 2 * a, pp:pp + ap] = d.F
    return system.symmetrize()


def _lift(system: BlockTridiagonal, param_sizes: Sequence[int], b: torch.Tensor) -> torch.Tensor:
    """Right-hand side of the lifted system, stacked: (b_l, 0, 0) per layer."""
    out = b.new_zeros(system.num_blocks, system.size, b.shape[-1])
    for l, part in enumerate(b.split(list(param_sizes))):
        out[l, :part.shape[0]] = part
    return out


def _unlift(param_sizes: Sequence[int], x: torch.Tensor) -> torch.Tensor:
    """The parameter part x_l of each lifted block, as one (n, k) tensor."""
    return torch.cat([x[l, :p] for l, p in enumerate(param_sizes)])


# --------------------------------------------------------------------------
# Parameter elimination (docs/ALGORITHM.md, "Parameter elimination")
# --------------------------------------------------------------------------
#
# With M_l = A_l + eps I, the x-row of the lifted system gives
# x_l = M_l^{-1} (g_l - C_l y_{l-1} - J_l^T w_l); putting that into the other
# rows leaves a system in (w_l, y_l) alone, and the push-through identity
# M^{-1} = (I - K^T D P^{-1} K) / eps, P = eps I + K K^T D, makes every
# eliminated block of an affine layer a product of (batch x width)-sized matrices.
# Every step below is batched over a group of equal layers.


@dataclass
class EliminatedLayer:
    """The parameters of a group's G layers eliminated, M_l = A_l + eps I (stacked).

    - ``w_block`` Q_l (G, a_l, a_l) = J_l M_l^{-1} J_l^T; the reduced system has -Q_l
      on the diagonal of w_l.
    - ``coupling`` T_l (G, a_l, a_{l-1}) = F_l - J_l M_l^{-1} C_l, between w_l and
      y_{l-1}; None for the first layer.
    - ``y_block`` R_l (G, a_{l-1}, a_{l-1}) = G_l - C_l^T M_l^{-1} C_l, on the diagonal
      of y_{l-1}; None for the first layer.
    - ``inverse``: X (G, p_l, k) -> M_l^{-1} X.
    """

    w_block: torch.Tensor
    coupling: Optional[torch.Tensor]
    y_block: Optional[torch.Tensor]
    inverse: Callable[[torch.Tensor], torch.Tensor]


def _nonsingular_lu(matrix: torch.Tensor, damping: float, layers: Sequence[int], what: str,
                    checks: _Checks, per_layer: int = 2):
    """LU factors of ``matrix + damping I`` (a stack); its check added to ``checks``.

    Singular to working precision means a pivot below rounding of the terms that were
    summed, ``finfo.eps * (max |matrix| + damping)``, the maximum over the last
    ``per_layer`` dimensions (one layer's blocks).  ``layers`` (1-based) name the
    stacked layers in the message; one check for the whole stack.
    """
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    LU, pivots, info = torch.linalg.lu_factor_ex(matrix + damping * eye)
    if not LU.numel():
        return LU, pivots
    dims = tuple(range(-per_layer, 0))
    scale = matrix.abs().amax(dim=dims, keepdim=True) + damping
    smallest = LU.diagonal(dim1=-2, dim2=-1).abs().unsqueeze(-1) / scale
    ok = ((info == 0).reshape(len(layers), -1).all(-1) &
          (smallest.amin(dim=dims) > torch.finfo(LU.dtype).eps).reshape(len(layers), -1).all(-1))

    def error(ok):
        layer = layers[int((~ok.reshape(-1)).nonzero()[0])]
        return EliminationError(
            f"layer {layer}: {what} is singular to working precision, so the structured "
            "path cannot eliminate this layer's parameters (A_l + damping I must be "
            "invertible for each layer, which is more than H + damping I being "
            "invertible). Use path='generic', whose pivoting does not need it, or another damping.")

    checks.add(ok, error)
    return LU, pivots


def eliminate_affine_layer(blocks: AffineLayerBlocks, damping: float, layers: Sequence[int],
                           checks: Optional[_Checks] = None) -> EliminatedLayer:
    """:class:`EliminatedLayer` of closed-form layers by the push-through identity.

    With Gamma = K K^T = gram kron I_h and P = eps I + Gamma D (B h square):
    K M^{-1} = P^{-1} K, so Q = S P^{-1} Gamma S^T and, with
    V = eps Wb - K E, T = S P^{-1} V and R = (V^T D P^{-1} V - E^T E) / eps
    (the eps-free forms of F - J M^{-1} C and G - C^T M^{-1} C).  For a hidden layer D
    is diagonal, so P is block diagonal by output unit, P_i = eps I_B + gram diag(d_i):
    h LUs of B x B instead of one of (B h)^2.  Cost O(h B^3 + B (B h)(a + a_in) +
    (B h) a_in^2); nothing of size p_l squared.  ``blocks`` is a stack of layers of one
    shape (``layers``, 1-based, one per entry): every step is one batched call.  The
    singularity check of P is added to ``checks`` (verified here when None).
    """
    pending = _Checks() if checks is None else checks
    eps, r, Z, W = damping, blocks.u_gradient, blocks.inputs, blocks.weight
    B, h = r.shape[-2:]
    m, lead = Z.shape[-1], r.shape[:-2]
    kw = dict(dtype=r.dtype, device=r.device)
    gram = blocks.gram()
    what = "eps I + K K^T D (that is, A_l + eps I)"
    if blocks.diagonal:
        units = gram.unsqueeze(-3) * blocks.u_hessian.mT.unsqueeze(-2)  # (G, h, B, B)
        lu = _nonsingular_lu(units, eps, layers, what, pending, per_layer=3)

        def solve_p(X):  # (G, B h, c) in example-major order, solved unit by unit
            by_unit = X.unflatten(-2, (B, h)).transpose(-3, -2)
            return torch.linalg.lu_solve(*lu, by_unit).transpose(-3, -2).flatten(-3, -2)
    else:
        gamma_d = torch.einsum("...nm,...mij->...nimj", gram, blocks.D_blocks())
        lu = _nonsingular_lu(gamma_d.reshape(*lead, B * h, B * h), eps, layers, what, pending)

        def solve_p(X):
            return torch.linalg.lu_solve(*lu, X)

    def inverse(X):
        return (X - blocks.K_t(blocks.D(solve_p(blocks.K(X))))) / eps

    S_t = blocks.S_dense().mT
    gamma_st = torch.einsum("...nm,...mio->...nio", gram, S_t.unflatten(-2, (B, h)))
    Q = blocks.S(solve_p(gamma_st.flatten(-3, -2)))
    if checks is None:
        pending.verify()
    if not blocks.input_derivatives:
        return EliminatedLayer(Q, None, None, inverse)
    KE = torch.einsum("...nk,...mi->...nimk", Z, r).reshape(*lead, B * h, B * m)
    Wb = torch.einsum("nm,...ij->...nimj", torch.eye(B, **kw), W).reshape(*lead, B * h, B * m)
    V = eps * Wb - KE
    Y = solve_p(V)
    EtE = torch.einsum("...nN,kj->...nkNj", r @ r.mT, torch.eye(m, **kw))
    R = (V.mT @ blocks.D(Y) - EtE.reshape(*lead, B * m, B * m)) / eps
    return EliminatedLayer(Q, blocks.S(Y), (R + R.mT) / 2, inverse)


def eliminate_dense_layer(derivs: LayerDerivatives, damping: float, layers: Sequence[int],
                          checks: Optional[_Checks] = None) -> EliminatedLayer:
    """:class:`EliminatedLayer` of a layer without closed forms: LU of A_l + eps I (p_l
    square); a stack of one."""
    pending = _Checks() if checks is None else checks
    lu = _nonsingular_lu(derivs.A, damping, layers, "A_l + eps I", pending)
    if checks is None:
        pending.verify()

    def inverse(X):
        return torch.linalg.lu_solve(*lu, X) if X.shape[-2] else X

    Q = derivs.J @ inverse(derivs.J.T)
    if derivs.C is None:
        return EliminatedLayer(Q[None], None, None, inverse)
    MC = inverse(derivs.C)
    return EliminatedLayer(Q[None], (derivs.F - derivs.J @ MC)[None],
                           (derivs.G - derivs.C.T @ MC)[None], inverse)


def eliminate_layers(groups: Sequence[LayerGroup], damping: float,
                     checks: Optional[_Checks] = None) -> list[EliminatedLayer]:
    """Every group's parameters eliminated: one batched elimination per group."""
    pending = _Checks() if checks is None else checks
    out = []
    for g in groups:
        numbers = list(range(g.start + 1, g.stop + 1))
        eliminate = eliminate_affine_layer if g.closed else eliminate_dense_layer
        out.append(eliminate(g.blocks, damping, numbers, pending))
    if checks is None:
        pending.verify()
    return out


def assemble_reduced_system(groups: Sequence[LayerGroup], eliminated: Sequence[EliminatedLayer]
                            ) -> BlockTridiagonal:
    """The lifted system with every x_l eliminated: unknowns (w_l, y_l) per layer.

    Per layer the diagonal is ``[[-Q_l, -I], [-I, R_{l+1}]]`` (R_{L+1} = 0) and the only
    coupling to the previous layer is ``T_l`` in (w_l, y_{l-1}).  Every coupling is then
    between neighbours of the sequence w_1, y_1, w_2, y_2, ..., so the matrix is block
    tridiagonal with 2L blocks of size a_l each: the same matrix and pivoting as with
    (y_l, w_l) blocks of size 2 a_l, at a quarter of the LU flops.  Written into the
    stacked storage by a constant number of strided copies per group.
    """
    sizes = [g.outputs for g in groups for _ in range(2 * g.count)]
    system = BlockTridiagonal.empty(sizes, eliminated[0].w_block)
    for g, e in zip(groups, eliminated):
        first, stop, a = 2 * g.start, 2 * g.stop, g.outputs
        system.diag[first:stop:2, :a, :a] -= e.w_block
        system.sub[first:stop:2, :a, :a].diagonal(dim1=-2, dim2=-1).fill_(-1.0)
        if e.coupling is not None:
            a_in = e.coupling.shape[-1]
            system.sub[first - 1:stop - 1:2, :a, :a_in] = e.coupling
            system.diag[first - 1:stop - 1:2, :a_in, :a_in] = e.y_block
    return system.symmetrize()


def _reduced_rhs(groups: Sequence[LayerGroup], eliminated: Sequence[EliminatedLayer],
                 system: BlockTridiagonal, g: Sequence[torch.Tensor]) -> torch.Tensor:
    """Reduced right-hand side, stacked (2L, n, k) in the order (w_1, y_1, w_2, ...).

    w_l gets -J_l M_l^{-1} g_l and y_{l-1} gets -C_l^T M_l^{-1} g_l (y_L: 0): a few
    batched calls per group; ``g`` the per-group (G, p, k) right-hand sides.
    """
    rhs = g[0].new_zeros(system.num_blocks, system.size, g[0].shape[-1])
    for group, e, gl in zip(groups, eliminated, g):
        d, first, stop, a = group.blocks, 2 * group.start, 2 * group.stop, group.outputs
        mg = e.inverse(gl)
        rhs[first:stop:2, :a] -= d.J @ mg
        if d.C is not None:
            y = d.C.T @ mg
            rhs[first - 1:stop - 1:2, :y.shape[-2]] -= y
    return rhs


def _recover_parameters(groups: Sequence[LayerGroup], eliminated: Sequence[EliminatedLayer],
                        g: Sequence[torch.Tensor], reduced: torch.Tensor) -> list[torch.Tensor]:
    """x_l = M_l^{-1} (g_l - C_l y_{l-1} - J_l^T w_l), ``reduced`` = (w_1, y_1, w_2, ...)
    stacked; per group (G, p, k)."""
    out = []
    for group, e, gl in zip(groups, eliminated, g):
        d, first, stop, a = group.blocks, 2 * group.start, 2 * group.stop, group.outputs
        rest = gl - d.J.T @ reduced[first:stop:2, :a]
        if d.C is not None:
            rest = rest - d.C @ reduced[first - 1:stop - 1:2, :d.C.shape[-1]]
        out.append(e.inverse(rest))
    return out


# --------------------------------------------------------------------------
# The output-space route (docs/ALGORITHM.md, "Gauss-Newton")
# --------------------------------------------------------------------------
#
# The GGN of B examples and C classes factors as GGN = U^T U, U = R J_o: J_o the
# Jacobian of all logits in all parameters ((B C) x n), R block diagonal over
# examples with R_n^T R_n = D_n (the softmax Hessian in example n's logits).  By
# Woodbury, exactly, (U^T U + eps I)^{-1} v = (v - U^T (eps I + U U^T)^{-1} U v) / eps:
# a damped GGN solve needs the m x m Gram matrix U U^T (m = B (C - 1)), accumulated
# layer by layer without forming U, and one Cholesky factor.
#
# A root of the softmax Hessian: with sum(p) = 1,
# diag(p) - p p^T = (I - 1 p^T)^T diag(p) (I - 1 p^T); its rows lie in the
# complement of the all-ones vector, so C - 1 rows suffice.


def ones_complement(size: int, like: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis Q (size, size - 1) of the complement of the all-ones vector.

    The first size - 1 columns of the Householder reflector I - w w^T / (1 + 1/sqrt(size)),
    w = 1/sqrt(size) + e_last, which maps 1/sqrt(size) to -e_last.  Cost O(size^2).
    """
    kw = dict(dtype=like.dtype, device=like.device)
    w = torch.full((size,), 1.0 / math.sqrt(size), **kw)
    w[-1] += 1.0
    reflector = torch.eye(size, **kw) - torch.outer(w, w) / (1.0 + 1.0 / math.sqrt(size))
    return reflector[:, :-1]


def softmax_curvature_root(u_hessian: torch.Tensor) -> torch.Tensor:
    """R (B, r, C) with R_n^T R_n = D_n for the loss layer's stored blocks D (B, C, C).

    The closed-form blocks keep D_n = mu_n (diag(p_n) - p_n p_n^T) / B but not p (nor the
    bias, so the logits cannot be recomputed; for C = 2, D does not even determine p), so
    the root comes from D alone: D_n 1 = 0 (the softmax gauge), hence D_n = Q E_n Q^T with
    Q = :func:`ones_complement` and E_n = Q^T D_n Q ((C-1) square, positive
    semi-definite); with E_n = V diag(lam) V^T, R_n = diag(sqrt lam) V^T Q^T (r = C - 1).
    If the rows of D do not sum to zero to rounding, the full eigendecomposition of D_n is
    used instead (r = C).  Batched: cost O(B C^3), no loop over examples.
    """
    num_classes = u_hessian.shape[-1]
    sym = (u_hessian + u_hessian.transpose(1, 2)) / 2
    scale = sym.abs().amax()
    tol = 64 * num_classes * torch.finfo(sym.dtype).eps * scale
    if num_classes > 1 and bool((sym.sum(-1).abs() <= tol).all()):
        Q = ones_complement(num_classes, sym)
        lam, V = torch.linalg.eigh(Q.T @ sym @ Q)
        basis = V.transpose(1, 2) @ Q.T
    else:
        lam, V = torch.linalg.eigh(sym)
        basis = V.transpose(1, 2)
    return lam.clamp(min=0).sqrt()[:, :, None] * basis


@dataclass
class OutputFactor:
    """The loss layer's part of U = R J_o, m rows.

    - ``apply(v_L, t)`` -> (m, k): R (do/dx_L v_L + do/dz_{L-1} t), t the tangent of the
      loss layer's input (None for a one-layer chain).
    - ``apply_t(y)`` -> (x_L (p_L, k), u (a_{L-1}, k) or None): the adjoint.
    - ``gram`` (m, m): U_L U_L^T, the loss layer's own parameters' share of U U^T.
    - ``phi``: R do/dz_{L-1}, as (B, r, w) example blocks when ``blocked`` (rows (n, i),
      columns (n, k) of z_{L-1} = (B, w)), else dense (m, a_{L-1}); None for one layer.
    """

    apply: Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
    apply_t: Callable[[torch.Tensor], tuple]
    gram: torch.Tensor
    phi: Optional[torch.Tensor]
    blocked: bool

    @property
    def rows(self) -> int:
        return self.gram.shape[0]


def closed_form_output_factor(d: AffineLayerBlocks) -> OutputFactor:
    """:class:`OutputFactor` of a closed-form loss layer (cross-entropy or squared error).

    Logits tangent ``du = K v_L + Wb t`` (B C), then R per example (B, r, C): the loss
    layer's own ``u_hessian_root`` (the softmax: r = C - 1; the squared error: r = C),
    else :func:`softmax_curvature_root` of D.  With K K^T = gram kron I_C,
    U_L U_L^T [(n, i), (n', j)] = gram[n, n'] (R_n R_n'^T)[i, j].  Cost O(B C^3 + m^2 C
    + m C w).
    """
    R = d.u_hessian_root if d.u_hessian_root is not None else softmax_curvature_root(d.u_hessian)
    B, r, C = R.shape
    m = B * r

    def apply(v, t):
        du = d.K(v) if t is None else d.K(v) + d.Wb(t)
        return (R @ du.reshape(B, C, -1)).reshape(m, -1)

    def apply_t(y):
        w = (R.transpose(1, 2) @ y.reshape(B, r, -1)).reshape(B * C, -1)
        return d.K_t(w), d.Wb_t(w) if d.input_derivatives else None

    flat = R.reshape(m, C)
    gram = (flat @ flat.T).view(B, r, B, r) * d.gram()[:, None, :, None]
    phi = R @ d.weight if d.input_derivatives else None
    return OutputFactor(apply, apply_t, gram.reshape(m, m), phi, True)


def dense_output_factor(d: LayerDerivatives) -> OutputFactor:
    """:class:`OutputFactor` of a dense GGN loss layer (any ``logits``/``loss`` split).

    Its GGN block M = [[A, C], [C^T, G]] = [J_th, J_z]^T H_o [J_th, J_z] is positive
    semi-definite, and the GGN depends on the logits Jacobian only through M, so any
    root R^T R = M serves: R = diag(sqrt lam) V^T over the eigenvalues lam of M above
    dim * eps * max(lam) (a perturbation of M at rounding level).  Cost O((p_L + a_{L-1})^3).
    """
    p = d.num_params
    M = d.A if d.C is None else torch.cat([torch.cat([d.A, d.C], 1), torch.cat([d.C.T, d.G], 1)])
    lam, V = torch.linalg.eigh((M + M.T) / 2)
    keep = lam > M.shape[0] * torch.finfo(M.dtype).eps * lam.abs().max()
    R = lam[keep].sqrt()[:, None] * V[:, keep].T
    R_theta, R_z = R[:, :p], R[:, p:]

    def apply(v, t):
        return R_theta @ v if t is None else R_theta @ v + R_z @ t

    def apply_t(y):
        return R_theta.T @ y, R_z.T @ y if d.C is not None else None

    return OutputFactor(apply, apply_t, R_theta @ R_theta.T,
                        R_z if d.C is not None else None, False)


def autograd_output_factor(d: "AutogradLayerBlocks") -> OutputFactor:
    """:class:`OutputFactor` of a matrix-free GGN loss layer (``curvature='ggn-loss'``).

    Its GGN block is J_o^T H_o J_o with J_o = [do/dx, do/dz] (o the layer's logits), so
    R = R_o J_o, R_o^T R_o = H_o (the eigen-root of the loss's Hessian in the logits,
    rows above rounding as in :func:`dense_output_factor`), applied by products: m =
    the root's rows (at most the number of logits); phi = R_o do/dz dense (m, a_{L-1}).
    """
    o = d.logits(d.theta, d.inputs.reshape(-1)).detach()
    H_o = jacrev(torch.func.grad(d.loss))(o)
    lam, V = torch.linalg.eigh((H_o + H_o.T) / 2)
    keep = lam > H_o.shape[0] * torch.finfo(H_o.dtype).eps * lam.abs().max()
    R = lam[keep].sqrt()[:, None] * V[:, keep].T
    J_x, J_z = (d._first_order(d.logits, wrt, o.numel()) for wrt in ("theta", "z"))

    def apply(v, t):
        return R @ (J_x @ v if t is None else J_x @ v + J_z @ t)

    def apply_t(y):
        w = R.T @ y
        return J_x.T @ w, J_z.T @ w if d.input_derivatives else None

    Y = (J_x.T @ R.T).T
    phi = (J_z.T @ R.T).T if d.input_derivatives else None
    return OutputFactor(apply, apply_t, Y @ Y.T, phi, False)


def output_factor(d) -> OutputFactor:
    if isinstance(d, AffineLayerBlocks):
        return closed_form_output_factor(d)
    if isinstance(d, AutogradLayerBlocks) and d.curvature == "ggn-loss":
        return autograd_output_factor(d)
    return dense_output_factor(d.densify() if isinstance(d, LayerBlocks) else d)


def _block_diagonal(phi: torch.Tensor) -> torch.Tensor:
    """(B, r, w) example blocks -> the dense (B r, B w) block-diagonal matrix."""
    B, r, w = phi.shape
    out = phi.new_zeros(B, r, B, w)
    index = torch.arange(B, device=phi.device)
    out[index, :, index, :] = phi
    return out.reshape(B * r, B * w)


def _blocked_group_gram(phi: torch.Tensor, d: AffineLayerBlocks):
    """A stack of G closed-form hidden layers under example-blocked Phi (B, r, h).

    Per layer, from the top: psi_l = Phi_l S_l and Phi_{l-1} = psi_l W_l (two calls);
    then, batched, U_l U_l^T [(n, i), (n', j)] = gram_l[n, n'] (psi_n psi_n'^T)[i, j]
    summed over the stack (:func:`_gram_sum`).  Cost O(G (m^2 h + m h m_in)), m = B r.
    """
    G, (B, r, h) = d.weight.shape[0], phi.shape
    psi = phi.new_empty(G, B, r, h)
    scale = d.out_map.view(G, B, 1, h)
    for i in reversed(range(G)):
        torch.mul(phi, scale[i], out=psi[i])
        phi = psi[i] @ d.weight[i] if i or d.input_derivatives else None
    return _gram_sum(psi, d.gram()), phi, psi


def _gram_sum(psi: torch.Tensor, gram: torch.Tensor, budget: int = 2 ** 22) -> torch.Tensor:
    """sum_l (psi_l psi_l^T) * (gram_l kron 1 1^T) for psi (G, B, r, h), gram (G, B, B):
    batched in chunks of at most ``budget`` numbers of (m, m) products."""
    G, B, r, h = psi.shape
    m, total = B * r, None
    flat = psi.reshape(G, m, h)
    step = max(1, budget // (m * m))
    for j in range(0, G, step):
        chunk = flat[j:j + step]
        share = torch.bmm(chunk, chunk.mT).view(-1, B, r, B, r)
        share = (share * gram[j:j + step, :, None, :, None]).sum(0)
        total = share if total is None else total + share
    return total.reshape(m, m)


def _dense_closed_form_layer_gram(phi: torch.Tensor, d: AffineLayerBlocks):
    """A closed-form hidden layer under dense Phi_l (m, B_l h).

    psi = Phi_l S_l; U_l U_l^T = psi (gram kron I_h) psi^T; Phi_{l-1} = psi (I kron W).
    Cost O(m B_l a_l + m^2 a_l + m a_l m_in).
    """
    m = phi.shape[0]
    B, h = d.num_examples, d.weight.shape[0]
    psi = (phi * d.out_map).reshape(m, B, h)
    spread = torch.einsum("nq,xqh->xnh", d.gram(), psi)
    gram = psi.reshape(m, -1) @ spread.reshape(m, -1).T
    return (gram, (psi @ d.weight).reshape(m, -1) if d.input_derivatives else None,
            psi.reshape(m, -1))


def _dense_layer_gram(phi: torch.Tensor, d):
    """A hidden layer under dense Phi_l (m, a_l), its blocks dense or known by their
    action: Y = Phi_l J_l (m, p_l), U_l U_l^T = Y Y^T, Phi_{l-1} = Phi_l F_l (the m rows
    as m columns of J^T and F^T)."""
    Y = (d.J.T @ phi.T).T
    return Y @ Y.T, (d.F.T @ phi.T).T if d.F is not None else None, Y


@dataclass
class LogitJacobian:
    """U = R J_o (m rows) by layer groups, and its Gram matrix U U^T (:func:`logit_gram`).

    ``loss``: the loss layer's :class:`OutputFactor`.  ``parts``, per hidden group in
    chain order, that group's columns of U in a compact form: ``('blocked', psi)``, psi
    (G, B, r, h) = Phi_l S_l by example (U_l v_l = psi_l K_l v_l per example);
    ``('closed', [psi_l (m, B h)])`` (U_l v_l = psi_l K_l v_l); ``('dense', [Y_l (m, p_l)])``
    (U_l = Y_l).  So U v and U^T y are a few batched calls per group, no sweep.
    """

    loss: OutputFactor
    parts: list
    gram: torch.Tensor

    def apply(self, groups: Sequence[LayerGroup], views: Sequence[torch.Tensor]) -> torch.Tensor:
        """U v (m, k) for per-group directions (G, p, k)."""
        out = self.loss.apply(views[-1][0], None)
        for g, (kind, part), v in zip(groups, self.parts, views):
            if kind == "blocked":
                Kv = g.blocks.K(v).unflatten(-2, (g.blocks.num_examples, -1))  # (G, B, h, k)
                out = out + (part @ Kv).sum(0).flatten(0, 1)
            elif kind == "closed":
                out = out + sum(p @ g.layer(i).K(v[i]) for i, p in enumerate(part))
            else:
                out = out + sum(Y @ v[i] for i, Y in enumerate(part))
        return out

    def apply_t(self, groups: Sequence[LayerGroup], y: torch.Tensor) -> list:
        """U^T y as per-group (G, p, k) blocks for y (m, k)."""
        out = []
        for g, (kind, part) in zip(groups, self.parts):
            if kind == "blocked":
                B = g.blocks.num_examples
                back = part.mT @ y.view(B, -1, y.shape[-1])                   # (G, B, h, k)
                out.append(g.blocks.K_t(back.flatten(1, 2)))
            elif kind == "closed":
                out.append(torch.stack([g.layer(i).K_t(p.T @ y) for i, p in enumerate(part)]))
            else:
                out.append(torch.stack([Y.T @ y for Y in part]))
        return out + [self.loss.apply_t(y)[0][None]]


def logit_gram(groups: Sequence[LayerGroup], factor: OutputFactor) -> LogitJacobian:
    """U U^T (m, m) = sum_l U_l U_l^T, one adjoint sweep of Phi_l = R d(logits)/dz_l, with
    each layer's columns of U kept compactly (:class:`LogitJacobian`).

    Example-blocked Phi_l (B, r, h_l) while every layer from l up is closed form with the
    loss's B examples (stacked groups: :func:`_blocked_group_gram`; convolutions,
    flattening and pooling: their ``example_gram``, which keep U_l = Y_l (m, p_l)
    explicitly: few parameters), dense (m, a_l) below the first other layer.  Memory O(m^2 + m a_l) at most (O(m^2 + B r h_l) when blocked);
    U (m x n) is never formed.  Cost per closed-form layer O(m^2 h_l + m h_l h_{l-1})
    blocked; symmetrised at the end.
    """
    gram, phi, blocked = factor.gram, factor.phi, factor.blocked
    parts = []
    for g in reversed(groups[:-1]):
        if blocked and g.closed and g.blocks.num_examples == phi.shape[0]:
            share, phi, psi = _blocked_group_gram(phi, g.blocks)
            gram = gram + share
            parts.append(("blocked", psi))
            continue
        step = getattr(g.blocks, "example_gram", None) if blocked else None
        result = step(phi) if step is not None else None
        if result is not None:  # a convolution, flattening or pooling: still per example
            share, phi, Y = result
            gram = gram if share is None else gram + share
            parts.append(("dense", [Y]))
            continue
        kept = []
        for i in reversed(range(g.count)):
            d = g.layer(i)
            if blocked:
                phi, blocked = _block_diagonal(phi), False
            share, phi, part = (_dense_closed_form_layer_gram(phi, d) if g.closed
                                else _dense_layer_gram(phi, d))
            gram = gram + share
            kept.insert(0, part)
        parts.append(("closed" if g.closed else "dense", kept))
    return LogitJacobian(factor, parts[::-1], (gram + gram.T) / 2)


def _damped_cholesky(gram: torch.Tensor, damping: float, name: str,
                     checks: _Checks) -> torch.Tensor:
    """Lower Cholesky factor of ``damping I + gram``; its check (a
    :class:`SingularHessianError` if none) added to ``checks``.

    The matrix is positive definite with smallest eigenvalue >= damping, but it is
    singular to working precision once damping <= u max diag(gram) (u the unit roundoff;
    then cond(GGN + damping I) >= 1/u): refused, like a failed factorisation.
    """
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(gram + damping * eye)
    top = gram.diagonal().amax() if gram.numel() else gram.new_zeros(())
    ok = (info == 0) & (factor.sum().isfinite()) & (
        damping > torch.finfo(gram.dtype).eps * top)

    def error(_):
        detail = (f"damping {damping:.1e} against the Gram matrix U U^T of the logit "
                  f"Jacobian, largest diagonal {float(top):.1e}")
        return SingularHessianError(_singular_message(name, detail, damping))

    checks.add(ok, error)
    return factor


# --------------------------------------------------------------------------
# Layer-wise LDL^T: the Riccati recursion (docs/ALGORITHM.md, "Layer-wise LDL^T")
# --------------------------------------------------------------------------
#
# With M = B + delta I (delta any real number: a damping, or minus a spectral
# shift) and the tangent t_l = J_l v_l + F_l t_{l-1}, eliminating the layers
# from the last one (Ghat_L = 0: nothing lies above the loss),
#
#     P_l        = A_l + delta I + J_l^T Ghat_l J_l       (p_l, p_l)
#     N_l        = C_l + J_l^T Ghat_l F_l                 (p_l, a_{l-1})
#     K_l        = P_l^{-1} N_l,   Phi_l = F_l - J_l K_l   (a_l, a_{l-1})
#     Ghat_{l-1} = G_l + F_l^T Ghat_l F_l - N_l^T K_l     (a_{l-1}, a_{l-1})
#
# completes the square: v^T M v = sum_l w_l^T P_l w_l, w_l = v_l + K_l t_{l-1}.
# So M = L^T diag(P_l) L, L unit block lower triangular: M is congruent to
# diag(P_l) (Sylvester: the same inertia), det M = prod_l det P_l, and M x = g is
#
#     backward  s_{l-1} = K_l^T g_l + Phi_l^T s_l   (s_{L-1} = 0),   y_l = g_l - J_l^T s_l
#     middle    z_l = P_l^{-1} y_l
#     forward   t_l = J_l z_l + Phi_l t_{l-1},                        x_l = z_l - K_l t_{l-1}
#
# Only the two sweeps' one (a_l x a_{l-1}) product per layer is sequential; the rest
# is batched over runs of same-shape layers.  Nothing pivots across layers: a
# singular P_l stops the recursion even where M is invertible, and a nearly singular
# one loses accuracy (the accuracy contract catches it; 'auto' then hands over to a
# pivoted route).


#: How the pivot blocks P_l are factored: LU (any nonsingular P_l: the Hessian's
#: solves), Cholesky (positive definite P_l: the damped GGN, definiteness tests), or
#: Bunch-Kaufman LDL^T (symmetric indefinite, whose D shows the inertia).
PIVOT_FACTORS = ("lu", "cholesky", "ldl")


class PivotFactor:
    """Factorisations of a stack of symmetric pivot blocks P (G, n, n), of kind ``kind``.

    ``solve(X)`` is P^{-1} X for X (G, n, k); ``info`` (G,) is nonzero where a
    factorisation broke down (an exact zero pivot, a failed Cholesky; see
    :meth:`check`).  ``values()``
    (Cholesky, LDL^T): (G, n) numbers with the inertia of each P whose product is
    det P: the squared Cholesky diagonal, or the eigenvalues of the LDL^T's 1 x 1 and
    2 x 2 diagonal blocks.
    """

    def __init__(self, kind: str, factors: tuple, info: torch.Tensor):
        self.kind, self.factors, self.info = kind, factors, info

    @classmethod
    def of(cls, P: torch.Tensor, kind: str) -> "PivotFactor":
        if kind == "cholesky":
            L, info = torch.linalg.cholesky_ex(P)
            return cls(kind, (L,), info)
        if kind == "ldl":
            LD, pivots, info = torch.linalg.ldl_factor_ex(P)
            return cls(kind, (LD, pivots), info)
        LU, pivots, info = torch.linalg.lu_factor_ex(P)
        return cls(kind, (LU, pivots), info)

    def factor_into(self, P: torch.Tensor, g: int) -> None:
        """Factor one block P (n, n) into slot g of this stack's storage."""
        out = tuple(f[g] for f in self.factors) + (self.info[g],)
        if self.kind == "cholesky":
            torch.linalg.cholesky_ex(P, out=out)
        elif self.kind == "ldl":
            torch.linalg.ldl_factor_ex(P, out=out)
        else:
            torch.linalg.lu_factor_ex(P, out=out)

    def solve_one(self, g: int, X: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """P_g^{-1} X for the block in slot g, written into ``out``."""
        factors = tuple(f[g] for f in self.factors)
        if self.kind == "cholesky":
            return torch.cholesky_solve(X, factors[0], out=out)
        if self.kind == "ldl":
            return torch.linalg.ldl_solve(*factors, X, out=out)
        return torch.linalg.lu_solve(*factors, X, out=out)

    def check(self, P: torch.Tensor, scale: torch.Tensor) -> None:
        """Flag, in ``info``, blocks singular to working precision: a pivot (an LU or
        Cholesky diagonal entry, an eigenvalue of D) at most n u ``scale`` (G,), the size of
        the terms summed into P, or not finite."""
        n = P.shape[-1]
        if not n:
            return
        if self.kind == "ldl":
            pivots = self.values().abs()
        else:
            pivots = self.factors[0].diagonal(dim1=-2, dim2=-1).abs()
            pivots = pivots.square() if self.kind == "cholesky" else pivots
        tiny = ~(pivots.amin(-1) > n * torch.finfo(P.dtype).eps * scale)
        self.info = torch.where(tiny & (self.info == 0), -1, self.info)

    def solve(self, X: torch.Tensor) -> torch.Tensor:
        if not X.shape[-2]:
            return X
        if self.kind == "cholesky":
            return torch.cholesky_solve(X, self.factors[0])
        if self.kind == "ldl":
            return torch.linalg.ldl_solve(*self.factors, X)
        return torch.linalg.lu_solve(*self.factors, X)

    def inverse(self) -> torch.Tensor:
        """P^{-1} (G, n, n)."""
        if self.kind == "cholesky":
            return torch.cholesky_inverse(self.factors[0])
        eye = torch.eye(self.factors[0].shape[-1], dtype=self.factors[0].dtype,
                        device=self.factors[0].device)
        return self.solve(eye.expand_as(self.factors[0]).contiguous())

    def solve_root(self, X: torch.Tensor) -> torch.Tensor:
        """C^{-T} X for P = C C^T (kind 'cholesky'): unit noise X becomes noise of
        covariance P^{-1}."""
        if self.kind != "cholesky":
            raise HessianInverseError("a square root of P^{-1} needs kind='cholesky'")
        return torch.linalg.solve_triangular(self.factors[0].mT, X, upper=True)

    def values(self) -> torch.Tensor:
        if self.kind == "cholesky":
            return self.factors[0].diagonal(dim1=-2, dim2=-1).square()
        if self.kind == "ldl":
            return _ldl_block_eigenvalues(*self.factors)
        raise HessianInverseError("an LU factorisation does not show the inertia: use kind='ldl'")


def _ldl_block_eigenvalues(LD: torch.Tensor, pivots: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (G, n) of the block-diagonal D of Bunch-Kaufman factors (LAPACK
    sytrf, lower) of a stack (G, n, n).

    A 2 x 2 block occupies rows k, k+1 where ``pivots`` is negative; negative
    entries come in pairs, paired from the start of each run of them.
    """
    n = LD.shape[-1]
    d = LD.diagonal(dim1=-2, dim2=-1).clone()
    if n < 2:
        return d
    index = torch.arange(n, device=LD.device).expand_as(pivots)
    negative = pivots < 0
    run_start = torch.cummax(torch.where(negative, -1, index), -1).values
    first = negative & ((index - run_start) % 2 == 1)
    first[..., -1] = False
    g, k = first.nonzero(as_tuple=True)
    a, b, c = d[g, k], LD[g, k + 1, k], d[g, k + 1]
    mean, radius = (a + c) / 2, torch.hypot((a - c) / 2, b)
    d[g, k], d[g, k + 1] = mean - radius, mean + radius
    return d


class DensePivots:
    """One layer's step of the recursion with dense blocks (:class:`LayerDerivatives`),
    in the interface of :class:`AffinePivots` (a stack of G = 1).

    ``extra`` (p_l, p_l), optional, is added to P_l (the gauge projector N N^T).
    Cost O(p_l^3 + p_l^2 a), memory O(p_l^2 + p_l a).
    """

    def __init__(self, d: LayerDerivatives, delta: float, kind: str,
                 extra: Optional[torch.Tensor] = None):
        self.d, self.delta, self.kind, self.extra = d, delta, kind, extra
        self.blocks = d

    def step(self, index: int, ghat: torch.Tensor) -> Optional[torch.Tensor]:
        d = self.d
        JG = d.J.T @ ghat
        JGJ = JG @ d.J
        P = d.A + JGJ + self.delta * torch.eye(d.num_params, dtype=d.A.dtype, device=d.A.device)
        if self.extra is not None:
            P = P + self.extra
        self.P = ((P + P.T) / 2)[None]
        self.factor = PivotFactor.of(self.P, self.kind)
        scale = d.A.abs().amax() + JGJ.abs().amax() + abs(self.delta) if d.A.numel() else P.sum()
        self.factor.check(self.P, scale[None])
        if d.C is None:
            self.K = self.Phi = None
            return None
        N = d.C + JG @ d.F
        self.K = self.factor.solve(N[None])
        self.Phi = (d.F - d.J @ self.K[0])[None]
        G = d.G + d.F.T @ ghat @ d.F - N.T @ self.K[0]
        return (G + G.T) / 2

    def finish(self) -> None:
        pass

    def select(self, g: int) -> "DensePivots":
        return self

    def J(self, x: torch.Tensor) -> torch.Tensor:
        return (self.d.J @ x[0])[None]

    def J_t(self, s: torch.Tensor) -> torch.Tensor:
        return (self.d.J.T @ s[0])[None]

    def solve(self, y: torch.Tensor) -> torch.Tensor:
        return self.factor.solve(y)

    def gain(self, t: torch.Tensor) -> torch.Tensor:
        return self.K @ t

    def gain_t(self, y: torch.Tensor) -> torch.Tensor:
        return self.K.mT @ y

    def values(self) -> torch.Tensor:
        return self.factor.values()

    def lowest(self, index: int) -> tuple[float, torch.Tensor]:
        """The lowest eigenpair of P_l, the vector in the layer's parameters."""
        values, vectors = torch.linalg.eigh(self.P[0])
        return values[0].item(), vectors[:, 0]

    # Second moments of the factorisation (docs/ALGORITHM.md, "The covariance sweep")

    def second_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """diag(P_l^{-1}) (1, p_l) and J_l P_l^{-1} J_l^T (1, a_l, a_l)."""
        inverse = self.factor.inverse()
        return inverse.diagonal(dim1=-2, dim2=-1), self.d.J @ inverse @ self.d.J.T

    def gain_quadratic(self, S: torch.Tensor) -> torch.Tensor:
        """diag(K_l S K_l^T) (1, p_l) for S (1, a_{l-1}, a_{l-1})."""
        return ((self.K @ S) * self.K).sum(-1)

    def inverse_root(self, e: torch.Tensor) -> torch.Tensor:
        """Unit noise (1, p_l, k) -> noise of covariance P_l^{-1} (Cholesky pivots)."""
        return self.factor.solve_root(e)


class AffinePivots:
    """The recursion's steps for a run of G same-shape closed-form affine layers, stacked.

    Nothing p_l x p_l is formed.  With ``Dt = D + S^T Ghat_l S`` (B h square),
    ``P_l = delta I + K^T Dt K`` and ``N_l = K^T Dt Wb + E`` (docs/ALGORITHM.md,
    "Structured layers").  K sees the parameters X = [W, c] (h, q) only through
    ``Y = X V``, V (q, r) from the thin SVD ``Zt = (U Sigma) V^T`` = ``Us V^T`` of the
    augmented input (r = min(B, q); singular values at rounding level are zeroed, so
    a rank-deficient input gives exact zero columns of Us): ``K X = Y Us^T``.  In the
    rotated parameters P_l is block diagonal,

        P_l = diag(P_V, M kron I_{q - r}),   P_V = delta I + (Us kron I_h)^T Dt (Us kron I_h),

    P_V (r h square, rows (j, i): rotated input j, unit i) and M = delta I_h, or
    ``delta I + 1 1^T / h`` for the loss layer gauge-fixed at damping 0 (``gauge``).
    E's share of N in the Y_perp directions is X_E (I - V V^T), X_E = [r^T T, 0] for
    the tangent T (B, m), so

        Ghat_{l-1} = Wb^T Dt Wb - N_V^T P_V^{-1} N_V - (r M^{-1} r^T) kron Pi,

    Pi = (I - V V^T) on the m weight columns.  Cost per layer O((r h)^3 +
    (B h)^2 (r + m) + (B m)^2 r h); Y_perp costs O(p_l) in closed form.
    """

    def __init__(self, blocks: AffineLayerBlocks, delta: float, kind: str, gauge: bool = False):
        self.blocks, self.delta, self.kind, self.gauge = blocks, float(delta), kind, gauge
        self.layers = [replace(blocks, **{name: getattr(blocks, name)[g] for name in (
            "inputs", "weight", "out_map", "u_gradient", "u_hessian")})
            for g in range(blocks.weight.shape[0])]
        self.B, (self.h, self.m) = blocks.num_examples, blocks.weight.shape[-2:]
        Zt = blocks.augmented_inputs()
        U, sigma, Vh = torch.linalg.svd(Zt, full_matrices=False)
        tol = max(Zt.shape[-2:]) * torch.finfo(Zt.dtype).eps * sigma[..., :1]
        self.kept = sigma > tol                                            # (G, r)
        sigma = torch.where(self.kept, sigma, torch.zeros_like(sigma))
        self.Us, self.V = U * sigma[..., None, :], Vh.mT                 # (G, B, r), (G, q, r)
        self.q, self.r = self.V.shape[-2:]
        self.perp = self.q - self.r
        kw = dict(dtype=Zt.dtype, device=Zt.device)
        B, h, m, r = self.B, self.h, self.m, self.r
        count, rh, a = blocks.weight.shape[0], r * h, blocks.num_outputs
        if blocks.input_derivatives and self.perp:
            Vw = self.V[:, :m]
            Pi = torch.eye(m, **kw) - Vw @ Vw.mT
            rr = blocks.u_gradient @ self._perp_inverse(blocks.u_gradient.mT)
            self.perp_schur = (rr[:, :, None, :, None], Pi[:, None, :, None, :])  # kron
        self.P = torch.empty(count, rh, rh, **kw)
        # Factors column-major (LAPACK's), so that solves take them without copying.
        self.factor = PivotFactor(kind, (torch.empty(count, rh, rh, **kw).mT,) + (
            (torch.empty(count, rh, dtype=torch.int32, device=Zt.device),)
            if kind != "cholesky" else ()), torch.empty(count, dtype=torch.int32, device=Zt.device))
        self.K = torch.empty(count, rh, B * m, **kw) if blocks.input_derivatives else None
        self.Phi = torch.empty(count, a, B * m, **kw) if blocks.input_derivatives else None

    def _perp_inverse(self, X: torch.Tensor) -> torch.Tensor:
        """M^{-1} X on the unit index (dimension -2) of X (..., h, k)."""
        if not self.gauge:
            return X / self.delta
        mean = X.mean(dim=-2, keepdim=True)     # M = delta I + 1 1^T / h (Sherman-Morrison)
        return (X - mean / (self.delta + 1.0)) / self.delta

    def _perp_values(self) -> torch.Tensor:
        """The eigenvalues of M (h,)."""
        values = torch.full((self.h,), self.delta, dtype=self.V.dtype, device=self.V.device)
        if self.gauge:
            values[-1] += 1.0
        return values

    @property
    def perp_ok(self) -> bool:
        """Whether M is invertible (positive definite for kind 'cholesky'), or there is no
        Y_perp block; decided without a device round trip."""
        if not self.perp:
            return True
        if self.kind == "cholesky":
            return self.delta > 0 or (self.gauge and self.h == 1 and self.delta > -1)
        return self.delta != 0 and (not self.gauge or self.delta != -1)

    def step(self, g: int, ghat: torch.Tensor) -> Optional[torch.Tensor]:
        """Layer g of the run: factor P_l from Ghat_l (into the run's stacked storage);
        returns Ghat_{l-1}, or None for the first layer."""
        d, B, h, m, r = self.layers[g], self.B, self.h, self.m, self.r
        Us, V, W = self.Us[g], self.V[g], d.weight
        if d.diagonal:                                                     # Dt = D + S^T Ghat S
            Dt = ghat * d.out_map[:, None]
            Dt.mul_(d.out_map).diagonal().add_(d.u_hessian.view(-1))
        else:
            Dt = d.S_t(d.S_t(ghat).mT) + _block_diagonal(d.u_hessian)
        # P_V = (Us kron I)^T Dt (Us kron I): contract Dt's two example indices with Us
        right = Dt.view(B * h, B, h).transpose(1, 2).reshape(B * h * h, B) @ Us    # (n,i,k,o)
        left = Us.T @ right.view(B, h * h * r)                                      # (j,i,k,o)
        P = self.P[g]
        P.view(r, h, r, h).copy_(left.view(r, h, h, r).transpose(2, 3))
        P.diagonal().add_(self.delta)
        if self.gauge:  # P_N = (1 1^T / h) kron I_q is the same in rotated coordinates
            P.view(r, h, r, h).diagonal(dim1=0, dim2=2).add_(1.0 / h)
        self.factor.factor_into(P, g)
        if not d.input_derivatives:
            return None
        # N_V = (Us kron I)^T Dt Wb + E_V, E_V[(j, i), (n, k)] = r[n, i] V[k, j]
        DtWb = Dt.view(B * h * B, h) @ W                                   # (n, i, n', k)
        E = V[:m].T[:, None, None, :] * d.u_gradient.T[None, :, :, None]
        N = torch.addmm(E.reshape(r, h * B * m), Us.T, DtWb.view(B, h * B * m)).view(r * h, B * m)
        K = self.factor.solve_one(g, N, out=self.K[g])
        WtDtWb = W.T @ DtWb.view(B, h, B * m).transpose(0, 1).reshape(h, B * B * m)
        G = WtDtWb.view(m, B, B, m).transpose(0, 1)                       # Wb^T Dt Wb
        if self.perp:                             # minus (r M^{-1} r^T) kron Pi, in one pass
            rr, Pi = (factor[g] for factor in self.perp_schur)
            G = torch.addcmul(G, rr, Pi, value=-1,
                              out=torch.empty_like(G, memory_format=torch.contiguous_format))
        G = G.reshape(B * m, B * m)
        # Phi = F - J K = S (Wb - K K_l), K K_l = (Us kron I) K_V
        T = (Us @ K.reshape(r, h * B * m)).view(B * h, B * m)
        T.view(B, h, B, m).diagonal(dim1=0, dim2=2).sub_(W[:, :, None])   # K K_l - Wb
        if d.diagonal:
            torch.mul(T, d.out_map[:, None], out=self.Phi[g]).neg_()
        else:
            torch.neg(d.S(T), out=self.Phi[g])
        return torch.addmm(G, N.T, K, alpha=-1)

    def finish(self) -> None:
        """After the sweep: pivots checked (:meth:`PivotFactor.check`); a Y_perp block that
        is singular breaks every layer of the run."""
        self.factor.check(self.P, self.P.abs().amax(dim=(-2, -1)) + abs(self.delta))
        if not self.perp_ok:
            self.factor.info = torch.ones_like(self.factor.info)

    def J(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks.J @ x

    def J_t(self, s: torch.Tensor) -> torch.Tensor:
        return self.blocks.J.T @ s

    def _rotate(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Parameters (G, p, k) -> their Y_V part (G, r h, k) and X (G, h, q, k)."""
        w, c = self.blocks._split(y)
        X = w if c is None else torch.cat([w, c], dim=-2)
        Y = torch.einsum("giqk,gqj->gjik", X, self.V)
        return Y.reshape(Y.shape[0], self.r * self.h, -1), X

    def _unrotate(self, Y: torch.Tensor, X_perp: Optional[torch.Tensor],
                  V: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Y_V (G, r h, k), plus a part X_perp (G, h, q, k) already unrotated -> (G, p, k)."""
        V = self.V if V is None else V
        X = torch.einsum("gjik,gqj->giqk", Y.reshape(Y.shape[0], self.r, self.h, -1), V)
        if X_perp is not None:
            X = X + X_perp
        m = self.m
        return self.blocks._join(X[..., :m, :], X[..., m, :] if self.blocks.bias else None)

    def _perp(self, X: torch.Tensor) -> Optional[torch.Tensor]:
        """M^{-1} X (I - V V^T) for X (G, h, q, k): the Y_perp block's inverse, or None."""
        if not self.perp:
            return None
        X = X - torch.einsum("giqk,gqj,gsj->gisk", X, self.V, self.V)
        return self._perp_inverse(X.flatten(-2)).view(X.shape)

    def _tangent_part(self, t: torch.Tensor) -> torch.Tensor:
        """X_E = [r^T T, 0] (G, h, q, k) for tangents t (G, B m, k)."""
        T = t.unflatten(-2, (self.B, self.m))
        X = torch.einsum("gni,gnqk->giqk", self.blocks.u_gradient, T)
        return torch.cat([X, X.new_zeros(*X.shape[:2], self.q - self.m, X.shape[-1])], dim=2)

    def solve(self, y: torch.Tensor) -> torch.Tensor:
        """P_l^{-1} y for parameters y (G, p, k)."""
        Y, X = self._rotate(y)
        return self._unrotate(self.factor.solve(Y), self._perp(X))

    def gain(self, t: torch.Tensor) -> torch.Tensor:
        """K_l t: (G, a_{l-1}, k) -> (G, p, k)."""
        return self._unrotate(self.K @ t, self._perp(self._tangent_part(t)))

    def gain_t(self, y: torch.Tensor) -> torch.Tensor:
        """K_l^T y: (G, p, k) -> (G, a_{l-1}, k)."""
        Y, X = self._rotate(y)
        out = self.K.mT @ Y
        if self.perp:
            Xp = self._perp(X)[..., :self.m, :]                               # (G, h, m, k)
            out = out + torch.einsum("gni,gimk->gnmk", self.blocks.u_gradient,
                                     Xp).reshape(out.shape)
        return out

    def values(self) -> torch.Tensor:
        main = self.factor.values()
        if not self.perp:
            return main
        perp = self._perp_values().repeat(self.perp).expand(main.shape[0], -1)
        return torch.cat([main, perp], dim=-1)

    def select(self, g: int) -> "AffinePivots":
        """Layer g of the run alone, as a run of one (views, nothing recomputed)."""
        one = copy.copy(self)
        one.layers, one.blocks = [self.layers[g]], stack_blocks([self.layers[g]])
        for name in ("Us", "V", "kept", "P", "K", "Phi"):
            value = getattr(self, name)
            setattr(one, name, None if value is None else value[g:g + 1])
        one.factor = PivotFactor(self.kind, tuple(f[g:g + 1] for f in self.factor.factors),
                                 self.factor.info[g:g + 1])
        return one

    def _off_range(self, V: torch.Tensor) -> Optional[torch.Tensor]:
        """X (h, q) of unit norm with X V = 0 (no tangent: K X = 0), rows summing to zero
        for the gauge-fixed loss layer (so P_N X = 0 too); None if V spans R^q."""
        q = V.shape[0]
        if V.shape[1] >= q or (self.gauge and self.h == 1):
            return None
        k = int(V.norm(dim=1).argmin())              # e_k minus its part in range(V)
        column = -V @ V[k]
        column[k] += 1.0
        unit = torch.zeros(self.h, dtype=V.dtype, device=V.device)
        unit[0] = 1.0
        if self.gauge:
            unit[1] = -1.0
        return unit[:, None] * column[None, :] / (unit.norm() * column.norm())

    def _flat(self, X: torch.Tensor) -> torch.Tensor:
        """(h, q) parameters [W, c] -> the layer's flat parameters (p,)."""
        return self.layers[0]._join(X[:, :self.m, None], X[:, self.m, None] if self.blocks.bias
                                    else None)[:, 0]

    def null_direction(self, g: int) -> Optional[torch.Tensor]:
        """At damping 0, a unit x_l (p_l,) with ``K x_l = 0`` (and ``P_N x_l = 0``) when
        layer g's input is rank deficient; None otherwise."""
        if self.delta != 0:
            return None
        X = self._off_range(self.V[g][:, self.kept[g]])
        return None if X is None else self._flat(X)

    def lowest(self, g: int) -> tuple[float, torch.Tensor]:
        """The lowest eigenpair of layer g's P_l, the vector in its parameters."""
        values, vectors = torch.linalg.eigh(self.P[g])
        perp_values = self._perp_values()
        if self.perp and perp_values.min() < values[0]:
            return perp_values.min().item(), self._flat(self._off_range(self.V[g]))
        return values[0].item(), self._unrotate(vectors[None, :, :1], None, self.V[g:g + 1])[0, :, 0]

    # Second moments of the factorisation (docs/ALGORITHM.md, "The covariance sweep"), in the
    # rotated parameters: P_l^{-1} = diag(P_V^{-1}, M^{-1} kron I), and K_l's Y_perp rows are
    # rho kron Pi (rho = M^{-1} r^T, Pi = I - V V^T on the weight columns).

    def _unit_major(self, X: torch.Tensor) -> torch.Tensor:
        """(G, h, q) numbers per parameter [W, c] -> (G, p) in the layer's parameter order."""
        X = X[..., None]
        return self.blocks._join(X[..., :self.m, :], X[..., self.m, :] if self.blocks.bias
                                 else None)[..., 0]

    def _perp_projector(self) -> torch.Tensor:
        """Pi = I - V V^T on the q input columns (G, q, q)."""
        eye = torch.eye(self.q, dtype=self.V.dtype, device=self.V.device)
        return eye - self.V @ self.V.mT

    def second_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """diag(P_l^{-1}) (G, p_l) and J_l P_l^{-1} J_l^T (G, a_l, a_l), from one P_V^{-1}:
        the diagonal is the V-rotated unit-diagonal blocks of P_V^{-1} plus diag(M^{-1})
        times diag(Pi); J_l is S (Us kron I_h) on Y_V and zero on Y_perp."""
        G, B, r, h = self.P.shape[0], self.B, self.r, self.h
        kw = dict(dtype=self.V.dtype, device=self.V.device)
        inverse = self.factor.inverse()
        Z = inverse.view(G, r, h, r, h).diagonal(dim1=2, dim2=4)           # (G, r, r, h)
        X = torch.einsum("gqj,gjki,gqk->giq", self.V, Z, self.V)
        if self.perp:
            m_inverse = self._perp_inverse(torch.eye(h, **kw)).diagonal()
            X = X + m_inverse[:, None] * self._perp_projector().diagonal(dim1=-2, dim2=-1)[:, None]
        T = self.blocks.S((self.Us[:, :, None, :, None] * torch.eye(h, **kw)[:, None, :])
                          .reshape(G, B * h, r * h))
        return self._unit_major(X), T @ inverse @ T.mT

    def gain_quadratic(self, S: torch.Tensor) -> torch.Tensor:
        """diag(K_l S K_l^T) (G, p_l) for S (G, a_{l-1}, a_{l-1}); row (i, k) of K_l is
        sum_j V[k, j] K_V[(j, i)] + rho[i] kron Pi[:m, k]."""
        G, r, h, B, m = self.P.shape[0], self.r, self.h, self.B, self.m
        KS = self.K @ S
        Z = torch.einsum("gjic,gkic->gijk", KS.view(G, r, h, -1), self.K.view(G, r, h, -1))
        X = torch.einsum("gqj,gijk,gqk->giq", self.V, Z, self.V)
        if self.perp:
            rho = self._perp_inverse(self.blocks.u_gradient.mT)                # (G, h, B)
            Pi = self._perp_projector()[:, :m]                                 # (G, m, q)
            KS_rho = torch.einsum("gjink,gin->gjik", KS.view(G, r, h, B, m), rho)
            X = X + 2 * torch.einsum("gqj,gjik,gkq->giq", self.V, KS_rho, Pi)
            S_rho = torch.einsum("gnkpl,gin,gip->gikl", S.view(G, B, m, B, m), rho, rho)
            X = X + torch.einsum("gkq,gikl,glq->giq", Pi, S_rho, Pi)
        return self._unit_major(X)

    def _perp_root(self, X: torch.Tensor) -> torch.Tensor:
        """M^{-1/2} X on the unit index (dimension -2) of X (..., h, k)."""
        if not self.gauge:
            return X / math.sqrt(self.delta)
        mean = X.mean(dim=-2, keepdim=True)     # M = delta I + 1 1^T / h: 1 has delta + 1
        return (X - mean) / math.sqrt(self.delta) + mean / math.sqrt(self.delta + 1.0)

    def inverse_root(self, e: torch.Tensor) -> torch.Tensor:
        """Unit noise (G, p_l, k) -> noise of covariance P_l^{-1} (Cholesky pivots): the
        rotation keeps the noise white, C_V^{-T} colours Y_V, M^{-1/2} colours Y_perp."""
        Y, X = self._rotate(e)
        perp = None
        if self.perp:
            X = X - torch.einsum("giqk,gqj,gsj->gisk", X, self.V, self.V)
            perp = self._perp_root(X.flatten(-2)).view(X.shape)
        return self._unrotate(self.factor.solve_root(Y), perp)


class RiccatiFactor:
    """``B + delta I`` (plus N N^T with ``gauge``) factored layer by layer:
    M = L^T diag(P_l) L (docs/ALGORITHM.md, "Layer-wise LDL^T").

    ``layers``: the operator's :class:`LayerGroup` s, or per-layer blocks (grouped
    here, :func:`group_layers`); ``delta``: any real number;
    ``kind``: how each P_l is factored (:data:`PIVOT_FACTORS`); ``gauge`` (p_L, k):
    the loss layer's known null basis N, whose projector is added to P_L.  Runs of
    same-shape closed-form layers are :class:`AffinePivots`, other layers
    :class:`DensePivots`.  ``broken`` (L,) bool: where P_l broke down (left on the
    device; ``ok`` synchronises once).  ``values()`` (kinds 'cholesky' and 'ldl'):
    n numbers with the inertia of M whose product is det M.  Memory
    O(sum_l (a_l^2 + a_l a_{l-1})) for affine layers (p_l^2 for dense ones).
    """

    def __init__(self, layers: Sequence, delta: float, kind: str = "lu",
                 gauge: Optional[torch.Tensor] = None):
        if kind not in PIVOT_FACTORS:
            raise HessianInverseError(f"kind must be one of {PIVOT_FACTORS}, got {kind!r}")
        stacks = (list(layers) if isinstance(layers[0], LayerGroup) else group_layers(layers))
        self.check_blocks(stacks)
        self.delta, self.kind = float(delta), kind
        self.num_layers = stacks[-1].stop
        self.runs = [list(range(g.start, g.stop)) for g in stacks]
        self.groups = []
        for g in stacks:
            fixed = gauge is not None and g.stop == self.num_layers
            if g.closed:
                group = AffinePivots(g.blocks, delta, kind, fixed)
            else:
                group = DensePivots(g.blocks, delta, kind, gauge @ gauge.T if fixed else None)
            self.groups.append(group)
        like = stacks[-1].blocks.inputs if stacks[-1].closed else stacks[-1].blocks.J
        ghat = torch.zeros(1, 1, dtype=like.dtype, device=like.device)  # z_L is the loss
        for run, group in zip(reversed(self.runs), reversed(self.groups)):
            for g in reversed(range(len(run))):
                ghat = group.step(g, ghat)
            group.finish()
        self.broken = torch.cat([group.factor.info for group in self.groups]) != 0

    @staticmethod
    def check_blocks(layers: Sequence, what: str = "RiccatiFactor") -> None:
        """Refuse blocks the recursion cannot take (it has pivots for closed-form affine
        layers and for dense blocks only); ``layers``: :class:`LayerGroup` s or per-layer
        blocks.  Blocks known only by their action (convolution, pooling, autograd
        products) are refused by name: their a_l x a_l curvature would be dense."""
        for l, g in enumerate(layers):
            l, d = (g.start, g.blocks) if isinstance(g, LayerGroup) else (l, g)
            if isinstance(d, LayerBlocks) and not isinstance(d, AffineLayerBlocks):
                raise HessianInverseError(
                    f"{what} factors each layer's blocks densely (the layer-wise LDL^T, with "
                    "a_l x a_l curvature blocks), which is not supported for convolutional, "
                    f"pooling or other matrix-free layers: layer {l + 1} ({type(d).__name__}, "
                    f"{d.num_outputs} activations) would need {d.num_outputs}^2 numbers. "
                    "Damped solves work: factorize(..., damping > 0) (the parameter-space or "
                    "output-space route), or DampedNewton(mode='damped').")
            if not isinstance(d, (AffineLayerBlocks, LayerDerivatives)):
                raise HessianInverseError(
                    f"layer {l + 1}: the layer-wise factorisation takes closed-form affine "
                    f"blocks (AffineLayerBlocks) or dense blocks (LayerDerivatives), not "
                    f"{type(d).__name__}; use path='structured' or 'generic' to solve with "
                    "this model")

    @property
    def ok(self) -> bool:
        return not bool(self.broken.any())

    def values(self) -> torch.Tensor:
        return torch.cat([v.reshape(-1) for v in (group.values() for group in self.groups)])

    def _stacked(self, run: list, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack([blocks[l] for l in run])

    def solve(self, g: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """M^{-1} g for per-layer blocks g_l (p_l, k) (:meth:`solve_groups` on stacks)."""
        x = self.solve_groups([self._stacked(run, g) for run in self.runs])
        return [xl for xi in x for xl in xi.unbind()]

    def solve_groups(self, G: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """M^{-1} g for each run's stacked blocks (G, p, k): backward sweep, pivots,
        forward sweep; the run's stacked solutions."""
        runs, groups, num_layers = self.runs, self.groups, self.num_layers
        # backward: s_{l-1} = K_l^T g_l + Phi_l^T s_l
        Ktg: list = [None] * num_layers
        for run, group, Gi in zip(runs, groups, G):
            if group.K is not None:
                Ktg[run[0]:run[-1] + 1] = group.gain_t(Gi).unbind()
        phi = self.transfers()
        s: list = [None] * num_layers                     # s[l]: the adjoint of t_l
        for l in reversed(range(1, num_layers)):
            s[l - 1] = Ktg[l] if s[l] is None else torch.addmm(Ktg[l], phi[l].T, s[l])
        # middle: z_l = P_l^{-1} (g_l - J_l^T s_l)
        Z = []
        for run, group, Gi in zip(runs, groups, G):
            if s[run[-1]] is not None:
                Gi = Gi - group.J_t(self._stacked(run, s))
            Z.append(group.solve(Gi))
        return self.substitute(Z)

    def transfers(self) -> list:
        """Phi_l (a_l, a_{l-1}) per layer (None for the first)."""
        phi: list = [None] * self.num_layers
        for run, group in zip(self.runs, self.groups):
            if group.Phi is not None:
                phi[run[0]:run[-1] + 1] = group.Phi.unbind()
        return phi

    def substitute(self, Z: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """x = L^{-1} z, the forward sweep: z per run stacked (G, p_l, k) -> x_l (p_l, k),
        t_l = J_l z_l + Phi_l t_{l-1}, x_l = z_l - K_l t_{l-1}."""
        runs, groups, num_layers = self.runs, self.groups, self.num_layers
        phi = self.transfers()
        Jz: list = [None] * num_layers
        for run, group, Zi in zip(runs, groups, Z):
            if run[0] < num_layers - 1:
                Jz[run[0]:run[-1] + 1] = group.J(Zi).unbind()
        t: list = [None] * num_layers
        for l in range(num_layers - 1):
            t[l] = Jz[l] if l == 0 else torch.addmm(Jz[l], phi[l], t[l - 1])
        x = []
        for run, group, Zi in zip(runs, groups, Z):
            if group.K is not None:
                Zi = Zi - group.gain(torch.stack([t[l - 1] for l in run]))
            x.append(Zi)
        return x

    def pivot(self, l: int):
        """(group, index) of layer l."""
        for run, group in zip(self.runs, self.groups):
            if run[0] <= l <= run[-1]:
                return group, l - run[0]
        raise IndexError(l)


# --------------------------------------------------------------------------
# The parameter-space route (docs/ALGORITHM.md, "The parameter-space route")
# --------------------------------------------------------------------------
#
# A convolutional network is the reverse of a tall-skinny one: huge states, few
# parameters.  So eliminate the states instead of the parameters: form the Hessian
# columns of the hidden layers' parameters (layer k's columns need only layers
# k..L, by forward-over-reverse sweeps on that sub-chain), eliminate the output
# layer's parameters by the push-through identity (its block A_L + eps I = K^T D K +
# eps I), and factor the n_c x n_c Schur complement of the rest,
#
#     S = H_cc + eps I - H_cL (A_L + eps I)^{-1} H_Lc,
#
# by a symmetric indefinite LDL^T (Bunch-Kaufman; Cholesky for the damped GGN).
# A solve: x_c = S^{-1} (g_c - H_cL y), y = (A_L + eps I)^{-1} g_L, then
# x_L = (A_L + eps I)^{-1} (g_L - H_Lc x_c), where H_cL y and H_Lc x_c are exact
# products (block sweeps), so the n_c x p_L columns are not kept.

#: Numbers the column sweeps of the parameter-space route may hold at once (tangents,
#: adjoints and products for a chunk of columns).
COLUMN_CHUNK_NUMBERS = 2 ** 24


def _columns_per_chunk(num_columns: int, per_column: int) -> int:
    return max(1, min(num_columns, COLUMN_CHUNK_NUMBERS // max(per_column, 1)))


def _parameter_split(sizes: LayerSizes, damping: Optional[float] = None) -> tuple[list, bool]:
    """(layers whose parameters the Schur complement holds, whether the loss layer's
    are eliminated in closed form: a closed-form loss layer at damping > 0)."""
    eliminated = (sizes.kinds[-1] == "affine" and len(sizes.params) > 1
                  and (damping is None or damping > 0))
    last = len(sizes.params) - 1 if eliminated else len(sizes.params)
    return list(range(last)), eliminated


def parameter_space_cost(sizes: LayerSizes, dtype: torch.dtype = torch.float64,
                         damping: Optional[float] = None) -> RouteCost:
    """Cost of :class:`ParameterSpaceSolver` from layer sizes.

    With f_l the flops of one product with layer l's J (:func:`_forward_flops`): layer
    k's p_k columns cost ~ p_k (4 f_k + 8 sum_{l>k} f_l) (a sweep up and down the
    sub-chain k..L); eliminating a closed-form loss layer (p_L parameters, B C logits;
    damping > 0) ~ 2 p_L n^2 + 8 B C p_L n (n = the Schur complement's size, all the
    parameters at damping 0); its LDL^T n^3 / 3.
    A solve: three sweeps (~ 24 sum_l f_l) and 2 n^2.  Bytes: the Schur complement and
    its factor (2 n^2), the loss layer's columns (p_L n), a chunk of column sweeps
    (:data:`COLUMN_CHUNK_NUMBERS`).
    """
    kept, eliminated = _parameter_split(sizes, damping)
    params, num_layers = sizes.params, len(sizes.params)
    n = sum(params[l] for l in kept)
    forward = [_forward_flops(sizes, l) for l in range(num_layers)]
    setup, ops = 0.0, 20
    for k in kept:
        setup += params[k] * (4 * forward[k] + 8 * sum(forward[k + 1:]))
        per_column = 4 * sum(sizes.outputs[l] + sizes.inputs[l] for l in range(k, num_layers))
        chunks = math.ceil(params[k] / _columns_per_chunk(params[k], per_column))
        ops += chunks * 12 * (num_layers - k)
    stored = 2 * n * n + max((min(COLUMN_CHUNK_NUMBERS, params[k] * 4 * sum(
        sizes.outputs[l] + sizes.inputs[l] for l in range(k, num_layers))) for k in kept),
        default=0)
    if eliminated:
        rows = sizes.u[-1]
        setup += 2 * params[-1] * n * n + 8 * rows * params[-1] * n
        stored += params[-1] * n + rows * rows
    setup += n ** 3 / 3
    solve = 2 * n * n + 24 * sum(forward)
    return RouteCost(setup, solve, stored * _itemsize(dtype), ops)


class ParameterSpaceSolver:
    """The parameter-space route: Hessian columns of the hidden layers' parameters, the
    output layer eliminated, an LDL^T of the Schur complement; damping > 0
    (docs/ALGORITHM.md, "The parameter-space route").

    Serves any chain, with any blocks that multiply (closed-form affine, convolutional
    and pooling layers, matrix-free autograd layers, dense blocks): it only needs
    the exact product.  A closed-form loss layer (``AffineLayerBlocks``) is eliminated
    by the push-through identity (``inverse``: (A_L + eps I)^{-1}); any other is kept
    in the Schur complement.  Time ~ n_c (one Hessian-vector product on the layer's
    sub-chain per column) + p_L n_c^2 + n_c^3 / 3, memory O(n_c^2 + p_L n_c): for
    networks with few parameters and huge states (a CNN), not tall-skinny MLPs.
    ``kind``: 'ldl' (Bunch-Kaufman, the Hessian's indefinite S) or 'cholesky' (the
    damped GGN's positive definite S; LDL^T where Cholesky fails to rounding).  At
    damping 0 nothing is eliminated: the LDL^T (symmetric pivoting) is of H + N N^T,
    ``gauge`` N the loss layer's known null basis (Moore-Penrose, "The softmax gauge").
    """

    route = "parameter"
    rcond = None

    def __init__(self, operator: "HessianOperator", damping: float,
                 gauge: Optional[torch.Tensor] = None, checks: Optional[_Checks] = None):
        self.operator, self.damping, self.gauge = operator, float(damping), gauge
        derivs = operator.derivs
        self.kept, self.eliminated = _parameter_split(operator.sizes, self.damping)
        self.inverse = None
        if self.eliminated:  # the loss layer's group: a stack of one
            loss = replace(operator.groups[-1].blocks, input_derivatives=False)
            stacked = eliminate_affine_layer(loss, self.damping, [len(derivs)], checks).inverse
            self.inverse = lambda X: stacked(X[None])[0]
        self.sizes = [derivs[l].num_params for l in self.kept]
        schur, scale = self._schur_complement()
        kind = "cholesky" if operator.curvature == "ggn" else "ldl"
        self.factor = PivotFactor.of(schur[None], kind)
        if kind == "cholesky" and int(self.factor.info[0]) != 0:
            self.factor = PivotFactor.of(schur[None], "ldl")
        del schur
        self.factor.check(self.factor.factors[0], scale[None])
        if int(self.factor.info[0]) != 0:
            raise EliminationError(_singular_message(
                _system_name(operator, self.damping, gauge),
                f"parameter-space route: a pivot of the LDL^T of the Schur complement of the "
                f"parameters of layers {self.kept[0] + 1}..{self.kept[-1] + 1} (n = "
                f"{sum(self.sizes)}) is below n u times its largest entry", self.damping))

    def _columns(self, k: int, cols: slice) -> list:
        """H[l, k][:, cols] for l = k..L: one sweep of the sub-chain k..L."""
        derivs = self.operator.derivs
        units = torch.zeros(derivs[k].num_params, cols.stop - cols.start,
                            dtype=self.operator.dtype, device=self.operator.device)
        units[cols].fill_diagonal_(1.0)
        return structured_hessian_vector_product(
            derivs[k:], [units] + [None] * (len(derivs) - k - 1))

    def _schur_complement(self) -> tuple[torch.Tensor, torch.Tensor]:
        """S = H_cc + eps I - H_cL (A_L + eps I)^{-1} H_Lc, assembled column chunk by chunk,
        and the largest magnitude of its entries.  Only the lower triangle is formed
        (the factorisations read no other): the sweeps of layer k give the block column
        below its diagonal block, and the output layer's share is subtracted on and
        below the diagonal (half the flops of the full product)."""
        derivs, kept, last = self.operator.derivs, self.kept, len(self.operator.derivs) - 1
        n = sum(self.sizes)
        offsets = [0, *accumulate(self.sizes)]
        kw = dict(dtype=self.operator.dtype, device=self.operator.device)
        S = torch.zeros(n, n, **kw)
        loss_columns = torch.zeros(derivs[-1].num_params, n, **kw) if self.eliminated else None
        for i, k in enumerate(kept):
            p = self.sizes[i]
            per_column = 4 * sum(d.num_outputs + getattr(d, "num_inputs", 0) for d in derivs[k:])
            step = _columns_per_chunk(p, per_column)
            for start in range(0, p, step):
                cols = slice(start, min(start + step, p))
                at = slice(offsets[i] + cols.start, offsets[i] + cols.stop)
                for j, block in enumerate(self._columns(k, cols)):
                    if self.eliminated and k + j == last:
                        loss_columns[:, at] = block
                    else:
                        S[offsets[i + j]:offsets[i + j + 1], at] = block
        S.diagonal().add_(self.damping)
        if self.gauge is not None:  # H + N N^T: the softmax gauge fixed at damping 0
            S[offsets[-2]:, offsets[-2]:] += self.gauge @ self.gauge.T
        if not self.eliminated:
            return S, S.tril().abs().amax()
        scale = S.new_zeros(())
        step = _columns_per_chunk(n, 2 * loss_columns.shape[0])
        for start in range(0, n, step):
            cols = slice(start, min(start + step, n))
            lower = S[start:, cols]
            lower -= loss_columns[:, start:].T @ self.inverse(loss_columns[:, cols])
            scale = torch.maximum(scale, lower.abs().amax())
        return S, scale

    def solve_once(self, b: torch.Tensor) -> torch.Tensor:
        """(n, k) right-hand sides -> (n, k) solutions (un-refined)."""
        return torch.cat(self._solve_blocks(list(b.split(self.operator.param_sizes))))

    def _solve_blocks(self, blocks: list) -> list:
        """Per-layer (p_l, k) right-hand sides -> (p_l, k) solutions."""
        derivs, kept, num = self.operator.derivs, self.kept, len(self.operator.derivs)
        g_c = [blocks[l] for l in kept]
        if self.eliminated:
            y = self.inverse(blocks[-1])
            coupled = structured_hessian_vector_product(derivs, [None] * (num - 1) + [y])
            g_c = [g - h for g, h in zip(g_c, coupled)]
        x_c = list(self.factor.solve(torch.cat(g_c)[None])[0].split(self.sizes))
        if not self.eliminated:
            return x_c
        coupled = structured_hessian_vector_product(derivs, x_c + [None])
        return x_c + [self.inverse(blocks[-1] - coupled[-1])]


# --------------------------------------------------------------------------
# One memory guard (docs/ALGORITHM.md, "Cost and memory")
# --------------------------------------------------------------------------


def estimate_factorization_bytes(param_counts: Sequence[int], output_counts: Sequence[int],
                                 input_count: int, dtype: torch.dtype) -> int:
    """Peak bytes of derivatives + lifted system + factors, before any is allocated.

    Per layer (p params, a_in inputs, a outputs, n = p + 2a): the derivative
    blocks (a p + p^2 + p a_in + a a_in + a_in^2), the oracle's Hessian
    workspace (~3 (p + a_in)^2), the lifted blocks (n^2 + n n_prev) and the LU
    factors (~3 n^2 + n n_next + n n_next2).
    """
    itemsize = torch.empty(0, dtype=dtype).element_size()
    sizes = [p + 2 * a for p, a in zip(param_counts, output_counts)]
    total, a_in = 0, input_count
    peak_workspace = 0
    for l, (p, a, n) in enumerate(zip(param_counts, output_counts, sizes)):
        ain = a_in if l > 0 else 0
        total += a * p + p * p + p * ain + a * ain + ain * ain
        peak_workspace = max(peak_workspace, 3 * (p + ain) ** 2)
        n1 = sizes[l + 1] if l + 1 < len(sizes) else 0
        n2 = sizes[l + 2] if l + 2 < len(sizes) else 0
        prev = sizes[l - 1] if l > 0 else 0
        total += n * n + n * prev + 3 * n * n + n * (n1 + n2) + n1 * n
        a_in = a
    return (total + peak_workspace) * itemsize


def estimate_structured_bytes(param_counts: Sequence[int], input_counts: Sequence[int],
                              output_counts: Sequence[int], u_counts: Sequence[Optional[int]],
                              dtype: torch.dtype) -> int:
    """Peak bytes of the structured path (derivatives, elimination, reduced LU), before allocating.

    Per layer: p parameters, a_in inputs (not counted for the first layer), a
    outputs, a_u = batch x width of u for a closed-form layer (None otherwise).
    A closed-form layer keeps S, D and the factors of P (~ a a_u + 2 a_u^2) and
    needs ~ 3 a_u^2 + 5 a_u a_in + 2 a_in^2 while eliminating; any other layer
    needs the generic oracle's blocks and the factors of A_l + eps I (~ p^2).
    Both keep Q, T, R (a^2 + a a_in + a_in^2).  The reduced system and its banded LU
    (blocks padded to n = max a_l: the system, the band and U's rows) store ~ 16 n^2
    per layer, and a solve ~ 6 p per right-hand side.  Against the measured
    rise of resident memory (float32, 20 layers, 3072 inputs, 1000 classes,
    curvature batch 4) this sum was 0.80 GiB for 0.81 GiB at width 128 and
    8.5 GiB for 9.6 GiB at width 512, so the guard adds a quarter.
    """
    itemsize = torch.empty(0, dtype=dtype).element_size()
    total, n = 0, max(output_counts)
    for l, (p, a_in, a, a_u) in enumerate(zip(param_counts, input_counts, output_counts,
                                               u_counts)):
        a_in = a_in if l > 0 else 0
        if a_u is not None:
            total += a * a_u + 5 * a_u * a_u + 2 * a_u * a + 5 * a_u * a_in + 2 * a_in * a_in
        else:
            total += a * p + 2 * p * p + p * a_in + a * a_in + a_in * a_in + 3 * (p + a_in) ** 2
        total += a * a + a * a_in + a_in * a_in + 16 * n * n + 6 * p
    return total * itemsize


#: A layer without closed forms whose dense blocks would hold more numbers than this
#: gets matrix-free :class:`AutogradLayerBlocks` instead (a convolution's F alone is
#: activations x activations).
DENSE_BLOCK_LIMIT = 2 ** 24

#: Kinds of layers whose blocks are known only by their action: the riccati,
#: structured and generic routes densify them first (:meth:`HessianOperator.densified`).
MATRIX_FREE_KINDS = ("conv", "linear", "autograd")


def _dense_block_numbers(p: int, a_in: int, a: int) -> int:
    """Numbers the dense oracle holds for a layer: J, A, F, C, G and its workspace."""
    return a * p + p * p + p * a_in + a * a_in + a_in * a_in + 3 * (p + a_in) ** 2


def _block_kind(d) -> str:
    """The :class:`LayerSizes` kind of a layer's blocks."""
    if isinstance(d, AffineLayerBlocks):
        return "affine"
    return getattr(d, "kind", "dense")


@dataclass
class LayerSizes:
    """What a route's memory depends on, one entry per layer.

    ``params`` p_l; ``inputs`` a_{l-1} (the first layer's input is data and is
    not charged); ``outputs`` a_l (1 for the loss layer); ``u`` batch x width
    of u = W z + c for a closed-form affine layer, None for any other; ``u_block``
    the width of D's per-example blocks there (1 when D is diagonal); ``examples``
    the batch B of a closed-form affine layer, the im2col rows B x positions of a
    convolution (None for any other).  ``root_rows``: the rows per example of a
    closed-form loss layer's curvature root R_n (:class:`OutputFactor`); None means
    C - 1, the softmax's.  ``kinds`` per layer: 'affine' (closed-form affine), 'conv',
    'linear' (parameter-free: flattening, pooling), 'autograd'
    (:class:`AutogradLayerBlocks`) or 'dense' (:class:`LayerDerivatives`); the kinds in
    :data:`MATRIX_FREE_KINDS` count as dense layers on the routes that write them out
    (riccati, structured, generic).
    """

    params: list
    inputs: list
    outputs: list
    u: list
    u_block: list
    examples: list
    root_rows: Optional[int] = None
    kinds: Optional[list] = None

    def __post_init__(self):
        if self.kinds is None:
            self.kinds = ["affine" if u is not None else "dense" for u in self.u]

    @classmethod
    def of_model(cls, model: TrackedChain, tracked: TrackedForward,
                 closed: Sequence[bool]) -> "LayerSizes":
        """From the layers and the tracked activations, before any derivative exists.

        A layer without closed forms is 'autograd' when its dense blocks would exceed
        :data:`DENSE_BLOCK_LIMIT` numbers, else 'dense'."""
        layers = list(model.layers)
        inputs = [z.numel() for z in tracked.inputs]
        outputs = inputs[1:] + [1]
        params = [sum(p.numel() for p in layer.parameters()) for layer in layers]
        u: list = [None] * len(layers)
        block: list = [None] * len(layers)
        examples: list = [None] * len(layers)
        kinds: list = []
        for l, (layer, c) in enumerate(zip(layers, closed)):
            if c and isinstance(layer, (AffineActivation, *_LOSS_BLOCKS)):
                linear = layer.linear
                examples[l] = inputs[l] // linear.in_features
                u[l] = examples[l] * linear.out_features
                block[l] = linear.out_features if l == len(layers) - 1 else 1
                kinds.append("affine")
            elif c and isinstance(layer, ConvActivation):
                examples[l] = outputs[l] // layer.conv.out_channels
                kinds.append("conv")
            elif c:
                kinds.append("linear")
            else:
                a_in = inputs[l] if l > 0 else 0
                big = _dense_block_numbers(params[l], a_in, outputs[l]) > DENSE_BLOCK_LIMIT
                kinds.append("autograd" if big else "dense")
        rows = block[-1] if closed[-1] and type(layers[-1]) is AffineSquaredError else None
        return cls(params, inputs, outputs, u, block, examples, rows, kinds)

    @classmethod
    def of_groups(cls, groups: Sequence[LayerGroup]) -> "LayerSizes":
        """From stacked derivative blocks already computed (no per-layer views)."""
        params, outputs, u, block, examples, kinds = [], [], [], [], [], []
        for g in groups:
            d = g.blocks
            params += [g.params] * g.count
            outputs += [g.outputs] * g.count
            u += [d.u_gradient[0].numel() if g.closed else None] * g.count
            block += [(1 if d.diagonal else d.u_hessian.shape[-1]) if g.closed else None] * g.count
            examples += [d.num_examples if g.closed else (
                d.out_map.numel() // d.weight.shape[0] if _block_kind(d) == "conv"
                else None)] * g.count
            kinds += [_block_kind(d)] * g.count
        last = groups[-1]
        root = last.blocks.u_hessian_root if last.closed else None
        return cls(params, [0] + outputs[:-1], outputs, u, block, examples,
                   None if root is None else root.shape[-2], kinds)

    @classmethod
    def of_derivatives(cls, derivs: Sequence) -> "LayerSizes":
        """From per-layer derivative blocks already computed."""
        return cls.of_groups([_one_layer_group(l, d) for l, d in enumerate(derivs)])


@dataclass
class RouteCost:
    """Predicted cost of a route: ``setup_flops`` (factorisation), ``solve_flops`` (one
    right-hand side, un-refined), ``bytes`` (peak beyond the derivative blocks), ``ops``
    and ``solve_ops`` (kernels dispatched by the setup and by one solve)."""

    setup_flops: float
    solve_flops: float
    bytes: int
    ops: int
    solve_ops: int = 0

    def seconds(self, device: Optional["DeviceModel"] = None, solves: int = 2) -> float:
        """Time of the setup and ``solves`` solves (a refined one-shot solve takes two)."""
        device = DeviceModel.of("cpu") if device is None else device
        return device.seconds(self.setup_flops + solves * self.solve_flops,
                              self.ops + solves * self.solve_ops)

    def __add__(self, other: "RouteCost") -> "RouteCost":
        return RouteCost(*(a + b for a, b in zip(
            (self.setup_flops, self.solve_flops, self.bytes, self.ops, self.solve_ops),
            (other.setup_flops, other.solve_flops, other.bytes, other.ops, other.solve_ops))))


@dataclass
class DeviceModel:
    """What a route's time is made of on a device: arithmetic at ``flops_per_second``
    and ``seconds_per_kernel`` for each kernel dispatched (launch and framework overhead).

    Rough figures (docs/ALGORITHM.md, "Choosing the route"): a CPU thread 1e10 flop/s in
    float64 (twice in float32), its per-call overhead (a few us) not charged: where it
    would matter the arithmetic is small anyway, and the banded LU's pivoting across
    blocks is the safer default; a GPU 5e11 (float64) or 5e12 (float32) flop/s at 10 us
    per kernel, where a deep chain's kernel count decides.
    """

    flops_per_second: float
    seconds_per_kernel: float

    @classmethod
    def of(cls, device, dtype: torch.dtype = torch.float64) -> "DeviceModel":
        double = dtype == torch.float64
        if torch.device(device).type == "cuda":
            return cls(5e11 if double else 5e12, 1e-5)
        return cls((1e10 if double else 2e10) * torch.get_num_threads(), 0.0)

    def seconds(self, flops: float, kernels: float) -> float:
        return flops / self.flops_per_second + kernels * self.seconds_per_kernel


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def factorization_cost(kind: str, blocks: int, size: int, merge: int = 1) -> RouteCost:
    """Flops and kernels of factoring ``blocks`` blocks of ``size`` (padded) and of one
    solve (``block_tridiagonal``): ``'banded'`` ~ 23/3 n^3 flops and 8 kernels per block,
    8 n^2 flops and 5 kernels per block and column to solve; ``'cyclic'`` on runs of
    ``merge`` blocks (b = merge n, couplings n x n) ~ 2/3 b^3 + 4 b^2 n + 6 n^3 flops per
    block, about 15 kernels per level (log2 of the blocks), 10 per level to solve."""
    N, n = blocks, size
    if kind == "banded":
        return RouteCost(23 / 3 * n ** 3 * N, 8 * n * n * N, 0, 8 * N, 5 * N)
    b, M = merge * n, -(-N // merge)
    levels = max(math.ceil(math.log2(max(M, 1))), 1)
    setup = M * (2 / 3 * b ** 3 + 4 * b * b * n + 6 * n ** 3) + 16 / 3 * b ** 3
    return RouteCost(setup, M * (2 * b * b + 6 * b * n), 0, 15 * levels + 10, 10 * levels + 5)


def choose_factorization(asked: str, blocks: int, size: int, merge: int,
                         device=None, dtype: torch.dtype = torch.float64) -> str:
    """``'banded'`` or ``'cyclic'``: the one asked, or for ``'auto'`` the faster on the
    device by :class:`DeviceModel` (cyclic reduction pays ~1.4x the flops, 1.8x merged,
    for log2 N levels of batched calls instead of N steps)."""
    if asked != "auto":
        return asked
    model = DeviceModel.of("cpu" if device is None else device, dtype)
    return min(("banded", "cyclic"),
               key=lambda kind: factorization_cost(kind, blocks, size, merge).seconds(model))


def _classes_and_batch(sizes: LayerSizes) -> tuple[int, int]:
    """(C, B) of a closed-form loss layer: u_L = B C, its D blocks C x C."""
    classes = sizes.u_block[-1]
    return classes, sizes.u[-1] // classes


def output_rows(sizes: LayerSizes) -> int:
    """m, the rows of U = R J_o that the output-space route factors (m x m).

    A closed-form loss layer: B times the rows of its curvature root (``root_rows``;
    C - 1 for the softmax).  Any other loss layer: at most p_L + a_{L-1}, the size of
    its GGN block, whose eigen-root R has one row per nonzero eigenvalue
    (:func:`dense_output_factor`).
    """
    if sizes.u[-1] is None or not sizes.u_block[-1]:
        return sizes.params[-1] + sizes.inputs[-1]
    classes, batch = _classes_and_batch(sizes)
    rows = sizes.root_rows if sizes.root_rows is not None else max(classes - 1, 1)
    return batch * rows


def _forward_flops(sizes: LayerSizes, l: int) -> float:
    """Flops of one product with layer l's J or F (about one forward pass of the layer).

    Affine or convolutional: 2 x rows x p_l (examples, or im2col rows, times parameters);
    parameter-free: a_in + a_out; dense blocks: 2 a_l (p_l + a_{l-1}); an autograd
    layer's cost is unknown from sizes: 2 a_l sqrt(p_l) (a square-ish linear map) plus
    a_in + a_out."""
    p, a, a_in, kind = sizes.params[l], sizes.outputs[l], sizes.inputs[l], sizes.kinds[l]
    if kind in ("affine", "conv"):
        rows = sizes.examples[l] or 1
        return 2.0 * rows * p
    if kind == "linear":
        return float(a + a_in)
    if kind == "autograd":
        return 2.0 * a * math.sqrt(p) + a + a_in
    return 2.0 * a * (p + a_in)


def output_space_cost(sizes: LayerSizes, dtype: torch.dtype = torch.float64) -> RouteCost:
    """Cost of :class:`OutputSpaceSolver` from layer sizes.

    m = :func:`output_rows`; for a closed-form loss layer (C outputs, w inputs per
    example, its root in closed form) ~ 2 m^2 C + 2 m C w, and per hidden closed-form
    layer (h outputs, m_in inputs per example) ~ 2 m^2 h + 2 m h m_in flops (the Gram
    share and Phi's propagation).  Any other loss layer: the eigen-root of its block,
    ~ 10 q^3 (q = p_L + a_{L-1}), and Phi dense from the start.  A dense layer (sizes.u
    None) turns Phi dense from there down: 2 m a_l p_l + 2 m^2 p_l + 2 m a_l a_{l-1}, and
    a closed-form layer under a dense Phi costs 2 m a_l (B + m + m_in).  A convolution
    or pooling keeps Phi blocked (2 m^2 p_l + 2 m f_l / B, f_l the layer's
    :func:`_forward_flops`), an autograd layer does not (2 m^2 p_l + 4 m f_l).  Cholesky
    m^3 / 3.  A solve: the two sweeps, ~ 8 B p_l per closed-form layer (4 a_l p_l for a
    dense one), plus 2 m^2; kernels: 2 per layer in the setup, 4 per layer in a solve.
    Bytes: Gram, factor and one m x m temporary (3 m^2), Phi (m a_l dense, m h_l
    blocked).
    """
    m = output_rows(sizes)
    if sizes.u[-1] is not None and sizes.u_block[-1]:
        classes, batch = _classes_and_batch(sizes)
        w_last = sizes.inputs[-1] // batch
        setup = 2 * m * m * classes + 2 * m * classes * w_last
        solve = 8 * batch * sizes.params[-1] + 2 * m * m
        ops, phi_bytes, blocked = 40, m * w_last, True
    else:  # batch unknown: B <= a_{L-1} bounds the per-example terms
        batch = sizes.inputs[-1]
        setup = 10 * m ** 3 + 2 * m * m * sizes.params[-1]
        solve = 4 * m * sizes.params[-1] + 2 * m * m
        ops, phi_bytes, blocked = 40, m * sizes.inputs[-1], False
    for l in reversed(range(len(sizes.params) - 1)):
        p, a, a_in, u = sizes.params[l], sizes.outputs[l], sizes.inputs[l], sizes.u[l]
        a_in = a_in if l > 0 else 0
        kind = sizes.kinds[l]
        blocked = blocked and kind in ("affine", "conv", "linear")
        if kind in MATRIX_FREE_KINDS:  # "Convolutional layers", "Matrix-free layers"
            forward = _forward_flops(sizes, l)
            # blocked: each of the m rows touches one example; dense Phi: the whole batch
            setup += 2 * m * m * p + (2 * m * forward / batch if blocked else
                                      (4 if kind == "autograd" else 2) * m * forward)
            phi_bytes = max(phi_bytes, m * max(a, a_in) // (batch if blocked else 1) + m * p)
            solve += 4 * forward
        elif u is not None:
            b = sizes.examples[l]
            h, m_in = a // b, a_in // b
            if blocked:
                setup += 2 * m * m * h + 2 * m * h * m_in + 2 * b * b * (m_in + 1)
                phi_bytes = max(phi_bytes, m * max(h, m_in))
            else:
                setup += 2 * m * a * (b + m + m_in)
                phi_bytes = max(phi_bytes, m * max(a, a_in))
            solve += 8 * b * p
        else:
            setup += 2 * m * a * p + 2 * m * m * p + 2 * m * a * a_in
            solve += 4 * a * p
            phi_bytes = max(phi_bytes, m * max(a, a_in) + m * p)
    setup += m ** 3 / 3
    layers = len(sizes.params)
    return RouteCost(setup, solve, (3 * m * m + 2 * phi_bytes) * _itemsize(dtype),
                     ops + 2 * layers, 20 + 4 * layers)


def structured_cost(sizes: LayerSizes, dtype: torch.dtype = torch.float64,
                    factorization: str = "banded") -> RouteCost:
    """Cost of the structured route (:class:`EliminatedSolver`), same terms.

    Per closed-form layer (a_u = batch x width of u, a outputs, a_in inputs): P's LU,
    h_l B^3 2/3 for a hidden layer (P block diagonal by unit), 2/3 a_u^3 for the loss
    layer; solves with P ~ 2 B a_u (a + a_in) (2 a_u^2 (a + a_in) for the loss layer);
    R ~ 2 a_u a_in^2; a dense layer LU of A_l + eps I, 2/3 p^3 + 2 p^2 (a + a_in).  The
    reduced system (2L blocks padded to n = max a_l) factored by ``factorization``
    (:func:`factorization_cost`; cyclic reduction on pairs), 40 kernels per group of
    stacked layers besides; a solve ~ 8 B p_l per layer and the factored solve.  Bytes:
    :func:`estimate_structured_bytes`.
    """
    batch = _classes_and_batch(sizes)[1] if sizes.u_block[-1] else 1
    setup, solve, groups, previous = 0.0, 0.0, 0, None
    for l, (p, a_in, a, a_u, block) in enumerate(zip(sizes.params, sizes.inputs, sizes.outputs,
                                                     sizes.u, sizes.u_block)):
        a_in = a_in if l > 0 else 0
        if a_u is not None and block == 1:
            setup += 2 / 3 * a_u * batch ** 2 + 2 * batch * a_u * (a + a_in)
        elif a_u is not None:
            setup += 2 / 3 * a_u ** 3 + 2 * a_u ** 2 * (a + a_in)
        if a_u is not None:
            setup += 2 * a_u * a_in * a_in
            solve += 8 * batch * p
        else:
            setup += 2 / 3 * p ** 3 + 2 * p * p * (a + a_in)
            solve += 4 * p * p
        key = (p, a_in, a, a_u, block)
        groups += a_u is None or key != previous
        previous = key
    bytes_ = estimate_structured_bytes(sizes.params, sizes.inputs, sizes.outputs, sizes.u,
                                       dtype)
    merge = 2 if factorization == "cyclic" else 1
    factor = factorization_cost(factorization, 2 * len(sizes.params), max(sizes.outputs), merge)
    return RouteCost(setup, solve, bytes_, 40 * groups, 10 * groups) + factor


def riccati_cost(sizes: LayerSizes, dtype: torch.dtype = torch.float64) -> RouteCost:
    """Cost of the layer-wise route (:class:`RiccatiSolver`), same terms.

    A closed-form layer with B examples, h outputs and q = p / h parameters per output
    pivots on n = min(B, q) h unknowns: forming P (~ 2 a_u B h (r + h)), its LU
    (2/3 n^3), N, K = P^{-1} N and the Schur complement (~ 2 a_u a_in h + 2 n^2 a_in +
    2 n a_in^2), Phi (2 a_u a_in); a dense layer the same with n = p plus J^T Ghat J.
    A solve: ~ 4 a a_in + 4 n a_in + 2 n^2 + 8 B p per layer.  Bytes: P, its factors, K
    and Phi per layer, plus one layer's temporaries.
    """
    setup = solve = 0.0
    stored = peak = 0
    for l, (p, a_in, a, a_u, B) in enumerate(zip(sizes.params, sizes.inputs, sizes.outputs,
                                                  sizes.u, sizes.examples)):
        a_in = a_in if l > 0 else 0
        if a_u is not None:
            h = a_u // B
            n = min(B, p // h) * h
            setup += 2 * a_u * B * h * (n // h + h) + 2 / 3 * n ** 3
            solve += 8 * B * p
        else:
            n = p
            setup += 2 / 3 * n ** 3 + 2 * p * a * (a + p)
            solve += 4 * a * p
        setup += 2 * a_u * a_in * max(a_u // B, 1) if a_u is not None else 2 * p * a * a_in
        setup += 2 * n * n * a_in + 2 * n * a_in * a_in + 2 * a * a_in * (n + 1)
        solve += 4 * a * a_in + 4 * n * a_in + 2 * n * n
        stored += 2 * n * n + n * a_in + a * a_in
        peak = max(peak, 3 * (a_u or a) ** 2 + 2 * a_in ** 2 + 2 * n * a_in)
    return RouteCost(setup, solve, (stored + peak) * _itemsize(dtype), 20 * len(sizes.params))


def _structured_auto_cost(sizes: LayerSizes, dtype: torch.dtype, device) -> RouteCost:
    kind = choose_factorization("auto", 2 * len(sizes.params), max(sizes.outputs), 2, device,
                                dtype)
    return structured_cost(sizes, dtype, kind)


#: The routes ``path='auto'`` weighs against each other when several can run: name ->
#: (eligible(damping, closed_forms, curvature, sizes), cost(sizes, dtype, device)).  A
#: route takes part by registering here; :func:`choose_route` takes the fastest by
#: :class:`DeviceModel` (setup and two solves, a refined one-shot solve).
AUTO_ROUTES: dict = {
    "riccati": (lambda damping, closed, curvature, sizes: damping > 0,
                lambda sizes, dtype, device: riccati_cost(sizes, dtype)),
    "structured": (lambda damping, closed, curvature, sizes: closed and damping > 0,
                   _structured_auto_cost),
    "output": (lambda damping, closed, curvature, sizes: (
        curvature == "ggn" and damping > 0 and sizes is not None and sizes.u[-1] is not None
        and bool(sizes.u_block[-1])),
               lambda sizes, dtype, device: output_space_cost(sizes, dtype)),
    # for chains with convolutions (matrix-free layers: few parameters, states too wide
    # for the other routes), at damping 0 too, where the generic route's lifted blocks
    # would be activations wide; tall-skinny MLPs keep the routes above
    "parameter": (lambda damping, closed, curvature, sizes: sizes is not None and any(
        kind in MATRIX_FREE_KINDS for kind in sizes.kinds),
                  lambda sizes, dtype, device: parameter_space_cost(sizes, dtype)),
}


def estimate_derivative_bytes(sizes: LayerSizes, dtype: torch.dtype) -> int:
    """Peak bytes of the derivative blocks alone: what ``H @ v`` needs.

    A closed-form layer keeps its input, S, r and D: O(a_u + a_in) numbers, and
    a_u h for a loss layer's dense (h, h) blocks of D (``sizes.u_block``); a
    convolution, pooling or autograd layer O(a_in + a_out + p).  A
    dense layer keeps J, F, A, C, G and the oracle's workspace, as in
    :func:`estimate_factorization_bytes`.
    """
    itemsize = torch.empty(0, dtype=dtype).element_size()
    total, peak_workspace = 0, 0
    for l, (p, a_in, a, a_u, h) in enumerate(zip(sizes.params, sizes.inputs, sizes.outputs,
                                                  sizes.u, sizes.u_block)):
        stored_input = a_in
        a_in = a_in if l > 0 else 0
        if a_u is not None:
            total += 3 * a_u + a_in + a + a_u * h
        elif sizes.kinds[l] in MATRIX_FREE_KINDS:  # input, S, r, D and a copy of W
            total += stored_input + 3 * a + p
        else:
            total += a * p + p * p + p * a_in + a * a_in + a_in * a_in
            peak_workspace = max(peak_workspace, 3 * (p + a_in) ** 2)
    return (total + peak_workspace) * itemsize


def _limit(device: torch.device, memory_limit: Optional[int]) -> int:
    """``memory_limit``, or the device's free memory."""
    return _available_bytes(device) if memory_limit is None else memory_limit


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2 ** 62


def _densified_bytes(sizes: LayerSizes, dtype: torch.dtype) -> int:
    """Bytes of the dense blocks of the matrix-free layers, which the riccati and
    structured routes write out first."""
    return _itemsize(dtype) * sum(
        _dense_block_numbers(p, a_in if l else 0, a)
        for l, (p, a_in, a, kind) in enumerate(zip(sizes.params, sizes.inputs, sizes.outputs,
                                                   sizes.kinds)) if kind in MATRIX_FREE_KINDS)


def route_bytes(sizes: LayerSizes, route: str, stage: str, dtype: torch.dtype,
                damping: Optional[float] = None) -> int:
    """Predicted peak bytes of ``stage`` ('derivatives' or 'factorization') of ``route``,
    with the measured quarter on top where the estimate is a route's own."""
    p, a_in, a, u = sizes.params, sizes.inputs, sizes.outputs, sizes.u
    if stage == "derivatives":
        return 5 * estimate_derivative_bytes(sizes, dtype) // 4
    if route in ("output", "riccati", "parameter"):
        cost = (parameter_space_cost(sizes, dtype, damping) if route == "parameter" else
                {"output": output_space_cost, "riccati": riccati_cost}[route](sizes, dtype))
        need = 5 * (estimate_derivative_bytes(sizes, dtype) + cost.bytes) // 4
    elif route == "structured":
        need = 5 * estimate_structured_bytes(p, a_in, a, u, dtype) // 4
    else:
        return estimate_factorization_bytes(p, a, a_in[0], dtype)
    if route in ("riccati", "structured"):
        need += _densified_bytes(sizes, dtype)
    return need


def check_memory(sizes: LayerSizes, route: str, stage: str, dtype: torch.dtype,
                 device: torch.device, memory_limit: Optional[int], advice: str = "",
                 curvature: str = "hessian", damping: Optional[float] = None) -> None:
    """The memory guard: raise before allocating what ``stage`` of ``route`` needs.

    ``stage`` is ``'derivatives'`` (the blocks, enough for ``H @ v``) or
    ``'factorization'`` (blocks, system and factors).
    :class:`InsufficientMemoryError` names the estimate, the route, the free memory
    (``memory_limit`` bytes instead, if given), the block that does not fit and what
    to shrink; for the Hessian where the Gauss-Newton matrix's output-space route
    would fit, it says so.  The structured estimates get a quarter on top
    (measured; see :func:`estimate_structured_bytes`).
    """
    p, a_in, a, u = sizes.params, sizes.inputs, sizes.outputs, sizes.u
    if route == "riccati":
        l = max(range(len(p)), key=lambda l: max(p[l] if u[l] is None else u[l], a_in[l] if l else 0))
        largest = (f"at layer {l + 1} (a = batch x width = {a[l]} outputs, {a_in[l]} inputs, "
                   f"p = {p[l]}); memory grows with (batch x width)^2 per layer (p^2 for a "
                   "layer without closed forms)")
    elif route == "output":
        l = len(p) - 1
        largest = (f"the Gram matrix of the logits, m = batch x rows of the loss curvature's "
                   f"root (classes - 1 for cross-entropy) = {output_rows(sizes)} square; "
                   "memory grows with m^2 (the curvature batch squared)")
    elif route == "parameter":
        kept, eliminated = _parameter_split(sizes, damping)
        largest = (f"the Schur complement of the parameters of layers {kept[0] + 1}.."
                   f"{kept[-1] + 1}, n = {sum(p[l] for l in kept)} square" +
                   (f", beside the output layer's Hessian columns ({p[-1]} x that n)"
                    if eliminated else "") + "; memory grows with n^2")
    elif route == "structured":
        l = max(range(len(p)), key=lambda l: max(u[l] or p[l], a[l], a_in[l] if l else 0))
        largest = (f"at layer {l + 1} (a = batch x width = {a[l]} outputs, {a_in[l]} inputs, "
                   f"p = {p[l]}); memory grows with (batch x width)^2 per layer (p^2 for a "
                   "layer without closed forms)")
    else:
        l = max(range(len(p)), key=lambda l: p[l] + 2 * a[l])
        largest = (f"layer {l + 1} (p={p[l]} parameters, a={a[l]} activations = batch x "
                   "width); cost grows with (p + 2a)^2 per layer")
    need = route_bytes(sizes, route, stage, dtype, damping)
    what = "derivative blocks need" if stage == "derivatives" else "factorisation needs"
    limit = _limit(device, memory_limit)
    if need > limit:
        matrix = "Gauss-Newton" if curvature == "ggn" else "Hessian"
        if any(kind in MATRIX_FREE_KINDS for kind in sizes.kinds) and route != "generic":
            largest += (" (convolutional and other matrix-free layers are written out densely "
                        "on the riccati, structured and generic routes)"
                        if route in ("riccati", "structured") else "")
        hint = ""
        if (curvature != "ggn" and stage != "derivatives" and u[-1] is not None
                and sizes.u_block[-1]):
            output_need = route_bytes(sizes, "output", stage, dtype)
            if output_need <= limit:
                hint = ("curvature='ggn' (the Gauss-Newton matrix) would fit: its output-space "
                        f"route needs about {output_need / 2**30:.2f} GiB. ")
        raise InsufficientMemoryError(
            f"the {route} {matrix} {what} about {need / 2**30:.2f} GiB but only "
            f"{limit / 2**30:.2f} GiB is available on {device}. The largest block is "
            f"{largest}. {advice}{hint}Shrink the curvature batch, narrow the widest layers, "
            "or use fewer layers."
        )


# --------------------------------------------------------------------------
# The operators users hold: H, and (H + eps I)^{-1} by either route
# --------------------------------------------------------------------------


def _check_vector(v, sizes: Sequence[int], like: torch.Tensor, what: str,
                  checks: Optional[_Checks] = None) -> None:
    """``v`` must be (n,) or (n, k >= 1), finite, with the model's dtype and device.

    Finiteness is added to ``checks`` when given (verified with the caller's others)."""
    n = sum(sizes)
    if not isinstance(v, torch.Tensor):
        raise HessianInverseError(f"{what} must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() not in (1, 2) or v.shape[0] != n or (v.dim() == 2 and v.shape[1] == 0):
        raise HessianInverseError(
            f"{what} must have shape ({n},) or ({n}, k) with k >= 1: one entry per model "
            "parameter (torch.cat([p.flatten() for p in model.parameters()])) and one column "
            f"per right-hand side; got {tuple(v.shape)}"
        )
    if v.dtype != like.dtype:
        raise HessianInverseError(
            f"{what} has dtype {v.dtype} but the model has {like.dtype}; convert it with "
            f".to({like.dtype})"
        )
    if v.device != like.device:
        raise HessianInverseError(
            f"{what} is on {v.device} but the model is on {like.device}; move it with "
            f".to('{like.device}')"
        )
    pending = _Checks() if checks is None else checks
    pending.add(_all_finite([v]),
                lambda _: HessianInverseError(f"{what} contains NaN or Inf entries"))
    if checks is None:
        pending.verify()


class _SelfAdjoint(torch.autograd.Function):
    """``v -> M v`` for a fixed symmetric M (H, or a solve with it) as an autograd node.

    The backward of ``M v`` is ``M^T g = M g``: the same map.  Only ``v`` is
    differentiated; M's dependence on the parameters is not (it is held fixed,
    as computed at the tracked point).
    """

    @staticmethod
    def forward(ctx, v: torch.Tensor, apply: Callable) -> torch.Tensor:
        ctx.linear_map = apply
        return apply(v)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # The same map again, itself differentiable (create_graph=True works).
        return _SelfAdjoint.apply(grad_output.contiguous(), ctx.linear_map), None


def _differentiable_in_v(v: torch.Tensor, apply: Callable) -> torch.Tensor:
    if v.requires_grad and torch.is_grad_enabled():
        return _SelfAdjoint.apply(v, apply)
    return apply(v)


def _check_damping(damping, dtype: Optional[torch.dtype] = None) -> float:
    """``damping`` as a float >= 0, finite in ``dtype`` (the model's) when given."""
    try:
        value = float(damping)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise HessianInverseError(f"damping must be a finite number >= 0, got {damping!r}")
    if dtype is not None and value > torch.finfo(dtype).max:
        name = str(dtype).replace("torch.", "")
        raise HessianInverseError(
            f"damping {value:g} overflows the model's {name} (largest {torch.finfo(dtype).max:.3g})"
            f": use a smaller damping, or model.double()")
    return value


def _check_path(path: str) -> None:
    if path not in PATHS:
        raise HessianInverseError(f"path must be one of {PATHS}, got {path!r}")


def default_rtol(dtype: torch.dtype) -> float:
    """The default accuracy contract: backward error at most eps^(2/3).

    About 3.7e-11 in float64 and 2.4e-5 in float32: a few digits above
    rounding.  A solve that meets it is the exact solution for a matrix and
    right-hand side within that relative distance of the given ones, so its
    error is at most about cond(B + eps I) times it; one that misses it is
    refused.
    """
    return torch.finfo(dtype).eps ** (2 / 3)


def choose_route(path: str, damping: Optional[float], closed_forms: bool,
                 curvature: str = "hessian", sizes: Optional[LayerSizes] = None,
                 device=None, dtype: torch.dtype = torch.float64,
                 available: Optional[int] = None) -> str:
    """The one place the route is decided: ``'riccati'``, ``'structured'``,
    ``'generic'``, ``'output'`` or ``'parameter'`` (docs/ALGORITHM.md, "Choosing the
    route").

    A forced ``path`` is kept.  ``'auto'`` weighs the routes of :data:`AUTO_ROUTES`
    that can run with damping > 0 (the layer-wise LDL^T; the structured route when the
    chain has closed-form layers; the output-space route for the GGN with a
    closed-form loss layer; the parameter-space route) by their predicted time on
    ``device`` (:class:`DeviceModel`), among those whose predicted memory
    (:func:`route_bytes`) fits in ``available`` bytes when given (all if none fits),
    and takes the generic route at damping 0, whose pivoting copes with singular blocks
    and the softmax gauge, or for a chain with convolutional or other matrix-free layers
    the parameter-space route.  ``damping=None`` (an operator whose damping is not
    chosen yet) keeps the closed forms.  A route that then fails hands over to the next
    (:meth:`HessianInverse._fall_back`).
    """
    if path != "auto":
        return path
    if damping is None:
        return "structured" if closed_forms else "generic"
    eligible = [name for name, (ok, _) in AUTO_ROUTES.items()
                if ok(damping, closed_forms, curvature, sizes)]
    if len(eligible) < 2 or sizes is None:
        return eligible[0] if eligible else "generic"
    if available is not None:
        eligible = [name for name in eligible if route_bytes(
            sizes, name, "factorization", dtype, damping) <= available] or eligible
    model = DeviceModel.of("cpu" if device is None else device, dtype)
    return min(eligible, key=lambda name: AUTO_ROUTES[name][1](sizes, dtype, device).seconds(model))


def _scipy_operator(op: "HessianOperator", apply: Callable[[torch.Tensor], torch.Tensor]):
    from scipy.sparse.linalg import LinearOperator
    import numpy as np

    def matvec(x):
        t = torch.as_tensor(np.asarray(x), dtype=op.dtype, device=op.device)
        return apply(t.reshape(op.num_params, -1)).cpu().double().numpy()

    return LinearOperator(op.shape, matvec=lambda x: matvec(x)[:, 0], matmat=matvec,
                          rmatvec=lambda x: matvec(x)[:, 0], dtype=np.float64)


class HessianOperator:
    """The Hessian ``H`` of a tracked chain's loss, held through its layer blocks.

    Build it with :func:`hessian_operator`.  ``H @ v`` costs two sweeps of
    block products (and is differentiable in v); :meth:`factorize` gives
    ``(H + damping I)^{-1}`` and reuses these derivatives for any number of
    damping values.  With ``curvature == 'ggn'`` the blocks are the
    Gauss-Newton matrix's and "H" reads "GGN" throughout.  ``groups`` holds the
    blocks as :class:`LayerGroup` s (runs of equal closed-form layers stacked);
    ``derivs`` one :class:`LayerDerivatives` (dense) or :class:`AffineLayerBlocks`
    (closed form, views into the stack) per layer; ``gauge`` the loss layer's known null
    basis N, or None.  ``pending``: checks of the inputs not yet verified (the first
    use verifies them together with its own: one host synchronisation).

    A snapshot of the tracked point: the blocks hold copies of what they need
    (weights included), so after the parameters change (an optimizer step,
    ``p.add_(...)``) ``H @ v`` still answers exactly for the point it was
    computed at, as do factorisations made from it.  For the new point, run
    the tracked forward pass again and build a new operator.
    """

    def __init__(self, groups: list, gauge,
                 curvature: str = "hessian", memory_limit: Optional[int] = None,
                 pending: Optional[_Checks] = None):
        self.groups = groups
        self._gauge = gauge
        self.curvature = curvature
        self.memory_limit = memory_limit
        self.pending = _Checks() if pending is None else pending
        self.param_sizes = [g.params for g in groups for _ in range(g.count)]
        self.num_params = sum(self.param_sizes)
        self._like = groups[-1].blocks.weight if groups[-1].closed else groups[-1].blocks.J
        self._derivs: Optional[list] = None

    @property
    def derivs(self) -> list:
        """Per-layer blocks (views into the stacked groups), built on first use."""
        if self._derivs is None:
            self._derivs = [g.layer(i) for g in self.groups for i in range(g.count)]
        return self._derivs

    @property
    def sizes(self) -> LayerSizes:
        return LayerSizes.of_groups(self.groups)

    @property
    def gauge(self) -> Optional[torch.Tensor]:
        """The loss layer's known null basis N (p_L, k), or None.  Given as a tensor or
        as a function computing it on first use (p_L x k is large for a classifier
        over convolutional features, and only damping 0 and projections need it)."""
        if callable(self._gauge):
            self._gauge = self._gauge()
        return self._gauge

    @property
    def symbol(self) -> str:
        """The matrix's name in messages: ``'H'`` or ``'GGN'``."""
        return "GGN" if self.curvature == "ggn" else "H"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    @property
    def dtype(self) -> torch.dtype:
        return self._like.dtype

    @property
    def device(self) -> torch.device:
        return self._like.device

    @property
    def has_closed_forms(self) -> bool:
        return any(g.closed for g in self.groups)

    @property
    def matrix_free_layers(self) -> list[int]:
        """Layers (0-based) whose blocks are known only by their action (convolutions,
        pooling, autograd products): the riccati, structured and generic routes write
        them out densely first."""
        return [g.start for g in self.groups if not g.closed and isinstance(g.blocks, LayerBlocks)]

    def require_layerwise(self, what: str) -> None:
        """Refuse, naming the layer, an operation that factors per-layer blocks densely
        (the layer-wise Cholesky of the trust region, spectral counts) on a chain with
        matrix-free layers, whose dense blocks are activations x activations."""
        RiccatiFactor.check_blocks(self.groups, what)

    def split(self, v: torch.Tensor, what: str = "v") -> list[torch.Tensor]:
        """Validate ``v`` ((n,) or (n, k)) and split it into per-layer (p_l, k) blocks."""
        _check_vector(v, self.param_sizes, self._like, what)
        return list(v.detach().reshape(self.num_params, -1).split(self.param_sizes))

    def project_out_gauge(self, v: torch.Tensor) -> torch.Tensor:
        """``v - P_N v`` for v (n,) or (n, k); v itself when there is no known gauge."""
        if self.gauge is None:
            return v
        last = self.param_sizes[-1]
        tail = v[-last:]
        return torch.cat([v[:-last], tail - self.gauge @ (self.gauge.T @ tail)])

    def densified(self, keep_affine: bool = False) -> "HessianOperator":
        """The same matrix with closed-form and matrix-free layers written out as dense
        blocks (what the generic route factors).

        Guarded by the generic route's memory estimate before writing them out.
        ``keep_affine``: keep closed-form affine groups, which the riccati and
        structured routes use as they are (their own guard has run).
        """
        def dense(g):
            return g.closed and not keep_affine or isinstance(g.blocks, LayerBlocks) and not g.closed

        if not any(dense(g) for g in self.groups):
            return self
        if not keep_affine:
            check_memory(self.sizes, "generic", "factorization", self.dtype, self.device,
                         self.memory_limit, "Use damping > 0, which allows the structured path, "
                         "or: ", self.curvature)
        groups = []
        for g in self.groups:
            if not dense(g):
                groups.append(g)
                continue
            for i in range(g.count):
                d = g.layer(i)
                groups.append(LayerGroup(g.start + i, g.start + i + 1, d.densify(), g.has_r,
                                         g.has_d))
        return HessianOperator(groups, self._gauge, self.curvature, self.memory_limit,
                               self.pending)

    def to(self, dtype: torch.dtype) -> "HessianOperator":
        """The same blocks in another floating dtype (for a lower-precision factorisation)."""
        if dtype == self.dtype:
            return self
        gauge = None if self.gauge is None else self.gauge.to(dtype)
        return HessianOperator([g.to(dtype) for g in self.groups], gauge, self.curvature,
                               self.memory_limit, self.pending)

    def apply(self, x: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
        """``(H + damping I) x`` for x (n, k): the exact product, two sweeps over the groups."""
        out = _flat(_sweeps(self.groups, _views(self.groups, x)))
        return out.add_(x, alpha=damping) if damping else out

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for v (n,) or (n, k); differentiable in v."""
        _check_vector(v, self.param_sizes, self._like, "v", self.pending)
        self.pending.verify()
        return _differentiable_in_v(
            v, lambda u: self.apply(u.detach().reshape(self.num_params, -1)).reshape(u.shape))

    __matmul__ = matmul

    def factorize(self, damping: float = 0.0, check_condition: bool = True,
                  path: str = "auto", rtol: Optional[float] = None,
                  on_inaccurate: str = "raise", factor_dtype="auto",
                  factorization: str = "auto", max_refinement: int = 10
                  ) -> "HessianInverse":
        """``(H + damping I)^{-1}`` (``H^+`` on the softmax gauge when damping is 0).

        ``path``: ``'riccati'`` (the layer-wise LDL^T) and ``'structured'`` (every
        layer's parameters eliminated) need damping > 0, ``'generic'`` factors the
        lifted system, ``'output'`` the GGN in output space, ``'auto'`` decides by
        :func:`choose_route`.  ``rtol``, ``on_inaccurate``, ``factor_dtype``,
        ``factorization`` and ``max_refinement`` (corrections per solve; 0: the
        un-refined solve, still held to ``rtol``): see :class:`HessianInverse`.
        """
        return HessianInverse(self, damping, check_condition, path, rtol, on_inaccurate,
                              max_refinement, factor_dtype=factor_dtype,
                              factorization=factorization)

    def as_linear_operator(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out)."""
        return _scipy_operator(self, self.matmul)


def _singular_message(what: str, detail: str, damping: float) -> str:
    hint = ("use damping > 0 (e.g. 1e-4 relative to the curvature scale)"
            if damping == 0 else "increase the damping")
    return (f"{what} is singular to working precision ({detail}). With too little data "
            "for the parameter count (batch small against the layer sizes), or an "
            f"eigenvalue of H at -damping, there is no unique solution: {hint}.")


#: Values of the ``factorization`` keyword: the block-tridiagonal factorisation used.
FACTORIZATIONS = ("auto", "banded", "cyclic")


class CyclicReductionFailed(SingularHessianError):
    """Cyclic reduction met a zero pivot (it pivots only within blocks)."""


def _factor(system: BlockTridiagonal, what: str, damping: float, factorization: str,
            merge: int, checks: _Checks):
    """:func:`banded_lu` or :func:`cyclic_reduction`, no host synchronisation: the pivot
    check goes into ``checks``, a zero pivot turned into advice (a cyclic one into
    :class:`CyclicReductionFailed`, on which the caller turns to the banded LU)."""
    if factorization == "cyclic":
        factor = cyclic_reduction(system, merge, check=False)
    else:
        factor = banded_lu(system, check=False)

    def error(_):
        try:
            factor.check()
        except SingularSystemError as err:
            if factorization == "cyclic":
                return CyclicReductionFailed(f"{err}")
            return SingularHessianError(_singular_message(what, str(err), damping))
        return SingularHessianError(what)

    checks.add(factor.smallest_pivot > 0.0, error)
    return factor


def _system_name(operator: HessianOperator, damping: float, gauge) -> str:
    B = operator.symbol
    if damping:
        return f"{B} + {damping:g} I"
    return f"{B} + P_N ({B} gauge-fixed on the softmax null space)" if gauge is not None else B


class LiftedSolver:
    """The generic route: the lifted system, factored by pivoted banded LU.

    Works for any chain and any damping >= 0; with damping 0 and a known
    gauge N it factors ``H + N N^T`` (Moore-Penrose; docs/ALGORITHM.md, "The
    softmax gauge").  With ``check_condition`` the factorisation is refused
    when the Hager-Higham estimate ``rcond`` of the lifted system's reciprocal
    condition number is below the dtype's eps.  Needs dense blocks (a
    :class:`HessianOperator` after :meth:`~HessianOperator.densified`).
    """

    route = "generic"

    def __init__(self, operator: HessianOperator, damping: float,
                 gauge: Optional[torch.Tensor], check_condition: bool,
                 factorization: str = "banded", checks: Optional[_Checks] = None):
        pending = _Checks() if checks is None else checks
        self.operator = operator
        self.system = assemble_lifted_system(operator.derivs, damping, gauge)
        what = _system_name(operator, damping, gauge)
        self.lu = _factor(self.system, what, damping, factorization, 1, pending)
        pending.verify()
        self.rcond = None
        if check_condition:
            self.rcond = reciprocal_condition(self.system, self.lu)
            if not self.rcond > torch.finfo(operator.dtype).eps:
                raise SingularHessianError(_singular_message(
                    what, f"reciprocal condition number of the lifted system ~ {self.rcond:.1e}",
                    damping))

    def solve_once(self, b: torch.Tensor) -> torch.Tensor:
        """One pass through the factors: (n, k) right-hand sides -> (n, k) solutions."""
        sizes = self.operator.param_sizes
        return _unlift(sizes, solve_factored(self.lu, _lift(self.system, sizes, b)))


class EliminatedSolver:
    """The structured route: every layer's parameters eliminated, damping > 0.

    ``eliminated`` holds each group's :class:`EliminatedLayer` (stacked); ``system`` is
    the reduced block-tridiagonal system (:func:`assemble_reduced_system`),
    equilibrated (``scales``, :func:`equilibrate`) and factored by the pivoted
    :func:`banded_lu` (or cyclic reduction on pairs of blocks).  A solve costs
    O(sum_l a_l^2 + sum_l a_l p_l) per vector.  Eliminating x_l divides by
    eps, so the reduced system can be worse conditioned than ``H + eps I``
    itself: :class:`HessianInverse` refines every solve against the exact
    product (docs/ALGORITHM.md, "Parameter elimination").
    """

    route = "structured"
    rcond = None

    def __init__(self, operator: HessianOperator, damping: float, factorization: str = "banded",
                 checks: Optional[_Checks] = None):
        if not damping > 0:
            raise HessianInverseError(
                f"the structured path needs a finite damping > 0 (it inverts A_l + damping I "
                f"for every layer); got {damping}. Use path='generic' or path='auto' for damping 0"
            )
        pending = _Checks() if checks is None else checks
        self.operator = operator
        self.groups = operator.groups
        self.eliminated = eliminate_layers(self.groups, damping, pending)
        self.system, self.scales = equilibrate(
            assemble_reduced_system(self.groups, self.eliminated), inplace=True)
        # merge=2 for cyclic reduction: the y-blocks R_{l+1} can be zero (always the last).
        self.lu = _factor(self.system, f"{operator.symbol} + {damping:g} I", damping,
                          factorization, 2, pending)
        if checks is None:
            pending.verify()

    def solve_once(self, b: torch.Tensor) -> torch.Tensor:
        """Reduced right-hand side, one pass through the factors, parameters recovered."""
        g = _views(self.groups, b)
        scales = self.scales.unsqueeze(-1)
        rhs = _reduced_rhs(self.groups, self.eliminated, self.system, g).mul_(scales)
        reduced = solve_factored(self.lu, rhs).mul_(scales)
        return _flat(_recover_parameters(self.groups, self.eliminated, g, reduced))


class RiccatiSolver:
    """The layer-wise route: ``B + eps I = L^T diag(P_l) L`` (:class:`RiccatiFactor`).

    Works for any chain; damping > 0, or 0 with the gauge fixed (``gauge``: ``B +
    N N^T``).  P_l is factored by LU for the Hessian (indefinite in general) and by
    Cholesky for the damped GGN (positive definite; LU where Cholesky fails to
    rounding).  A solve is two sweeps of one product per layer.  Nothing pivots
    across layers, so a singular P_l raises :class:`EliminationError` even where
    ``B + eps I`` is invertible, and :class:`HessianInverse` refines every solve
    against the exact product (docs/ALGORITHM.md, "Layer-wise LDL^T").
    """

    route = "riccati"
    rcond = None

    def __init__(self, operator: HessianOperator, damping: float,
                 gauge: Optional[torch.Tensor] = None, checks: Optional[_Checks] = None):
        pending = _Checks() if checks is None else checks
        self.operator = operator
        kind = "cholesky" if operator.curvature == "ggn" and damping > 0 else "lu"
        self.factor = RiccatiFactor(operator.groups, damping, kind, gauge)
        if kind == "cholesky" and not self.factor.ok:  # Cholesky failed to rounding: LU
            self.factor = RiccatiFactor(operator.groups, damping, "lu", gauge)

        def error(ok):
            layer = int((~ok).nonzero()[-1]) + 1
            return EliminationError(
                f"layer {layer}: the layer-wise factorisation of {operator.symbol} + "
                f"{damping:g} I broke down (its pivot block P_l = A_l + damping I + "
                "J_l^T Ghat_l J_l is singular to working precision). The route does not "
                "pivot across layers: path='structured' or 'generic' does, or use another "
                "damping.")

        pending.add(~self.factor.broken, error)
        if checks is None:
            pending.verify()

    def solve_once(self, b: torch.Tensor) -> torch.Tensor:
        """Both sweeps: (n, k) right-hand sides -> (n, k) solutions."""
        return _flat(self.factor.solve_groups(_views(self.operator.groups, b)))


class OutputSpaceSolver:
    """The output-space route: (GGN + eps I)^{-1} by Woodbury in the logits, damping > 0.

    GGN = U^T U, U = R J_o (m = B (C - 1) rows for softmax cross-entropy, B C for the
    squared error), and
    (U^T U + eps I)^{-1} v = (v - U^T (eps I + U U^T)^{-1} U v) / eps.  Setup:
    ``gram`` = U U^T (:func:`logit_gram`, which keeps U's columns compactly: ``jacobian``)
    and its damped Cholesky factor ``cholesky``; O(sum_l (m^2 h_l + m h_l h_{l-1}) + m^3)
    time, O(m^2 + sum_l m h_l) memory beyond the operator's blocks.  A solve: U v,
    a Cholesky solve, U^T y, O(sum_l B r p_l + m^2) per right-hand side in a few batched
    calls per group (no sweep over layers).  Not backward
    stable on its own (the subtraction loses about u cond(GGN + eps I) relative, u the
    unit roundoff), so :class:`HessianInverse` refines it like the structured route.
    Needs ``operator.curvature == 'ggn'`` (for the Hessian, U^T U misses the network's own
    curvature); any hidden layers; a closed-form ``AffineCrossEntropy`` or
    ``AffineSquaredError``, or any dense GGN loss layer.
    """

    route = "output"
    rcond = None

    def __init__(self, operator: HessianOperator, damping: float,
                 checks: Optional[_Checks] = None):
        if operator.curvature != "ggn":
            raise HessianInverseError(
                f"the output-space path solves with the Gauss-Newton matrix only (GGN = U^T U);"
                f" got curvature={operator.curvature!r}. Use curvature='ggn' or another path")
        if not (math.isfinite(damping) and damping > 0):
            raise HessianInverseError(
                f"the output-space path needs a finite damping > 0 (eps I + U U^T must be "
                f"positive definite; at 0 the GGN is singular on the softmax gauge); got "
                f"{damping}. Use path='generic' or path='auto' for damping 0")
        pending = _Checks() if checks is None else checks
        self.operator = operator
        self.damping = float(damping)
        self.factor = output_factor(operator.groups[-1].layer(0))
        self.jacobian = logit_gram(operator.groups, self.factor)
        self.gram = self.jacobian.gram
        self.cholesky = _damped_cholesky(self.gram, self.damping,
                                         f"{operator.symbol} + {damping:g} I", pending)
        if checks is None:
            pending.verify()

    @property
    def rows(self) -> int:
        """m, the rows of U (the size of the factored system)."""
        return self.gram.shape[0]

    def solve_once(self, b: torch.Tensor) -> torch.Tensor:
        """One un-refined solve: (n, k) right-hand sides -> (n, k) solutions."""
        groups, U = self.operator.groups, self.jacobian
        y = torch.cholesky_solve(U.apply(groups, _views(groups, b)), self.cholesky)
        return (b - _flat(U.apply_t(groups, y))) / self.damping


def _relative(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """max over columns j of ||num_j|| / ||den_j|| for (n, k) tensors (0/0 = 0), 0-dim."""
    num_norm, den_norm = num.norm(dim=0), den.norm(dim=0)
    ratio = torch.where(den_norm > 0, num_norm / den_norm,
                        torch.where(num_norm > 0, math.inf, 0.0))
    return ratio.amax()


class _CastSolver:
    """A solver factored in a lower precision, solving in the caller's (mixed precision)."""

    def __init__(self, solver, dtype: torch.dtype):
        self.solver, self.dtype = solver, dtype
        self.route, self.rcond = solver.route, solver.rcond

    def solve_once(self, b: torch.Tensor) -> torch.Tensor:
        return self.solver.solve_once(b.to(self.solver.operator.dtype)).to(self.dtype)


def _largest_block(operator: HessianOperator, route: str) -> int:
    """The block size of the system ``route`` factors (a_l, the pivot size, or p_l + 2 a_l)."""
    sizes = operator.sizes
    if route == "structured":
        return max(sizes.outputs)
    if route == "riccati":
        return max(min(B, p // (u // B)) * (u // B) if u is not None else p
                   for p, u, B in zip(sizes.params, sizes.u, sizes.examples))
    if route == "parameter":
        return sum(sizes.params[:-1])
    return max(p + 2 * a for p, a in zip(sizes.params, sizes.outputs))


class HessianInverse:
    """``(H + damping I)^{-1}`` as a factorised operator; ``inv @ v`` solves.

    Build it with :func:`factorize` or :meth:`HessianOperator.factorize`.  The
    factors belong to ``solver``, chosen by :func:`choose_route`: a
    :class:`LiftedSolver` (``route == 'generic'``; with ``check_condition``
    its condition estimate ``rcond`` must exceed eps) or an
    :class:`EliminatedSolver` (``route == 'structured'``; with
    ``check_condition`` and ``probe``, a refined solve of a fixed random
    right-hand side must meet the contract below: its residual is
    ``probe_error``).  With ``path='auto'`` a structured factorisation or
    solve that fails warns and falls back to the generic route, if that fits
    in memory.

    The accuracy contract, the same on both routes: every solve is refined
    against the exact product ``A x = (H + damping I) x`` (block sweeps, not
    the factored system) while that lowers its residual r = v - A x, and its
    measured normwise backward error ``max_j ||r_j|| / (||A|| ||x_j|| +
    ||v_j||)`` (``backward_error``; ||A|| by power iteration, a lower bound, so
    the figure errs high) must be at most ``rtol`` (default
    :func:`default_rtol`), or :class:`InaccurateSolveError` is raised with the
    figure and the advice (``on_inaccurate='warn'`` warns and returns the
    result instead).  ``residual`` keeps ``max_j ||r_j|| / ||v_j||``; the
    error of x is at most about cond(A) times the backward error.

    Mixed precision (``factor_dtype``): a float64 problem may be factored in
    float32 (about twice the speed of the factorisation) and refined in
    float64 against the exact product, which restores float64 accuracy
    whenever float32's factors contract at all; if the contract is missed the
    factorisation is redone in float64, silently.  ``'auto'`` (default) does
    this for float64 problems whose factored blocks are 512 or wider, where
    it pays; ``None`` never; ``torch.float32`` always.  ``factor_dtype`` says
    which ran.

    ``factorization``: ``'banded'`` (the pivoted banded LU), ``'cyclic'`` (block cyclic
    reduction: log2 depth levels of batched calls, for GPUs; it pivots only within
    blocks, so a zero pivot or a missed contract hands over to the banded LU), or
    ``'auto'`` (default): the faster on the model's device by
    :func:`choose_factorization`.

    With ``damping == 0`` and a loss layer with known null directions N (the
    softmax gauge), this is the Moore-Penrose ``H^+`` computed exactly as
    ``(H + N N^T)^{-1} (v - N N^T v)``: the minimum-norm Newton direction.
    Vectors, or (n, k) matrices of them, are solved with the stored factors;
    the solve is differentiable in v (its backward is the same solve; H's own
    dependence on the parameters is not differentiated).  Each column of v is
    scaled by a power of two internally, so huge or tiny v (1e-300 .. 1e300)
    are solved as accurately as v of order 1, and ``inv @ (2**k * v)`` is
    exactly ``2**k * (inv @ v)``.

    Like its :class:`HessianOperator`, a snapshot of the tracked point: later
    changes to the parameters do not reach it.
    """

    def __init__(self, operator: HessianOperator, damping: float = 0.0,
                 check_condition: bool = True, path: str = "auto",
                 rtol: Optional[float] = None, on_inaccurate: str = "raise",
                 max_refinement: int = 10, probe: bool = True, factor_dtype="auto",
                 factorization: str = "auto"):
        _check_path(path)
        if factorization not in FACTORIZATIONS:
            raise HessianInverseError(
                f"factorization must be one of {FACTORIZATIONS}, got {factorization!r}")
        self._factorization_asked = factorization
        if on_inaccurate not in ("raise", "warn"):
            raise HessianInverseError(
                f"on_inaccurate must be 'raise' or 'warn', got {on_inaccurate!r}")
        rtol = default_rtol(operator.dtype) if rtol is None else rtol
        if not (isinstance(rtol, (int, float)) and 0 < rtol < math.inf):
            raise HessianInverseError(f"rtol must be a number > 0, got {rtol!r}")
        self.operator = operator
        self.damping = _check_damping(damping, operator.dtype)
        self.check_condition = check_condition
        self.path = path
        self.rtol = float(rtol)
        self.on_inaccurate = on_inaccurate
        self.max_refinement = max_refinement
        self.gauge = operator.gauge if self.damping == 0.0 else None
        self.residual: Optional[float] = None
        self.correction: Optional[float] = None
        self.backward_error: Optional[float] = None
        self.probe_error: Optional[float] = None
        self._norm: Optional[float] = None
        sizes = operator.sizes
        route = choose_route(path, self.damping, operator.has_closed_forms, operator.curvature,
                             sizes, operator.device, operator.dtype,
                             _limit(operator.device, operator.memory_limit))
        self._factor_dtype_asked = factor_dtype
        self.factor_dtype = self._resolve_factor_dtype(factor_dtype, route)
        self._cyclic_failed = False
        self.solver = self._first_solver(route, probe)

    def _resolve_factorization(self, route: str) -> str:
        """'banded' or 'cyclic' for the system ``route`` factors (:func:`choose_factorization`;
        banded once cyclic reduction failed here)."""
        if self._cyclic_failed:
            return "banded"
        sizes, asked = self.operator.sizes, self._factorization_asked
        if route == "structured":
            blocks, size, merge = 2 * len(sizes.params), max(sizes.outputs), 2
        else:
            blocks, merge = len(sizes.params), 1
            size = max(p + 2 * a for p, a in zip(sizes.params, sizes.outputs))
        return choose_factorization(asked, blocks, size, merge, self.operator.device,
                                    self.factor_dtype)

    def _resolve_factor_dtype(self, asked, route: str) -> torch.dtype:
        dtype = self.operator.dtype
        if route in ("output", "parameter"):  # the costly part is not the factorisation
            return dtype
        if asked == "auto":
            wide = _largest_block(self.operator, route) >= 512
            return torch.float32 if dtype == torch.float64 and wide else dtype
        if asked is None:
            return dtype
        if asked not in (torch.float32, torch.float64) or asked.itemsize > dtype.itemsize:
            raise HessianInverseError(
                f"factor_dtype must be 'auto', None, torch.float32 or torch.float64, and not "
                f"wider than the model's {dtype}; got {asked!r}")
        return asked

    def _first_solver(self, route: str, probe: bool):
        """The solver for ``route`` in ``factor_dtype``; full precision, then (``'auto'``)
        the generic route, when that fails."""
        self.factorization = self._resolve_factorization(route)
        try:
            return self._build(route, probe)
        except SingularHessianError as err:
            if self.factorization == "cyclic" and route in ("structured", "generic"):
                if isinstance(err, CyclicReductionFailed):
                    warnings.warn(f"{err}; factoring with the banded LU instead.", RuntimeWarning)
                self._cyclic_failed = True
                return self._first_solver(route, probe)
            if self.factor_dtype != self.operator.dtype:
                self.factor_dtype = self.operator.dtype
                return self._first_solver(route, probe)
            if route != "generic":
                return self._fall_back(err, route, probe)
            raise

    def _build(self, route: str, probe: bool):
        """Factor ``route`` in ``factor_dtype``; the structured, layer-wise and
        parameter-space routes are probed if asked."""
        op, low = self.operator, self.factor_dtype
        gauge = None if self.gauge is None else self.gauge.to(low)
        checks = op.pending  # the inputs' checks, verified with the factorisation's
        if route != "generic":
            check_memory(op.sizes, route, "factorization", low, op.device, op.memory_limit,
                         curvature=op.curvature, damping=self.damping)
        if route == "generic":
            solver = LiftedSolver(op.densified().to(low), self.damping, gauge, self.check_condition,
                                  self.factorization, checks)
        elif route == "output":
            solver = OutputSpaceSolver(op, self.damping, checks)
        elif route == "parameter":
            solver = ParameterSpaceSolver(op, self.damping, self.gauge, checks)
        elif route == "riccati":
            solver = RiccatiSolver(op.densified(keep_affine=True).to(low), self.damping, gauge,
                                   checks)
        else:
            solver = EliminatedSolver(op.densified(keep_affine=True).to(low), self.damping,
                                      self.factorization, checks)
        checks.verify()
        if low != op.dtype:
            solver = _CastSolver(solver, op.dtype)
        if route in ("structured", "riccati", "parameter") and self.check_condition and probe:
            generator = torch.Generator(device=op.device).manual_seed(0)
            b = torch.randn(op.num_params, 1, generator=generator, dtype=op.dtype,
                            device=op.device)
            self.probe_error = self._check(b, *self._refine(solver, b))
            if not self.probe_error <= self.rtol:
                raise EliminationError(
                    "acceptance probe (a random right-hand side): "
                    + self._inaccurate_message(self.probe_error, route)
                    + " Eliminating without pivoting across layers can also lose accuracy "
                    "on its own: path='generic' (pivoted on the full lifted system) tells "
                    "the two apart.")
        return solver

    def _fall_back(self, err: SingularHessianError, failed: str, probe: bool = False):
        """``path='auto'`` after the ``failed`` route failed: warn, then the next route
        of output, riccati, structured (with closed forms), generic (probed like the
        first, if ``probe``); after the output route, the parameter route on a chain
        with matrix-free layers.  The parameter route pivots across all its
        parameters, so its failure is final."""
        if self.path != "auto" or failed == "parameter":
            raise err
        self.probe_error, self.factor_dtype = None, self.operator.dtype
        following = {"output": "riccati", "riccati": "structured"}.get(failed)
        if failed == "output" and self.operator.matrix_free_layers:
            following = "parameter"  # the riccati route would write out conv-sized blocks
        if following == "structured" and not (self.operator.has_closed_forms and self.damping):
            following = None
        if following is not None:
            warnings.warn(f"{err} Falling back to the {following} path.", RuntimeWarning)
            return self._first_solver(following, probe)
        try:
            dense = self.operator.densified()
        except InsufficientMemoryError:
            raise err from None
        warnings.warn(f"{err} Falling back to the generic path.", RuntimeWarning)
        self._cyclic_failed, self.factorization = True, "banded"
        return LiftedSolver(dense, self.damping, self.gauge, self.check_condition)

    def _name(self) -> str:
        return _system_name(self.operator, self.damping, self.gauge)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        """The exact product with what the factors invert: ``H + damping I`` [+ N N^T]."""
        out = self.operator.apply(x, self.damping)
        if self.gauge is not None:
            last = self.gauge.shape[0]
            out[-last:] += self.gauge @ (self.gauge.T @ x[-last:])
        return out

    def _refine(self, solver, b: torch.Tensor) -> tuple:
        """A solve refined against the exact product.

        Corrections continue while each at least halves the relative residual,
        up to ``max_refinement``, and stop once it is at rounding level (4 eps).
        Returns x, its residual r = b - A x, r's size relative to b, and the size of the
        last correction computed relative to x (0 if none was needed): an estimate of
        x's relative error, which stays O(1) when A is singular to working precision.
        The first correction is computed before its need is known, so that the common
        case reads its figures back from the device once.
        """
        eps = torch.finfo(self.operator.dtype).eps
        x = solver.solve_once(b)
        r = b - self._apply(x)
        if self.max_refinement < 1:
            return x, r, float(_relative(r, b)), 0.0
        steps, correction, stalled = 0, 0.0, False
        while steps < self.max_refinement:
            dx = solver.solve_once(r)
            x_new = x + dx
            r_new = b - self._apply(x_new)
            figures = [_relative(dx, x_new), _relative(r_new, b)]
            if not steps:
                figures.append(_relative(r, b))
                step_size, res_new, res = torch.stack(figures).tolist()
                if not res > 4 * eps:
                    break
            else:
                step_size, res_new = torch.stack(figures).tolist()
            steps, correction = steps + 1, step_size
            if not res_new < res:
                break
            stalled = not res_new < res / 2
            x, r, res = x_new, r_new, res_new
            if stalled or not res > 4 * eps:
                break
        return x, r, res, correction

    def _norm_estimate(self, steps: int = 8) -> float:
        """A lower bound on ||A||_2 by power iteration (``steps`` exact products, cached)."""
        if self._norm is None:
            op = self.operator
            generator = torch.Generator(device=op.device).manual_seed(1)
            q = torch.randn(op.num_params, 1, generator=generator, dtype=op.dtype,
                            device=op.device)
            for _ in range(steps):
                q = self._apply(q / q.norm())
            self._norm = float(q.norm())
        return self._norm

    def _check(self, b: torch.Tensor, x: torch.Tensor, r: torch.Tensor, residual: float,
               correction: float) -> float:
        """The contract's figure for a refined solve: its backward error, or inf if undetermined.

        The backward error is ``max_j ||r_j|| / (||A|| ||x_j|| + ||b_j||)``
        (the cheap bound ||r_j|| / ||b_j|| when that already meets ``rtol``).
        A singular A can still give a small backward error, so a solve whose
        last refinement correction exceeds eps^(1/4) of x (refinement that
        does not converge: A singular to working precision) counts as inf.
        """
        self.residual = residual
        self.correction = correction
        if not correction <= torch.finfo(self.operator.dtype).eps ** 0.25:
            return math.inf
        if self.residual <= self.rtol:
            return self.residual
        eta = r.norm(dim=0) / (self._norm_estimate() * x.norm(dim=0) + b.norm(dim=0))
        return float(torch.nan_to_num(eta, nan=math.inf).max())

    def _inaccurate_message(self, eta: float, route: str) -> str:
        dtype = str(self.operator.dtype).replace("torch.", "")
        if math.isinf(eta):
            found = (f"iterative refinement did not converge (last correction {self.correction:.1e}"
                     f" of the solution): {self._name()} is singular to working precision")
        else:
            found = (f"the solve's backward error ||v - A x|| / (||A|| ||x|| + ||v||) is "
                     f"{eta:.1e} (relative residual {self.residual:.1e}), above rtol = "
                     f"{self.rtol:.1e}")
        wider = ("use float64 (model.double()) or increase the damping"
                 if self.operator.dtype != torch.float64 else "increase the damping")
        return (f"{self._name()}: {found} ({route} route, {dtype}). Too ill-conditioned "
                f"for {dtype} at this damping: {wider}, or pass a looser rtol= (or "
                "on_inaccurate='warn' to take the result anyway).")

    def _escalate(self, eta: float):
        """After a solve that missed the contract: the banded LU if cyclic reduction
        factored, float64 factors if they were lower, else ``'auto'``'s next route;
        None when nothing is left to try."""
        try:
            if self.factorization == "cyclic" and self.route in ("structured", "generic"):
                self._cyclic_failed = True
                return self._first_solver(self.route, probe=False)
            if self.factor_dtype != self.operator.dtype:
                self.factor_dtype = self.operator.dtype
                return self._first_solver(self.route, probe=False)
            if self.route != "generic" and self.path == "auto":
                message = self._inaccurate_message(eta, self.route)
                return self._fall_back(InaccurateSolveError(message), self.route)
        except SingularHessianError:
            if self.on_inaccurate == "raise":
                raise
        return None

    def _solve_detached(self, v: torch.Tensor) -> torch.Tensor:
        # Each column scaled by a power of two near its largest entry (exact both ways), so
        # that norms and residuals neither overflow for huge v nor underflow for tiny v.
        b = v.detach().reshape(self.operator.num_params, -1)
        scale = torch.ldexp(torch.ones_like(b[0]), torch.frexp(b.abs().amax(0)).exponent)
        b = b / scale
        if self.gauge is not None:
            last = self.gauge.shape[0]
            b = torch.cat([b[:-last], b[-last:] - self.gauge @ (self.gauge.T @ b[-last:])])
        x, r, residual, correction = self._refine(self.solver, b)
        eta = self._check(b, x, r, residual, correction)
        while not eta <= self.rtol:
            solver = self._escalate(eta)
            if solver is None:
                break
            self.solver = solver
            x, r, residual, correction = self._refine(solver, b)
            eta = self._check(b, x, r, residual, correction)
        self.backward_error = eta
        if not eta <= self.rtol:
            if self.on_inaccurate == "raise":
                raise InaccurateSolveError(self._inaccurate_message(eta, self.route))
            warnings.warn(self._inaccurate_message(eta, self.route), RuntimeWarning)
        return (x * scale).reshape(v.shape)

    @property
    def route(self) -> str:
        """``'generic'`` (the lifted system) or ``'structured'`` (parameters eliminated)."""
        return self.solver.route

    @property
    def rcond(self) -> Optional[float]:
        """Generic route: estimated reciprocal condition number of the lifted system."""
        return self.solver.rcond

    @property
    def shape(self) -> tuple[int, int]:
        return self.operator.shape

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """``(H + damping I)^{-1} v`` for v of shape (n,) or (n, k); differentiable in v."""
        _check_vector(v, self.operator.param_sizes, self.operator._like, "v")
        return _differentiable_in_v(v, self._solve_detached)

    __matmul__ = solve

    def with_damping(self, damping: float) -> "HessianInverse":
        """Another damping from the same derivatives (the route chosen anew, same ``path``)."""
        return HessianInverse(self.operator, damping, self.check_condition, self.path,
                              self.rtol, self.on_inaccurate, self.max_refinement,
                              factor_dtype=self._factor_dtype_asked,
                              factorization=self._factorization_asked)

    def as_linear_operator(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out)."""
        return _scipy_operator(self.operator, self.solve)


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


def validate_model(model, curvature: str = "hessian") -> None:
    """Refuse, with the fix, a model the Hessian routines cannot serve exactly.

    It must be a :class:`TrackedChain` whose parameters are float32 or float64
    (one dtype, one device), each owned by exactly one layer (no tied
    weights), and able to give ``curvature``.
    """
    if not isinstance(model, TrackedChain):
        raise HessianInverseError(
            f"model must be a TrackedChain (e.g. DeepMLPWithTracking), got "
            f"{type(model).__name__}"
        )
    owner: dict = {}
    for l, layer in enumerate(model.layers):
        for name, p in layer.named_parameters():
            if id(p) in owner:
                raise HessianInverseError(
                    f"parameter {name!r} of layer {l + 1} is also a parameter of layer "
                    f"{owner[id(p)] + 1} (tied weights). The Hessian here is over each layer's "
                    "own parameters (the lifted system has one block per layer); a tied model's "
                    "Hessian sums those blocks and is not supported. Give each layer its own "
                    "copy of the weights.")
            owner[id(p)] = l
    params = list(model.parameters())
    if not params or {id(p) for p in params} != set(owner):
        raise HessianInverseError(
            "every parameter of the model must belong to one of model.layers (the Hessian is "
            "over model.parameters() in layer order); found "
            + ("no parameters" if not params else "parameters outside the layers"))
    kinds = {(p.dtype, p.device) for p in params}
    dtype, device = next(iter(kinds))
    if len(kinds) > 1 or dtype not in (torch.float32, torch.float64):
        found = ", ".join(sorted(f"{d} on {dev}" for d, dev in kinds))
        raise HessianInverseError(
            f"the Hessian routines need all parameters in float32 or float64 on one device; "
            f"found {found}. Convert the model with model.float() or model.double() (and "
            ".to(device)), then run the tracked forward pass again.")
    _check_curvature(curvature, model.loss_layer)


#: Piecewise-linear modules: exact only off their kinks (:func:`_warn_piecewise_linear`).
_PIECEWISE_LINEAR = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.MaxPool1d, nn.MaxPool2d,
                     nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)


def _warn_piecewise_linear(model: TrackedChain) -> None:
    """Warn (once per call site) that ReLU and max-pooling have a Hessian only almost
    everywhere, naming the layers."""
    found = [f"layer {l + 1} ({type(module).__name__})"
             for l, layer in enumerate(model.layers) for module in layer.modules()
             if isinstance(module, _PIECEWISE_LINEAR)
             or getattr(module, "activation", None) == "relu"]
    if found:
        warnings.warn(
            f"{', '.join(found)}: ReLU and max-pooling are piecewise linear, so the Hessian "
            "exists only almost everywhere (off the kinks and ties), where their own "
            "curvature is zero; results are exact there. Prefer smooth activations (tanh, "
            "gelu, softplus) for second-order methods.", RuntimeWarning, stacklevel=4)


def _operator_at_tracked_point(model: TrackedChain, loss: Optional[torch.Tensor],
                               curvature: str, path: str, damping: Optional[float],
                               memory_limit: Optional[int], stage: str,
                               checks: Optional[_Checks] = None) -> HessianOperator:
    """Check the tracked pass, decide the route, guard ``stage``'s memory, one sweep.

    Arguments are already validated.  Layers get closed forms unless the route is
    generic; a layer without closed forms whose dense blocks would be large gets
    matrix-free autograd blocks (:class:`LayerSizes`, kind 'autograd').  The checks that need the device's values
    (parameters unchanged, targets in range, finite blocks; and the caller's ``checks``)
    are left pending on the operator: its first use verifies them with its own.
    """
    pending = _Checks() if checks is None else checks
    tracked = model.tracked_forward(loss, pending)
    _warn_piecewise_linear(model)
    closed = closed_form_flags(model, tracked, pending)
    sizes = LayerSizes.of_model(model, tracked, closed)
    first = tracked.inputs[-1]
    route = choose_route(path, damping, "affine" in sizes.kinds, curvature, sizes,
                         first.device, first.dtype, _limit(first.device, memory_limit))
    if route == "generic":
        closed = [False] * len(closed)
        sizes = LayerSizes.of_model(model, tracked, closed)
    check_memory(sizes, route, stage, first.dtype, first.device, memory_limit,
                 curvature=curvature, damping=damping)
    groups = chain_derivatives(model, tracked, curvature, closed, pending,
                               [kind == "autograd" for kind in sizes.kinds])
    null_directions = getattr(model.loss_layer, "null_directions", None)
    gauge = None
    if callable(null_directions):
        dtype, device = first.dtype, first.device  # the tracked point's, even if cast later
        gauge = lambda: null_directions().detach().to(dtype=dtype, device=device)  # noqa: E731
    return HessianOperator(groups, gauge, curvature, memory_limit, pending)


def hessian_operator(model: TrackedChain, loss: Optional[torch.Tensor] = None,
                     memory_limit: Optional[int] = None, curvature: str = "hessian",
                     path: str = "auto") -> HessianOperator:
    """The Hessian of the model's last tracked loss w.r.t. ``model.parameters()``.

    ``loss`` (optional) must be the tensor that tracked forward returned; it is
    only checked, never differentiated, so ``loss.backward(create_graph=True)``
    beforehand is allowed but not needed.  ``memory_limit`` (bytes) overrides
    the free memory of the device used by the pre-allocation estimate, which
    charges the derivative blocks only (a factorisation is guarded when asked
    for).  ``curvature='ggn'`` gives the generalized Gauss-Newton matrix
    ``J^T H_loss J`` instead (J: Jacobian of the loss layer's logits in all
    parameters); the loss layer must expose ``logits`` and ``loss``.  The
    softmax gauge is a null space of both.
    ``path``: ``'generic'`` holds every layer's derivatives as dense autograd
    blocks; ``'structured'`` and ``'auto'`` hold closed forms for affine
    layers (``AffineLayerBlocks``) and dense blocks for the others.
    """
    validate_model(model, curvature)
    _check_path(path)
    operator = _operator_at_tracked_point(model, loss, curvature, path, None, memory_limit,
                                          "derivatives")
    operator.pending.verify()
    return operator


def factorize(model: TrackedChain, loss: Optional[torch.Tensor] = None, damping: float = 0.0,
              memory_limit: Optional[int] = None, curvature: str = "hessian",
              path: str = "auto", rtol: Optional[float] = None,
              on_inaccurate: str = "raise", factor_dtype="auto",
              factorization: str = "auto") -> HessianInverse:
    """Derivatives and factorisation of ``H + damping I`` (or ``GGN + damping I``
    with ``curvature='ggn'``), ready for many solves.

    ``path``: ``'auto'`` (default) takes the structured route when damping > 0
    and the model has affine layers with closed forms, else the generic one
    (:func:`choose_route`); ``'structured'`` or ``'generic'`` force a route.
    ``rtol``, ``on_inaccurate``: the accuracy contract; ``factor_dtype``: mixed
    precision, ``factorization`` (all in :class:`HessianInverse`).
    """
    validate_model(model, curvature)
    _check_path(path)
    damping = _check_damping(damping, next(model.parameters()).dtype)
    operator = _operator_at_tracked_point(model, loss, curvature, path, damping, memory_limit,
                                          "factorization")
    return HessianInverse(operator, damping, path=path, rtol=rtol, on_inaccurate=on_inaccurate,
                          factor_dtype=factor_dtype, factorization=factorization)


def hessian_inverse_vector_product(model: TrackedChain, loss: Optional[torch.Tensor],
                                   v: torch.Tensor, damping: float = 0.0,
                                   memory_limit: Optional[int] = None,
                                   curvature: str = "hessian", path: str = "auto",
                                   rtol: Optional[float] = None,
                                   on_inaccurate: str = "raise", factor_dtype="auto",
                                   factorization: str = "auto") -> torch.Tensor:
    """``(H + damping I)^{-1} v``, exactly, in time and memory linear in depth.

    Args:
        model: a :class:`TrackedChain` run with ``track_activations=True``.
        loss: the scalar loss that forward pass returned (or None).
        v: (n,) or (n, k), n = total parameters, ordered as ``model.parameters()``.
            Checked before any derivative is computed; the result is
            differentiable in v (not in the parameters through H).
        damping: eps >= 0.  With 0, a softmax classifier's always-singular H is
            gauge-fixed and ``H^+ v`` (Moore-Penrose on the logit-shift null
            space) is returned.
        memory_limit: bytes available (default: the device's free memory).
        curvature: ``'hessian'`` or ``'ggn'`` (the Gauss-Newton matrix
            ``J^T H_loss J``, positive semi-definite for cross-entropy).
        path: ``'auto'``, ``'structured'`` or ``'generic'``, as in :func:`factorize`.
        rtol, on_inaccurate: the accuracy contract: the result's relative
            residual is at most ``rtol`` (default :func:`default_rtol`) or
            :class:`InaccurateSolveError` is raised (``'warn'``: warned).
        factor_dtype: ``'auto'``, None or a dtype: mixed precision, as in
            :class:`HessianInverse`.
        factorization: ``'auto'`` (default: by the device's cost model), ``'banded'``
            or ``'cyclic'`` (block cyclic reduction, parallel in depth; falls back to
            banded when it fails).

    The structured route pays no separate acceptance probe here: the refined
    solve of ``v`` is its own test, and ``path='auto'`` falls back to the
    generic route only if it fails.  Raises :class:`SingularHessianError` if
    the system is singular beyond the gauge.
    """
    validate_model(model, curvature)
    _check_path(path)
    damping = _check_damping(damping, next(model.parameters()).dtype)
    like, checks = next(model.parameters()), _Checks()
    _check_vector(v, [sum(p.numel() for p in layer.parameters()) for layer in model.layers],
                  like, "v", checks)
    operator = _operator_at_tracked_point(model, loss, curvature, path, damping, memory_limit,
                                          "factorization", checks)
    inverse = HessianInverse(operator, damping, path=path, rtol=rtol,
                             on_inaccurate=on_inaccurate, probe=False, factor_dtype=factor_dtype,
                             factorization=factorization)
    return _differentiable_in_v(v, inverse._solve_detached)


def hessian_vector_product(model: TrackedChain, loss: Optional[torch.Tensor],
                           v: torch.Tensor, curvature: str = "hessian") -> torch.Tensor:
    """``H v`` through the layer structure (equal to Pearlmutter's product), or
    ``GGN v = J^T H_loss J v`` with ``curvature='ggn'``; differentiable in v."""
    return hessian_operator(model, loss, curvature=curvature).matmul(v)


_MOVED = {"DampedNewton": "damped_newton", "trust_region_step": "trust_region",
          "TrustRegionStep": "trust_region", "definiteness": "trust_region",
          "Definiteness": "trust_region", "lowest_eigenpair": "trust_region",
          "EigenEstimate": "trust_region"}


def __getattr__(name: str):
    """Say where the optimisation code went (an ImportError, so ``from`` shows it)."""
    if name in _MOVED:
        raise ImportError(f"{name} moved out of the core module hessian_inverse: use "
                          f"`from {_MOVED[name]} import {name}`")
    raise AttributeError(f"module 'hessian_inverse' has no attribute {name!r}")

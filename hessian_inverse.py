"""Exact inverse-Hessian-vector products for deep networks, linear in depth.

Implements A. Rahimi, "The Hessian of tall-skinny networks is easy to invert"
(arXiv:2601.06096).  Read it beside ``docs/ALGORITHM.md``, whose sections the
comments cite by name; the module runs top to bottom in that order:

- The chain: ``z_l = f_l(z_{l-1}; x_l)``, l = 1..L, the last layer fused with
  the loss (:class:`TrackedChain`, :class:`DeepMLPWithTracking`).
- The derivative oracle: per layer ``J_l``, ``F_l`` and the second derivatives
  ``A_l``, ``C_l``, ``G_l`` of ``b_l . f_l`` (:func:`compute_layer_derivatives`),
  or their closed forms for affine layers (:class:`AffineLayerBlocks`), in one
  backward sweep (:func:`chain_derivatives`).
- The Hessian-vector product through those blocks
  (:func:`structured_hessian_vector_product`).
- The lifted system: ``(H + eps I) x = g`` as a symmetric block-tridiagonal
  system in (x_l, y_l, w_l) (:func:`assemble_lifted_system`), factored by
  block-banded LU with partial pivoting (``block_tridiagonal.banded_lu``).
- Parameter elimination (beyond the paper): with damping > 0, each affine
  layer's parameters are eliminated by the push-through identity, leaving a
  reduced system in (w_l, y_l) (:func:`assemble_reduced_system`): cost linear
  in the parameter count.
- One memory guard, the operators users hold (:class:`HessianOperator`,
  :class:`HessianInverse`, whose solver is the lifted or the eliminated one),
  one function that chooses the route (:func:`choose_route`), and the entry
  points (:func:`hessian_operator`, :func:`factorize`,
  :func:`hessian_inverse_vector_product`, :func:`hessian_vector_product`).

With ``damping == 0`` a softmax classifier's always-singular Hessian is solved
exactly on its known null space (Moore-Penrose, "The softmax gauge");
``curvature='ggn'`` swaps H for the generalized Gauss-Newton matrix.  Nothing of
size n x n (n = all parameters) is ever formed.  The trust-region solver
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
from dataclasses import dataclass, fields, replace
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, jvp, vmap

from block_tridiagonal import (BlockTridiagonal, CyclicReductionFactor, SingularSystemError,
                               banded_lu, banded_lu_solve, cyclic_reduction,
                               cyclic_reduction_solve, equilibrate)

__all__ = [
    # models
    "ACTIVATIONS", "AffineActivation", "AffineCrossEntropy", "TrackedChain",
    "DeepMLPWithTracking",
    # the derivative oracle
    "LayerDerivatives", "compute_layer_derivatives",
    # operators and entry points
    "CURVATURES", "PATHS", "HessianOperator", "HessianInverse", "hessian_operator",
    "factorize", "hessian_inverse_vector_product", "hessian_vector_product",
    # errors
    "HessianInverseError", "NotTrackedError", "SingularHessianError", "EliminationError",
    "InaccurateSolveError", "InsufficientMemoryError",
]

#: Curvatures the operators accept: the Hessian, or the generalized Gauss-Newton matrix.
CURVATURES = ("hessian", "ggn")
#: Values of the ``path`` keyword: which solver runs (see :func:`choose_route`).
PATHS = ("auto", "riccati", "structured", "generic", "output")


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class HessianInverseError(ValueError):
    """Bad input to the Hessian routines (wrong shape, dtype, device, values)."""


class NotTrackedError(RuntimeError):
    """The model has no usable tracked forward pass to differentiate."""


class SingularHessianError(torch.linalg.LinAlgError):
    """``H + damping I`` (or the gauge-fixed ``H + P_N``) is singular."""


class EliminationError(SingularHessianError):
    """A layer's ``A_l + eps I`` is singular: its parameters cannot be eliminated."""


class InaccurateSolveError(SingularHessianError):
    """A solve missed its accuracy contract (relative residual above ``rtol``)."""


class InsufficientMemoryError(MemoryError):
    """The computation would not fit in the memory of the model's device."""


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
    (Gauss-Newton) can split the layer.
    """

    def __init__(self, in_features: int, num_classes: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes, bias=bias)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z)

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


@dataclass
class TrackedForward:
    """What a tracked forward pass records, checked before every use.

    - ``inputs``: each layer's input z_0 .. z_{L-1}, detached.  Any that shares
      memory with the caller's ``x`` (z_0 always) is a copy, so changing ``x``
      in place afterwards cannot change them.
    - ``targets``: a copy.
    - ``loss_ref``: a weak reference to the returned loss tensor.
    - ``parameters``: copies of the parameter values the pass ran with.  Every
      use compares them with the current values bit for bit, which catches
      every way of changing a parameter (an optimizer step, fused or not,
      ``p.data = ...``, ``vector_to_parameters``, ``model.double()``).
    - ``stochastic``: modules that made the pass random or stateful
      (Dropout or BatchNorm in training mode), by name.
    """

    inputs: list
    targets: torch.Tensor
    loss_ref: Callable
    parameters: tuple
    stochastic: list


def _record(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``z`` detached, copied if it shares memory with the caller's input ``x``."""
    z = z.detach()
    shares = (isinstance(x, torch.Tensor) and z.numel() and x.numel() and
              z.untyped_storage().data_ptr() == x.untyped_storage().data_ptr())
    return z.clone() if shares else z


def _same_bits(current: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> bool:
    """Whether two lists of tensors agree in shape, dtype, device and every bit.

    One host synchronisation for the whole list, not one per tensor.
    """
    if len(current) != len(saved) or any(
            (a.shape, a.dtype, a.device) != (b.shape, b.dtype, b.device)
            for a, b in zip(current, saved)):
        return False
    if not current:
        return True
    equal = [(a.detach().reshape(-1).view(torch.uint8) ==
              b.reshape(-1).view(torch.uint8)).all() for a, b in zip(current, saved)]
    return bool(torch.stack(equal).all())


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
            found.append(f"{name} ({type(module).__name__})")
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
    that they did not change) for the Hessian routines.
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

    def forward(self, x: torch.Tensor, targets: torch.Tensor,
                track_activations: bool = False) -> torch.Tensor:
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
                parameters=tuple(p.detach().clone() for p in self.parameters()),
                stochastic=_stochastic_modules(self),
            )
        return loss

    def tracked_forward(self, loss: Optional[torch.Tensor] = None) -> TrackedForward:
        """The recorded forward pass, checked to be current and to match ``loss``."""
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
        if not _same_bits(list(self.parameters()), tracked.parameters):
            raise NotTrackedError(
                "the parameters changed since the tracked forward pass (their values, dtype "
                "or device: an optimizer step, p.data = ..., vector_to_parameters, "
                f"model.double(), ...); the recorded activations are stale: {rerun} at the "
                "current parameters"
            )
        stochastic = tracked.stochastic or _stochastic_modules(self)
        if stochastic:
            raise NotTrackedError(
                f"{', '.join(stochastic)} in training mode makes the forward pass random or "
                "stateful, so its Hessian is not a well-defined function of the parameters: "
                f"call model.eval() and {rerun}"
            )
        return tracked


class DeepMLPWithTracking(TrackedChain):
    """The paper's tall-skinny MLP.

    ``num_hidden_layers`` layers ``tanh(W z + c)`` (input -> hidden, then
    hidden -> hidden), then one output affine layer fused with the mean
    cross-entropy loss: L = num_hidden_layers + 1 layers in the chain.  Inputs
    of any shape ``(B, ...)`` are flattened to ``(B, input_dim)``.
    """

    def __init__(self, input_dim: int, hidden_dim: int, num_classes: int,
                 num_hidden_layers: int, activation: str = "tanh", bias: bool = True):
        _activation(activation)
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
        super().__init__(hidden, AffineCrossEntropy(widths[-1], num_classes, bias))
        self.activation = activation

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

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


@dataclass
class AffineLayerBlocks:
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

    # Every tensor may carry leading dimensions (a stack of layers of the same
    # shape, eliminated together); the methods act on each layer of the stack.

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
        """du/d(W, c) x: (p, k) -> (B h, k)."""
        x_w, x_c = self._split(x)
        u = self.inputs.unsqueeze(-3) @ x_w  # (h, B, k)
        if x_c is not None:
            u = u + x_c
        return u.transpose(-3, -2).flatten(-3, -2)

    def K_t(self, u: torch.Tensor) -> torch.Tensor:
        """K^T u: (B h, k) -> (p, k)."""
        per_unit = self._examples(u).transpose(-3, -2)  # (h, B, k)
        return self._join(self.inputs.mT.unsqueeze(-3) @ per_unit,
                          per_unit.sum(-2) if self.bias else None)

    def Wb(self, t: torch.Tensor) -> torch.Tensor:
        """du/dz t = (I_B kron W) t: (B m, k) -> (B h, k)."""
        return (self.weight.unsqueeze(-3) @ self._examples(t)).flatten(-3, -2)

    def Wb_t(self, u: torch.Tensor) -> torch.Tensor:
        """(I_B kron W)^T u: (B h, k) -> (B m, k)."""
        return (self.weight.mT.unsqueeze(-3) @ self._examples(u)).flatten(-3, -2)

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

    def _map(self, rows: int, cols: int, apply: Callable, apply_t: Callable) -> LinearMap:
        return LinearMap((rows, cols), apply, apply_t, self.weight)

    @property
    def J(self) -> LinearMap:
        return self._map(self.num_outputs, self.num_params,
                         lambda x: self.S(self.K(x)), lambda w: self.K_t(self.S_t(w)))

    @property
    def A(self) -> LinearMap:
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
        return self._map(self.num_params, self.num_inputs,
                         lambda t: self.K_t(self.D(self.Wb(t))) + self.E(t),
                         lambda x: self.Wb_t(self.D(self.K(x))) + self.E_t(x))

    @property
    def G(self) -> Optional[LinearMap]:
        if not self.input_derivatives:
            return None

        def apply(t):
            return self.Wb_t(self.D(self.Wb(t)))
        return self._map(self.num_inputs, self.num_inputs, apply, apply)

    def densify(self) -> LayerDerivatives:
        """The same blocks as dense tensors (what the generic oracle computes)."""
        dense = {name: getattr(self, name) for name in ("J", "A", "F", "C", "G")}
        return LayerDerivatives(**{name: block.dense() if block is not None else None
                                   for name, block in dense.items()})


def gauss_newton_blocks(blocks: AffineLayerBlocks, is_loss_layer: bool) -> AffineLayerBlocks:
    """The closed-form blocks of the Gauss-Newton matrix (docs/ALGORITHM.md, "Gauss-Newton").

    GGN keeps only the loss's curvature in the logits: every layer loses the
    E term (r = 0, it is d2u/dW dz contracted with the backprop gradient), and
    hidden layers lose the activation curvature (D = 0).  The fused loss
    layer's D is the softmax Hessian in its logits, which GGN keeps: its logits
    are affine in (W, c, z).
    """
    kept = blocks.u_hessian if is_loss_layer else torch.zeros_like(blocks.u_hessian)
    return replace(blocks, u_gradient=torch.zeros_like(blocks.u_gradient), u_hessian=kept)


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


def affine_activation_blocks(layer: AffineActivation, z_prev: torch.Tensor,
                             adjoint: torch.Tensor, input_derivatives: bool = True
                             ) -> AffineLayerBlocks:
    """Closed forms for ``sigma(W z + c)``.

    S = diag(sigma'(u)), r = b sigma'(u), D = diag(b sigma''(u)).

    ``adjoint`` is b_l (B h,), ``z_prev`` the layer's input (..., m).
    """
    Z, weight, bias, u = _affine_inputs(layer.linear, z_prev)
    first, second = _pointwise_derivatives(layer.activation, u)
    b = adjoint.detach().reshape(u.shape)
    return AffineLayerBlocks(inputs=Z, weight=weight, bias=bias is not None,
                             out_map=first.reshape(-1), u_gradient=b * first,
                             u_hessian=b * second, input_derivatives=input_derivatives,
                             diagonal=True)


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
    y = (targets.to(u.dtype) if targets.is_floating_point()
         else F.one_hot(targets, num_classes).to(u.dtype))
    mass = y.sum(-1, keepdim=True)
    p = torch.softmax(u, dim=-1)
    r = (mass * p - y) / B
    D = mass[..., None] * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / B
    return AffineLayerBlocks(inputs=Z, weight=weight, bias=bias is not None,
                             out_map=r.reshape(1, -1), u_gradient=r, u_hessian=D,
                             input_derivatives=input_derivatives)


def has_closed_form(layer: nn.Module, is_loss_layer: bool, z_prev: torch.Tensor,
                    targets: Optional[torch.Tensor] = None) -> bool:
    """Whether the closed forms of "Structured layers" describe this layer exactly.

    Exact types only (a subclass may change ``forward``): ``AffineActivation``
    as a hidden layer; ``AffineCrossEntropy`` as the loss layer on (B, m)
    inputs with class-index targets in range or (B, C) probability targets.
    """
    if not is_loss_layer:
        return type(layer) is AffineActivation
    if type(layer) is not AffineCrossEntropy or z_prev.dim() != 2 or targets is None:
        return False
    num_classes = layer.linear.out_features
    if targets.is_floating_point():
        return tuple(targets.shape) == (z_prev.shape[0], num_classes)
    return (tuple(targets.shape) == (z_prev.shape[0],) and
            bool(((targets >= 0) & (targets < num_classes)).all()))


def closed_form_flags(model: TrackedChain, tracked: TrackedForward) -> list[bool]:
    """Per layer, whether :func:`has_closed_form` holds at the tracked point."""
    layers = list(model.layers)
    return [has_closed_form(layer, l == len(layers) - 1, tracked.inputs[l], tracked.targets)
            for l, layer in enumerate(layers)]

# --------------------------------------------------------------------------
# All layers in one backward sweep
# --------------------------------------------------------------------------


def _layer_derivatives(layer: nn.Module, z_prev: torch.Tensor, adjoint: torch.Tensor,
                       targets: torch.Tensor, is_loss: bool, first: bool, curvature: str,
                       closed_form: bool):
    """One layer's blocks: closed forms where ``closed_form``, else autograd."""
    if closed_form:
        d = (affine_cross_entropy_blocks(layer, z_prev, targets, not first) if is_loss
             else affine_activation_blocks(layer, z_prev, adjoint, not first))
        return gauss_newton_blocks(d, is_loss) if curvature == "ggn" else d
    if curvature == "ggn":
        return (compute_loss_layer_ggn_derivatives(layer, z_prev, targets, not first)
                if is_loss else compute_layer_jacobians(layer, z_prev, not first))
    extra = (targets,) if is_loss else ()
    return compute_layer_derivatives(layer, z_prev, adjoint, *extra, input_derivatives=not first)


def chain_derivatives(model: TrackedChain, tracked: TrackedForward, curvature: str = "hessian",
                      closed: Optional[Sequence[bool]] = None) -> list:
    """All layers' derivatives in one backward sweep (l = L..1).

    The adjoint starts at b_L = 1 and is propagated as b_{l-1} = F_l^T b_l,
    exactly backprop, so every layer's second derivatives are contracted with
    the right adjoint.  ``curvature='ggn'`` gives the Gauss-Newton blocks
    instead: first order only for hidden layers, and the loss layer's curvature
    restricted to its logits (docs/ALGORITHM.md, "Gauss-Newton").  Layers
    flagged in ``closed`` (from :func:`closed_form_flags`) get
    :class:`AffineLayerBlocks`; the others get dense :class:`LayerDerivatives`.
    ``tracked`` is the model's checked tracked forward pass.
    """
    layers = list(model.layers)
    last = len(layers) - 1
    closed = [False] * len(layers) if closed is None else closed
    z_last = tracked.inputs[-1]
    adjoint = torch.ones(1, dtype=z_last.dtype, device=z_last.device)
    derivs: list = [None] * len(layers)
    for l in reversed(range(len(layers))):
        checked = (contextlib.nullcontext() if closed[l]  # closed forms are deterministic
                   else _deterministic(layers[l], l, z_last.device))
        with checked:
            d = _layer_derivatives(layers[l], tracked.inputs[l], adjoint, tracked.targets,
                                   l == last, l == 0, curvature, closed[l])
        derivs[l] = d
        if l > 0:
            adjoint = d.F.T @ adjoint
    _check_finite_blocks(derivs)
    return derivs


@contextlib.contextmanager
def _deterministic(layer: nn.Module, l: int, device: torch.device):
    """Refuse a layer whose forward draws random numbers (``F.dropout`` called directly).

    Its derivatives are not a function of the parameters: the oracle's vmap
    refuses the draw, and a Jacobian taken outside vmap would differentiate
    another random mask than the tracked pass used.  ``nn.Dropout`` modules
    are caught earlier (:meth:`TrackedChain.tracked_forward`).
    """
    def rng_state():
        return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()

    message = (f"layer {l + 1} ({type(layer).__name__}) draws random numbers in its forward "
               "(e.g. F.dropout called directly), so its Hessian is not a function of the "
               "parameters: use an nn.Dropout module (model.eval() turns it off) or remove "
               "the call")
    before = rng_state()
    try:
        yield
    except RuntimeError as err:
        if "randomness" in str(err):
            raise HessianInverseError(message) from None
        raise
    if not torch.equal(before, rng_state()):
        raise HessianInverseError(message)


def _check_finite_blocks(derivs: Sequence) -> None:
    """NaN/Inf in any layer's blocks: one host synchronisation for the whole chain."""
    tensors = [(l, field.name, getattr(d, field.name)) for l, d in enumerate(derivs)
               for field in fields(d) if isinstance(getattr(d, field.name), torch.Tensor)]
    finite = torch.stack([torch.isfinite(block).all() for _, _, block in tensors])
    if not bool(finite.all()):
        l, name, _ = tensors[int((~finite).nonzero()[0])]
        raise HessianInverseError(
            f"layer {l + 1}: derivative block {name} has NaN/Inf entries; the "
            "tracked forward pass is not finite (check inputs, weights and loss)"
        )

# --------------------------------------------------------------------------
# The Hessian-vector product (docs/ALGORITHM.md, "The Hessian-vector product")
# --------------------------------------------------------------------------


def structured_hessian_vector_product(derivs: Sequence[LayerDerivatives],
                                      v_blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``(H v)_l`` for every layer (docs/ALGORITHM.md, "The Hessian-vector product").

    ``v_blocks[l]`` is (p_l, k).  Forward tangent ``t_l = J_l v_l + F_l t_{l-1}``,
    backward adjoint ``u_l = C_{l+1}^T v_{l+1} + G_{l+1} t_l + F_{l+1}^T u_{l+1}``
    (u_L = 0), then ``(H v)_l = A_l v_l + C_l t_{l-1} + J_l^T u_l``.
    """
    num_layers = len(derivs)
    tangents = []
    t = None
    for l, d in enumerate(derivs):
        t = d.J @ v_blocks[l] + (d.F @ t if l > 0 else 0)
        tangents.append(t)
    out: list[Optional[torch.Tensor]] = [None] * num_layers
    u = torch.zeros_like(tangents[-1])
    for l in reversed(range(num_layers)):
        d = derivs[l]
        out[l] = d.A @ v_blocks[l] + d.J.T @ u
        if l > 0:
            out[l] = out[l] + d.C @ tangents[l - 1]
            u = d.C.T @ v_blocks[l] + d.G @ tangents[l - 1] + d.F.T @ u
    return out

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
    diag, sub = [], []
    for l, d in enumerate(derivs):
        p, a = d.num_params, d.num_outputs
        kw = dict(dtype=d.J.dtype, device=d.J.device)
        n = p + 2 * a
        block = torch.zeros(n, n, **kw)
        xx = d.A + damping * torch.eye(p, **kw)
        if gauge is not None and l == num_layers - 1:
            xx = xx + gauge @ gauge.T
        block[:p, :p] = xx
        block[:p, p + a:] = d.J.T
        block[p + a:, :p] = d.J
        if l + 1 < num_layers:
            block[p:p + a, p:p + a] = derivs[l + 1].G
        eye = torch.eye(a, **kw)
        block[p:p + a, p + a:] = -eye
        block[p + a:, p:p + a] = -eye
        diag.append(block)
        if l > 0:
            prev = derivs[l - 1]
            pp, ap = prev.num_params, prev.num_outputs
            s = torch.zeros(n, pp + 2 * ap, **kw)
            s[:p, pp:pp + ap] = d.C
            s[p + a:, pp:pp + ap] = d.F
            sub.append(s)
    return BlockTridiagonal(diag, sub)


def _lift(derivs: Sequence[LayerDerivatives], v_blocks: Sequence[torch.Tensor]) -> list:
    """Right-hand side of the lifted system: (v_l, 0, 0) per layer."""
    return [torch.cat([v, v.new_zeros(2 * d.num_outputs, v.shape[1])])
            for d, v in zip(derivs, v_blocks)]


def _unlift(derivs: Sequence[LayerDerivatives], blocks: Sequence[torch.Tensor]) -> list:
    """The parameter part x_l of each lifted block."""
    return [s[:d.num_params] for d, s in zip(derivs, blocks)]



# --------------------------------------------------------------------------
# Parameter elimination (docs/ALGORITHM.md, "Parameter elimination")
# --------------------------------------------------------------------------
#
# With M_l = A_l + eps I, the x-row of the lifted system gives
# x_l = M_l^{-1} (g_l - C_l y_{l-1} - J_l^T w_l); putting that into the other
# rows leaves a system in (w_l, y_l) alone, and the push-through identity
# M^{-1} = (I - K^T D P^{-1} K) / eps, P = eps I + K K^T D, makes every
# eliminated block of an affine layer a product of (batch x width)-sized matrices.


@dataclass
class EliminatedLayer:
    """Layer l's parameters eliminated from the lifted system, M_l = A_l + eps I.

    - ``w_block`` Q_l (a_l, a_l) = J_l M_l^{-1} J_l^T; the reduced system has -Q_l
      on the diagonal of w_l.
    - ``coupling`` T_l (a_l, a_{l-1}) = F_l - J_l M_l^{-1} C_l, between w_l and
      y_{l-1}; None for the first layer.
    - ``y_block`` R_l (a_{l-1}, a_{l-1}) = G_l - C_l^T M_l^{-1} C_l, on the diagonal
      of y_{l-1}; None for the first layer.
    - ``inverse``: X (p_l, k) -> M_l^{-1} X.
    """

    w_block: torch.Tensor
    coupling: Optional[torch.Tensor]
    y_block: Optional[torch.Tensor]
    inverse: Callable[[torch.Tensor], torch.Tensor]


def _nonsingular_lu(matrix: torch.Tensor, damping: float, layers: Sequence[int], what: str):
    """LU factors of ``matrix + damping I`` (one or a stack); :class:`EliminationError` if singular.

    Singular to working precision means a pivot below rounding of the terms
    that were summed, ``finfo.eps * (max |matrix| + damping)``.  ``layers``
    (1-based) name the stacked matrices in the message.  One check for the
    whole stack: no host synchronisation per layer.
    """
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    LU, pivots, info = torch.linalg.lu_factor_ex(matrix + damping * eye)
    if not LU.numel():
        return LU, pivots
    scale = matrix.abs().amax(dim=(-2, -1)) + damping
    ok = ((info == 0) & torch.isfinite(LU).all(dim=-1).all(dim=-1) &
          (LU.diagonal(dim1=-2, dim2=-1).abs().amin(-1) > torch.finfo(LU.dtype).eps * scale))
    if not bool(ok.all()):
        layer = layers[int((~ok.reshape(-1)).nonzero()[0])]
        raise EliminationError(
            f"layer {layer}: {what} is singular to working precision, so the structured "
            "path cannot eliminate this layer's parameters (A_l + damping I must be "
            "invertible for each layer, which is more than H + damping I being "
            "invertible). Use path='generic', whose pivoting does not need it, or another damping."
        )
    return LU, pivots


def eliminate_affine_layer(blocks: AffineLayerBlocks, damping: float, layers: Sequence[int]
                           ) -> EliminatedLayer:
    """:class:`EliminatedLayer` of closed-form layers by the push-through identity.

    With Gamma = K K^T = gram kron I_h and P = eps I + Gamma D (B h square):
    K M^{-1} = P^{-1} K, so Q = S P^{-1} Gamma S^T and, with
    V = eps Wb - K E, T = S P^{-1} V and R = (V^T D P^{-1} V - E^T E) / eps
    (the eps-free forms of F - J M^{-1} C and G - C^T M^{-1} C).  Cost
    O((B h)^3 + (B h)^2 a_{l-1} + a_{l-1}^3); nothing of size p_l squared.
    ``blocks`` may be a stack of layers of one shape (``layers``, 1-based, one
    per entry): every step is then one batched call for the whole stack.
    """
    eps, S, r, Z, W = damping, blocks.S_dense(), blocks.u_gradient, blocks.inputs, blocks.weight
    B, h = r.shape[-2:]
    m, lead = Z.shape[-1], r.shape[:-2]
    kw = dict(dtype=r.dtype, device=r.device)
    gram = blocks.gram()
    gamma_d = torch.einsum("...nm,...mij->...nimj", gram, blocks.D_blocks())
    lu = _nonsingular_lu(gamma_d.reshape(*lead, B * h, B * h), eps, layers,
                         "eps I + K K^T D (that is, A_l + eps I)")

    def solve_p(X):
        return torch.linalg.lu_solve(*lu, X)

    def inverse(X):
        return (X - blocks.K_t(blocks.D(solve_p(blocks.K(X))))) / eps

    gamma_st = torch.einsum("...nm,...mio->...nio", gram, S.mT.unflatten(-2, (B, h)))
    Q = S @ solve_p(gamma_st.flatten(-3, -2))
    if not blocks.input_derivatives:
        return EliminatedLayer(Q, None, None, inverse)
    KE = torch.einsum("...nk,...mi->...nimk", Z, r).reshape(*lead, B * h, B * m)
    Wb = torch.einsum("nm,...ij->...nimj", torch.eye(B, **kw), W).reshape(*lead, B * h, B * m)
    V = eps * Wb - KE
    Y = solve_p(V)
    EtE = torch.einsum("...nN,kj->...nkNj", r @ r.mT, torch.eye(m, **kw))
    R = (V.mT @ blocks.D(Y) - EtE.reshape(*lead, B * m, B * m)) / eps
    return EliminatedLayer(Q, S @ Y, (R + R.mT) / 2, inverse)


def eliminate_dense_layer(derivs: LayerDerivatives, damping: float, layers: Sequence[int]
                          ) -> EliminatedLayer:
    """:class:`EliminatedLayer` of a layer without closed forms: LU of A_l + eps I (p_l square)."""
    lu = _nonsingular_lu(derivs.A, damping, layers, "A_l + eps I")

    def inverse(X):
        return torch.linalg.lu_solve(*lu, X) if X.shape[0] else X

    Q = derivs.J @ inverse(derivs.J.T)
    if derivs.C is None:
        return EliminatedLayer(Q, None, None, inverse)
    MC = inverse(derivs.C)
    return EliminatedLayer(Q, derivs.F - derivs.J @ MC, derivs.G - derivs.C.T @ MC, inverse)


@dataclass
class EliminatedGroup:
    """Consecutive layers eliminated together.

    ``layers``: their chain indices (0-based); ``blocks``: either one layer's
    dense :class:`LayerDerivatives`, or the closed-form
    :class:`AffineLayerBlocks` of layers of one shape stacked along a leading
    dimension (the interior layers of an MLP: one group, whatever the depth);
    ``eliminated``: their :class:`EliminatedLayer`, stacked the same way.
    """

    layers: list
    blocks: object
    eliminated: EliminatedLayer

    @property
    def stacked(self) -> bool:
        return isinstance(self.blocks, AffineLayerBlocks)

    def gather(self, per_layer: Sequence[torch.Tensor]) -> torch.Tensor:
        """The group's entries of a per-layer list, stacked if the group is."""
        if self.stacked:
            return torch.stack([per_layer[l] for l in self.layers])
        return per_layer[self.layers[0]]

    def scatter(self, stacked: torch.Tensor, per_layer: list) -> None:
        """Write the group's results back into a per-layer list."""
        parts = stacked.unbind(0) if self.stacked else [stacked]
        for l, part in zip(self.layers, parts):
            per_layer[l] = part


def _shape_signature(d) -> Optional[tuple]:
    if not isinstance(d, AffineLayerBlocks):
        return None
    return (d.inputs.shape, d.weight.shape, d.out_map.shape, d.u_hessian.shape, d.bias,
            d.diagonal, d.input_derivatives)


def same_shape_runs(derivs: Sequence) -> list[list[int]]:
    """Runs of consecutive layers whose closed-form blocks have one shape (stackable);
    every other layer is a run of its own."""
    runs: list[list[int]] = []
    for l, d in enumerate(derivs):
        signature = _shape_signature(d)
        if runs and signature is not None and signature == _shape_signature(derivs[runs[-1][0]]):
            runs[-1].append(l)
        else:
            runs.append([l])
    return runs


def stack_blocks(blocks: Sequence[AffineLayerBlocks]) -> AffineLayerBlocks:
    """Closed-form blocks of same-shape layers stacked along a new leading dimension."""
    first = blocks[0]
    return replace(first, **{name: torch.stack([getattr(b, name) for b in blocks])
                             for name in ("inputs", "weight", "out_map", "u_gradient",
                                          "u_hessian")})


def eliminate_layers(derivs: Sequence, damping: float) -> list[EliminatedGroup]:
    """Every layer's parameters eliminated, runs of same-shape closed-form layers at once."""
    groups = []
    for run in same_shape_runs(derivs):
        numbers = [l + 1 for l in run]
        if isinstance(derivs[run[0]], AffineLayerBlocks):
            stacked = stack_blocks([derivs[l] for l in run])
            groups.append(EliminatedGroup(run, stacked,
                                          eliminate_affine_layer(stacked, damping, numbers)))
        else:
            groups.append(EliminatedGroup(run, derivs[run[0]],
                                          eliminate_dense_layer(derivs[run[0]], damping, numbers)))
    return groups


def _per_layer(groups: Sequence[EliminatedGroup]) -> list[EliminatedLayer]:
    """The groups' eliminated blocks as one :class:`EliminatedLayer` per layer (views)."""
    out = []
    for group in groups:
        e = group.eliminated
        if not group.stacked:
            out.append(e)
            continue
        for i in range(len(group.layers)):
            out.append(EliminatedLayer(e.w_block[i],
                                       None if e.coupling is None else e.coupling[i],
                                       None if e.y_block is None else e.y_block[i], None))
    return out


def assemble_reduced_system(eliminated: Sequence[EliminatedLayer]) -> BlockTridiagonal:
    """The lifted system with every x_l eliminated: unknowns (w_l, y_l) per layer.

    Per layer the diagonal is ``[[-Q_l, -I], [-I, R_{l+1}]]`` (R_{L+1} = 0) and
    the only coupling to the previous layer is ``T_l`` in (w_l, y_{l-1}).  Every
    coupling is then between neighbours of the sequence w_1, y_1, w_2, y_2, ...,
    so the matrix is block tridiagonal with 2L blocks of size a_l each: the same
    matrix and pivoting as with (y_l, w_l) blocks of size 2 a_l, at a quarter of
    the LU flops.
    """
    diag, sub = [], []
    for l, e in enumerate(eliminated):
        q = e.w_block
        if l > 0:
            sub.append(e.coupling)
        diag.append(-q)
        sub.append(-torch.eye(q.shape[0], dtype=q.dtype, device=q.device))
        diag.append(eliminated[l + 1].y_block if l + 1 < len(eliminated) else torch.zeros_like(q))
    return BlockTridiagonal(diag, sub)




def _reduced_rhs(groups: Sequence[EliminatedGroup], g_blocks: Sequence[torch.Tensor]
                 ) -> list[torch.Tensor]:
    """Reduced right-hand side, ordered (w_1, y_1, w_2, ...).

    w_l gets -J_l M_l^{-1} g_l and y_l gets -C_{l+1}^T M_{l+1}^{-1} g_{l+1}
    (0 for the last layer): one batched call per group.
    """
    num_layers = len(g_blocks)
    rhs_w: list = [None] * num_layers
    rhs_y: list = [None] * num_layers
    for group in groups:
        d = group.blocks
        mg = group.eliminated.inverse(group.gather(g_blocks))
        group.scatter(-(d.J @ mg), rhs_w)
        if d.C is not None:
            shifted: list = [None] * num_layers
            group.scatter(-(d.C.T @ mg), shifted)
            for l in group.layers:
                rhs_y[l - 1] = shifted[l]
    rhs_y[-1] = rhs_w[-1].new_zeros(rhs_w[-1].shape)
    return [block for pair in zip(rhs_w, rhs_y) for block in pair]


def _recover_parameters(groups: Sequence[EliminatedGroup], g_blocks: Sequence[torch.Tensor],
                        reduced: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """x_l = M_l^{-1} (g_l - C_l y_{l-1} - J_l^T w_l), reduced = (w_1, y_1, w_2, ...)."""
    w, y = reduced[0::2], reduced[1::2]
    x: list = [None] * len(g_blocks)
    for group in groups:
        d = group.blocks
        rest = group.gather(g_blocks) - d.J.T @ group.gather(w)
        if d.C is not None:
            y_prev = [None] + list(y[:-1])
            rest = rest - d.C @ group.gather(y_prev)
        group.scatter(group.eliminated.inverse(rest), x)
    return x


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
    """:class:`OutputFactor` of the closed-form loss layer ``mean CE(W z + c, t)``.

    Logits tangent ``du = K v_L + Wb t`` (B C), then R per example (B, r, C) from
    :func:`softmax_curvature_root`.  With K K^T = gram kron I_C,
    U_L U_L^T [(n, i), (n', j)] = gram[n, n'] (R_n R_n'^T)[i, j].  Cost O(B C^3 + m^2 C
    + m C w).
    """
    R = softmax_curvature_root(d.u_hessian)
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


def output_factor(d) -> OutputFactor:
    if isinstance(d, AffineLayerBlocks):
        return closed_form_output_factor(d)
    return dense_output_factor(d)


def _block_diagonal(phi: torch.Tensor) -> torch.Tensor:
    """(B, r, w) example blocks -> the dense (B r, B w) block-diagonal matrix."""
    B, r, w = phi.shape
    out = phi.new_zeros(B, r, B, w)
    index = torch.arange(B, device=phi.device)
    out[index, :, index, :] = phi
    return out.reshape(B * r, B * w)


def _blocked_layer_gram(phi: torch.Tensor, d: AffineLayerBlocks):
    """A closed-form hidden layer under example-blocked Phi_l (B, r, h).

    psi = Phi_l S_l; U_l U_l^T [(n, i), (n', j)] = gram[n, n'] (psi_n psi_n'^T)[i, j];
    Phi_{l-1} = psi W (B, r, m_in).  Cost O(m^2 h + m h m_in), m = B r.
    """
    B, r, h = phi.shape
    psi = phi * d.out_map.reshape(B, 1, h)
    flat = psi.reshape(B * r, h)
    gram = (flat @ flat.T).view(B, r, B, r) * d.gram()[:, None, :, None]
    return gram.reshape(B * r, B * r), psi @ d.weight if d.input_derivatives else None


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
    return gram, (psi @ d.weight).reshape(m, -1) if d.input_derivatives else None


def _dense_layer_gram(phi: torch.Tensor, d: LayerDerivatives):
    """A dense hidden layer: Y = Phi_l J_l (m, p_l), U_l U_l^T = Y Y^T, Phi_{l-1} = Phi_l F_l."""
    Y = phi @ d.J
    return Y @ Y.T, phi @ d.F if d.F is not None else None


def logit_gram(derivs: Sequence, factor: OutputFactor) -> torch.Tensor:
    """U U^T (m, m) = sum_l U_l U_l^T, one adjoint sweep of Phi_l = R d(logits)/dz_l.

    Example-blocked Phi_l (B, r, h_l) while every layer from l up is closed form with the
    loss's B examples, dense (m, a_l) below the first other layer.  Memory O(m^2 + m a_l)
    at most (O(m^2 + B r h_l) when blocked); U (m x n) is never formed.  Cost per
    closed-form layer O(m^2 h_l + m h_l h_{l-1}) blocked; symmetrised at the end.
    """
    gram, phi, blocked = factor.gram, factor.phi, factor.blocked
    for d in reversed(derivs[:-1]):
        closed = isinstance(d, AffineLayerBlocks)
        if blocked and not (closed and d.num_examples == phi.shape[0]):
            phi, blocked = _block_diagonal(phi), False
        if blocked:
            share, phi = _blocked_layer_gram(phi, d)
        elif closed:
            share, phi = _dense_closed_form_layer_gram(phi, d)
        else:
            share, phi = _dense_layer_gram(phi, d)
        gram = gram + share
    return (gram + gram.T) / 2


def output_tangent(derivs: Sequence, factor: OutputFactor, blocks: Sequence) -> torch.Tensor:
    """U v (m, k) for per-layer blocks v_l (p_l, k): the tangent sweep to the logits, then R."""
    t = None
    for l, d in enumerate(derivs[:-1]):
        t = d.J @ blocks[l] if t is None else d.J @ blocks[l] + d.F @ t
    return factor.apply(blocks[-1], t)


def output_adjoint(derivs: Sequence, factor: OutputFactor, y: torch.Tensor) -> list:
    """U^T y as per-layer blocks (p_l, k) for y (m, k): the adjoint sweep."""
    out: list = [None] * len(derivs)
    out[-1], u = factor.apply_t(y)
    for l in reversed(range(len(derivs) - 1)):
        d = derivs[l]
        out[l] = d.J.T @ u
        if l > 0:
            u = d.F.T @ u
    return out


def _damped_cholesky(gram: torch.Tensor, damping: float, name: str) -> torch.Tensor:
    """Lower Cholesky factor of ``damping I + gram``; :class:`SingularHessianError` if none.

    The matrix is positive definite with smallest eigenvalue >= damping, but it is
    singular to working precision once damping <= u max diag(gram) (u the unit roundoff;
    then cond(GGN + damping I) >= 1/u): refused, like a failed factorisation.
    """
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(gram + damping * eye)
    top = float(gram.diagonal().max()) if gram.numel() else 0.0
    if int(info) != 0 or not torch.isfinite(factor).all() or not (
            damping > torch.finfo(gram.dtype).eps * top):
        detail = (f"damping {damping:.1e} against the Gram matrix U U^T of the logit "
                  f"Jacobian, largest diagonal {top:.1e}")
        raise SingularHessianError(_singular_message(name, detail, damping))
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
        self.factor = PivotFactor(kind, (torch.empty(count, rh, rh, **kw),) + (
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

    ``derivs``: the operator's per-layer blocks; ``delta``: any real number;
    ``kind``: how each P_l is factored (:data:`PIVOT_FACTORS`); ``gauge`` (p_L, k):
    the loss layer's known null basis N, whose projector is added to P_L.  Runs of
    same-shape closed-form layers are :class:`AffinePivots`, other layers
    :class:`DensePivots`.  ``broken`` (L,) bool: where P_l broke down (left on the
    device; ``ok`` synchronises once).  ``values()`` (kinds 'cholesky' and 'ldl'):
    n numbers with the inertia of M whose product is det M.  Memory
    O(sum_l (a_l^2 + a_l a_{l-1})) for affine layers (p_l^2 for dense ones).
    """

    def __init__(self, derivs: Sequence, delta: float, kind: str = "lu",
                 gauge: Optional[torch.Tensor] = None):
        if kind not in PIVOT_FACTORS:
            raise HessianInverseError(f"kind must be one of {PIVOT_FACTORS}, got {kind!r}")
        self.check_blocks(derivs)
        self.derivs, self.delta, self.kind = derivs, float(delta), kind
        last = len(derivs) - 1
        self.runs = same_shape_runs(derivs)
        self.groups = []
        for run in self.runs:
            d, fixed = derivs[run[0]], gauge is not None and run[-1] == last
            if isinstance(d, AffineLayerBlocks):
                group = AffinePivots(stack_blocks([derivs[l] for l in run]), delta, kind, fixed)
            else:
                group = DensePivots(d, delta, kind, gauge @ gauge.T if fixed else None)
            self.groups.append(group)
        like = derivs[-1].J
        ghat = torch.zeros(1, 1, dtype=like.dtype, device=like.device)  # z_L is the loss
        for run, group in zip(reversed(self.runs), reversed(self.groups)):
            for g in reversed(range(len(run))):
                ghat = group.step(g, ghat)
            group.finish()
        self.broken = torch.cat([group.factor.info for group in self.groups]) != 0

    @staticmethod
    def check_blocks(derivs: Sequence) -> None:
        """Refuse blocks the recursion cannot take (it has pivots for closed-form affine
        layers and for dense blocks only)."""
        for l, d in enumerate(derivs):
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
        """M^{-1} g for per-layer blocks g_l (p_l, k): backward sweep, pivots, forward sweep."""
        runs, groups, num_layers = self.runs, self.groups, len(self.derivs)
        G = [self._stacked(run, g) for run in runs]
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
        phi: list = [None] * len(self.derivs)
        for run, group in zip(self.runs, self.groups):
            if group.Phi is not None:
                phi[run[0]:run[-1] + 1] = group.Phi.unbind()
        return phi

    def substitute(self, Z: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """x = L^{-1} z, the forward sweep: z per run stacked (G, p_l, k) -> x_l (p_l, k),
        t_l = J_l z_l + Phi_l t_{l-1}, x_l = z_l - K_l t_{l-1}."""
        runs, groups, num_layers = self.runs, self.groups, len(self.derivs)
        phi = self.transfers()
        Jz: list = [None] * num_layers
        for run, group, Zi in zip(runs, groups, Z):
            if run[0] < num_layers - 1:
                Jz[run[0]:run[-1] + 1] = group.J(Zi).unbind()
        t: list = [None] * num_layers
        for l in range(num_layers - 1):
            t[l] = Jz[l] if l == 0 else torch.addmm(Jz[l], phi[l], t[l - 1])
        x: list = [None] * num_layers
        for run, group, Zi in zip(runs, groups, Z):
            if group.K is not None:
                Zi = Zi - group.gain(torch.stack([t[l - 1] for l in run]))
            x[run[0]:run[-1] + 1] = Zi.unbind()
        return x

    def pivot(self, l: int):
        """(group, index) of layer l."""
        for run, group in zip(self.runs, self.groups):
            if run[0] <= l <= run[-1]:
                return group, l - run[0]
        raise IndexError(l)


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
    Both keep Q, T, R (a^2 + a a_in + a_in^2).  The reduced LU stores ~ 9 a^2
    per layer, and a solve ~ 6 p per right-hand side.  Against the measured
    rise of resident memory (float32, 20 layers, 3072 inputs, 1000 classes,
    curvature batch 4) this sum was 0.80 GiB for 0.81 GiB at width 128 and
    8.5 GiB for 9.6 GiB at width 512, so the guard adds a quarter.
    """
    itemsize = torch.empty(0, dtype=dtype).element_size()
    total = 0
    for l, (p, a_in, a, a_u) in enumerate(zip(param_counts, input_counts, output_counts,
                                               u_counts)):
        a_in = a_in if l > 0 else 0
        if a_u is not None:
            total += a * a_u + 5 * a_u * a_u + 2 * a_u * a + 5 * a_u * a_in + 2 * a_in * a_in
        else:
            total += a * p + 2 * p * p + p * a_in + a * a_in + a_in * a_in + 3 * (p + a_in) ** 2
        total += a * a + a * a_in + a_in * a_in + 9 * a * a + 6 * p
    return total * itemsize


@dataclass
class LayerSizes:
    """What a route's memory depends on, one entry per layer.

    ``params`` p_l; ``inputs`` a_{l-1} (the first layer's input is data and is
    not charged); ``outputs`` a_l (1 for the loss layer); ``u`` batch x width
    of u = W z + c for a closed-form layer, None for any other; ``u_block`` the
    width of D's per-example blocks there (1 when D is diagonal); ``examples`` the
    batch B of a closed-form layer (None for any other).
    """

    params: list
    inputs: list
    outputs: list
    u: list
    u_block: list
    examples: list

    @classmethod
    def of_model(cls, model: TrackedChain, tracked: TrackedForward,
                 closed: Sequence[bool]) -> "LayerSizes":
        """From the layers and the tracked activations, before any derivative exists."""
        layers = list(model.layers)
        inputs = [z.numel() for z in tracked.inputs]
        u = [a_in // layer.linear.in_features * layer.linear.out_features if c else None
             for layer, a_in, c in zip(layers, inputs, closed)]
        block = [None] * len(layers)
        if closed[-1]:
            block[-1] = layers[-1].linear.out_features
        block[:-1] = [1 if c else None for c in closed[:-1]]
        examples = [a_in // layer.linear.in_features if c else None
                    for layer, a_in, c in zip(layers, inputs, closed)]
        return cls([sum(p.numel() for p in layer.parameters()) for layer in layers],
                   inputs, inputs[1:] + [1], u, block, examples)

    @classmethod
    def of_derivatives(cls, derivs: Sequence) -> "LayerSizes":
        """From derivative blocks already computed."""
        outputs = [d.num_outputs for d in derivs]
        closed = [isinstance(d, AffineLayerBlocks) for d in derivs]
        u = [d.u_gradient.numel() if c else None for d, c in zip(derivs, closed)]
        block = [(1 if d.diagonal else d.u_hessian.shape[-1]) if c else None
                 for d, c in zip(derivs, closed)]
        examples = [d.num_examples if c else None for d, c in zip(derivs, closed)]
        return cls([d.num_params for d in derivs], [0] + outputs[:-1], outputs, u, block,
                   examples)


@dataclass
class RouteCost:
    """Predicted cost of a route: ``setup_flops`` (factorisation), ``solve_flops`` (one
    right-hand side, un-refined), ``bytes`` (peak beyond the derivative blocks), and
    ``ops`` (torch calls in the setup: per-call overhead, ~10 us each on a CPU)."""

    setup_flops: float
    solve_flops: float
    bytes: int
    ops: int

    def seconds(self, flops_per_second: float = 1e10, seconds_per_op: float = 1e-5) -> float:
        """A crude time estimate of the setup plus one solve."""
        return (self.setup_flops + self.solve_flops) / flops_per_second + self.ops * seconds_per_op


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _classes_and_batch(sizes: LayerSizes) -> tuple[int, int]:
    """(C, B) of a closed-form loss layer: u_L = B C, its D blocks C x C."""
    classes = sizes.u_block[-1]
    return classes, sizes.u[-1] // classes


def output_space_cost(sizes: LayerSizes, dtype: torch.dtype = torch.float64) -> RouteCost:
    """Cost of :class:`OutputSpaceSolver` from layer sizes (loss layer closed form).

    m = B (C - 1); per hidden closed-form layer (h outputs, m_in inputs per example)
    ~ 2 m^2 h + 2 m h m_in flops (the Gram share and Phi's propagation); loss layer
    ~ 10 B C^3 (eigh) + 2 m^2 C + 2 m C w; Cholesky m^3 / 3.  A dense layer (sizes.u None)
    turns Phi dense from there down: 2 m a_l p_l + 2 m^2 p_l + 2 m a_l a_{l-1}.  A solve:
    the two sweeps, ~ 8 B p_l per closed-form layer (4 a_l p_l for a dense one), plus 2 m^2.
    Bytes: Gram, factor and one m x m temporary (3 m^2), Phi (m a_l dense, m h_l blocked).
    """
    classes, batch = _classes_and_batch(sizes)
    m = batch * max(classes - 1, 1)
    w_last = sizes.inputs[-1] // batch
    setup = 10 * batch * classes ** 3 + 2 * m * m * classes + 2 * m * classes * w_last
    solve = 8 * batch * sizes.params[-1] + 2 * m * m
    ops, phi_bytes, blocked = 12, m * w_last, True
    for l in reversed(range(len(sizes.params) - 1)):
        p, a, a_in, u = sizes.params[l], sizes.outputs[l], sizes.inputs[l], sizes.u[l]
        a_in = a_in if l > 0 else 0
        blocked = blocked and u is not None
        if u is not None:
            h, m_in = a // batch, a_in // batch
            if blocked:
                setup += 2 * m * m * h + 2 * m * h * m_in + 2 * batch * batch * (m_in + 1)
                phi_bytes = max(phi_bytes, m * max(h, m_in))
            else:
                setup += 2 * m * a * (batch + m + m_in)
                phi_bytes = max(phi_bytes, m * max(a, a_in))
            solve += 8 * batch * p
        else:
            setup += 2 * m * a * p + 2 * m * m * p + 2 * m * a * a_in
            solve += 4 * a * p
            phi_bytes = max(phi_bytes, m * max(a, a_in) + m * p)
        ops += 8
    setup += m ** 3 / 3
    return RouteCost(setup, solve, (3 * m * m + 2 * phi_bytes) * _itemsize(dtype), ops)


def structured_cost(sizes: LayerSizes, dtype: torch.dtype = torch.float64) -> RouteCost:
    """Cost of the structured route (:class:`EliminatedSolver`), same terms.

    Per closed-form layer (a_u = batch x width of u, a outputs, a_in inputs): LU of
    P (a_u square) 2/3 a_u^3, solves and products with it ~ 2 a_u^2 (a + a_in) +
    2 a_u (a^2 + a_in^2 + a a_in); a dense layer LU of A_l + eps I, 2/3 p^3 + 2 p^2 (a +
    a_in).  The pivoted banded LU of the reduced system (2L blocks of size a_l): ~ 8 a_l^3
    per block (panel LU, triangular solve, update with the fill).  A solve ~ 12 a_l^2 +
    8 B p_l per layer.  Bytes: :func:`estimate_structured_bytes`.
    """
    batch = _classes_and_batch(sizes)[1] if sizes.u_block[-1] else 1
    setup, solve, ops = 0.0, 0.0, 0
    for l, (p, a_in, a, a_u) in enumerate(zip(sizes.params, sizes.inputs, sizes.outputs,
                                              sizes.u)):
        a_in = a_in if l > 0 else 0
        if a_u is not None:
            setup += 2 / 3 * a_u ** 3 + 2 * a_u ** 2 * (a + a_in) + 2 * a_u * (
                a * a + a_in * a_in + a * a_in)
            solve += 8 * batch * p
        else:
            setup += 2 / 3 * p ** 3 + 2 * p * p * (a + a_in)
            solve += 4 * p * p
        setup += 16 * a ** 3
        solve += 12 * a * a
        ops += 45
    bytes_ = estimate_structured_bytes(sizes.params, sizes.inputs, sizes.outputs, sizes.u,
                                          dtype)
    return RouteCost(setup, solve, bytes_, ops)


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


def estimate_derivative_bytes(sizes: LayerSizes, dtype: torch.dtype) -> int:
    """Peak bytes of the derivative blocks alone: what ``H @ v`` needs.

    A closed-form layer keeps its input, S, r and D: O(a_u + a_in) numbers, and
    a_u h for a loss layer's dense (h, h) blocks of D (``sizes.u_block``).  A
    dense layer keeps J, F, A, C, G and the oracle's workspace, as in
    :func:`estimate_factorization_bytes`.
    """
    itemsize = torch.empty(0, dtype=dtype).element_size()
    total, peak_workspace = 0, 0
    for l, (p, a_in, a, a_u, h) in enumerate(zip(sizes.params, sizes.inputs, sizes.outputs,
                                                  sizes.u, sizes.u_block)):
        a_in = a_in if l > 0 else 0
        if a_u is not None:
            total += 3 * a_u + a_in + a + a_u * h
        else:
            total += a * p + p * p + p * a_in + a * a_in + a_in * a_in
            peak_workspace = max(peak_workspace, 3 * (p + a_in) ** 2)
    return (total + peak_workspace) * itemsize


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


def check_memory(sizes: LayerSizes, route: str, stage: str, dtype: torch.dtype,
                 device: torch.device, memory_limit: Optional[int], advice: str = "") -> None:
    """The memory guard: raise before allocating what ``stage`` of ``route`` needs.

    ``stage`` is ``'derivatives'`` (the blocks, enough for ``H @ v``) or
    ``'factorization'`` (blocks, system and factors).
    :class:`InsufficientMemoryError` names the estimate, the free memory
    (``memory_limit`` bytes instead, if given), the largest layer and what to
    shrink.  The structured estimates get a quarter on top (measured; see
    :func:`estimate_structured_bytes`).
    """
    p, a_in, a, u = sizes.params, sizes.inputs, sizes.outputs, sizes.u
    if route == "riccati":
        l = max(range(len(p)), key=lambda l: max(p[l] if u[l] is None else u[l], a_in[l] if l else 0))
        largest = (f"at layer {l + 1} (a = batch x width = {a[l]} outputs, {a_in[l]} inputs, "
                   f"p = {p[l]}); memory grows with (batch x width)^2 per layer (p^2 for a "
                   "layer without closed forms)")
    elif route == "output":
        l = len(p) - 1
        largest = (f"the Gram matrix of the logits, m = batch x (classes - 1) = "
                   f"{u[-1] // sizes.u_block[-1] * (sizes.u_block[-1] - 1)} square; memory "
                   "grows with m^2")
    elif route == "structured":
        l = max(range(len(p)), key=lambda l: max(u[l] or p[l], a[l], a_in[l] if l else 0))
        largest = (f"at layer {l + 1} (a = batch x width = {a[l]} outputs, {a_in[l]} inputs, "
                   f"p = {p[l]}); memory grows with (batch x width)^2 per layer (p^2 for a "
                   "layer without closed forms)")
    else:
        l = max(range(len(p)), key=lambda l: p[l] + 2 * a[l])
        largest = (f"layer {l + 1} (p={p[l]} parameters, a={a[l]} activations = batch x "
                   "width); cost grows with (p + 2a)^2 per layer")
    if stage == "derivatives":
        need, what = 5 * estimate_derivative_bytes(sizes, dtype) // 4, "derivative blocks need"
    elif route in ("output", "riccati"):
        cost = output_space_cost if route == "output" else riccati_cost
        need = 5 * (estimate_derivative_bytes(sizes, dtype) + cost(sizes, dtype).bytes) // 4
        what = "factorisation needs"
    elif route == "structured":
        need, what = 5 * estimate_structured_bytes(p, a_in, a, u, dtype) // 4, "factorisation needs"
    else:
        need, what = estimate_factorization_bytes(p, a, a_in[0], dtype), "factorisation needs"
    limit = _available_bytes(device) if memory_limit is None else memory_limit
    if need > limit:
        raise InsufficientMemoryError(
            f"the {route} Hessian {what} about {need / 2**30:.2f} GiB but only "
            f"{limit / 2**30:.2f} GiB is available on {device}. The largest block is "
            f"{largest}. {advice}Shrink the curvature batch, narrow the widest layers, or use "
            "fewer layers."
        )


# --------------------------------------------------------------------------
# The operators users hold: H, and (H + eps I)^{-1} by either route
# --------------------------------------------------------------------------


def _check_vector(v, sizes: Sequence[int], like: torch.Tensor, what: str) -> None:
    """``v`` must be (n,) or (n, k >= 1), finite, with the model's dtype and device."""
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
    if not torch.isfinite(v).all():
        raise HessianInverseError(f"{what} contains NaN or Inf entries")


def _split(v: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """A checked (n,) or (n, k) tensor as per-layer (p_l, k) blocks (detached)."""
    return list(v.detach().reshape(sum(sizes), -1).split(list(sizes)))


def _join(blocks: Sequence[torch.Tensor], vector: bool) -> torch.Tensor:
    out = torch.cat(list(blocks))
    return out[:, 0] if vector else out


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
                 curvature: str = "hessian", sizes: Optional[LayerSizes] = None) -> str:
    """The one place the route is decided: ``'riccati'``, ``'structured'``,
    ``'generic'`` or ``'output'`` (docs/ALGORITHM.md, "Choosing the route").

    A forced ``path`` is kept.  ``'auto'`` needs the generic route at damping 0,
    whose pivoting copes with singular blocks and the softmax gauge;
    ``damping=None`` (an operator whose damping is not chosen yet) keeps the closed
    forms.  With damping > 0 it takes the cheapest setup (flops from layer sizes)
    among the routes that apply: the layer-wise LDL^T (:func:`riccati_cost`), the
    structured route when the chain has closed-form layers (:func:`structured_cost`),
    and for the GGN with a closed-form loss layer the output-space route
    (:func:`output_space_cost`).  A route that then fails hands over to the next
    (:meth:`HessianInverse._fall_back`).
    """
    if path != "auto":
        return path
    if damping is None or damping == 0:
        return "structured" if closed_forms and damping is None else "generic"
    if sizes is None:
        return "riccati"
    costs = {"riccati": riccati_cost}
    if closed_forms:
        costs["structured"] = structured_cost
    if curvature == "ggn" and sizes.u[-1] is not None and sizes.u_block[-1]:
        costs["output"] = output_space_cost
    return min(costs, key=lambda route: costs[route](sizes).setup_flops)


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
    Gauss-Newton matrix's and "H" reads "GGN" throughout.  ``derivs`` holds one
    :class:`LayerDerivatives` (dense) or :class:`AffineLayerBlocks` (closed
    form) per layer; ``gauge`` the loss layer's known null basis N, or None.

    A snapshot of the tracked point: the blocks hold copies of what they need
    (weights included), so after the parameters change (an optimizer step,
    ``p.add_(...)``) ``H @ v`` still answers exactly for the point it was
    computed at, as do factorisations made from it.  For the new point, run
    the tracked forward pass again and build a new operator.
    """

    def __init__(self, derivs: list, gauge: Optional[torch.Tensor],
                 curvature: str = "hessian", memory_limit: Optional[int] = None):
        self.derivs = derivs
        self.gauge = gauge
        self.curvature = curvature
        self.memory_limit = memory_limit
        self.param_sizes = [d.num_params for d in derivs]
        self.num_params = sum(self.param_sizes)
        self._like = derivs[-1].J

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
        return any(isinstance(d, AffineLayerBlocks) for d in self.derivs)

    def split(self, v: torch.Tensor, what: str = "v") -> list[torch.Tensor]:
        """Validate ``v`` ((n,) or (n, k)) and split it into per-layer (p_l, k) blocks."""
        _check_vector(v, self.param_sizes, self._like, what)
        return _split(v, self.param_sizes)

    def project_out_gauge(self, v: torch.Tensor) -> torch.Tensor:
        """``v - P_N v`` for v (n,) or (n, k); v itself when there is no known gauge."""
        if self.gauge is None:
            return v
        last = self.param_sizes[-1]
        tail = v[-last:]
        return torch.cat([v[:-last], tail - self.gauge @ (self.gauge.T @ tail)])

    def densified(self) -> "HessianOperator":
        """The same matrix with closed-form layers written out as dense blocks.

        Guarded by the generic route's memory estimate before writing them out.
        """
        if not self.has_closed_forms:
            return self
        check_memory(LayerSizes.of_derivatives(self.derivs), "generic", "factorization",
                     self.dtype, self.device, self.memory_limit,
                     "Use damping > 0, which allows the structured path, or: ")
        dense = [d.densify() if isinstance(d, AffineLayerBlocks) else d for d in self.derivs]
        return HessianOperator(dense, self.gauge, self.curvature, self.memory_limit)

    def to(self, dtype: torch.dtype) -> "HessianOperator":
        """The same blocks in another floating dtype (for a lower-precision factorisation)."""
        if dtype == self.dtype:
            return self

        def cast(d):
            return replace(d, **{f.name: getattr(d, f.name).to(dtype) for f in fields(d)
                                 if isinstance(getattr(d, f.name), torch.Tensor)})
        gauge = None if self.gauge is None else self.gauge.to(dtype)
        return HessianOperator([cast(d) for d in self.derivs], gauge, self.curvature,
                               self.memory_limit)

    def apply_blocks(self, x: list, damping: float = 0.0) -> list:
        """``(H + damping I) x`` on per-layer blocks (p_l, k): the exact product."""
        out = structured_hessian_vector_product(self.derivs, x)
        return [o + damping * xi for o, xi in zip(out, x)] if damping else out

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for v (n,) or (n, k); differentiable in v."""
        _check_vector(v, self.param_sizes, self._like, "v")
        return _differentiable_in_v(
            v, lambda u: _join(self.apply_blocks(_split(u, self.param_sizes)), u.dim() == 1))

    __matmul__ = matmul

    def factorize(self, damping: float = 0.0, check_condition: bool = True,
                  path: str = "auto", rtol: Optional[float] = None,
                  on_inaccurate: str = "raise", factor_dtype="auto",
                  factorization: str = "banded") -> "HessianInverse":
        """``(H + damping I)^{-1}`` (``H^+`` on the softmax gauge when damping is 0).

        ``path``: ``'structured'`` eliminates every layer's parameters (needs
        damping > 0), ``'generic'`` factors the lifted system, ``'auto'``
        decides by :func:`choose_route`.  ``rtol``, ``on_inaccurate`` and
        ``factor_dtype``: see :class:`HessianInverse`.
        """
        return HessianInverse(self, damping, check_condition, path, rtol, on_inaccurate,
                              factor_dtype=factor_dtype, factorization=factorization)

    def as_linear_operator(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out)."""
        return _scipy_operator(self, self.matmul)


def _singular_message(what: str, detail: str, damping: float) -> str:
    hint = ("use damping > 0 (e.g. 1e-4 relative to the curvature scale)"
            if damping == 0 else "increase the damping")
    return (f"{what} is singular to working precision ({detail}). With too little data "
            "for the parameter count (batch small against the layer sizes), or an "
            f"eigenvalue of H at -damping, there is no unique solution: {hint}.")


FACTORIZATIONS = ("banded", "cyclic")


def _factor_or_explain(system: BlockTridiagonal, what: str, damping: float,
                       factorization: str = "banded", merge: int = 1):
    """:func:`banded_lu` (or :func:`cyclic_reduction`), a zero pivot turned into advice.

    Cyclic reduction that meets a zero pivot (it pivots only within blocks)
    warns and hands over to the banded LU, which decides singularity.
    """
    if factorization == "cyclic":
        try:
            return cyclic_reduction(system, merge)
        except SingularSystemError as err:
            warnings.warn(f"{err}; factoring with the banded LU instead.", RuntimeWarning)
    try:
        return banded_lu(system)
    except SingularSystemError as err:
        raise SingularHessianError(_singular_message(what, str(err), damping)) from None


def _solve_factored(factor, rhs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Solve with either factorisation's factors."""
    if isinstance(factor, CyclicReductionFactor):
        return cyclic_reduction_solve(factor, rhs)
    return banded_lu_solve(factor, rhs)


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
                 factorization: str = "banded"):
        self.operator = operator
        self.system = assemble_lifted_system(operator.derivs, damping, gauge)
        what = _system_name(operator, damping, gauge)
        self.lu = _factor_or_explain(self.system, what, damping, factorization)
        self.rcond = None
        if check_condition:
            self.rcond = self.reciprocal_condition()
            if not self.rcond > torch.finfo(operator.dtype).eps:
                raise SingularHessianError(_singular_message(
                    what, f"reciprocal condition number of the lifted system ~ {self.rcond:.1e}",
                    damping))

    def solve_once(self, blocks: list) -> list:
        """One pass through the factors: per-layer right-hand sides -> parameter blocks."""
        derivs = self.operator.derivs
        return _unlift(derivs, _solve_factored(self.lu, _lift(derivs, blocks)))

    def reciprocal_condition(self, iterations: int = 5) -> float:
        """Estimate 1 / cond_1 of the lifted system (Hager-Higham, as LAPACK gecon).

        A few solves with the factors give a lower bound on ||K^{-1}||_1 that
        is usually within a factor of 3; K is symmetric so K^{-T} = K^{-1}.
        """
        sizes = self.lu.block_sizes
        like = self.system.diag[0]
        total = sum(sizes)
        x = torch.full((total, 1), 1.0 / total, dtype=like.dtype, device=like.device)
        estimate = 0.0
        for it in range(iterations):
            y = torch.cat(_solve_factored(self.lu, list(x.split(sizes))))
            if not torch.isfinite(y).all():
                return 0.0
            estimate = y.abs().sum().item()
            z = torch.cat(_solve_factored(self.lu, list(torch.sign(y).split(sizes))))
            j = int(z.abs().argmax())
            if it > 0 and z.abs()[j, 0] <= (z * x).sum():
                break
            x = torch.zeros_like(x)
            x[j] = 1.0
        return 1.0 / (self.system.norm1().item() * estimate) if estimate > 0 else 0.0




class EliminatedSolver:
    """The structured route: every layer's parameters eliminated, damping > 0.

    ``eliminated`` holds each layer's :class:`EliminatedLayer`; ``system`` is
    the reduced block-tridiagonal system (:func:`assemble_reduced_system`),
    equilibrated (``scales``, :func:`equilibrate`) and factored by the same
    pivoted :func:`banded_lu` as the generic route.  A solve costs
    O(sum_l a_l^2 + sum_l a_l p_l) per vector.  Eliminating x_l divides by
    eps, so the reduced system can be worse conditioned than ``H + eps I``
    itself: :class:`HessianInverse` refines every solve against the exact
    product (docs/ALGORITHM.md, "Parameter elimination").
    """

    route = "structured"
    rcond = None

    def __init__(self, operator: HessianOperator, damping: float, factorization: str = "banded"):
        if not damping > 0:
            raise HessianInverseError(
                f"the structured path needs a finite damping > 0 (it inverts A_l + damping I "
                f"for every layer); got {damping}. Use path='generic' or path='auto' for damping 0"
            )
        self.operator = operator
        self.groups = eliminate_layers(operator.derivs, damping)
        self.eliminated = _per_layer(self.groups)
        self.system, self.scales = equilibrate(assemble_reduced_system(self.eliminated))
        # merge=2 for cyclic reduction: the y-blocks R_{l+1} can be zero (always the last).
        self.lu = _factor_or_explain(self.system, f"{operator.symbol} + {damping:g} I", damping,
                                     factorization, merge=2)

    def solve_once(self, g_blocks: list) -> list:
        """Reduced right-hand side, one pass through the factors, parameters recovered."""
        rhs = _reduced_rhs(self.groups, g_blocks)
        scaled = _solve_factored(self.lu, [s[:, None] * r for s, r in zip(self.scales, rhs)])
        reduced = [s[:, None] * y for s, y in zip(self.scales, scaled)]
        return _recover_parameters(self.groups, g_blocks, reduced)


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
                 gauge: Optional[torch.Tensor] = None):
        self.operator = operator
        kind = "cholesky" if operator.curvature == "ggn" and damping > 0 else "lu"
        self.factor = RiccatiFactor(operator.derivs, damping, kind, gauge)
        if kind == "cholesky" and not self.factor.ok:
            self.factor = RiccatiFactor(operator.derivs, damping, "lu", gauge)
        if not self.factor.ok:
            layer = int(self.factor.broken.nonzero()[-1]) + 1
            raise EliminationError(
                f"layer {layer}: the layer-wise factorisation of {operator.symbol} + "
                f"{damping:g} I broke down (its pivot block P_l = A_l + damping I + "
                "J_l^T Ghat_l J_l is singular to working precision). The route does not "
                "pivot across layers: path='structured' or 'generic' does, or use another "
                "damping.")

    def solve_once(self, blocks: list) -> list:
        """Both sweeps: per-layer (p_l, k) right-hand sides -> (p_l, k) solutions."""
        return self.factor.solve(blocks)


class OutputSpaceSolver:
    """The output-space route: (GGN + eps I)^{-1} by Woodbury in the logits, damping > 0.

    GGN = U^T U, U = R J_o (m = B (C - 1) rows for softmax cross-entropy), and
    (U^T U + eps I)^{-1} v = (v - U^T (eps I + U U^T)^{-1} U v) / eps.  Setup:
    ``gram`` = U U^T (:func:`logit_gram`) and its damped Cholesky factor ``cholesky``;
    O(sum_l (m^2 h_l + m h_l h_{l-1}) + m^3) time, O(m^2) memory beyond the operator's
    blocks.  A solve: O(one GGN-vector product + m^2) per right-hand side.  Not backward
    stable on its own (the subtraction loses about u cond(GGN + eps I) relative, u the
    unit roundoff),
    so :class:`HessianInverse` refines it like the structured route.
    Needs ``operator.curvature == 'ggn'`` (for the Hessian, U^T U misses the network's own
    curvature); any hidden layers; a closed-form ``AffineCrossEntropy`` or any dense GGN
    loss layer.
    """

    route = "output"
    rcond = None

    def __init__(self, operator: HessianOperator, damping: float):
        if operator.curvature != "ggn":
            raise HessianInverseError(
                f"the output-space path solves with the Gauss-Newton matrix only (GGN = U^T U);"
                f" got curvature={operator.curvature!r}. Use curvature='ggn' or another path")
        if not (math.isfinite(damping) and damping > 0):
            raise HessianInverseError(
                f"the output-space path needs a finite damping > 0 (eps I + U U^T must be "
                f"positive definite; at 0 the GGN is singular on the softmax gauge); got "
                f"{damping}. Use path='generic' or path='auto' for damping 0")
        self.operator = operator
        self.damping = float(damping)
        self.factor = output_factor(operator.derivs[-1])
        self.gram = logit_gram(operator.derivs, self.factor)
        self.cholesky = _damped_cholesky(self.gram, self.damping,
                                         f"{operator.symbol} + {damping:g} I")

    @property
    def rows(self) -> int:
        """m, the rows of U (the size of the factored system)."""
        return self.gram.shape[0]

    def solve_once(self, blocks: list) -> list:
        """One un-refined solve: per-layer (p_l, k) right-hand sides -> (p_l, k) blocks."""
        derivs = self.operator.derivs
        y = torch.cholesky_solve(output_tangent(derivs, self.factor, blocks), self.cholesky)
        back = output_adjoint(derivs, self.factor, y)
        return [(v - b) / self.damping for v, b in zip(blocks, back)]


def _column_norms(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of each column of a block vector of (p_l, k) matrices: (k,)."""
    return torch.stack([d.square().sum(0) for d in blocks]).sum(0).sqrt()


def _relative_norm(num: Sequence[torch.Tensor], den: Sequence[torch.Tensor]) -> float:
    """max over columns j of ||num_j|| / ||den_j|| for blocks of (p_l, k) matrices (0/0 = 0)."""
    num_norm, den_norm = _column_norms(num), _column_norms(den)
    ratio = torch.where(den_norm > 0, num_norm / den_norm,
                        torch.where(num_norm > 0, math.inf, 0.0))
    return float(ratio.max())


class _CastSolver:
    """A solver factored in a lower precision, solving in the caller's (mixed precision)."""

    def __init__(self, solver, dtype: torch.dtype):
        self.solver, self.dtype = solver, dtype
        self.route, self.rcond = solver.route, solver.rcond

    def solve_once(self, blocks: list) -> list:
        low = self.solver.operator.dtype
        return [x.to(self.dtype) for x in self.solver.solve_once([b.to(low) for b in blocks])]


def _largest_block(operator: HessianOperator, route: str) -> int:
    """The block size of the system ``route`` factors (a_l, the pivot size, or p_l + 2 a_l)."""
    if route == "structured":
        return max(d.num_outputs for d in operator.derivs)
    if route == "riccati":
        return max(min(d.num_examples, d.num_params // d.weight.shape[0]) * d.weight.shape[0]
                   if isinstance(d, AffineLayerBlocks) else d.num_params
                   for d in operator.derivs)
    return max(d.num_params + 2 * d.num_outputs for d in operator.derivs)


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

    ``factorization='cyclic'`` factors by block cyclic reduction (parallel in
    depth, for GPUs) instead of the banded LU; it pivots only within blocks, so
    a zero pivot or a missed contract hands over to the banded LU.

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
                 factorization: str = "banded"):
        _check_path(path)
        if factorization not in FACTORIZATIONS:
            raise HessianInverseError(
                f"factorization must be one of {FACTORIZATIONS}, got {factorization!r}")
        self.factorization = self._factorization_asked = factorization
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
        route = choose_route(path, self.damping, operator.has_closed_forms, operator.curvature,
                             LayerSizes.of_derivatives(operator.derivs))
        self._factor_dtype_asked = factor_dtype
        self.factor_dtype = self._resolve_factor_dtype(factor_dtype, route)
        self.solver = self._first_solver(route, probe)

    def _resolve_factor_dtype(self, asked, route: str) -> torch.dtype:
        dtype = self.operator.dtype
        if route == "output":  # an m x m Cholesky: cheap, and float32 would cost u32 cond
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
        try:
            return self._build(route, probe)
        except SingularHessianError as err:
            if self.factorization == "cyclic" and route in ("structured", "generic"):
                self.factorization = "banded"
                return self._first_solver(route, probe)
            if self.factor_dtype != self.operator.dtype:
                self.factor_dtype = self.operator.dtype
                return self._first_solver(route, probe)
            if route != "generic":
                return self._fall_back(err, route, probe)
            raise

    def _build(self, route: str, probe: bool):
        """Factor ``route`` in ``factor_dtype``; the structured route is probed if asked."""
        op, low = self.operator, self.factor_dtype
        gauge = None if self.gauge is None else self.gauge.to(low)
        if route == "generic":
            solver = LiftedSolver(op.densified().to(low), self.damping, gauge, self.check_condition,
                                  self.factorization)
        elif route == "output":
            check_memory(LayerSizes.of_derivatives(op.derivs), "output", "factorization",
                         low, op.device, op.memory_limit)
            solver = OutputSpaceSolver(op, self.damping)
        elif route == "riccati":
            check_memory(LayerSizes.of_derivatives(op.derivs), "riccati", "factorization",
                         low, op.device, op.memory_limit)
            solver = RiccatiSolver(op.to(low), self.damping, gauge)
        else:
            check_memory(LayerSizes.of_derivatives(op.derivs), "structured", "factorization",
                         low, op.device, op.memory_limit)
            solver = EliminatedSolver(op.to(low), self.damping, self.factorization)
        if low != op.dtype:
            solver = _CastSolver(solver, op.dtype)
        if route in ("structured", "riccati") and self.check_condition and probe:
            generator = torch.Generator(device=op.device).manual_seed(0)
            g = torch.randn(op.num_params, 1, generator=generator, dtype=op.dtype,
                            device=op.device)
            b = _split(g, op.param_sizes)
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
        first, if ``probe``)."""
        if self.path != "auto":
            raise err
        self.probe_error, self.factor_dtype = None, self.operator.dtype
        following = {"output": "riccati", "riccati": "structured"}.get(failed)
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
        return LiftedSolver(dense, self.damping, self.gauge, self.check_condition)

    def _name(self) -> str:
        return _system_name(self.operator, self.damping, self.gauge)

    def _apply(self, x: list) -> list:
        """The exact product with what the factors invert: ``H + damping I`` [+ N N^T]."""
        out = self.operator.apply_blocks(x, self.damping)
        if self.gauge is not None:
            out[-1] = out[-1] + self.gauge @ (self.gauge.T @ x[-1])
        return out

    def _refine(self, solver, b: list) -> tuple[list, list, float]:
        """A solve refined against the exact product.

        Corrections continue while each at least halves the relative residual,
        up to ``max_refinement``, and stop once it is at rounding level (4 eps).
        Returns x, its residual b - A x, and the size of the last correction
        computed relative to x (0 if none was needed): an estimate of x's
        relative error, which stays O(1) when A is singular to working precision.
        """
        eps = torch.finfo(self.operator.dtype).eps
        x = solver.solve_once(b)
        r = [bi - ai for bi, ai in zip(b, self._apply(x))]
        res, correction = _relative_norm(r, b), 0.0
        for _ in range(self.max_refinement):
            if not res > 4 * eps:
                break
            dx = solver.solve_once(r)
            x_new = [xi + di for xi, di in zip(x, dx)]
            correction = _relative_norm(dx, x_new)
            r_new = [bi - ai for bi, ai in zip(b, self._apply(x_new))]
            res_new = _relative_norm(r_new, b)
            if not res_new < res:
                break
            x, r, res, stalled = x_new, r_new, res_new, not res_new < res / 2
            if stalled:
                break
        return x, r, correction

    def _norm_estimate(self, steps: int = 8) -> float:
        """A lower bound on ||A||_2 by power iteration (``steps`` exact products, cached)."""
        if self._norm is None:
            op = self.operator
            generator = torch.Generator(device=op.device).manual_seed(1)
            q = _split(torch.randn(op.num_params, 1, generator=generator, dtype=op.dtype,
                                   device=op.device), op.param_sizes)
            norm = 0.0
            for _ in range(steps):
                size = torch.stack([qi.square().sum() for qi in q]).sum().sqrt()
                q = self._apply([qi / size for qi in q])
                norm = float(torch.stack([qi.square().sum() for qi in q]).sum().sqrt())
            self._norm = norm
        return self._norm

    def _check(self, b: list, x: list, r: list, correction: float) -> float:
        """The contract's figure for a refined solve: its backward error, or inf if undetermined.

        The backward error is ``max_j ||r_j|| / (||A|| ||x_j|| + ||b_j||)``
        (the cheap bound ||r_j|| / ||b_j|| when that already meets ``rtol``).
        A singular A can still give a small backward error, so a solve whose
        last refinement correction exceeds eps^(1/4) of x (refinement that
        does not converge: A singular to working precision) counts as inf.
        """
        self.residual = _relative_norm(r, b)
        self.correction = correction
        if not correction <= torch.finfo(self.operator.dtype).eps ** 0.25:
            return math.inf
        if self.residual <= self.rtol:
            return self.residual
        eta = _column_norms(r) / (self._norm_estimate() * _column_norms(x) + _column_norms(b))
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
        return (f"{self._name()}: {found} ({route} route, {dtype}). Too ill-conditioned "
                f"for {dtype} at this damping: use float64 (model.double()) or increase the "
                "damping, or pass a looser rtol= (or on_inaccurate='warn' to take the result "
                "anyway).")

    def _escalate(self, eta: float):
        """After a solve that missed the contract: the banded LU if cyclic reduction
        factored, float64 factors if they were lower, else ``'auto'``'s next route;
        None when nothing is left to try."""
        try:
            if self.factorization == "cyclic" and self.route in ("structured", "generic"):
                self.factorization = "banded"
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
        scale = torch.ldexp(torch.ones_like(v[0]), torch.frexp(v.abs().amax(0)).exponent)
        b = _split(v / scale, self.operator.param_sizes)
        if self.gauge is not None:
            b[-1] = b[-1] - self.gauge @ (self.gauge.T @ b[-1])
        x, r, correction = self._refine(self.solver, b)
        eta = self._check(b, x, r, correction)
        while not eta <= self.rtol:
            solver = self._escalate(eta)
            if solver is None:
                break
            self.solver = solver
            x, r, correction = self._refine(solver, b)
            eta = self._check(b, x, r, correction)
        self.backward_error = eta
        if not eta <= self.rtol:
            if self.on_inaccurate == "raise":
                raise InaccurateSolveError(self._inaccurate_message(eta, self.route))
            warnings.warn(self._inaccurate_message(eta, self.route), RuntimeWarning)
        return _join(x, v.dim() == 1) * scale

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


def _operator_at_tracked_point(model: TrackedChain, loss: Optional[torch.Tensor],
                               curvature: str, path: str, damping: Optional[float],
                               memory_limit: Optional[int], stage: str) -> HessianOperator:
    """Check the tracked pass, decide the route, guard ``stage``'s memory, one sweep.

    Arguments are already validated.  Layers get closed forms exactly when the
    route is structured.
    """
    tracked = model.tracked_forward(loss)
    closed = closed_form_flags(model, tracked)
    sizes = LayerSizes.of_model(model, tracked, closed)
    route = choose_route(path, damping, any(closed), curvature, sizes)
    if route == "generic":
        closed = [False] * len(closed)
        sizes = LayerSizes.of_model(model, tracked, closed)
    first = tracked.inputs[-1]
    check_memory(sizes, route, stage, first.dtype, first.device, memory_limit)
    derivs = chain_derivatives(model, tracked, curvature, closed)
    null_directions = getattr(model.loss_layer, "null_directions", None)
    gauge = null_directions().detach() if callable(null_directions) else None
    return HessianOperator(derivs, gauge, curvature, memory_limit)


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
    return _operator_at_tracked_point(model, loss, curvature, path, None, memory_limit,
                                      "derivatives")


def factorize(model: TrackedChain, loss: Optional[torch.Tensor] = None, damping: float = 0.0,
              memory_limit: Optional[int] = None, curvature: str = "hessian",
              path: str = "auto", rtol: Optional[float] = None,
              on_inaccurate: str = "raise", factor_dtype="auto",
              factorization: str = "banded") -> HessianInverse:
    """Derivatives and factorisation of ``H + damping I`` (or ``GGN + damping I``
    with ``curvature='ggn'``), ready for many solves.

    ``path``: ``'auto'`` (default) takes the structured route when damping > 0
    and the model has affine layers with closed forms, else the generic one
    (:func:`choose_route`); ``'structured'`` or ``'generic'`` force a route.
    ``rtol``, ``on_inaccurate``: the accuracy contract; ``factor_dtype``: mixed
    precision (both in :class:`HessianInverse`).
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
                                   factorization: str = "banded") -> torch.Tensor:
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
        factorization: ``'banded'`` (default) or ``'cyclic'`` (block cyclic
            reduction, parallel in depth; falls back to banded when it fails).

    The structured route pays no separate acceptance probe here: the refined
    solve of ``v`` is its own test, and ``path='auto'`` falls back to the
    generic route only if it fails.  Raises :class:`SingularHessianError` if
    the system is singular beyond the gauge.
    """
    validate_model(model, curvature)
    _check_path(path)
    damping = _check_damping(damping, next(model.parameters()).dtype)
    like = next(model.parameters())
    _check_vector(v, [sum(p.numel() for p in layer.parameters()) for layer in model.layers],
                  like, "v")
    operator = _operator_at_tracked_point(model, loss, curvature, path, damping, memory_limit,
                                          "factorization")
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

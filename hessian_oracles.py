"""Independent reference computations for the tests (ALGORITHM.md section 8).

Nothing here uses the lifted system or the layer oracle of ``hessian_inverse``:
the dense Hessian comes from ``torch.func.hessian`` of the loss as a function of
the flattened parameter vector, and the Hessian-vector product from
``torch.func.jvp`` of ``torch.func.grad``.  Dense matrices are formed here on
purpose, for small models only.
"""

from __future__ import annotations

import torch
from torch.func import functional_call


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
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

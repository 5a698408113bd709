"""The core under hostile but fair use (issue 18, items 3, 6 and 7).

- Kept operators are snapshots of the tracked point: after an optimizer step
  (SGD, Adam, fused Adam) or an in-place change of the parameters, ``H @ v``
  and ``inv @ v`` still answer exactly for the point they were computed at,
  on every route, checked against the dense Hessian (or GGN) of a copy of the
  old parameters.
- A layer that draws random numbers itself (``F.dropout`` called directly) is
  refused with an error naming it, on the Hessian and on the GGN.
- Huge and tiny right-hand sides are solved, not called singular; a damping
  that overflows the model's dtype is refused as such.

    python -m pytest test_reliability.py -q
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hessian_inverse as hi
from conftest import (cross_entropy_in_logits, dense_ggn, dense_hessian, make_mlp,
                      relative_error)

F64 = torch.float64
DAMPING = 1e-2

# (route asked of factorize, curvature): every route the solver has.
ROUTES = [("auto", "hessian"), ("structured", "hessian"), ("generic", "hessian"),
          ("output", "ggn")]


def sgd(params):
    return torch.optim.SGD(params, lr=0.5)


def adam(params):
    return torch.optim.Adam(params, lr=0.1)


def fused_adam(params):
    return torch.optim.Adam(params, lr=0.1, fused=True)


UPDATES = {"sgd": sgd, "adam": adam, "fused-adam": fused_adam, "in-place": None}


def move(model, loss, update):
    """Change the parameters in place: an optimizer step on ``loss``, or ``p.add_``."""
    if UPDATES[update] is None:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        return
    optimizer = UPDATES[update](model.parameters())
    loss.backward()
    optimizer.step()


def curvature_matrix(model, x, t, curvature):
    if curvature == "ggn":
        return dense_ggn(model, x, cross_entropy_in_logits(len(t), t))
    return dense_hessian(model, x, t)


@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("path, curvature", ROUTES, ids=[f"{p}-{c}" for p, c in ROUTES])
def test_kept_operators_answer_for_their_tracked_point_after_the_parameters_move(
        path, curvature, update):
    model, x, t, loss = make_mlp(3, 3, 4, 6)
    reference = curvature_matrix(copy.deepcopy(model), x, t, curvature)
    # 'generic' holds the autograd oracle's dense blocks; the others hold closed forms.
    H = hi.hessian_operator(model, loss, curvature=curvature,
                            path="generic" if path == "generic" else "auto")
    inv = H.factorize(DAMPING, path=path)
    if path != "auto":
        assert inv.route == path
    move(model, loss, update)
    V = torch.randn(H.num_params, 3, dtype=F64)
    moved = curvature_matrix(model, x, t, curvature)
    assert relative_error(moved @ V, reference @ V) > 1e-2  # the point did move

    assert relative_error(H @ V, reference @ V) < 1e-13
    expected = torch.linalg.solve(reference + DAMPING * torch.eye(H.num_params, dtype=F64), V)
    assert relative_error(inv @ V, expected) < 1e-9
    assert relative_error(inv.with_damping(0.1) @ V, torch.linalg.solve(
        reference + 0.1 * torch.eye(H.num_params, dtype=F64), V)) < 1e-9


class RandomLayer(nn.Module):
    """A hidden layer that calls F.dropout itself (random unless told it is not training)."""

    def __init__(self, width, follow_mode):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.follow_mode = follow_mode

    def forward(self, z):
        z = self.linear(z)
        z = F.dropout(z, 0.5, training=self.training) if self.follow_mode else F.dropout(z, 0.5)
        return torch.tanh(z)


def random_chain(follow_mode):
    torch.manual_seed(0)
    model = hi.TrackedChain([RandomLayer(4, follow_mode), RandomLayer(4, follow_mode)],
                            hi.AffineCrossEntropy(4, 3)).to(F64)
    x, t = torch.randn(5, 4, dtype=F64), torch.randint(0, 3, (5,))
    return model, x, t


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_a_layer_calling_dropout_directly_is_refused_by_name(curvature):
    model, x, t = random_chain(follow_mode=False)
    loss = model(x, t, track_activations=True)
    for build in (lambda: hi.hessian_operator(model, loss, curvature=curvature),
                  lambda: hi.factorize(model, loss, 0.1, curvature=curvature)):
        with pytest.raises(hi.HessianInverseError) as err:
            build()
        message = str(err.value)
        assert message.startswith("layer 2 (RandomLayer) draws random numbers"), message
        assert "nn.Dropout" in message and "remove" in message


def test_dropout_that_follows_eval_mode_is_not_refused():
    model, x, t = random_chain(follow_mode=True)
    model.eval()
    loss = model(x, t, track_activations=True)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64)
    assert relative_error(hi.hessian_operator(model, loss) @ v,
                          dense_hessian(model, x, t) @ v) < 1e-13


@pytest.mark.parametrize("path", ["auto", "structured", "generic"])
def test_huge_and_tiny_right_hand_sides_are_solved_exactly_scaled(path):
    model, x, t, loss = make_mlp(1, 3, 4, 6)
    inv = hi.factorize(model, loss, DAMPING, path=path)
    V = torch.randn(inv.shape[0], 2, dtype=F64)
    X = inv @ V
    reference = torch.linalg.solve(
        dense_hessian(model, x, t) + DAMPING * torch.eye(inv.shape[0], dtype=F64), V)
    assert relative_error(X, reference) < 1e-9
    for power in (700, -700, 1000, -1000):  # 2**1000 ~ 1e301: norms of v overflow float64
        assert torch.equal(inv @ (V * 2.0 ** power), X * 2.0 ** power)
    for scale in (1e250, 1e-250):
        assert relative_error(inv @ (V * scale) / scale, X) < 1e-14
        assert relative_error(hi.hessian_inverse_vector_product(
            model, loss, V[:, 0] * scale, DAMPING, path=path) / scale, X[:, 0]) < 1e-14
    scales = torch.tensor([1e300, 1e-300], dtype=F64)  # each column on its own
    assert relative_error((inv @ (V * scales)) / scales, X) < 1e-14


def test_damping_that_overflows_the_model_dtype_is_refused_as_such():
    model, x, t, loss = make_mlp(1, 3, 4, 6, dtype=torch.float32)
    H = hi.hessian_operator(model, loss)
    attempts = [lambda: hi.factorize(model, loss, 1e39), lambda: H.factorize(1e39),
                lambda: H.factorize(1.0).with_damping(1e39),
                lambda: hi.hessian_inverse_vector_product(
                    model, loss, torch.ones(H.num_params), 1e39)]
    for attempt in attempts:
        with pytest.raises(hi.HessianInverseError) as err:
            attempt()
        message = str(err.value)
        assert "damping 1e+39 overflows the model's float32" in message, message
        assert "singular" not in message
    v = torch.randn(H.num_params)
    x1 = H.factorize(1e38) @ v  # representable: solved, x = v / damping to float32 accuracy
    assert relative_error(x1 * 1e38, v) < 1e-5

"""Convolutional networks: closed-form conv, flattening and pooling blocks, matrix-free
autograd blocks for plain torch modules, the parameter-space route (Hessian) and the
output-space route (Gauss-Newton) on them (docs/ALGORITHM.md, "Convolutional layers",
"Matrix-free layers", "The parameter-space route").

References are independent of the layer blocks: the dense Hessian by
``torch.func.hessian`` of the loss in the flat parameter vector and the dense GGN
``J^T H_o J`` (``conftest.dense_ggn``), float64, solved by ``torch.linalg.solve`` or
``torch.linalg.pinv``; at the sizes of the targets, residuals through autograd's
Hessian-vector product (``conftest.autograd_hvp``).

Tolerances.  Products: 1e-12 relative (a product is a few convolutions; measured
<= 1e-15).  Solves: the forward error of a backward-stable solve is about u cond(A),
u = 1.1e-16; we ask for 100 u cond(A), floored at 1e-12 (measured 1e-15..1e-13).
Residuals of the big targets: the solver's contract, backward error <= u^(2/3)
(4e-11), which for a relative residual ||A x - v|| / ||v|| means at most
u^(2/3) (1 + ||A|| ||x|| / ||v||); we ask for 1e-10 (measured <= 4e-13).
"""

import pytest
import torch
import torch.nn as nn

import hessian_inverse as hi
import spectrum
import trust_region
from conftest import (SineSquaredError, autograd_hvp, cross_entropy_in_logits, dense_ggn,
                      dense_hessian)
from conftest import relative_error as rel

F64 = torch.float64
EPS64 = torch.finfo(F64).eps


def solve_tolerance(A: torch.Tensor) -> float:
    return max(1e-12, 100 * EPS64 * torch.linalg.cond(A).item())


def damped(M: torch.Tensor, eps: float) -> torch.Tensor:
    return M + eps * torch.eye(M.shape[0], dtype=M.dtype)


def cnn(seed, input_shape, channels, strides, padding, activation, batch, classes=3,
        pool=None):
    """A ConvNetWithTracking, its data and tracked loss (parameters, then inputs, targets)."""
    torch.manual_seed(seed)
    model = hi.ConvNetWithTracking(input_shape, classes, channels, strides=strides,
                                   padding=padding, activation=activation, pool=pool).double()
    x = torch.randn(batch, *input_shape, dtype=F64)
    t = torch.randint(0, classes, (batch,))
    return model, x, t, model(x, t, track_activations=True)


def plain_chain(seed, batch, loss_layer=None, targets=None):
    """The issue's chain of plain torch modules: Conv2d+Tanh, Conv2d(stride 2)+Sigmoid,
    Flatten, then AffineCrossEntropy (or ``loss_layer``)."""
    torch.manual_seed(seed)
    layers = [nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh()),
              nn.Sequential(nn.Conv2d(3, 2, 3, stride=2), nn.Sigmoid()), nn.Flatten()]
    model = hi.TrackedChain(layers, loss_layer or hi.AffineCrossEntropy(2 * 2 * 2, 3)).double()
    x = torch.randn(batch, 2, 6, 6, dtype=F64)
    t = torch.randint(0, 3, (batch,)) if targets is None else targets
    return model, x, t, model(x, t, track_activations=True)


# (seed, input_shape, channels, strides, padding, activation, batch): Conv1d and Conv2d,
# strides 1 and 2, padding 0 and 1, tanh / sigmoid / gelu, batches 1..48, n <= 1,500.
CNNS = [
    (0, (2, 6, 6), [3, 4], [1, 2], 1, "tanh", 5),
    (1, (1, 7, 7), [2, 3], [2, 1], 0, "sigmoid", 1),
    (2, (2, 5, 5), [4], [1], 0, "gelu", 12),
    (3, (2, 16), [3, 2], [2, 1], 1, "tanh", 7),
    (4, (1, 11), [4, 3], [1, 2], 0, "gelu", 48),
    (5, (3, 8, 8), [6, 6], [2, 2], 1, "tanh", 3),           # n = 1,305
]


@pytest.mark.parametrize("seed,shape,channels,strides,padding,activation,batch", CNNS)
def test_products_and_damped_solves_match_dense(seed, shape, channels, strides, padding,
                                                activation, batch):
    model, x, t, loss = cnn(seed, shape, channels, strides, padding, activation, batch)
    H = dense_hessian(model, x, t)
    G = dense_ggn(model, x, cross_entropy_in_logits(batch, t))
    n = H.shape[0]
    v = torch.randn(n, 2, dtype=F64)
    op, op_ggn = hi.hessian_operator(model, loss), hi.hessian_operator(model, loss,
                                                                       curvature="ggn")
    assert {type(d) for d in op.derivs[:-1]} <= {hi.ConvLayerBlocks, hi.LinearLayerBlocks}
    assert rel(op @ v, H @ v) <= 1e-12
    assert rel(op_ggn @ v, G @ v) <= 1e-12
    for eps in (1e-3, 1.0):  # 'auto' takes the cheapest route by the sizes (any is exact)
        for operator, M, paths in ((op, H, ("auto", "parameter")),
                                   (op_ggn, G, ("auto", "output", "parameter"))):
            A = damped(M, eps)
            for path in paths:
                inv = operator.factorize(eps, path=path)
                assert path == "auto" or inv.route == path
                assert rel(inv @ v, torch.linalg.solve(A, v)) <= solve_tolerance(A)


def test_every_route_on_a_cnn_and_pooling():
    """Average and max pooling (closed forms, never densified on the routes that only
    multiply); the riccati, structured and generic routes write the conv blocks out."""
    with pytest.warns(RuntimeWarning, match="layer 2 \\(MaxPool2d\\).*almost everywhere"):
        for pool in ("avg", "max"):
            model, x, t, loss = cnn(6, (2, 6, 6), [3], [1], 1, "sigmoid", 4, pool=pool)
            H = dense_hessian(model, x, t)
            op = hi.hessian_operator(model, loss)
            assert type(op.derivs[1]) is (hi.MaxPoolBlocks if pool == "max"
                                          else hi.LinearLayerBlocks)
            v = torch.randn(H.shape[0], dtype=F64)
            assert rel(op @ v, H @ v) <= 1e-12
            A = damped(H, 1e-2)
            for path in ("parameter", "riccati", "structured", "generic"):
                inv = op.factorize(1e-2, path=path)
                assert inv.route == path
                assert rel(inv @ v, torch.linalg.solve(A, v)) <= solve_tolerance(A)


def test_conv_blocks_match_the_autograd_oracle():
    """Each closed-form block (J, F, A, C, G) of a strided, padded conv layer against
    compute_layer_derivatives, and the GGN's (A = C = G = 0 for a hidden layer)."""
    torch.manual_seed(0)
    layer = hi.ConvActivation(2, 3, (3, 2), stride=(2, 1), padding=(1, 0),
                              activation="gelu").double()
    z = torch.randn(3, 2, 5, 4, dtype=F64)
    b = torch.randn(layer(z).numel(), dtype=F64)
    blocks = hi.conv_activation_blocks(layer, z, b)
    dense, oracle = blocks.densify(), hi.compute_layer_derivatives(layer, z, b)
    for name in ("J", "F", "A", "C", "G"):
        assert rel(getattr(dense, name), getattr(oracle, name)) <= 1e-13, name
    ggn = blocks.gauss_newton(False).densify()
    jac = hi.compute_layer_jacobians(layer, z)
    assert rel(ggn.J, jac.J) <= 1e-13 and rel(ggn.F, jac.F) <= 1e-13
    assert all(getattr(ggn, name).abs().max() == 0 for name in ("A", "C", "G"))


@pytest.mark.parametrize("batch", [1, 6])
def test_a_chain_of_plain_torch_modules(monkeypatch, batch):
    """nn.Sequential(nn.Conv2d, nn.Tanh) and friends have no closed forms: matrix-free
    autograd blocks (forced here at small size), exact on every route."""
    monkeypatch.setattr(hi, "DENSE_BLOCK_LIMIT", 0)
    model, x, t, loss = plain_chain(7, batch)
    H, G = dense_hessian(model, x, t), dense_ggn(model, x, cross_entropy_in_logits(batch, t))
    op, op_ggn = hi.hessian_operator(model, loss), hi.hessian_operator(model, loss,
                                                                       curvature="ggn")
    assert [type(d) for d in op.derivs] == [hi.AutogradLayerBlocks, hi.AutogradLayerBlocks,
                                            hi.LinearLayerBlocks, hi.AffineLayerBlocks]
    v = torch.randn(H.shape[0], 3, dtype=F64)
    assert rel(op @ v, H @ v) <= 1e-12 and rel(op_ggn @ v, G @ v) <= 1e-12
    for operator, M, paths in ((op, H, ("auto", "parameter", "generic")),
                               (op_ggn, G, ("auto", "output", "parameter"))):
        A = damped(M, 1e-2)
        for path in paths:
            inv = operator.factorize(1e-2, path=path)
            assert rel(inv @ v, torch.linalg.solve(A, v)) <= solve_tolerance(A), path


def test_a_plain_loss_layer_under_gauss_newton(monkeypatch):
    """A loss layer without closed forms (logits sin(W z + c), squared error) as
    matrix-free blocks: its GGN by logits and loss, the output route by the root of the
    loss's Hessian in the logits."""
    monkeypatch.setattr(hi, "DENSE_BLOCK_LIMIT", 0)
    torch.manual_seed(8)
    y = torch.randn(5, 2, dtype=F64)
    model, x, _, loss = plain_chain(8, 5, SineSquaredError(8, 2), y)
    G = dense_ggn(model, x, lambda o: ((o.view(5, 2) - y) ** 2).mean())
    H = dense_hessian(model, x, y)
    op_ggn, op = hi.hessian_operator(model, loss, curvature="ggn"), hi.hessian_operator(model,
                                                                                      loss)
    assert type(op_ggn.derivs[-1]) is hi.AutogradLayerBlocks
    v = torch.randn(G.shape[0], 2, dtype=F64)
    assert rel(op_ggn @ v, G @ v) <= 1e-12 and rel(op @ v, H @ v) <= 1e-12
    for path in ("output", "parameter"):
        A = damped(G, 1e-1)
        assert rel(op_ggn.factorize(1e-1, path=path) @ v,
                   torch.linalg.solve(A, v)) <= solve_tolerance(A)
    A = damped(H, 1e-1)
    assert rel(op.factorize(1e-1, path="parameter") @ v,
               torch.linalg.solve(A, v)) <= solve_tolerance(A)


@pytest.mark.parametrize("seed,shape,channels,strides", [
    (0, (1, 6, 6), [3, 2], [1, 2]), (1, (2, 5, 5), [2, 2], [2, 1]), (2, (1, 12), [3, 2], [1, 2])])
def test_damping_zero_is_the_pseudo_inverse(seed, shape, channels, strides):
    """With enough data (batch 48) the Hessian's null space is the softmax gauge alone
    (checked on the dense eigenvalues): damping 0 gives pinv(H) g exactly."""
    model, x, t, loss = cnn(seed, shape, channels, strides, 1, "tanh", 48)
    H = dense_hessian(model, x, t)
    values = torch.linalg.eigvalsh(H).abs()
    gauge = model.loss_layer.linear.in_features + 1
    assert int((values < 1e-10 * values.max()).sum()) == gauge
    g = torch.cat([p.reshape(-1) for p in torch.autograd.grad(loss, list(model.parameters()))])
    inv = hi.factorize(model, loss, 0.0)
    assert inv.route == "parameter"  # H + N N^T by LDL^T: the lifted system is far wider
    nonzero = values[values >= 1e-10 * values.max()]
    tolerance = max(1e-12, 100 * EPS64 * (nonzero.max() / nonzero.min()).item())
    assert rel(inv @ g, torch.linalg.pinv(H, hermitian=True, rtol=1e-10) @ g) <= tolerance


def test_damping_zero_with_null_directions_beyond_the_gauge_is_a_clear_singular_error():
    """All-zero images: the first layer's weights never act, so they are null directions
    of H beyond the gauge, and H + N N^T is singular."""
    model, x, t, _ = cnn(0, (1, 6, 6), [3, 2], [1, 2], 1, "tanh", 8)
    loss = model(torch.zeros_like(x), t, track_activations=True)
    g = torch.cat([p.reshape(-1) for p in torch.autograd.grad(loss, list(model.parameters()))])
    for solve in (lambda: hi.hessian_inverse_vector_product(model, loss, g),
                  lambda: hi.factorize(model, loss, 0.0)):
        with pytest.raises(hi.SingularHessianError, match="damping > 0"):
            solve()


TARGETS = {
    # (a) digits: 1x8x8, conv 8ch 3x3 pad 1, conv 8ch 3x3 stride 2, linear 10, batch 32
    "a": ((1, 8, 8), [8, 8], [1, 2], 32),
    # (b) CIFAR: 3x32x32, three conv 16ch 3x3 (strides 1, 2, 2), linear 10, batch 8
    "b": ((3, 32, 32), [16, 16, 16], [1, 2, 2], 8),
}


def target(name):
    shape, channels, strides, batch = TARGETS[name]
    model, x, t, loss = cnn(0, shape, channels, strides, 1, "tanh", batch, classes=10)
    g = torch.cat([p.reshape(-1) for p in torch.autograd.grad(loss, list(model.parameters()))])
    return model, x, t, loss, g


@pytest.mark.parametrize("name,curvature", [("a", "hessian"), ("a", "ggn"), ("b", "ggn")])
def test_the_targets_by_residuals(name, curvature):
    """The issue's targets, one-shot solves checked through exact products: autograd's
    Hessian-vector product, or the GGN product of the blocks (checked against a dense
    GGN above).  Timed in bench_cnn.py, not here."""
    model, x, t, loss, g = target(name)
    eps = 1e-3
    route = hi.choose_route("auto", eps, True, curvature,
                            hi.LayerSizes.of_model(model, model.tracked_forward(),
                                                   hi.closed_form_flags(model,
                                                                        model.tracked_forward())))
    assert route == ("parameter" if curvature == "hessian" else "output")
    s = hi.hessian_inverse_vector_product(model, loss, g, damping=eps, curvature=curvature)
    if curvature == "hessian":
        product = autograd_hvp(model, (x, t), s)
    else:
        product = hi.hessian_vector_product(model, loss, s, curvature="ggn")
    assert rel(product + eps * s, g) <= 1e-10


def test_the_hessian_of_target_b_chooses_the_parameter_route_within_memory():
    """Target (b)'s Hessian (the solve is timed in bench_cnn.py): the cost model keeps
    the routes that write out 16,384-wide blocks away, and the parameter route's
    estimate is below the issue's 4 GB."""
    model, x, t, loss, g = target("b")
    tracked = model.tracked_forward()
    sizes = hi.LayerSizes.of_model(model, tracked, hi.closed_form_flags(model, tracked))
    assert sizes.kinds == ["conv", "conv", "conv", "linear", "affine"]
    assert hi.choose_route("auto", 1e-3, True, "hessian", sizes) == "parameter"
    assert hi.route_bytes(sizes, "parameter", "factorization", F64) < 4e9
    assert hi.route_bytes(sizes, "riccati", "factorization", F64) > 1e10


def test_memory_messages_name_the_route_and_the_block():
    model, x, t, loss, g = target("a")
    with pytest.raises(hi.InsufficientMemoryError) as err:
        hi.factorize(model, loss, 1e-3, memory_limit=2 ** 24)
    message = str(err.value)
    assert "parameter Hessian factorisation" in message and "Schur complement" in message
    assert "curvature='ggn'" in message and "curvature batch" in message
    with pytest.raises(hi.InsufficientMemoryError) as err:
        hi.factorize(model, loss, 1e-3, curvature="ggn", path="output", memory_limit=2 ** 18)
    message = str(err.value)
    assert "output Gauss-Newton factorisation" in message and "Gram matrix" in message
    assert "curvature batch" in message and "curvature='ggn' (" not in message


def test_unsupported_options_are_refused_by_name():
    for kwargs, option in (({"groups": 2}, "groups=2"), ({"dilation": 2}, "dilation="),
                           ({"padding_mode": "circular"}, "padding_mode='circular'")):
        with pytest.raises(hi.HessianInverseError, match=f"ConvActivation\\(2, 4\\): {option}"):
            hi.ConvActivation(2, 4, 3, **kwargs)
    with pytest.raises(hi.HessianInverseError, match="padding='same'"):
        hi.ConvActivation(2, 4, 3, padding="same")
    layer = hi.ConvActivation(2, 4, 3)
    layer.conv.dilation = (2, 2)  # changed after construction: refused when run
    with pytest.raises(hi.HessianInverseError, match="dilation"):
        layer(torch.randn(1, 2, 8, 8))
    with pytest.raises(hi.HessianInverseError, match="stage 2"):
        hi.ConvNetWithTracking((1, 4, 4), 3, [2, 2], strides=[2, 2], padding=0)
    # batch norm in training mode (running statistics): named, and a HessianInverseError
    model = hi.TrackedChain([hi.ConvActivation(1, 2, 3),
                             nn.Sequential(nn.BatchNorm2d(2), nn.Flatten())],
                            hi.AffineCrossEntropy(2 * 6 * 6, 3))
    loss = model(torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,)), track_activations=True)
    for error in (hi.HessianInverseError, hi.NotTrackedError):
        with pytest.raises(error, match="layer 2: BatchNorm2d.*training mode"):
            hi.hessian_operator(model, loss)


def test_the_trust_region_and_spectrum_refuse_conv_layers_before_allocating():
    """The layer-wise factorisation needs a_l x a_l blocks: a clear refusal."""
    model, x, t, loss, g = target("b")
    op = hi.hessian_operator(model, loss)
    with pytest.raises(hi.HessianInverseError, match="layer 1 \\(ConvLayerBlocks, 131072"):
        trust_region.definiteness(op, 0.1)
    with pytest.raises(hi.HessianInverseError, match="convolutional"):
        trust_region.trust_region_step(op, g, 1.0)
    with pytest.raises(hi.HessianInverseError, match="RiccatiFactor factors"):
        hi.RiccatiFactor(op.derivs, 0.1, "ldl")  # the recursion itself
    with pytest.raises(hi.HessianInverseError, match="layer 1 \\(ConvLayerBlocks"):
        spectrum.Spectrum(op)  # counts, determinants, samples: on the same recursion


def test_conv_net_arguments_and_inputs():
    model = hi.ConvNetWithTracking((1, 8, 8), 10, [4, 4], strides=2).double()
    flat = torch.randn(3, 64, dtype=F64)  # flattened images are reshaped
    assert torch.equal(model(flat, torch.zeros(3, dtype=torch.long)),
                       model(flat.view(3, 1, 8, 8), torch.zeros(3, dtype=torch.long)))
    assert [type(layer).__name__ for layer in model.layers] == [
        "ConvActivation", "ConvActivation", "Flatten", "AffineCrossEntropy"]
    assert model.loss_layer.linear.in_features == 4 * 2 * 2
    with pytest.raises(hi.HessianInverseError, match="\\(B, 1, 8, 8\\)"):
        model(torch.randn(3, 60, dtype=F64), torch.zeros(3, dtype=torch.long))
    for bad in (dict(input_shape=(8, 8, 8, 8)), dict(channels=[]), dict(strides=[1]),
                dict(pool="median"), dict(activation="swish")):
        args = dict(input_shape=(1, 8, 8), num_classes=10, channels=[4, 4], strides=[1, 1])
        args.update(bad)
        with pytest.raises(hi.HessianInverseError):
            hi.ConvNetWithTracking(**args)


def test_relu_warns_and_is_exact_off_the_kinks():
    model, x, t, loss = cnn(9, (2, 6, 6), [3], [1], 1, "relu", 4)
    with pytest.warns(RuntimeWarning, match="layer 1 \\(ConvActivation\\).*almost everywhere"):
        op = hi.hessian_operator(model, loss)
    v = torch.randn(op.num_params, dtype=F64)
    assert rel(op @ v, dense_hessian(model, x, t) @ v) <= 1e-12


def test_flattening_without_flatten_and_the_output_layer_on_conv_outputs():
    """AffineCrossEntropy flattens (B, C, H, W) itself: no Flatten layer needed."""
    torch.manual_seed(10)
    model = hi.TrackedChain([hi.ConvActivation(1, 2, 3, padding=1)],
                            hi.AffineCrossEntropy(2 * 4 * 4, 3)).double()
    x, t = torch.randn(5, 1, 4, 4, dtype=F64), torch.randint(0, 3, (5,))
    loss = model(x, t, track_activations=True)
    op = hi.hessian_operator(model, loss, curvature="ggn")
    assert type(op.derivs[-1]) is hi.AffineLayerBlocks
    G = dense_ggn(model, x, cross_entropy_in_logits(5, t))
    v = torch.randn(G.shape[0], dtype=F64)
    A = damped(G, 1e-2)
    assert rel(op.factorize(1e-2) @ v, torch.linalg.solve(A, v)) <= solve_tolerance(A)
    assert rel(op @ v, G @ v) <= 1e-12


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_conv_routes_follow_the_device():
    """On the GPU, float32 and float64: products and the parameter and output routes
    against the same solve on the CPU."""
    for dtype, tol in ((F64, 1e-10), (torch.float32, 1e-3)):
        model, x, t, loss = cnn(11, (2, 8, 8), [4, 4], [1, 2], 1, "tanh", 6)
        cpu = {curv: hi.factorize(model, loss, 1e-2, curvature=curv) for curv in ("hessian",
                                                                               "ggn")}
        v = torch.randn(cpu["ggn"].operator.num_params, dtype=F64)
        model = model.to("cuda", dtype)
        loss = model(x.to("cuda", dtype), t.to("cuda"), track_activations=True)
        for curvature, inverse in cpu.items():
            gpu = hi.factorize(model, loss, 1e-2, curvature=curvature)
            got = gpu @ v.to("cuda", dtype)
            assert got.device.type == "cuda" and got.dtype == dtype
            assert gpu.route == inverse.route
            assert rel(got.double().cpu(), inverse @ v) <= tol


def test_matrix_free_blocks_are_snapshots(monkeypatch):
    """A plain module with buffers (BatchNorm in eval mode) as autograd products: exact,
    and, like every operator, a snapshot (a later training-mode pass that moves the
    running statistics, or an optimizer step, does not change H @ v)."""
    monkeypatch.setattr(hi, "DENSE_BLOCK_LIMIT", 0)
    torch.manual_seed(12)
    model = hi.TrackedChain([nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2),
                                           nn.Tanh()), nn.Flatten()],
                            hi.AffineCrossEntropy(2 * 16, 3)).double().eval()
    with torch.no_grad():
        model.layers[0][1].running_mean.uniform_()
        model.layers[0][1].running_var.uniform_(0.5, 2.0)
    x, t = torch.randn(4, 1, 4, 4, dtype=F64), torch.randint(0, 3, (4,))
    loss = model(x, t, track_activations=True)
    op = hi.hessian_operator(model, loss)
    assert type(op.derivs[0]) is hi.AutogradLayerBlocks
    v = torch.randn(op.num_params, dtype=F64)
    before = op @ v
    assert rel(before, dense_hessian(model, x, t) @ v) <= 1e-12
    model.train()
    model(x, t)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    assert torch.equal(op @ v, before)


class RandomConv(nn.Module):
    """A convolution whose forward calls F.dropout itself (no nn.Dropout to switch off)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, z):
        return torch.nn.functional.dropout(torch.tanh(self.conv(z)), 0.5, training=True)


@pytest.mark.parametrize("first", [True, False])
def test_a_matrix_free_layer_drawing_random_numbers_is_refused(monkeypatch, first):
    monkeypatch.setattr(hi, "DENSE_BLOCK_LIMIT", 0)
    layers = [RandomConv(), nn.Flatten()]
    if not first:
        layers.insert(0, nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Tanh()))
    model = hi.TrackedChain(layers, hi.AffineCrossEntropy(32, 3)).double()
    loss = model(torch.randn(4, 1, 4, 4, dtype=F64), torch.randint(0, 3, (4,)),
                 track_activations=True)
    for curvature in hi.CURVATURES:
        with pytest.raises(hi.HessianInverseError, match=f"layer {1 if first else 2} "
                                                         "\\(RandomConv\\) draws random"):
            hi.hessian_operator(model, loss, curvature=curvature)

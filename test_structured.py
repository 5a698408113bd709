"""Tests of the structured path (docs/ALGORITHM.md, "Structured layers" and
"Parameter elimination"): closed-form affine layers,
parameters eliminated by the push-through identity, reduced system in (y_l, w_l).

Oracles, all independent of the code under test: the dense Hessian from
``torch.func.hessian`` of the loss as a function of the flat parameter vector
and autograd Hessian-vector products (``torch.func.jvp`` of ``torch.func.grad``),
both from ``conftest.py``, and the generic path of
``hessian_inverse`` (autograd derivative blocks, pivoted lifted system), which
shares no code with the structured path beyond the banded LU.

Tolerances.  float64 rounding is u = 1.1e-16.  A backward-stable solve of
(H + eps I) x = v has a relative forward error of about cond * u, and
cond(H + eps I) ~ ||H|| / eps because a softmax classifier's H always has null
directions (docs/ALGORITHM.md, "The softmax gauge").  With ||H|| <~ 1 that is <~ 1e-10 at
eps = 1e-6, and well below elsewhere; the issue's bar for structured vs
generic is 1e-10 over damping 1e-6..10 (both paths are backward stable; they
agree to ~3e-11 at 1e-6 on these seeds).  Against the dense oracle we allow
10 u cond, with cond measured from the oracle's eigenvalues.
"""

import pytest
import torch
import torch.nn as nn

import hessian_inverse as hi
from conftest import SquaredErrorLoss, autograd_hvp, dense_hessian, make_mlp, relative_error

F64 = torch.float64
U64 = torch.finfo(F64).eps
ACTIVATIONS = sorted(hi.ACTIVATIONS)


# -- the dense reference solve -------------------------------------------------------


def dense_solve_and_cond(H, v, damping):
    shifted = H + damping * torch.eye(H.shape[0], dtype=H.dtype)
    eig = torch.linalg.eigvalsh(shifted).abs()
    return torch.linalg.solve(shifted, v), (eig.max() / eig.min()).item()


# -- layers --------------------------------------------------------------------


class SineGate(nn.Module):
    """A non-affine layer with parameters: z -> a * sin(z) + s * z (a, s per unit)."""

    def __init__(self, width):
        super().__init__()
        self.a = nn.Parameter(torch.randn(width) * 0.5)
        self.s = nn.Parameter(1 + 0.1 * torch.randn(width))

    def forward(self, z):
        return self.a * torch.sin(z) + self.s * z


class Flatten(nn.Module):
    def forward(self, z):
        return z.flatten(1)


# -- 1. structured agrees with generic ----------------------------------------------

# (activation, layers, width, batch, input dim, bias): every activation, batch
# 1..8 on both sides of the input width (rank of the Gram matrix), no-bias layers.
SHAPES = [(3, 4, 3, 5, True), (4, 3, 8, 2, True), (2, 5, 1, 3, False)]
SPREAD = [(i, act) + shape for i, (act, shape) in
          enumerate((act, shape) for act in ACTIVATIONS for shape in SHAPES)]
DAMPINGS = (1e-6, 1e-3, 1.0, 10.0)


@pytest.mark.parametrize("seed,activation,layers,width,batch,input_dim,bias", SPREAD)
def test_structured_agrees_with_generic(seed, activation, layers, width, batch, input_dim, bias):
    model, x, t, loss = make_mlp(seed, layers, width, batch, activation, input_dim, bias=bias)
    generic = hi.hessian_operator(model, loss, path="generic")
    structured = hi.hessian_operator(model, loss, path="structured")
    assert all(isinstance(d, hi.AffineLayerBlocks) for d in structured.derivs)
    v = torch.randn(generic.num_params, 2, dtype=F64)
    for damping in DAMPINGS:
        x_g = generic.factorize(damping, path="generic").solve(v)
        inverse = structured.factorize(damping, path="structured")
        assert inverse.route == "structured"
        err = relative_error(inverse.solve(v), x_g)
        assert err < 1e-10, (damping, err)


def test_closed_form_blocks_equal_autograd_blocks():
    # The closed forms of J, F, A, C, G against the autograd oracle ("The derivative oracle"),
    # including probability targets on the loss layer; entries are O(1) sums of a
    # few products, so agreement is to a few u.
    torch.manual_seed(3)
    chain = hi.TrackedChain([hi.AffineActivation(4, 5, "softplus"),
                             hi.AffineActivation(5, 3, "gelu", bias=False)],
                            hi.AffineCrossEntropy(3, 4))
    chain = chain.to(F64)
    x = torch.randn(6, 4, dtype=F64)
    soft = torch.softmax(torch.randn(6, 4, dtype=F64), -1)
    loss = chain(x, soft, track_activations=True)
    assert_closed_forms_match_autograd(chain, loss)


def assert_closed_forms_match_autograd(chain, loss):
    """Every closed-form block, written out, against the generic oracle's to a few u."""
    generic = hi.hessian_operator(chain, loss, path="generic").derivs
    structured = hi.hessian_operator(chain, loss, path="structured").derivs
    for g, s in zip(generic, structured):
        dense = s.densify()
        for name in ("J", "F", "A", "C", "G"):
            ref = getattr(g, name)
            if ref is not None:
                assert (getattr(dense, name) - ref).abs().max() <= 1e-14 * (1 + ref.abs().max())
    return structured


# -- 2. structured agrees with the dense oracle -----------------------------------


@pytest.mark.parametrize("seed,activation,damping", [
    (0, "tanh", 1e-4), (1, "gelu", 1e-2), (2, "sigmoid", 1.0), (3, "silu", 1e-6),
    (4, "relu", 1e-2), (5, "softplus", 10.0), (6, "tanh", 1e-8),
])
def test_structured_matches_dense_hessian(seed, activation, damping):
    model, x, t, loss = make_mlp(seed, 3 + seed % 2, 4, 2 + seed, activation, input_dim=3)
    H = dense_hessian(model, x, t)
    v = torch.randn(H.shape[0], dtype=F64)
    ref, cond = dense_solve_and_cond(H, v, damping)
    inverse = hi.factorize(model, loss, damping, path="structured")
    assert inverse.route == "structured"
    assert relative_error(inverse @ v, ref) < 10 * U64 * cond
    # The operator's H v (closed forms, "The Hessian-vector product") against the dense product.
    assert relative_error(inverse.operator @ v, H @ v) < 1e-13


def test_multiple_right_hand_sides_and_reuse():
    model, x, t, loss = make_mlp(7, 4, 3, 5, "tanh", input_dim=3)
    H = dense_hessian(model, x, t)
    V = torch.randn(H.shape[0], 6, dtype=F64)
    inverse = hi.factorize(model, loss, 1e-2, path="structured")
    ref, cond = dense_solve_and_cond(H, V, 1e-2)
    X = inverse.solve(V)
    assert X.shape == V.shape
    assert relative_error(X, ref) < 10 * U64 * cond
    for j in (0, 5):  # columns solved alone agree with the dense oracle too
        assert relative_error(inverse @ V[:, j], ref[:, j]) < 10 * U64 * cond
    other = inverse.with_damping(0.5)
    assert other.route == "structured"
    ref, cond = dense_solve_and_cond(H, V, 0.5)
    assert relative_error(other @ V, ref) < 10 * U64 * cond
    # The scipy view solves too.
    got = torch.as_tensor(other.as_linear_operator().matmat(V.numpy()))
    assert relative_error(got, ref) < 10 * U64 * cond


def test_float32():
    # float32 rounding is u32 = 1.2e-7 and cond(H + 0.01 I) ~ 6e2 here; the
    # refinement against the exact product undoes the elimination's 1/eps
    # amplification, so the float64 rule (10 u cond) applies (observed 0.01 u cond).
    model, x, t, loss = make_mlp(11, 4, 4, 3, "tanh", input_dim=3, dtype=torch.float32)
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    got = hi.hessian_inverse_vector_product(model, loss, v, 1e-2)
    assert got.dtype == torch.float32
    model64 = make_mlp(11, 4, 4, 3, "tanh", input_dim=3)[0]
    model64.load_state_dict({k: p.double() for k, p in model.state_dict().items()})
    H = dense_hessian(model64, x.double(), t)
    ref, cond = dense_solve_and_cond(H, v.double(), 1e-2)
    assert relative_error(got.double(), ref) < 10 * torch.finfo(torch.float32).eps * cond


# -- 3. mixed chains ---------------------------------------------------------------


def test_mixed_chain_with_custom_layers():
    # Closed-form layers around a non-affine layer with parameters, a
    # parameter-free layer, inputs of shape (B, 2, m) (every leading position is
    # an example of the affine layer) and a loss without closed forms.
    torch.manual_seed(5)
    chain = hi.TrackedChain(
        [hi.AffineActivation(3, 4, "tanh"), SineGate(4), Flatten(),
         hi.AffineActivation(8, 3, "silu")],
        SquaredErrorLoss(3, 2)).to(F64)
    x = torch.randn(3, 2, 3, dtype=F64)
    y = torch.randn(3, 2, dtype=F64)
    loss = chain(x, y, track_activations=True)
    H = dense_hessian(chain, x, y)
    v = torch.randn(H.shape[0], 2, dtype=F64)
    inverse = hi.factorize(chain, loss, 1e-3, path="structured")
    assert inverse.route == "structured"
    kinds = [type(d) for d in inverse.operator.derivs]
    assert kinds == [hi.AffineLayerBlocks, hi.LayerDerivatives, hi.LayerDerivatives,
                     hi.AffineLayerBlocks, hi.LayerDerivatives]
    ref, cond = dense_solve_and_cond(H, v, 1e-3)
    assert relative_error(inverse @ v, ref) < 10 * U64 * cond
    generic = hi.factorize(chain, loss, 1e-3, path="generic")
    assert relative_error(inverse @ v, generic @ v) < 1e-10
    layerwise = hi.factorize(chain, loss, 1e-3)  # auto: the layer-wise route, same blocks
    assert layerwise.route == "riccati"
    assert relative_error(layerwise @ v, ref) < 10 * U64 * cond


# -- 4. path selection, override and fallback -----------------------------------------


def test_path_selection_and_override():
    model, x, t, loss = make_mlp(2, 3, 3, 4, input_dim=3)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64)
    assert hi.factorize(model, loss, 1e-3).route == "riccati"
    assert hi.factorize(model, loss, 1e-3, path="structured").route == "structured"
    assert hi.factorize(model, loss, 1e-3, path="generic").route == "generic"
    assert hi.factorize(model, loss, 0.0).route == "generic"  # damping 0: generic
    with pytest.raises(hi.HessianInverseError, match="damping > 0"):
        hi.factorize(model, loss, 0.0, path="structured")
    with pytest.raises(hi.HessianInverseError, match="path must be one of"):
        hi.factorize(model, loss, 1e-3, path="fast")
    # A structured operator still serves damping 0 (its blocks written out densely),
    # giving the generic path's Moore-Penrose answer.
    structured = hi.hessian_operator(model, loss)
    pinv = structured.factorize(0.0)
    assert pinv.route == "generic"
    H = dense_hessian(model, x, t)
    g = H @ v  # in the range of H: H^+ g is the minimum-norm solution
    ref = torch.linalg.pinv(H, hermitian=True, rtol=1e-10) @ g
    assert relative_error(pinv @ g, ref) < 1e-8
    assert hi.factorize(model, loss, 1e-3).with_damping(0.0).route == "generic"


def test_chain_without_closed_forms_is_eliminated_densely_when_forced():
    torch.manual_seed(8)
    chain = hi.TrackedChain([SineGate(3), nn.Linear(3, 3)], SquaredErrorLoss(3, 2)).to(F64)
    x, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)
    loss = chain(x, y, track_activations=True)
    assert hi.factorize(chain, loss, 1e-2).route == "riccati"  # dense pivots, p_l square
    forced = hi.factorize(chain, loss, 1e-2, path="structured")  # every layer eliminated densely
    assert forced.route == "structured"
    H = dense_hessian(chain, x, y)
    v = torch.randn(H.shape[0], dtype=F64)
    ref, cond = dense_solve_and_cond(H, v, 1e-2)
    assert relative_error(forced @ v, ref) < 10 * U64 * cond


class CurvedShift(nn.Module):
    """z -> z + theta w + c theta^2 u / 2 at theta = 0 (w, u fixed directions).

    The output and the adjoint b do not depend on c, but A = d2(b . f)/dtheta2
    = c (b . u) does, so c can make A + eps I exactly 0; J = w couples theta to
    the rest, so H + eps I stays nonsingular.
    """

    def __init__(self, width):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(1))
        self.register_buffer("w", torch.randn(width))
        self.register_buffer("u", torch.randn(width))
        self.c = 1.0

    def forward(self, z):
        return z + self.theta * self.w + 0.5 * self.c * self.theta ** 2 * self.u


def curved_shift_chain():
    """tanh layer, :class:`CurvedShift`, cross-entropy; returns (chain, gate, x, t, loss)."""
    torch.manual_seed(9)
    gate = CurvedShift(3)
    chain = hi.TrackedChain([hi.AffineActivation(3, 3, "tanh"), gate],
                            hi.AffineCrossEntropy(3, 3)).to(F64)
    x, t = torch.randn(4, 3, dtype=F64), torch.randint(0, 3, (4,))
    return chain, gate, x, t, chain(x, t, track_activations=True)


def test_singular_elimination_falls_back_or_raises():
    damping = 1e-2
    chain, gate, x, t, loss = curved_shift_chain()
    a = hi.hessian_operator(chain, loss).derivs[1].A.item()  # = c (b . u) with c = 1
    gate.c = -damping / a
    loss = chain(x, t, track_activations=True)
    assert abs(hi.hessian_operator(chain, loss).derivs[1].A.item() + damping) < 1e-15
    with pytest.raises(hi.EliminationError, match="layer 2"):
        hi.factorize(chain, loss, damping, path="structured")
    # A_2 + eps I = 0 does not make P_2 = A_2 + eps I + J_2^T Ghat_2 J_2 singular: the
    # layer-wise route ('auto') is exact here; forced structured with auto fallback is not
    # expressible, so the generic route is checked directly.
    assert hi.factorize(chain, loss, damping).route == "riccati"
    inverse = hi.factorize(chain, loss, damping, path="generic")
    H = dense_hessian(chain, x, t)
    v = torch.randn(H.shape[0], dtype=F64)
    ref, cond = dense_solve_and_cond(H, v, damping)
    assert relative_error(inverse @ v, ref) < 10 * U64 * cond


def test_damping_at_an_eigenvalue_is_refused():
    # H + eps I singular (eps = -lambda_min of an indefinite H): the structured
    # solve's refinement cannot converge, so path='structured' refuses with
    # EliminationError and 'auto' hands over to the generic path, whose
    # condition estimate reports the singular system.
    model, x, t, loss = make_mlp(24, 3, 3, 8, input_dim=3)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    loss = model(x, t, track_activations=True)
    H = dense_hessian(model, x, t)
    damping = -torch.linalg.eigvalsh(H)[0].item()
    assert damping > 1e-3
    with pytest.raises(hi.EliminationError, match="did not converge"):
        hi.factorize(model, loss, damping, path="structured")
    with pytest.warns(RuntimeWarning), pytest.raises(hi.SingularHessianError):
        hi.factorize(model, loss, damping)


# -- 5. memory guard -----------------------------------------------------------------


def test_memory_guard_before_allocating():
    model, x, t, loss = make_mlp(1, 3, 4, 3, input_dim=3)
    with pytest.raises(hi.InsufficientMemoryError, match="Shrink the curvature batch"):
        hi.factorize(model, loss, 1e-3, memory_limit=10_000)
    # A structured operator asked for damping 0 checks the generic estimate
    # before writing its blocks out.
    operator = hi.hessian_operator(model, loss)
    operator.memory_limit = 10_000
    with pytest.raises(hi.InsufficientMemoryError, match="generic Hessian factorisation"):
        operator.factorize(0.0)


def test_structured_estimate_is_linear_in_depth_and_parameters():
    def estimate(layers, input_dim, width=16, batch=4, classes=10):
        params = [input_dim * width + width] + [width * width + width] * (layers - 2) + \
                 [width * classes + classes]
        inputs = [batch * input_dim] + [batch * width] * (layers - 1)
        outputs = [batch * width] * (layers - 1) + [1]
        u = [batch * width] * (layers - 1) + [batch * classes]
        return hi.estimate_structured_bytes(params, inputs, outputs, u, F64)

    assert estimate(256, 16) == pytest.approx(2 * estimate(128, 16), rel=0.02)
    # An image-sized input layer adds O(p) bytes, not O(p^2).
    assert estimate(8, 3072) - estimate(8, 16) < 100 * (3072 - 16) * 16 * 8


# -- 6. wide input: what the generic path cannot afford ---------------------------------


def test_wide_input_residual_with_autograd_hvp():
    # Input dimension 3072 (a flattened 32x32x3 image), batch 2: the first layer
    # has 24,584 parameters, so the generic path would need a 24,584^2 block
    # (~5 GB); the structured path needs megabytes.  Checked through the residual
    # with autograd Hessian-vector products.  A backward-stable solve leaves
    # ||r|| / ||v|| ~ u ||H + eps I|| ||x|| / ||v|| <= u cond; we allow 1e-10,
    # cond being <~ 1e3 at eps = 1e-2 here (||H|| ~ 10).
    model, x, t, loss = make_mlp(4, 3, 8, 2, "tanh", input_dim=3072, classes=5)
    n = sum(p.numel() for p in model.parameters())
    params = [sum(p.numel() for p in layer.parameters()) for layer in model.layers]
    generic_bytes = hi.estimate_factorization_bytes(params, [16, 16, 1], 2 * 3072, F64)
    assert generic_bytes > 4e9
    damping = 1e-2
    v = torch.randn(n, 2, dtype=F64)
    for path in ("auto", "structured"):  # auto: the layer-wise route, r = 2 of q = 3073
        inverse = hi.factorize(model, loss, damping, path=path)
        assert inverse.route == ("riccati" if path == "auto" else path)
        sol = inverse @ v
        residual = autograd_hvp(model, (x, t), sol) + damping * sol - v
        assert (residual.norm() / v.norm()).item() < 1e-10


# -- 7. CUDA: the same computations on the GPU as on the CPU in float64 -----------------
#
# Marked ``cuda`` (python -m pytest -q -m cuda; gpu_check.sh runs them) and skipped
# without a CUDA device.  Each compares a result computed on the GPU with the same call
# on the CPU in float64: both are backward stable, so they agree to about u cond
# (cond <~ 1e3 at these dampings), and we allow 1e-10 (float32 factors: refined in
# float64 against the exact product, so the same bar).


def needs_cuda(test):
    """Marked ``cuda`` (selected by ``-m cuda``) and skipped without a CUDA device."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    return pytest.mark.cuda(skip(test))


def _on_cuda(model, x, t):
    """The model moved to the GPU and a new tracked pass there (the CPU's stays valid)."""
    import copy
    gpu = copy.deepcopy(model).cuda()
    return gpu, gpu(x.cuda(), t.cuda(), track_activations=True)


@needs_cuda
def test_cuda_follows_model_device():
    model, x, t, loss = make_mlp(6, 3, 4, 3, input_dim=3)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64)
    ref = hi.hessian_inverse_vector_product(model, loss, v, 1e-2)
    model = model.cuda()
    loss = model(x.cuda(), t.cuda(), track_activations=True)
    got = hi.hessian_inverse_vector_product(model, loss, v.cuda(), 1e-2)
    assert got.device.type == "cuda"
    assert relative_error(got.cpu(), ref) < 1e-10


@pytest.mark.parametrize("curvature,path,factorization", [
    ("hessian", "structured", "banded"), ("hessian", "generic", "banded"),
    ("hessian", "structured", "cyclic"), ("ggn", "structured", "banded"),
    ("ggn", "output", "banded")])
@needs_cuda
def test_cuda_routes_match_cpu(curvature, path, factorization):
    # Each route (and the cyclic factorisation) on the GPU against the banded CPU solve.
    if path not in hi.PATHS or factorization not in getattr(hi, "FACTORIZATIONS", ("banded",)):
        pytest.skip(f"path={path!r}, factorization={factorization!r}: not in this version")
    kw = {} if factorization == "banded" else {"factorization": factorization}
    model, x, t, loss = make_mlp(7, 4, 5, 3, input_dim=4, classes=4)
    v = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=F64)
    ref = hi.factorize(model, loss, 1e-2, curvature=curvature, path=path) @ v
    gpu, gpu_loss = _on_cuda(model, x, t)
    inverse = hi.factorize(gpu, gpu_loss, 1e-2, curvature=curvature, path=path, **kw)
    got = inverse @ v.cuda()
    assert inverse.route == path and got.device.type == "cuda"
    assert relative_error(got.cpu(), ref) < 1e-10
    one_shot = hi.hessian_inverse_vector_product(gpu, gpu_loss, v.cuda(), 1e-2,
                                                 curvature=curvature, path=path, **kw)
    assert relative_error(one_shot.cpu(), ref) < 1e-10


@needs_cuda
def test_cuda_float32_factors_refined_to_float64():
    # factor_dtype=torch.float32 on a float64 model: float32 factors on the GPU, refined in
    # float64 against the exact product, must reach the CPU float64 answer.
    model, x, t, loss = make_mlp(8, 5, 6, 4, input_dim=5, classes=3)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64)
    ref = hi.factorize(model, loss, 1e-2, path="structured", factor_dtype=None) @ v
    gpu, gpu_loss = _on_cuda(model, x, t)
    inverse = hi.factorize(gpu, gpu_loss, 1e-2, path="structured", factor_dtype=torch.float32)
    got = inverse @ v.cuda()
    assert got.dtype == F64 and got.device.type == "cuda"
    assert inverse.backward_error <= hi.default_rtol(F64)
    assert relative_error(got.cpu(), ref) < 1e-10


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@needs_cuda
def test_cuda_products_match_cpu(curvature):
    # The exact block product H v (and GGN v) on the GPU against the CPU, float64 and float32.
    model, x, t, loss = make_mlp(9, 5, 4, 3, input_dim=6, classes=5)
    v = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=F64)
    ref = hi.hessian_vector_product(model, loss, v, curvature=curvature)
    gpu, gpu_loss = _on_cuda(model, x, t)
    got = hi.hessian_vector_product(gpu, gpu_loss, v.cuda(), curvature=curvature)
    assert got.device.type == "cuda"
    assert relative_error(got.cpu(), ref) < 1e-12
    gpu32 = gpu.float()
    loss32 = gpu32(x.cuda().float(), t.cuda(), track_activations=True)
    got32 = hi.hessian_vector_product(gpu32, loss32, v.cuda().float(), curvature=curvature)
    assert relative_error(got32.cpu().double(), ref) < 1e-5

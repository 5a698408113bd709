"""Tests of the training side: the DampedNewton optimizer, train_imagenet.py and
simple_example.py.  CPU only, no network; tiny models and a generated ImageFolder.

    PYTHONPATH=. python -m pytest test_training.py -q
"""

import copy
import hashlib
import json
import math

import numpy as np
import pytest
import torch

import simple_example
import train_imagenet
from damped_newton import DampedNewton
from hessian_inverse import DeepMLPWithTracking, NotTrackedError, SingularHessianError


# --------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------


def teacher_problem(dtype=torch.float64, n=32, seed=0):
    """A small full-batch classification problem and a fresh student MLP."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen, dtype=dtype)
    y = (x @ torch.randn(5, 3, generator=gen, dtype=dtype)).argmax(1)
    torch.manual_seed(seed)
    model = DeepMLPWithTracking(5, 4, 3, num_hidden_layers=2).to(dtype)
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


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


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
    assert torch.equal(flat(model), flat(twin))
    assert twin_opt.stats == opt.stats


def test_newton_beats_gradient_descent_in_the_same_number_of_steps():
    model0, x, y = teacher_problem()
    steps = 8
    losses = gradient_descent_losses(model0, x, y, steps)
    model = copy.deepcopy(model0)
    opt = DampedNewton(model, damping=1e-2)
    for _ in range(steps):
        opt.step(closure_for(model, opt, x, y))
    newton = float(model(x, y).detach())
    assert newton < 0.5 * min(losses.values()), (newton, losses)
    assert opt.stats["accepted"] >= steps - 1


def test_damping_rises_after_a_rejected_step_and_falls_after_accepted_ones():
    model, x, y = teacher_problem()
    opt = DampedNewton(model, damping=1.0, max_retries=0, gradient_lr=0.05)
    start = flat(model)
    opt.step(spoiled_closure(model, opt, x, y))
    assert opt.stats["rejected"] == 1 and opt.stats["gradient_fallbacks"] == 1
    assert opt.damping == pytest.approx(3.0)
    # The fallback is exactly a gradient step from the start, not the rejected Newton step.
    model_check, _, _ = teacher_problem()
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(model_check(x, y),
                                                              list(model_check.parameters()))])
    torch.testing.assert_close(flat(model), start - 0.05 * g)

    dampings, ratios = [opt.damping], []
    for _ in range(3):
        opt.step(closure_for(model, opt, x, y))
        dampings.append(opt.damping)
        ratios.append(opt.stats["last_ratio"])
    assert opt.stats["accepted"] == 3 and opt.stats["rejected"] == 1
    for before, after, ratio in zip(dampings, dampings[1:], ratios):  # the LM rule
        expected = before / 3 if ratio > 0.75 else before * 3 if ratio < 0.25 else before
        assert after == pytest.approx(expected), (dampings, ratios)
    assert dampings[-1] < dampings[0] / 3, (dampings, ratios)


class FlakyNewton(DampedNewton):
    """Fails its first proposal in a chosen way, then behaves."""

    def __init__(self, *args, failure, **kwargs):
        super().__init__(*args, **kwargs)
        self.failure, self.proposals = failure, 0

    def _propose(self, curvature, grad, damping):
        self.proposals += 1
        if self.proposals == 1:
            if self.failure == "singular":
                raise SingularHessianError("test")
            return grad.clone(), curvature @ grad  # uphill
        return super()._propose(curvature, grad, damping)


@pytest.mark.parametrize("failure,counter", [("singular", "singular"), ("uphill", "non_descent")])
def test_failed_proposals_are_redamped_not_taken(failure, counter):
    model, x, y = teacher_problem()
    opt = FlakyNewton(model, damping=0.1, failure=failure)
    before = float(model(x, y).detach())
    opt.step(closure_for(model, opt, x, y))
    assert opt.stats[counter] >= 1 and opt.stats["accepted"] == 1
    assert opt.stats["gradient_fallbacks"] == 0 and opt.proposals >= 2
    assert float(model(x, y).detach()) < before


def test_state_dict_round_trip_resumes_exactly():
    model, x, y = teacher_problem()
    opt = DampedNewton(model, damping=0.5, max_step_norm=2.0, curvature_interval=2)
    for _ in range(3):
        opt.step(closure_for(model, opt, x, y))
    twin = copy.deepcopy(model)
    twin_opt = DampedNewton(twin)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert twin_opt.stats == opt.stats
    assert twin_opt.param_groups[0]["max_step_norm"] == 2.0
    assert_continue_identically(model, opt, twin, twin_opt, x, y)


def test_curvature_interval_step_cap_and_curvature_batch():
    model, x, y = teacher_problem(dtype=torch.float32)
    opt = DampedNewton(model, damping=0.01, max_step_norm=0.05, curvature_interval=3,
                       gradient_lr=0.5)
    before = float(model(x, y).detach())
    for _ in range(6):
        start = flat(model)
        opt.step(closure_for(model, opt, x, y, tracked=False),
                 curvature_closure=lambda: model(x[:8], y[:8], track_activations=True))
        assert (flat(model) - start).norm() <= 0.05 * (1 + 1e-5)
    s = opt.stats
    assert (s["newton_steps"], s["gradient_steps"]) == (2, 4)
    assert s["clipped"] >= 1
    assert float(model(x, y).detach()) < before


def test_untracked_closure_and_nonfinite_loss():
    model, x, y = teacher_problem()
    opt = DampedNewton(model)
    with pytest.raises(NotTrackedError):
        opt.step(closure_for(model, opt, x, y, tracked=False))
    start = flat(model)
    opt.step(lambda: torch.tensor(math.nan))
    assert torch.equal(flat(model), start) and opt.stats["nonfinite"] == 1
    with pytest.raises(ValueError):
        DampedNewton(model, damping=0.0)


# --------------------------------------------------------------------------
# train_imagenet.py
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """train/ and val/ with 3 classes of 10x10 PNGs, told apart by colour."""
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
    train_imagenet.main(["--data-dir", str(data), "--checkpoint-dir", str(ckpt)] + TINY
                        + [str(e) for e in extra])
    return torch.load(ckpt / "last.pt", weights_only=False)


def metrics(ckpt):
    return [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]


def test_imagenet_sgd_epoch(image_folder, tmp_path, capsys):
    ckpt = imagenet(image_folder, tmp_path, "--epochs", "1")
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 3
    epoch = [m for m in metrics(tmp_path) if m["event"] == "epoch"]
    assert len(epoch) == 1 and {"val_top1", "val_top3", "train_loss"} <= set(epoch[0])
    assert "top-1" in capsys.readouterr().out


def test_imagenet_hessian_resume_continues_exactly(image_folder, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    first = imagenet(image_folder, a, "--use-hessian", "--epochs", "1")
    assert first["epoch"] == 1 and first["optimizer"]["state"][0]["newton_steps"] == 3
    resumed = imagenet(image_folder, a, "--use-hessian", "--epochs", "2", "--resume")
    assert "resumed from" in capsys.readouterr().out
    assert resumed["epoch"] == 2 and resumed["global_step"] == 6
    straight = imagenet(image_folder, b, "--use-hessian", "--epochs", "2")
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
        assert not torch.equal(first["model"][key], value), key
    assert resumed["optimizer"]["state"][0] == straight["optimizer"]["state"][0]
    assert [m["epoch"] for m in metrics(a) if m["event"] == "epoch"] == [1, 2]


def exit_message(excinfo):
    return str(excinfo.value.code)


def test_imagenet_clear_errors(image_folder, tmp_path):
    with pytest.raises(SystemExit) as e:
        imagenet(tmp_path / "nowhere", tmp_path / "c")
    assert "does not exist" in exit_message(e) and "train/<class name>" in exit_message(e)
    (tmp_path / "bad" / "train" / "cls").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        imagenet(tmp_path / "bad", tmp_path / "c")
    assert "no val/ folder" in exit_message(e)
    (tmp_path / "bad" / "val" / "cls").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        imagenet(tmp_path / "bad", tmp_path / "c")
    assert "not a usable image folder" in exit_message(e)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            imagenet(image_folder, tmp_path / "c", "--device", "cuda")
        assert "CUDA is not available" in exit_message(e)
    with pytest.raises(SystemExit) as e:
        imagenet(image_folder, tmp_path / "c", "--use-hessian", "--hessian-memory-gb", "1e-6")
    assert "does not fit in memory" in exit_message(e) and "lower" in exit_message(e)


def test_imagenet_nan_stops_and_keeps_the_last_good_checkpoint(image_folder, tmp_path,
                                                              monkeypatch):
    with pytest.raises(SystemExit) as e:  # diverges in the first epoch: nothing saved
        imagenet(image_folder, tmp_path, "--epochs", "1", "--lr", "1e38")
    assert "stopped without saving" in exit_message(e) and not (tmp_path / "last.pt").exists()

    imagenet(image_folder, tmp_path, "--epochs", "1")
    good = hashlib.sha256((tmp_path / "last.pt").read_bytes()).hexdigest()
    real_step = train_imagenet.train_step
    monkeypatch.setattr(train_imagenet, "train_step",
                        lambda *a, **k: (math.nan, real_step(*a, **k)[1]))
    with pytest.raises(SystemExit) as e:
        imagenet(image_folder, tmp_path, "--epochs", "2", "--resume")
    assert "is kept" in exit_message(e)
    assert hashlib.sha256((tmp_path / "last.pt").read_bytes()).hexdigest() == good


# --------------------------------------------------------------------------
# simple_example.py
# --------------------------------------------------------------------------


def test_simple_example_quick_reports_both_methods_and_plots(tmp_path, capsys):
    out = tmp_path / "plot.png"
    simple_example.main(["--quick", "--dataset", "digits", "--out", str(out)])
    text = capsys.readouterr().out
    summary = text[text.index("summary"):]
    assert "gradient descent" in summary and "damped Newton" in summary
    assert "Gauss-Newton" in summary  # the default methods: gd,newton,ggn
    assert f"plot saved to {out}" in text
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_simple_example_cifar_fallback_and_insistence(tmp_path, capsys, monkeypatch):
    def unavailable(args):
        raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(simple_example, "load_cifar10", unavailable)
    simple_example.main(["--quick", "--steps", "1", "--out", str(tmp_path / "p.png")])
    notes = [line for line in capsys.readouterr().out.splitlines() if "CIFAR-10" in line]
    assert len(notes) == 1 and "digits" in notes[0]
    with pytest.raises(SystemExit) as e:
        simple_example.main(["--quick", "--dataset", "cifar10"])
    assert "CIFAR-10 is not in" in exit_message(e)

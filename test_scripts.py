"""Tests of the scripts end to end: train_imagenet.py (an epoch, exact resume,
clear errors, NaN handling, trust region on the Gauss-Newton matrix) and
simple_example.py (the default methods, --methods all, the CIFAR-10 fallback).
CPU only, no network; tiny models and a generated ImageFolder (the
``image_folder`` fixture of conftest.py).

    python -m pytest test_scripts.py -q
"""

import hashlib
import json
import math

import pytest
import torch

import simple_example
import train_imagenet
from conftest import imagenet


# --------------------------------------------------------------------------
# train_imagenet.py
# --------------------------------------------------------------------------


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


def test_train_imagenet_trust_region_on_the_gauss_newton_matrix(image_folder, tmp_path):
    ckpt = imagenet(image_folder, tmp_path, "--use-hessian", "--epochs", "1", "--curvature",
                    "ggn", "--trust-region", "--radius", "0.2", "--max-radius", "3")
    group, state = ckpt["optimizer"]["param_groups"][0], ckpt["optimizer"]["state"][0]
    assert (group["mode"], group["curvature"], group["max_radius"]) == ("trust_region", "ggn", 3.0)
    assert state["newton_steps"] == 3 and state["radius"] != 0.2
    with pytest.raises(SystemExit):
        imagenet(image_folder, tmp_path, "--use-hessian", "--trust-region", "--radius", "5",
                 "--max-radius", "3")


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


def test_simple_example_all_methods_report_and_plot(tmp_path, capsys):
    out = tmp_path / "plot.png"
    simple_example.main(["--quick", "--dataset", "digits", "--steps", "2", "--methods", "all",
                         "--out", str(out)])
    text = capsys.readouterr().out
    summary = text[text.index("summary"):]
    rows = [line.split("  ")[0] for line in summary.splitlines()[3:7]]
    assert rows == ["gradient descent", "damped Newton", "Gauss-Newton", "trust region"]
    assert "trust region: " in summary and "radius shrunk" in summary
    assert out.read_bytes()[:4] == b"\x89PNG"
    import matplotlib.image
    assert matplotlib.image.imread(out).shape[1] > 1000  # both panels drawn

    with pytest.raises(SystemExit):
        simple_example.main(["--methods", "gd,bfgs"])
    assert "unknown method(s) bfgs" in capsys.readouterr().err

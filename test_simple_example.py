"""Tests of simple_example.py: the comparison (all seven methods, the tuning grid, the
target from the best tuned baseline, seeds, the plot, the --results JSON), the CIFAR-10
fallback, and the one-line refusals of bad flags and of Ctrl-C.  CPU only, no network,
the bundled digits, tiny models (--quick).

    python -m pytest test_simple_example.py -q
"""

import json

import pytest
import torch

import simple_example

QUICK = ["--quick", "--dataset", "digits"]


def run(tmp_path, *extra):
    out, results = tmp_path / "plot.png", tmp_path / "results.json"
    simple_example.main(QUICK + ["--out", str(out), "--results", str(results)]
                        + [str(e) for e in extra])
    return out, json.loads(results.read_text())


def test_all_methods_report_plot_and_write_the_results_schema(tmp_path, capsys):
    out, data = run(tmp_path, "--methods", "all", "--seeds", 2)
    text = capsys.readouterr().out
    tuning = text[text.index("tuning"):text.index("summary")]
    for name, (_, key, grid, _) in simple_example.FIRST_ORDER.items():
        assert f"{name:<7} {key} = " in tuning and "grid" in tuning
    summary = text[text.index("summary"):]
    rows = [line[:17].strip() for line in summary.splitlines()[3:10]]
    assert rows == list(simple_example.METHODS.values())
    assert "trust region (all seeds)" in summary and "radius shrunk" in summary
    assert f"plot saved to {out}" in text and out.read_bytes()[:4] == b"\x89PNG"
    import matplotlib.image
    assert matplotlib.image.imread(out).shape[1] > 1200  # both panels

    assert set(data) == {"target", "methods"}
    assert list(data["methods"]) == list(simple_example.METHODS)
    steps = simple_example.QUICK["steps"]
    for name, m in data["methods"].items():
        assert set(m) == {"loss", "seconds", "test_accuracy", "steps_to_target",
                          "seconds_to_target", "hyperparameters"}
        assert len(m["loss"]) == len(m["seconds"]) == steps + 1 and m["seconds"][0] == 0.0
        assert all(b >= a for a, b in zip(m["seconds"], m["seconds"][1:]))
        assert 0.0 <= m["test_accuracy"] <= 1.0 and isinstance(m["hyperparameters"], dict)
        hit = next((k for k, x in enumerate(m["loss"]) if x <= data["target"]), None)
        assert m["steps_to_target"] == hit
        assert m["seconds_to_target"] == (None if hit is None else m["seconds"][hit])
    first_order = [data["methods"][m]["loss"][-1] for m in simple_example.FIRST_ORDER]
    assert data["target"] == min(first_order)  # the best tuned baseline's (median) final loss
    assert "lr" in data["methods"]["adam"]["hyperparameters"]
    assert data["methods"]["ggn"]["hyperparameters"]["curvature"] == "ggn"


def test_tuning_is_deterministic_under_a_seed():
    args = simple_example.get_args(QUICK + ["--methods", "adam"])
    problem = simple_example.Problem(args)
    first = simple_example.tune(problem, "sgdm", 3, 4)
    again = simple_example.tune(problem, "sgdm", 3, 4)
    assert first == again
    value, finals = first
    assert finals[value] == min(finals.values())
    assert list(finals) == list(simple_example.FIRST_ORDER["sgdm"][2])
    other = simple_example.tune(problem, "sgdm", 4, 4)[1]
    assert other != finals  # the seed matters: weights and batches


def test_gradient_descent_learning_rate_can_be_fixed_and_the_target_given(tmp_path, capsys):
    _, data = run(tmp_path, "--methods", "gd,ggn", "--lr", 0.5, "--target-loss", 2.0)
    text = capsys.readouterr().out
    assert "lr = 0.5   (--lr, not tuned)" in text and "target loss 2 (--target-loss)" in text
    assert data["target"] == 2.0 and data["methods"]["gd"]["hyperparameters"] == {"lr": 0.5}


def test_cifar_fallback_and_insistence(tmp_path, capsys, monkeypatch):
    def unavailable(args):
        raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(simple_example, "load_cifar10", unavailable)
    simple_example.main(["--quick", "--steps", "1", "--methods", "gd", "--out",
                         str(tmp_path / "p.png")])
    notes = [line for line in capsys.readouterr().out.splitlines() if "CIFAR-10" in line]
    assert len(notes) == 1 and "digits" in notes[0]
    with pytest.raises(SystemExit) as e:
        simple_example.main(["--quick", "--dataset", "cifar10"])
    assert "CIFAR-10 is not in" in str(e.value.code)


BAD_FLAGS = [
    (["--lr", "-1"], "--lr must be a number > 0"),
    (["--lr", "inf"], "--lr must be a number > 0"),
    (["--newton-lr", "-0.5"], "--newton-lr must be in (0, 2)"),
    (["--newton-lr", "2"], "--newton-lr must be in (0, 2)"),
    (["--damping", "0"], "--damping must be a number > 0"),
    (["--damping", "nan"], "--damping must be a number > 0"),
    (["--radius", "0"], "--radius must be a number > 0"),
    (["--radius", "5", "--max-radius", "1"], "need --radius <= --max-radius"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--hessian-batch-size", "0"], "--hessian-batch-size must be >= 1"),
    (["--train-size", "8", "--hessian-batch-size", "16"], "--hessian-batch-size 16 is larger"),
    (["--batch-size", "-3"], "--batch-size must be >= 0"),
    (["--target-loss", "-1"], "--target-loss must be a number > 0"),
    (["--max-step-norm", "0"], "--max-step-norm must be a number > 0"),
    (["--min-damping", "0"], "--min-damping must be a number > 0"),
    (["--damping", "1e-9"], "--damping must be >= --min-damping"),
    (["--results", "/nonexistent/folder/r.json"], "--results /nonexistent/folder/r.json"),
    (["--methods", "gd,bfgs"], "unknown method(s) bfgs"),
    (["--steps", "many"], "invalid int value"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_are_refused_in_one_line_before_any_work(flags, message, capsys,
                                                           monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the flags were checked")

    monkeypatch.setattr(simple_example, "load_data", no_work)
    with pytest.raises(SystemExit) as e:
        simple_example.main(flags)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "(see --help)" in err, err


def test_ctrl_c_is_one_line_without_a_traceback(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(simple_example, "run", interrupted)
    with pytest.raises(SystemExit) as e:
        simple_example.main(QUICK)
    assert e.value.code == 130
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "interrupted" in err and "Traceback" not in err


def test_the_regime_preset_sets_its_flags_and_explicit_flags_win():
    args = simple_example.get_args(["--regime", "full-batch", "--steps", "7"])
    preset = simple_example.REGIMES["full-batch"]
    assert args.steps == 7 and args.num_layers == preset["num_layers"]
    assert args.first_order_steps == preset["first_order_steps"]
    assert args.hessian_batch_size == args.train_size  # the curvature of the whole batch
    assert args.min_damping == preset["min_damping"]
    model = simple_example.build_model(4, 3, 2, 2, "tanh", torch.device("cpu"), torch.float64)
    for name in ("newton", "ggn"):
        optimizer, settings = simple_example.make_optimizer(name, model, None, args)
        assert optimizer.param_groups[0]["min_damping"] == preset["min_damping"]
        assert settings["min_damping"] == preset["min_damping"]


def test_cnn_model_takes_second_order_steps_and_refuses_the_trust_region(tmp_path, capsys):
    out, data = run(tmp_path, "--model", "cnn", "--methods", "adam,newton,ggn")
    text = capsys.readouterr().out
    assert "CNN 64 -> 8 x 2 -> 10" in text and "1954 parameters" in text
    assert list(data["methods"]) == ["adam", "newton", "ggn"]
    for name in ("newton", "ggn"):
        losses = data["methods"][name]["loss"]
        assert losses[-1] < losses[0]
    args = simple_example.get_args(QUICK + ["--model", "cnn"])
    assert "tr" not in args.methods and "newton" in args.methods
    with pytest.raises(SystemExit):
        simple_example.get_args(QUICK + ["--model", "cnn", "--methods", "tr"])
    assert "does not support convolutional layers" in capsys.readouterr().err

"""Tests of simple_example.py: the comparison (all seven methods, the tuning grid with its
edges, targets fixed in advance, seeds, the plot, the --results JSON with steps,
evaluations and seconds), L-BFGS as its users run it, the regression regime with scipy's
least_squares as a peer, the CIFAR-10 fallback, and the one-line refusals of bad flags and
of Ctrl-C.  CPU only, no network, the bundled digits, tiny models (--quick).

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

    assert set(data) == {"target", "targets", "metric", "methods"}
    assert data["targets"] == simple_example.parse_targets(simple_example.DEFAULT_TARGETS)
    assert data["target"] == min(data["targets"])  # fixed in advance, not any method's result
    assert list(data["methods"]) == list(simple_example.METHODS)
    for name, m in data["methods"].items():
        assert set(m) == {"runs", "test_metric", "reached", "hyperparameters", "stats"}
        assert len(m["runs"]) == 2 and len(m["test_metric"]) == 2
        budget = simple_example.QUICK["first_order_steps" if name in simple_example.FIRST_ORDER
                                      else "steps"]
        for curve, reached in zip(m["runs"], m["reached"][f"{data['target']:g}"]):
            assert set(curve) == {"loss", "seconds", "steps", "evaluations"}
            assert len(curve["loss"]) == len(curve["seconds"]) == len(curve["steps"]) == \
                len(curve["evaluations"]) >= 2
            assert curve["seconds"][0] == curve["steps"][0] == curve["evaluations"][0] == 0
            for key in ("seconds", "steps", "evaluations"):
                assert all(b >= a for a, b in zip(curve[key], curve[key][1:]))
            assert curve["steps"][-1] >= budget and curve["steps"][-2] < budget
            assert curve["evaluations"][-1] >= curve["steps"][-1]  # at least one per step
            hit = next((k for k, x in enumerate(curve["loss"]) if x <= data["target"]), None)
            expected = (None,) * 3 if hit is None else tuple(
                curve[key][hit] for key in ("steps", "evaluations", "seconds"))
            assert tuple(reached[key] for key in ("steps", "evaluations", "seconds")) == expected
        assert all(0.0 <= a <= 1.0 for a in m["test_metric"])
        assert isinstance(m["hyperparameters"], dict)
    assert "lr" in data["methods"]["adam"]["hyperparameters"]
    assert data["methods"]["ggn"]["hyperparameters"]["curvature"] == "ggn"
    lbfgs = data["methods"]["lbfgs"]["hyperparameters"]
    assert (lbfgs["max_iter"], lbfgs["line_search_fn"]) == (20, "strong_wolfe")
    assert "evals to target" in summary and "CPU seconds to each target" in summary


def test_lbfgs_runs_as_its_users_run_it():
    """Strong Wolfe, 20 iterations per call: one call, many iterations and evaluations."""
    args = simple_example.get_args(QUICK + ["--methods", "lbfgs"])
    problem = simple_example.Problem(args)
    model = problem.model(0)
    optimizer, _ = simple_example.make_optimizer("lbfgs", model, 10, args)
    group = optimizer.param_groups[0]
    assert (group["max_iter"], group["line_search_fn"], group["history_size"]) == \
        (20, "strong_wolfe", 10)
    run = simple_example.train(problem, "lbfgs", 10, 0, 1)
    assert run["steps"][1] == 20 and run["evaluations"][1] >= 20  # one call, 20 iterations


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
    assert data["target"] == 2.0 and data["targets"] == [2.0]
    assert data["methods"]["gd"]["hyperparameters"] == {"lr": 0.5}


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
    (["--damping", "1e-9", "--min-damping", "1e-8"], "--damping must be >= --min-damping"),
    (["--targets", "1e-3,-1"], "targets must be numbers > 0"),
    (["--time-budget", "-2"], "--time-budget must be a number of seconds > 0"),
    (["--grid", "bfgs=1,2"], "--grid needs METHOD=V1,V2"),
    (["--grid", "adam=fast"], "values must be floats"),
    (["--methods", "lsq", "--dataset", "digits"], "lsq (scipy's least_squares) needs"),
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


def test_the_regression_regime_with_least_squares_as_a_peer(tmp_path, capsys):
    """--regime regression (tiny with --quick): teacher-student MSE, our Levenberg-Marquardt
    (the GGN through the output-space route, Nielsen's damping), L-BFGS, Adam and scipy's
    least_squares('trf', exact Jacobian), with the 'lm' refusal said when there are fewer
    residuals than parameters."""
    out, results = tmp_path / "r.png", tmp_path / "r.json"
    simple_example.main(["--regime", "regression", "--quick", "--seeds", "2", "--steps", "6",
                         "--train-size", "24", "--hessian-batch-size", "24", "--out", str(out),
                         "--results", str(results)])
    text = capsys.readouterr().out
    assert "teacher-student regression" in text and "test MSE" in text
    assert "refuses this problem" in text and "(24 residuals, 61 variables)" in text
    assert "scipy trf (all seeds): stopped by" in text
    data = json.loads(results.read_text())
    assert list(data["methods"]) == ["adam", "lbfgs", "ggn", "lsq"]
    assert data["targets"] == [1e-4, 1e-6, 1e-8] and data["metric"] == "test MSE"
    ggn = data["methods"]["ggn"]["hyperparameters"]
    assert (ggn["damping_update"], ggn["momentum"], ggn["min_damping"]) == ("nielsen", False, None)
    for run in data["methods"]["ggn"]["runs"] + data["methods"]["lsq"]["runs"]:
        assert run["loss"][-1] < 0.5 * run["loss"][0]
        assert len(run["steps"]) == len(run["loss"]) and run["steps"][-1] <= 6
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_least_squares_fits_the_teacher_data_with_the_exact_jacobian():
    """The lsq runner's Jacobian is the exact one: at its end the loss it reports is the
    model's training MSE, and trf converges on a tiny zero-residual problem."""
    args = simple_example.get_args(["--regime", "regression", "--quick", "--train-size", "24",
                                    "--hessian-batch-size", "24", "--steps", "200",
                                    "--methods", "lsq"])
    problem = simple_example.Problem(args)
    run = simple_example.train(problem, "lsq", None, 0, 200)
    model = problem.model(0)
    assert run["loss"][0] == pytest.approx(problem.measure(model)[0], rel=1e-12)
    assert run["loss"][-1] < 1e-12, run["loss"]
    assert "gtol" in run["hyperparameters"]["stopped"] or "ftol" in \
        run["hyperparameters"]["stopped"] or "xtol" in run["hyperparameters"]["stopped"]


def test_a_regime_grid_and_an_explicit_grid():
    args = simple_example.get_args(["--regime", "regression"])
    assert args.grids["lbfgs"] == (10, 30, 100, 300, 1000) and args.methods == ["adam", "lbfgs",
                                                                         "ggn", "lsq"]
    args = simple_example.get_args(["--regime", "regression", "--grid", "lbfgs=100"])
    assert args.grids["lbfgs"] == (100,) and args.grids["adam"][0] == 1e-4
    assert args.time_budget == 20.0 and args.targets == [1e-4, 1e-6, 1e-8]


def test_cnn_model_takes_second_order_steps_and_refuses_the_trust_region(tmp_path, capsys):
    out, data = run(tmp_path, "--model", "cnn", "--methods", "adam,newton,ggn")
    text = capsys.readouterr().out
    assert "CNN 64 -> 8 x 2 -> 10" in text and "1954 parameters" in text
    assert list(data["methods"]) == ["adam", "newton", "ggn"]
    for name in ("newton", "ggn"):
        for curve in data["methods"][name]["runs"]:
            assert curve["loss"][-1] < curve["loss"][0]
    args = simple_example.get_args(QUICK + ["--model", "cnn"])
    assert "tr" not in args.methods and "newton" in args.methods
    for flags in (["--methods", "tr"], ["--dataset", "teacher"]):
        with pytest.raises(SystemExit):
            simple_example.get_args(QUICK + ["--model", "cnn"] + flags)
    err = capsys.readouterr().err
    assert "does not support convolutional layers" in err and "--model mlp" in err

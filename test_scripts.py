"""Tests of the scripts end to end: train_imagenet.py (an epoch, exact resume,
clear errors, NaN handling, trust region on the Gauss-Newton matrix);
simple_example.py has its own file, test_simple_example.py.
CPU only, no network; tiny models and a generated ImageFolder (the
``image_folder`` fixture of conftest.py).

    python -m pytest test_scripts.py -q
"""

import errno
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import train_imagenet
import train_utils
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
    assert len(epoch) == 1 and {"val_top1", "train_loss"} <= set(epoch[0])
    assert "val_top3" not in epoch[0]  # 3 classes: top-3 is always 1, not reported
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
    assert same_state(resumed["optimizer"]["state"][0], straight["optimizer"]["state"][0])
    assert [m["epoch"] for m in metrics(a) if m["event"] == "epoch"] == [1, 2]


def same_state(a: dict, b: dict) -> bool:
    """Optimizer state dicts equal, tensors (e.g. a kept previous step) bit for bit."""
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


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


# train_imagenet.py: failing cleanly and resuming truthfully (issue 10, items 9-11)


def one_line(excinfo) -> str:
    """The exit message of a SystemExit: a single line, no traceback."""
    message = exit_message(excinfo)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_imagenet_resume_from_unreadable_checkpoints_says_one_line(image_folder, tmp_path):
    good = imagenet(image_folder, tmp_path / "good", "--epochs", "1")
    blob = (tmp_path / "good" / "last.pt").read_bytes()
    cases = {"truncated": blob[:len(blob) // 2], "random": os.urandom(4096), "empty": b"",
             "weights": None}
    for name, content in cases.items():
        path = tmp_path / f"{name}.pt"
        if content is None:
            torch.save(good["model"], path)  # a model state_dict alone
        else:
            path.write_bytes(content)
        with pytest.raises(SystemExit) as e:
            imagenet(image_folder, tmp_path / "c", "--epochs", "2", "--resume", path)
        message = one_line(e)
        assert f"--resume: {path}" in message and "without --resume" in message, message
        assert not (tmp_path / "c").exists()  # refused before any work
    assert "model state_dict only" in message


@pytest.mark.parametrize("workers, content", [(0, b""), (1, b"\x89PNG\r\n\x1a\n broken")])
def test_imagenet_unreadable_image_mid_epoch_names_the_file(image_folder, tmp_path, workers, content):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    bad = data / "train" / "n00001" / "img3.png"
    bad.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        imagenet(data, tmp_path / "c", "--epochs", "1", "--workers", workers, "--strict-images")
    message = one_line(e)
    assert message.startswith(f"error: cannot read image {bad} (") and "remove or replace" in message
    assert ("the file is empty" in message) == (content == b"")
    assert "no checkpoint of this run had been written yet" in message


@pytest.mark.parametrize("flags, named", [
    (["--lr", "-0.1"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--use-hessian", "--newton-lr", "-1"], "--newton-lr"),
    (["--use-hessian", "--newton-lr", "2.5"], "--newton-lr"),
    (["--use-hessian", "--damping", "0"], "--damping"),
    (["--use-hessian", "--min-damping", "2"], "--min-damping"),
    (["--use-hessian", "--max-step-norm", "0"], "--max-step-norm"),
    (["--use-hessian", "--hessian-batch-size", "9"], "--hessian-batch-size"),
    (["--use-hessian", "--trust-region", "--radius", "-1"], "--radius"),
    (["--momentum", "1"], "--momentum"), (["--trust-region"], "--trust-region"),
    (["--curvature", "ggn"], "--curvature"), (["--amp"], "--amp"), (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"), (["--hidden-dim", "0"], "--hidden-dim"),
])
def test_imagenet_bad_flags_refused_before_any_work(image_folder, tmp_path, monkeypatch, flags,
                                                     named):
    def no_work(*args, **kwargs):
        raise AssertionError("the data were opened before the flags were checked")

    monkeypatch.setattr(train_imagenet, "image_folders", no_work)
    with pytest.raises(SystemExit) as e:
        imagenet(image_folder, tmp_path / "c", *flags)
    message = one_line(e)
    assert message.startswith("error: ") and named in message, message
    assert not (tmp_path / "c").exists()


def test_imagenet_ctrl_c_says_one_line_and_keeps_the_checkpoint(image_folder, tmp_path,
                                                               monkeypatch, capsys):
    imagenet(image_folder, tmp_path, "--epochs", "1")
    good, real_step, calls = sha256(tmp_path / "last.pt"), train_imagenet.train_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_imagenet, "train_step", interrupted)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        imagenet(image_folder, tmp_path, "--epochs", "3", "--resume")
    assert e.value.code == 130
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "in epoch 2" in lines[0] and "(after epoch 1) is intact" in lines[0]
    assert "--resume" in lines[0] and sha256(tmp_path / "last.pt") == good


@pytest.mark.parametrize("delay", [0.0, 0.2, 0.4])
def test_imagenet_sigint_to_a_real_run_with_workers(image_folder, tmp_path, delay):
    """Ctrl-C as a terminal sends it: to the process group, data workers included, at
    several moments around an epoch's end (where DataLoader iterators shut their workers
    down in ``__del__``, which drops exceptions: a KeyboardInterrupt raised there was lost
    and the run went on)."""
    cmd = [sys.executable, "train_imagenet.py", "--data-dir", str(image_folder),
           "--checkpoint-dir", str(tmp_path), "--image-size", "4", "--hidden-dim", "4",
           "--num-layers", "3", "--batch-size", "8", "--device", "cpu", "--workers", "1",
           "--epochs", "100000"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and "is intact" in lines[0] and "--resume" in lines[0], err
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] >= 1


def test_imagenet_first_signal_stops_at_the_next_batch_the_second_at_once(monkeypatch, capsys):
    stop = train_imagenet._Stop
    previous = stop.install(announce=True)
    try:
        stop.check()  # nothing requested
        stop.handler(signal.SIGINT, None)  # the first: remembered, said, not raised
        assert stop.requested and "stopping at the next batch" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            stop.check()
        with pytest.raises(KeyboardInterrupt):
            stop.handler(signal.SIGTERM, None)  # the second: at once
        with pytest.raises(KeyboardInterrupt):
            list(stop.checked([1, 2]))
        monkeypatch.setattr(stop, "pid", -1)  # as in a data worker forked from the run
        stop.handler(signal.SIGINT, None)  # left to the main process
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop.requested = False


def test_imagenet_resume_flags_override_record_and_model_flags_must_match(image_folder, tmp_path,
                                                                         capsys):
    imagenet(image_folder, tmp_path, "--epochs", "1", "--lr", "0.2", "--momentum", "0.5")
    capsys.readouterr()
    ckpt = imagenet(image_folder, tmp_path, "--epochs", "2", "--resume", "--lr", "0.05")
    out = capsys.readouterr().out
    assert "from the command line: --lr 0.05 (checkpoint: 0.2)" in out
    assert "SGD lr 0.05, momentum 0.5" in out  # what runs: the override, the checkpoint's momentum
    assert (ckpt["args"]["lr"], ckpt["args"]["momentum"]) == (0.05, 0.5)
    group = ckpt["optimizer"]["param_groups"][0]
    assert (group["lr"], group["momentum"]) == (0.05, 0.5)
    resumes = [m for m in metrics(tmp_path) if m["event"] == "resume"]
    assert resumes[-1]["overrides"] == {"lr": 0.05}
    ckpt = imagenet(image_folder, tmp_path, "--epochs", "3", "--resume")  # not given: kept
    assert ckpt["args"]["lr"] == 0.05 and "SGD lr 0.05" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        imagenet(image_folder, tmp_path, "--epochs", "4", "--resume", "--hidden-dim", "5")
    assert "--hidden-dim 4" in one_line(e) and "drop --hidden-dim" in one_line(e)


def test_imagenet_resume_newton_settings_override(image_folder, tmp_path, capsys):
    imagenet(image_folder, tmp_path, "--use-hessian", "--epochs", "1")
    capsys.readouterr()
    # no --use-hessian: the checkpoint's; --trust-region and --max-radius override
    ckpt = imagenet(image_folder, tmp_path, "--epochs", "2", "--resume", "--trust-region",
                    "--max-radius", "3")
    out = capsys.readouterr().out
    assert "--trust-region (checkpoint: --no-trust-region)" in out and "trust-region steps" in out
    group = ckpt["optimizer"]["param_groups"][0]
    assert (group["mode"], group["max_radius"]) == ("trust_region", 3.0)
    assert ckpt["args"]["use_hessian"] and ckpt["args"]["trust_region"]
    assert ckpt["optimizer"]["state"][0]["newton_steps"] == 6


def test_imagenet_metrics_consistent_after_an_interrupted_epoch(image_folder, tmp_path,
                                                                monkeypatch):
    imagenet(image_folder, tmp_path, "--epochs", "1", "--log-interval", "1")  # steps 1-3
    real_step, calls = train_imagenet.train_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(train_imagenet, "train_step", interrupted)
        with pytest.raises(SystemExit):  # steps 4 and 5 logged, then Ctrl-C
            imagenet(image_folder, tmp_path, "--epochs", "2", "--resume", "--log-interval", "1")
    imagenet(image_folder, tmp_path, "--epochs", "2", "--resume", "--log-interval", "1")
    log = metrics(tmp_path)
    last = [m for m in log if m["event"] == "resume"][-1]
    assert (last["step"], last["superseded"]) == (3, 2)
    kept = []  # the reading rule: a resume record supersedes the records after its step
    for record in log:
        if record["event"] == "resume":
            kept = [k for k in kept if k.get("step", 0) <= record["step"]]
        kept.append(record)
    assert [m["step"] for m in kept if m["event"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [m["epoch"] for m in kept if m["event"] == "epoch"] == [1, 2]


def test_imagenet_one_class_reports_top1_once(image_folder, tmp_path, capsys):
    data = tmp_path / "data"
    for split in ("train", "val"):
        shutil.copytree(image_folder / split / "n00000", data / split / "n00000")
    imagenet(data, tmp_path / "c", "--epochs", "1")
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.startswith("epoch 1:")]
    assert line.count("top-") == 1 and "one class" in out


def test_imagenet_startup_line_and_epoch_counts_tell_the_truth(image_folder, tmp_path, capsys):
    imagenet(image_folder, tmp_path, "--use-hessian", "--epochs", "1", "--batch-size", "16",
             "--hessian-batch-size", "12")
    out = capsys.readouterr().out
    assert "curvature on the first 12 images of each batch (all 8 of the last, shorter one)" in out
    imagenet(image_folder, tmp_path, "--epochs", "1", "--resume")
    out = capsys.readouterr().out
    assert "nothing to do" in out and "1 epoch(s) done" in out and "done:" not in out
    imagenet(image_folder, tmp_path, "--epochs", "2", "--resume")
    assert "done: 1 epoch(s) in this run, 2 in all" in capsys.readouterr().out


# train_imagenet.py: untrusted checkpoints, planted links, lost epochs, full disks (issue 18)


class Payload:
    """What an attacker puts in a checkpoint: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_imagenet_resume_never_runs_code_from_a_checkpoint(image_folder, tmp_path):
    good = imagenet(image_folder, tmp_path / "good", "--epochs", "1")
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(Payload(proof)))  # the payload is real: unpickled, it runs
    assert proof.exists()
    marker = tmp_path / "marker"
    optimizer = {**good["optimizer"], "state": {0: {"momentum_buffer": Payload(marker)}}}
    files = {"extra-key": {**good, "note": Payload(marker)},  # a checkpoint carrying it
             "nested": {**good, "optimizer": optimizer},
             "not-a-checkpoint": Payload(marker)}
    for name, content in files.items():
        path = tmp_path / f"{name}.pt"
        torch.save(content, path)
        with pytest.raises(SystemExit) as e:
            imagenet(image_folder, tmp_path / name, "--epochs", "2", "--resume", path)
        message = one_line(e)
        assert f"--resume: {path} holds a Python object (posix.system)" in message, message
        assert "runs no code" in message and "refused" in message
        assert not marker.exists(), name
        assert not (tmp_path / name).exists()  # refused before any work
    with open(tmp_path / "plain.pkl", "wb") as fh:  # a plain pickle, not torch's zip format
        pickle.dump(Payload(marker), fh)
    with pytest.raises(SystemExit) as e:
        imagenet(image_folder, tmp_path / "c", "--epochs", "2", "--resume", tmp_path / "plain.pkl")
    assert "refused" in one_line(e) and not marker.exists()


def test_imagenet_checkpoint_is_tensors_and_plain_values_with_a_checksum(image_folder, tmp_path):
    ckpt = imagenet(image_folder, tmp_path / "a", "--use-hessian", "--epochs", "1")  # weights_only
    assert ckpt["validated"] and ckpt["processes"] == 1 and ckpt["record"]["epoch"] == 1
    stored = ckpt.pop("sha256")
    assert stored == train_utils.sha256_of(ckpt)
    blob = bytearray((tmp_path / "a" / "last.pt").read_bytes())
    weight = ckpt["model"]["layers.0.linear.weight"]
    at = blob.find(weight.numpy().tobytes())
    assert at > 0
    blob[at] ^= 1  # the lowest mantissa bit of one weight: still loads, silently different
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(blob))
    loaded = torch.load(flipped, weights_only=True)["model"]["layers.0.linear.weight"]
    assert not torch.equal(loaded, weight) and torch.allclose(loaded, weight)
    with pytest.raises(SystemExit) as e:
        imagenet(image_folder, tmp_path / "b", "--epochs", "2", "--resume", flipped)
    message = one_line(e)
    assert f"--resume: {flipped} fails its checksum" in message and "intact copy" in message


def test_imagenet_save_never_writes_through_a_planted_link(image_folder, tmp_path, monkeypatch):
    ckpt, victim = tmp_path / "c", tmp_path / "victim"
    imagenet(image_folder, ckpt, "--epochs", "1")
    victim.write_text("precious")
    (ckpt / "last.pt.tmp").symlink_to(victim)  # the fixed name older versions wrote through
    (ckpt / ".last.pt.k3x9q_f1.tmp").write_bytes(b"left by a run killed while saving")
    imagenet(image_folder, ckpt, "--epochs", "2", "--resume")
    assert victim.read_text() == "precious"
    assert not (ckpt / "last.pt").is_symlink() and torch.load(ckpt / "last.pt")["epoch"] == 2
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.pt", "metrics.jsonl"]  # cleaned

    for name in ("last.pt", "metrics.jsonl"):  # a link where the run writes: refused at start
        planted = tmp_path / f"planted-{name}"
        shutil.copytree(ckpt, planted)
        (planted / name).unlink()
        (planted / name).symlink_to(victim)
        with pytest.raises(SystemExit) as e:
            imagenet(image_folder, planted, "--epochs", "3")
        message = one_line(e)
        assert f"{planted / name} is a symbolic link (to {victim})" in message, message
        assert victim.read_text() == "precious"

    real_step, calls = train_imagenet.train_step, []

    def plant(name):  # a link planted while the run trains
        def step(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                (ckpt / name).unlink()
                (ckpt / name).symlink_to(victim)
            return real_step(*args, **kwargs)
        return step

    monkeypatch.setattr(train_imagenet, "train_step", plant("last.pt"))
    imagenet(image_folder, ckpt, "--epochs", "3", "--resume", "--log-interval", "1000")
    assert victim.read_text() == "precious"  # the rename replaced the link, not its target
    assert not (ckpt / "last.pt").is_symlink() and torch.load(ckpt / "last.pt")["epoch"] == 3
    calls.clear()
    monkeypatch.setattr(train_imagenet, "train_step", plant("metrics.jsonl"))
    with pytest.raises(SystemExit) as e:
        imagenet(image_folder, ckpt, "--epochs", "4", "--resume", "--log-interval", "1")
    message = one_line(e)
    assert f"cannot append to {ckpt / 'metrics.jsonl'}: it is a symbolic link" in message, message
    assert victim.read_text() == "precious"


def test_imagenet_disk_full_during_a_save_says_one_line_and_keeps_the_old(image_folder, tmp_path,
                                                                          monkeypatch):
    imagenet(image_folder, tmp_path, "--epochs", "1")
    good, real_save = sha256(tmp_path / "last.pt"), torch.save

    class FullDisk(io.RawIOBase):
        """The file of a disk that fills up after a few kilobytes."""

        def __init__(self, fh):
            self.fh, self.written = fh, 0

        def writable(self):
            return True

        def write(self, data):
            self.written += len(data)
            if self.written > 2000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.fh.write(data)

    monkeypatch.setattr(torch, "save", lambda obj, fh: real_save(obj, FullDisk(fh)))
    with pytest.raises(SystemExit) as e:
        imagenet(image_folder, tmp_path, "--epochs", "2", "--resume")
    message = one_line(e)
    assert f"cannot write the checkpoint {tmp_path / 'last.pt'}: no space left on device (ENOSPC)" \
        in message and "(after epoch 1) is intact" in message and "--resume" in message, message
    assert sha256(tmp_path / "last.pt") == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "metrics.jsonl"]  # no temporary


def test_imagenet_unusable_checkpoint_dir_refused_before_the_first_batch(image_folder, tmp_path,
                                                                         monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train_imagenet, "train_step", no_training)
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root writes anywhere: make the folder refuse as it would anyone else
        real = tempfile.TemporaryFile

        def refusing(*args, dir=None, **kwargs):
            if Path(dir) == locked:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(locked))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "TemporaryFile", refusing)
    cases = {tmp_path / "file": "is a file, not a folder",
             tmp_path / "dangling": f"is a symbolic link to {tmp_path / 'gone'}, which does not exist",
             tmp_path / "file" / "sub": "cannot write in --checkpoint-dir",
             locked: "(permission denied (EACCES)): fix its permissions"}
    try:
        for folder, expected in cases.items():
            with pytest.raises(SystemExit) as e:
                imagenet(image_folder, folder, "--epochs", "1")
            message = one_line(e)
            assert message.startswith("error: ") and expected in message, message
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


def test_imagenet_unreadable_images_are_skipped_named_and_counted(image_folder, tmp_path, capfd):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    bad_train, bad_val = data / "train" / "n00001" / "img3.png", data / "val" / "n00002" / "img0.png"
    bad_train.write_bytes(b"")
    bad_val.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    ckpt = imagenet(data, tmp_path / "c", "--epochs", "2", "--workers", "1")
    err = capfd.readouterr().err
    assert err.count(f"warning: skipped unreadable train image {bad_train} (the file is empty)") == 2
    assert err.count(f"warning: skipped unreadable val image {bad_val} (") == 2
    epochs = [m for m in metrics(tmp_path / "c") if m["event"] == "epoch"]
    assert [m["skipped_images"] for m in epochs] == [{"train": 1, "val": 1}] * 2
    assert ckpt["global_step"] == 6  # the batches kept their size: 3 per epoch
    with pytest.raises(SystemExit):  # the same run with --strict-images stops at the image
        imagenet(data, tmp_path / "d", "--epochs", "1", "--strict-images")


def test_imagenet_bad_validation_image_keeps_the_epoch_and_resume_validates_it(
        image_folder, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    bad = data / "val" / "n00001" / "img2.png"
    intact = bad.read_bytes()
    bad.write_bytes(intact[:40])  # truncated
    with pytest.raises(SystemExit) as e:
        imagenet(data, tmp_path / "a", "--use-hessian", "--epochs", "2", "--strict-images")
    message = one_line(e)
    assert message.startswith(f"error: cannot read image {bad} (")
    assert f"{tmp_path / 'a' / 'last.pt'} (after epoch 1) is intact" in message, message
    assert "continue with the same command and --resume" in message
    kept = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    assert (kept["epoch"], kept["validated"]) == (1, False)  # the epoch's training was kept

    bad.write_bytes(intact)
    capsys.readouterr()
    resumed = imagenet(data, tmp_path / "a", "--use-hessian", "--epochs", "2", "--resume")
    assert "validating epoch 1 first" in capsys.readouterr().out
    straight = imagenet(data, tmp_path / "b", "--use-hessian", "--epochs", "2")
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for run in ("a", "b"):
        records = [m for m in metrics(tmp_path / run) if m["event"] == "epoch"]
        assert [m["epoch"] for m in records] == [1, 2]
    validated = [m for m in metrics(tmp_path / "a") if m["event"] == "epoch"]
    assert validated[0]["val_loss"] == [m for m in metrics(tmp_path / "b")
                                        if m["event"] == "epoch"][0]["val_loss"]


# simple_example.py: test_simple_example.py

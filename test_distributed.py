"""train_imagenet.py under torchrun: two CPU processes (gloo) on a generated ImageFolder.

Three ``torchrun --standalone --nproc_per_node 2`` launches (an SGD epoch,
a Newton epoch, a resumed Newton epoch) and single-process runs of the same
settings to compare with; tiny images and a tiny float64 model, so the time is
mostly the processes' start-up.

    python -m pytest test_distributed.py -q
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed

import train_imagenet

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available()
                                     and torch.distributed.is_gloo_available()),
                                reason="this torch build has no gloo process groups")

ROOT = Path(__file__).resolve().parent
# float64: the runs compared below differ only in the order of floating-point sums
# (the mean of two 8-image means against one 16-image mean), about 1e-16 per step.
TINY = ["--image-size", "4", "--hidden-dim", "4", "--num-layers", "3", "--workers", "0",
        "--device", "cpu", "--dtype", "float64"]
# SGD: a few steps from the same start cannot amplify 1e-16 differences beyond this.
ATOL = 1e-12
# Newton steps: the damping adapts to (f0 - f1) / predicted, a difference of nearly equal
# losses, which turns 1e-16 rounding differences into about 1e-10 in the weights here.
NEWTON_ATOL = 1e-8


def torchrun(data, ckpt, *extra, processes=2):
    """train_imagenet.py under torchrun; returns (checkpoint, the output's lines)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(processes), str(ROOT / "train_imagenet.py"),
           "--data-dir", str(data), "--checkpoint-dir", str(ckpt), *TINY, *map(str, extra)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return torch.load(ckpt / "last.pt", weights_only=True), run.stdout.splitlines()


def single(data, ckpt, *extra):
    """The same script in this process, without torchrun."""
    train_imagenet.main(["--data-dir", str(data), "--checkpoint-dir", str(ckpt), *TINY,
                         *map(str, extra)])
    return torch.load(ckpt / "last.pt", weights_only=True)


def records(ckpt, event):
    lines = (ckpt / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def assert_same_weights(a, b, atol=ATOL):
    assert a.keys() == b.keys()
    for key in a:
        assert not key.startswith("module."), key
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def test_sgd_two_processes_of_8_match_one_process_of_16(image_folder, tmp_path):
    two, lines = torchrun(image_folder, tmp_path / "two", "--batch-size", 8, "--epochs", 1)
    one = single(image_folder, tmp_path / "one", "--batch-size", 16, "--epochs", 1)
    assert two["global_step"] == one["global_step"] == 2  # 24 images: 16 + 8
    assert_same_weights(two["model"], one["model"])
    assert any("2 processes x batch 8 = 16 images per step" in line for line in lines)
    assert sum(line.startswith("epoch 1:") for line in lines) == 1  # rank 0 prints, alone
    assert len(records(tmp_path / "two", "epoch")) == 1
    (v2,), (v1,) = records(tmp_path / "two", "epoch"), records(tmp_path / "one", "epoch")
    assert v2["val_loss"] == pytest.approx(v1["val_loss"], abs=1e-12)  # validation all-reduced


def test_newton_two_processes_stay_identical_checkpoint_once_and_resume(image_folder, tmp_path):
    run, copy = tmp_path / "run", tmp_path / "copy"
    first, _ = torchrun(image_folder, run, "--batch-size", 8, "--epochs", 1, "--use-hessian",
                        "--check-sync", 1)
    syncs = records(run, "sync")
    assert [s["step"] for s in syncs] == [1, 2]  # after every step: parameters and optimizer state
    assert all(len(s["fingerprints"]) == 2 and len(set(s["fingerprints"])) == 1 for s in syncs)
    assert [(c["epoch"], c["rank"], c["validated"]) for c in records(run, "checkpoint")] == [
        (1, 0, False), (1, 0, True)]  # before validation, and after it
    assert len(records(run, "start")) == 1 and not (run / "last.pt.tmp").exists()
    assert first["optimizer"]["state"][0]["newton_steps"] == 2
    # the curvature batch is the global batch's first 4 images: one process of 16 takes the same steps
    assert_same_weights(first["model"], single(image_folder, tmp_path / "one", "--batch-size", 16,
                                               "--epochs", 1, "--use-hessian")["model"], NEWTON_ATOL)

    copy.mkdir()
    shutil.copy(run / "last.pt", copy / "last.pt")
    resumed, lines = torchrun(image_folder, run, "--batch-size", 8, "--epochs", 2, "--resume",
                              "--trust-region", "--radius", 0.5, "--check-sync", 1)
    assert any("resumed from" in line and "--trust-region (checkpoint: --no-trust-region)" in line
               for line in lines)
    assert resumed["epoch"] == 2 and resumed["args"]["trust_region"] is True
    assert resumed["optimizer"]["param_groups"][0]["mode"] == "trust_region"
    syncs = records(run, "sync")[2:]
    assert [s["step"] for s in syncs] == [3, 4]
    assert all(len(set(s["fingerprints"])) == 1 for s in syncs)
    # any number of processes resumes it: one process of 16 from the same checkpoint
    alone = single(image_folder, copy, "--batch-size", 16, "--epochs", 2, "--resume",
                   "--trust-region", "--radius", 0.5)
    assert_same_weights(resumed["model"], alone["model"], NEWTON_ATOL)
    assert resumed["optimizer"]["state"][0]["accepted"] == alone["optimizer"]["state"][0]["accepted"]


def test_amp_refused_on_cpu_and_newton_steps_never_autocast(image_folder, tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as e:
        single(image_folder, tmp_path / "a", "--amp", "--dtype", "float32")
    assert "--amp needs CUDA" in str(e.value.code) and "\n" not in str(e.value.code)

    # The dispatch, on the CPU's bf16 autocast: SGD steps autocast, Newton steps in float32.
    monkeypatch.setattr(train_imagenet, "check_device", lambda args, device: None)
    steps, real_step = [], train_imagenet.train_step

    def spy(model, optimizer, x, y, curvature_batch=None, **kw):
        newton_steps = optimizer.stats["newton_steps"]
        autocast = kw["precision"]()
        assert curvature_batch[0].dtype == torch.float32
        assert not isinstance(autocast, torch.autocast) or autocast.fast_dtype == torch.bfloat16
        out = real_step(model, optimizer, x, y, curvature_batch, **kw)
        steps.append((optimizer.stats["newton_steps"] > newton_steps,
                      isinstance(autocast, torch.autocast)))
        return out

    monkeypatch.setattr(train_imagenet, "train_step", spy)
    ckpt = single(image_folder, tmp_path / "b", "--amp", "--dtype", "float32", "--use-hessian",
                  "--hessian-freq", 2, "--batch-size", 8, "--epochs", 1)
    assert steps == [(True, False), (False, True), (True, False)]
    assert ckpt["optimizer"]["state"][0]["newton_steps"] == 2
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_amp_epoch_and_nccl_processes(image_folder, tmp_path):
    """On a GPU: an epoch with --amp (SGD steps in bf16, Newton steps in float32), and with two
    or more GPUs the same under torchrun with NCCL, its processes kept identical."""
    cuda = ["--device", "cuda", "--dtype", "float32", "--amp", "--use-hessian", "--hessian-freq", 2]
    ckpt = single(image_folder, tmp_path / "one", *cuda, "--batch-size", 8, "--epochs", 1)
    assert ckpt["optimizer"]["state"][0]["newton_steps"] == 2
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())
    if torch.cuda.device_count() >= 2:
        torchrun(image_folder, tmp_path / "two", *cuda, "--batch-size", 8, "--epochs", 1,
                 "--check-sync", 1)
        assert all(len(set(s["fingerprints"])) == 1 for s in records(tmp_path / "two", "sync"))


# Failures of a process, and resuming with another number of processes (issue 18, item 5)

TIMEOUT = 4  # --dist-timeout for the failure tests, seconds


def launch(data, ckpt, logs):
    """A long torchrun of 2 processes, each writing its output to its own file under ``logs``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--log-dir", str(logs), "--redirects", "3", str(ROOT / "train_imagenet.py"),
           "--data-dir", str(data), "--checkpoint-dir", str(ckpt), *TINY, "--batch-size", "4",
           "--epochs", "100000", "--dist-timeout", str(TIMEOUT)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def ranks(agent: subprocess.Popen) -> dict:
    """{rank: pid} of torchrun's worker processes (Linux /proc)."""
    found = {}
    for task in Path(f"/proc/{agent.pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                rank = [e for e in env if e.startswith(b"RANK=")]
                if rank:
                    found[int(rank[0][5:])] = int(pid)
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_epoch(agent, ckpt) -> dict:
    deadline = time.time() + 120
    while time.time() < deadline and agent.poll() is None:
        pids = ranks(agent)
        if len(pids) == 2 and (ckpt / "last.pt").exists():
            return pids
        time.sleep(0.05)
    agent.kill()
    raise AssertionError("the run did not get through an epoch: " + agent.communicate()[1])


def rank_lines(logs, rank) -> list:
    """What a rank wrote to stderr, as lines (progress-bar updates split off)."""
    (path,) = logs.glob(f"*/attempt_0/{rank}/stderr.log")
    text = path.read_text()
    assert "Traceback" not in text, text
    return [line for line in re.split(r"[\r\n]", text) if line.strip()]


def stop_all(agent, pids):
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    agent.kill()
    agent.communicate()


def rank_0_after(image_folder, tmp_path, sig) -> tuple:
    """Send ``sig`` to rank 1 of a long run after its first epoch; returns the seconds until
    rank 0 exits and the one line it ends with (checked to name the checkpoint on disk)."""
    ckpt, logs = tmp_path / "c", tmp_path / "logs"
    agent = launch(image_folder, ckpt, logs)
    pids = {}
    try:
        pids = wait_for_epoch(agent, ckpt)
        os.kill(pids[1], sig)
        start = time.time()
        while running(pids[0]) and time.time() - start < 60:
            time.sleep(0.05)
        elapsed = time.time() - start
    finally:
        stop_all(agent, pids)
    lines = rank_lines(logs, 0)
    ends = [line for line in lines if line.startswith(("error (rank 0 of 2)", "interrupted"))]
    assert len(ends) == 1, lines
    epoch = train_imagenet.load_checkpoint(ckpt / "last.pt")["epoch"]
    assert f"{ckpt / 'last.pt'} (after epoch {epoch}) is intact" in ends[0], ends[0]
    assert "--resume" in ends[0]
    return elapsed, ends[0]


def test_a_killed_process_stops_the_other_with_one_line(image_folder, tmp_path):
    elapsed, line = rank_0_after(image_folder, tmp_path, signal.SIGKILL)
    assert elapsed < TIMEOUT  # the closed connection is seen at once, not at the timeout
    # (torchrun's SIGTERM, sent when it sees rank 1 die, may reach rank 0 first)
    assert line.startswith("interrupted") or "the connection to another process was lost" in line


def test_a_stopped_process_stops_the_other_within_the_timeout(image_folder, tmp_path):
    elapsed, line = rank_0_after(image_folder, tmp_path, signal.SIGSTOP)  # alive, answers nothing
    assert 0.9 * TIMEOUT < elapsed < TIMEOUT + 10, elapsed
    assert "another process did not answer within --dist-timeout" in line, line


def test_resume_with_other_processes_keeps_the_images_per_step(image_folder, tmp_path):
    one = tmp_path / "one"
    single(image_folder, one, "--batch-size", 16, "--epochs", 1)
    straight = single(image_folder, tmp_path / "straight", "--batch-size", 16, "--epochs", 2)
    resumed, lines = torchrun(image_folder, one, "--epochs", 2, "--resume")
    assert any("note: --batch-size 8 per process keeps the checkpoint's 16 images per step "
               "(1 process(es) x 16)" in line for line in lines), lines
    assert (resumed["args"]["batch_size"], resumed["processes"]) == (8, 2)
    assert resumed["global_step"] == straight["global_step"] == 4
    assert_same_weights(resumed["model"], straight["model"])


def test_resume_refused_when_the_processes_cannot_split_the_batch(image_folder, tmp_path,
                                                                 monkeypatch):
    single(image_folder, tmp_path, "--batch-size", 16, "--epochs", 1)
    for key, value in {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)  # as torchrun --nproc_per_node 3 would
    monkeypatch.setattr(train_imagenet, "image_folders", lambda *a: pytest.fail("work started"))
    with pytest.raises(SystemExit) as e:
        single(image_folder, tmp_path, "--epochs", 2, "--resume")
    message = str(e.value.code)
    assert message.startswith("error (rank 0 of 3): --resume: ") and "\n" not in message
    assert "took 16 images per step (1 process(es) x --batch-size 16), which 3 processes " \
           "cannot split evenly" in message, message

"""Train a tall-skinny MLP on ImageNet (or any ImageFolder data set) with plain
SGD or with damped Newton steps through the exact, linear-in-depth inverse
Hessian of ``hessian_inverse.py``.

    python train_imagenet.py --data-dir /path/to/imagenet --batch-size 256 --epochs 90 \\
        --lr 0.1 --hidden-dim 512 --num-layers 20 --use-hessian --device cuda
    torchrun --standalone --nproc_per_node 8 train_imagenet.py --data-dir ... --batch-size 32

Images are preprocessed as for ImageNet, resized to --image-size and flattened.
With --use-hessian every --hessian-freq-th batch takes a damped Newton step
(DampedNewton) whose curvature comes from the first --hessian-batch-size
images of the batch; the other batches take plain SGD steps with --lr.
Each epoch's training ends with an atomically written checkpoint
<checkpoint-dir>/last.pt (tensors and plain values with their SHA-256: loading
it runs no code) that --resume continues from exactly, then validation (top-1,
and top-5 with more than 5 classes) and a record in <checkpoint-dir>/metrics.jsonl.
An image that cannot be read is skipped and reported (--strict-images: fatal).
Under torchrun, one process per GPU (or several on a CPU): see the end of
--help and docs/training.md, "Several processes".
"""

import argparse
import contextlib
import errno
import json
import math
import os
import pickle
import random
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from damped_newton import DampedNewton
from hessian_inverse import DeepMLPWithTracking, InsufficientMemoryError
from train_utils import (ARCHITECTURES, DTYPES, HelpFormatter, Processes, UsageError,
                         build_model, collective_failure, curvature_too_large, evaluate, fingerprint,
                         seed_everything, sha256_of, train_step)

FEASIBILITY = """\
feasible sizes with --use-hessian:
  A Newton step takes the cheapest exact route for its sizes (docs/ALGORITHM.md,
  "Choosing the route"): for these MLPs the structured solver or the
  layer-wise LDL^T, whose memory grows with sum_l (B_h * w_l)^2 and time with
  sum_l (B_h * w_l)^3 (B_h is --hessian-batch-size, w_l the width; the
  parameter count, image size included, enters only linearly), or for
  --curvature ggn the output-space route (B_h x classes square). Measured,
  float32, 20 layers, 3x32x32 inputs, 1000 classes, B_h = 4, damping 1e-2,
  one factorisation on a 2-core CPU, one thread:
    --hidden-dim 128:  0.5 GiB, 3 s (Hessian or GGN: structured)
    --hidden-dim 512:  7.7 GiB, 85 s (Hessian: structured, after the layer-wise
                       route missed float32's accuracy contract); 0.65 GiB,
                       10 s with --curvature ggn (output route)
  Doubling B_h or the width multiplies the Hessian's memory by 4 and time by
  8. Whatever does not fit stops at the first Newton step with the estimate
  and the option to lower.

several processes (torchrun; one per GPU, NCCL, or several on a CPU, gloo):
  torchrun --standalone --nproc_per_node N train_imagenet.py ... --batch-size B
  Each process takes B images per step (N * B in all; the gradient is their
  mean, as DistributedDataParallel gives); the curvature batch is the first
  B_h images of those N * B, the same on every process, so every process
  solves the same Newton system and takes the same step. Only rank 0 prints,
  logs and writes checkpoints; a checkpoint resumes with any number of
  processes (keeping its images per step: --batch-size is adjusted, or the
  resume refused if they cannot be split evenly). N processes x --batch-size B
  take the steps of one process with --batch-size N*B (to rounding), when N
  divides the number of images. A process that dies or stops makes the others
  stop within --dist-timeout, each with one line naming the intact checkpoint."""


# What a resumed run takes from its checkpoint (docs/training.md, "Resuming"):
# the model's shape must match (given on the command line or not: the checkpoint's);
ARCHITECTURE = ("arch", "image_size", "hidden_dim", "num_layers", "activation", "dtype",
                "use_hessian")
# the optimisation settings are the checkpoint's unless given on the command line;
OPTIMISATION = ("batch_size", "lr", "momentum", "seed", "hessian_freq", "hessian_batch_size",
                "newton_lr", "damping", "min_damping", "max_damping", "max_step_norm",
                "curvature", "trust_region", "radius", "max_radius")
# everything else (data location, device, --amp, workers, epochs, logging) is this run's.
HESSIAN_ONLY = ("hessian_freq", "hessian_batch_size", "newton_lr", "damping", "min_damping",
                "max_damping", "max_step_norm", "curvature", "trust_region", "radius",
                "max_radius", "hessian_memory_gb")
DAMPED_ONLY = ("newton_lr", "damping", "min_damping", "max_damping")
_UNSET = object()


def get_args(argv=None):
    """The parsed command line, and the set of options given on it explicitly."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=FEASIBILITY,
        formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", required=True,
                   help="ImageFolder root with train/<class>/<images> and val/<class>/<images>")
    g.add_argument("--image-size", type=int, default=32,
                   help="images are resized to S x S and flattened to 3*S*S inputs")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="data loading processes (per training process)")
    g.add_argument("--max-batches", type=int, default=0,
                   help="stop each epoch after this many training batches (0: all)")
    g.add_argument("--strict-images", action="store_true",
                   help="stop at an image that cannot be read (default: skip it, named in a "
                        "warning and counted in the epoch's record)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="mlp", choices=ARCHITECTURES,
                   help="mlp: the tall-skinny MLP; cnn: --num-layers - 1 convolutional stages "
                        "(3x3, --hidden-dim channels, stride 2 down to 4x4 images), then the "
                        "classifier")
    g.add_argument("--hidden-dim", type=int, default=512,
                   help="width of every hidden layer (channels with --arch cnn)")
    g.add_argument("--num-layers", type=int, default=20, help="total, the output layer included")
    g.add_argument("--activation", default="tanh",
                   choices=["tanh", "sigmoid", "softplus", "gelu", "silu", "relu"],
                   help="hidden activation (smooth ones have a full Hessian)")
    g.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="parameter dtype")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=256,
                   help="images per step and per process (under torchrun the step's batch is "
                        "this times the number of processes)")
    g.add_argument("--epochs", type=int, default=90, help="epochs in total (a resumed run counts the done ones)")
    g.add_argument("--lr", type=float, default=0.1,
                   help="SGD learning rate (with --use-hessian: of the gradient steps; 0: none)")
    g.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (without --use-hessian)")
    g.add_argument("--amp", action="store_true",
                   help="bf16 autocast (CUDA only) for the forward and backward of the SGD "
                        "steps; Newton steps and validation stay in --dtype")
    g = p.add_argument_group("Hessian preconditioning")
    g.add_argument("--use-hessian", action="store_true",
                   help="damped Newton steps with the exact inverse Hessian instead of SGD")
    g.add_argument("--hessian-freq", type=int, default=1,
                   help="Newton step every N batches, SGD steps between")
    g.add_argument("--hessian-batch-size", type=int, default=4,
                   help="first images of each batch used for the curvature (sets the cost; see below)")
    g.add_argument("--newton-lr", type=float, default=1.0, help="scale of the Newton step")
    g.add_argument("--damping", type=float, default=1.0,
                   help="initial Levenberg-Marquardt damping (adapted during training)")
    g.add_argument("--min-damping", type=float, default=1e-6, help="lower bound of the damping")
    g.add_argument("--max-damping", type=float, default=1e6, help="upper bound of the damping")
    g.add_argument("--max-step-norm", type=float, default=None, help="cap on the step's 2-norm")
    g.add_argument("--curvature", default="hessian", choices=["hessian", "ggn"],
                   help="the Hessian, or the generalized Gauss-Newton matrix (positive semi-definite)")
    g.add_argument("--trust-region", action=argparse.BooleanOptionalAction, default=False,
                   help="trust-region steps (radius adapted) instead of damped Newton steps "
                        "(damping adapted); --newton-lr and the damping options then do not apply")
    g.add_argument("--radius", type=float, default=1.0, help="initial trust-region radius")
    g.add_argument("--max-radius", type=float, default=100.0, help="largest trust-region radius")
    g.add_argument("--hessian-memory-gb", type=float, default=None,
                   help="memory the curvature may use (None: the device's free memory)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto",
                   help="auto, cpu, cuda or cuda:N (under torchrun: auto, cpu or cuda, one GPU "
                        "per process)")
    g.add_argument("--seed", type=int, default=0, help="seeds initialisation, shuffling and augmentation")
    g.add_argument("--checkpoint-dir", default="checkpoints",
                   help="where last.pt and metrics.jsonl go")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue from PATH (no PATH: <checkpoint-dir>/last.pt) at the start of "
                        "the next epoch; the model options are the checkpoint's, and so are the "
                        "optimisation options not given on this command line")
    g.add_argument("--log-interval", type=int, default=50,
                   help="batches between training lines in metrics.jsonl")
    g.add_argument("--dist-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="under torchrun: how long a process waits for the others (a collective "
                        "operation) before it stops, naming the intact checkpoint; longer than "
                        "the slowest checkpoint write")
    g.add_argument("--check-sync", type=int, default=0, metavar="N",
                   help="every N steps, check that all processes hold bit-identical parameters "
                        "and optimizer state, and log their fingerprints (0: at epoch ends only)")
    args = p.parse_args(argv)
    probe = argparse.Namespace(**{a.dest: _UNSET for a in p._actions if a.dest != "help"})
    given = {key for key, value in vars(p.parse_args(argv, probe)).items() if value is not _UNSET}
    return args, given


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def setting(key: str, value) -> str:
    """How an option with this value is written on the command line."""
    if isinstance(value, bool):
        return flag(key) if value else flag(key).replace("--", "--no-", 1)
    return f"{flag(key)} {value}"


def check_flags(args, given: set, processes: Processes) -> list:
    """Refuse nonsensical settings, naming the flag, before any work starts; returns notes."""
    for key in ("image_size", "batch_size", "hessian_batch_size", "hessian_freq", "log_interval",
                "epochs", "hidden_dim", "num_layers"):
        if getattr(args, key) < 1:
            raise UsageError(f"{flag(key)} must be >= 1, got {getattr(args, key)}")
    for key in ("workers", "max_batches", "check_sync"):
        if getattr(args, key) < 0:
            raise UsageError(f"{flag(key)} must be >= 0, got {getattr(args, key)}")

    def positive(key, value=None):
        value = getattr(args, key) if value is None else value
        if not 0 < value < math.inf:
            raise UsageError(f"{flag(key)} must be a positive number, got {value}")

    if args.use_hessian:  # 0: no gradient steps between Newton steps, none as the fallback
        if not 0 <= args.lr < math.inf:
            raise UsageError(f"--lr must be a finite number >= 0 with --use-hessian, got {args.lr}")
    else:
        positive("lr")
    if not 0 <= args.momentum < 1:
        raise UsageError(f"--momentum must be in [0, 1), got {args.momentum}")
    for key in ("newton_lr", "damping", "min_damping", "max_damping", "radius", "max_radius"):
        positive(key)
    for key in ("max_step_norm", "hessian_memory_gb"):
        if getattr(args, key) is not None:
            positive(key)
    positive("dist_timeout")
    if not args.min_damping <= args.damping <= args.max_damping:
        raise UsageError(f"need --min-damping <= --damping <= --max-damping, got "
                         f"{args.min_damping}, {args.damping}, {args.max_damping}")
    if not args.radius <= args.max_radius:
        raise UsageError(f"need --radius <= --max-radius, got {args.radius} > {args.max_radius}")
    notes = []  # tuning options of a method that does not run: said, not silently ignored
    if not args.use_hessian:
        if args.trust_region or args.curvature != "hessian":
            raise UsageError(f"{'--trust-region' if args.trust_region else '--curvature'} selects "
                             "the kind of Newton step: add --use-hessian, or drop it")
        extra = [flag(k) for k in HESSIAN_ONLY if k in given and k != "trust_region"]
        if extra:
            notes.append(f"{', '.join(extra)} ignored: Newton-step options, and this run has "
                         "no --use-hessian")
    elif "momentum" in given and args.momentum:
        notes.append("--momentum ignored: it applies to SGD, not to --use-hessian's gradient steps")
    if args.use_hessian and args.trust_region and args.arch == "cnn":
        raise UsageError("--trust-region needs a layer-wise definiteness test that convolutional "
                         "layers do not support yet: drop it (damped Newton steps) or use "
                         "--arch mlp")
    if args.use_hessian and args.trust_region:
        extra = [flag(k) for k in DAMPED_ONLY if k in given]
        if extra:
            notes.append(f"{', '.join(extra)} ignored: trust-region steps adapt the radius "
                         "(--radius, --max-radius), not a damping")
    global_batch = args.batch_size * processes.world
    if args.use_hessian and args.hessian_batch_size > global_batch:
        raise UsageError(f"--hessian-batch-size {args.hessian_batch_size} is larger than a batch "
                         f"(--batch-size {args.batch_size} x {processes.world} process(es) = "
                         f"{global_batch} images): lower it to at most {global_batch}")
    if args.use_hessian:
        check_newton_settings(args)
    return notes


def check_device(args, device: torch.device) -> None:
    if args.amp and device.type != "cuda":
        raise UsageError(f"--amp needs CUDA (bf16 autocast on the GPU); on {device.type} drop "
                         "--amp: the run is then in --dtype (float32 by default)")
    if args.amp and args.dtype != "float32":
        raise UsageError(f"--amp autocasts float32 work to bf16; with --dtype {args.dtype} it would "
                         "do nothing: drop --amp or use --dtype float32")


LAYOUT = """expected layout:
  DATA_DIR/train/<class name>/<image files>   e.g. train/n01440764/n01440764_10026.JPEG
  DATA_DIR/val/<class name>/<image files>     the same class folders as train/
(ImageNet's validation images must be sorted into class folders first.)"""


class UnreadableImage(Exception):
    """An image file that cannot be decoded; the message names it: "cannot read image PATH (WHY)"."""


def load_image(path: str):
    """ImageFolder's loader, with one clear error naming the file instead of PIL's traceback."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as fh:
            return Image.open(fh).convert("RGB")
    except Exception as err:  # empty, truncated, not an image, unreadable
        size = os.path.getsize(path) if os.path.exists(path) else None
        why = ("the file is empty" if size == 0 else
               "not an image format PIL knows, or a damaged header"
               if isinstance(err, UnidentifiedImageError) else f"{type(err).__name__}: {err}")
        raise UnreadableImage(f"cannot read image {path} ({why})") from None


class Examples(torch.utils.data.Dataset):
    """An ImageFolder's examples as ``(image, label, unreadable)``, where ``unreadable``
    lists the files that could not be read, each as "PATH (WHY)".

    ``replace`` (training): an unreadable image is replaced by the next readable
    one, so a batch keeps its size (under torchrun every process's batch must
    have the same length). Otherwise (validation) it is left out: ``image`` is
    None and :func:`collate` drops it, so the metrics are over the readable
    images. ``strict``: raise :class:`UnreadableImage` instead.

    ``seed``: the augmentation is a function of (seed, epoch, index) alone. Each
    example is transformed with torch's CPU generator seeded from those three
    numbers (and restored after), so an example gets the same random crop
    whatever the number of processes, data workers or the batch size.
    """

    def __init__(self, dataset, seed: Optional[int] = None, replace: bool = False,
                 strict: bool = False):
        self.dataset, self.seed, self.epoch = dataset, seed, 0
        self.replace, self.strict = replace, strict
        self.classes, self.samples = dataset.classes, dataset.samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def read(self, index):
        """The transformed example ``index`` (raises :class:`UnreadableImage`)."""
        if self.seed is None:
            return self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(
                ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % 2**63)
            return self.dataset[index]

    def __getitem__(self, index):
        unreadable = []
        for offset in range(len(self) if self.replace else 1):
            try:
                image, label = self.read((index + offset) % len(self))
                return image, label, unreadable
            except UnreadableImage as err:
                if self.strict:
                    raise
                unreadable.append(str(err).removeprefix("cannot read image "))
        if self.replace:
            raise UnreadableImage(f"cannot read image {unreadable[0]}, nor any other of the "
                                  f"{len(self)} training images")
        return None, self.dataset.targets[index], unreadable


def collate(samples):
    """A batch ``(x, y, unreadable)`` of :class:`Examples` items, left-out images dropped."""
    kept = [(image, label) for image, label, _ in samples if image is not None]
    x = torch.stack([image for image, _ in kept]) if kept else torch.empty(0)
    y = torch.tensor([label for _, label in kept], dtype=torch.long)
    return x, y, [item for _, _, unreadable in samples for item in unreadable]


def image_folders(root: Path, image_size: int, seed: int, strict: bool = False):
    """train/ and val/ as :class:`Examples` of torchvision ImageFolders, with ImageNet
    preprocessing at image_size (``strict``: an unreadable image raises)."""
    from torchvision import datasets, transforms

    if not root.is_dir():
        raise UsageError(f"data directory {root} does not exist; {LAYOUT}")
    normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    splits = {
        "train": transforms.Compose([transforms.RandomResizedCrop(image_size),
                                     transforms.RandomHorizontalFlip(),
                                     transforms.ToTensor(), normalize]),
        "val": transforms.Compose([transforms.Resize(round(image_size * 256 / 224)),
                                   transforms.CenterCrop(image_size),
                                   transforms.ToTensor(), normalize]),
    }
    for split in splits:
        if not (root / split).is_dir():
            found = sorted(q.name + "/" for q in root.iterdir() if q.is_dir())[:5]
            raise UsageError(f"{root} has no {split}/ folder (found: "
                             f"{', '.join(found) or 'no folders'}); {LAYOUT}")
    folders = {}
    for split, transform in splits.items():
        try:
            folders[split] = datasets.ImageFolder(str(root / split), transform=transform,
                                                  loader=load_image)
        except (FileNotFoundError, RuntimeError) as err:
            raise UsageError(f"{root / split} is not a usable image folder ({err}); {LAYOUT}") from None
    if folders["train"].classes != folders["val"].classes:
        extra = sorted(set(folders["val"].classes) ^ set(folders["train"].classes))[:5]
        raise UsageError(f"train/ has {len(folders['train'].classes)} classes and val/ has "
                         f"{len(folders['val'].classes)}; they must match (differing: {extra}); {LAYOUT}")
    return (Examples(folders["train"], seed, replace=True, strict=strict),
            Examples(folders["val"], strict=strict))


def rng_state() -> dict:
    """Python's, NumPy's, torch's and CUDA's random states, as tensors and plain values."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    mt = state["numpy"]
    np.random.set_state(("MT19937", mt["keys"].numpy().astype(np.uint32), mt["position"],
                         mt["has_gauss"], mt["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def why_not_written(err: BaseException) -> str:
    """The operating system's reason behind a failed write (torch.save wraps it)."""
    cause = err
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is None or cause.errno is None:
        return str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    if cause.errno == errno.ELOOP:
        return "it is a symbolic link, and this script writes through none"
    return f"{os.strerror(cause.errno).lower()} ({errno.errorcode.get(cause.errno, cause.errno)})"


def fsync_directory(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporaries(path: Path) -> list:
    """The temporary files of :func:`save_checkpoint` for ``path`` (and the name older
    versions used) that a run killed while saving left."""
    return [*path.parent.glob(f".{path.name}.*.tmp"), path.with_name(path.name + ".tmp")]


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` and its SHA-256 to ``path`` atomically, writing through no link.

    The data go to a new temporary file in the same folder, created exclusively
    under a fresh name (a file or link planted under any name is never written
    through), flushed and fsynced; it is then renamed over ``path`` (a rename
    replaces a link at ``path``, never its target) and the folder fsynced. On
    any failure the temporary file is removed and ``path`` keeps its old content.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({**state, "sha256": sha256_of(state)}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def prepare_checkpoint_dir(folder: Path, clean: bool) -> None:
    """Refuse, before any training, a --checkpoint-dir that last.pt and metrics.jsonl
    cannot be written to; ``clean``: remove our temporary files a killed run left."""
    option = f"--checkpoint-dir {folder}"
    if folder.is_symlink() and not folder.exists():
        raise UsageError(f"{option} is a symbolic link to {os.readlink(folder)}, which does not "
                         "exist: create that folder or choose another --checkpoint-dir")
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{option} is a file, not a folder: choose another --checkpoint-dir")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UsageError(f"cannot write in {option} ({why_not_written(err)}): fix its "
                         "permissions or choose another --checkpoint-dir") from None
    for target in (folder / "last.pt", folder / "metrics.jsonl"):
        if target.is_symlink():
            raise UsageError(f"{target} is a symbolic link (to {os.readlink(target)}); this script "
                             "writes there and through no link: remove the link or choose "
                             "another --checkpoint-dir")
        if target.exists() and not target.is_file():
            raise UsageError(f"{target} is not a file: remove it or choose another "
                             "--checkpoint-dir")
    if clean:
        for stale in temporaries(folder / "last.pt"):
            if stale.is_symlink() or stale.is_file():
                stale.unlink(missing_ok=True)


CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "global_step", "best_top1", "args", "classes",
                   "rng", "processes", "validated", "record", "sha256")


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by this script, or one clear UsageError naming the file."""
    fresh = "or start afresh without --resume"
    if not path.is_file():
        raise UsageError(f"--resume: no checkpoint at {path}; give the path of a last.pt, {fresh}")
    if path.stat().st_size == 0:
        raise UsageError(f"--resume: {path} is empty (0 bytes), probably from an interrupted copy; "
                         f"use an intact last.pt, {fresh}")
    try:  # tensors and plain values only: loading runs no code, whoever wrote the file
        with warnings.catch_warnings():  # e.g. on a foreign pickle's protocol: the error says it
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise UsageError(f"--resume: {path} cannot be read as a checkpoint ({str(err)[:160]}); "
                             f"it is truncated or not a checkpoint: use an intact last.pt, "
                             f"{fresh}") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"a Python object ({found.group(1)})" if found else "a Python object"
        older = (" (a last.pt of an older train_imagenet.py, whose NumPy random state is such "
                 "an object, is refused too)" if found and found.group(1).startswith("numpy") else "")
        raise UsageError(f"--resume: {path} holds {what} that only running code could rebuild; a "
                         "checkpoint holds tensors and plain values, and loading one runs no code, "
                         f"so it is refused{older}; use a last.pt this script wrote, {fresh}") from None
    except Exception as err:
        why = str(err).strip().split(". ")[0].splitlines()[0][:160] if str(err).strip() \
            else type(err).__name__
        raise UsageError(f"--resume: {path} cannot be read as a checkpoint ({why}); it is truncated "
                         f"or not a checkpoint: use an intact last.pt, {fresh}") from None
    missing = [k for k in CHECKPOINT_KEYS if not (isinstance(ckpt, dict) and k in ckpt)]
    if missing:
        what = ("a model state_dict only" if isinstance(ckpt, dict) and ckpt and all(
            isinstance(v, torch.Tensor) for v in ckpt.values()) else f"a {type(ckpt).__name__}")
        raise UsageError(f"--resume: {path} is not a train_imagenet.py checkpoint (it holds {what}, "
                         f"without {', '.join(missing)}); --resume needs the last.pt this script "
                         f"writes (model, optimizer, epoch, RNG states and settings), {fresh}")
    if ckpt.pop("sha256") != sha256_of(ckpt):
        raise UsageError(f"--resume: {path} fails its checksum: its contents differ from the "
                         "SHA-256 stored when it was written (damaged on disk or in a copy); use "
                         f"an intact copy, {fresh}")
    return ckpt


def merge_resumed_args(args, given: set, saved: dict, path: Path) -> dict:
    """Apply the resume rule to ``args`` in place; returns {option: (checkpoint's, now)} changed."""
    saved = {"arch": "mlp", **saved}  # checkpoints from before --arch are MLPs
    for key in ARCHITECTURE:
        if key in given and key in saved and getattr(args, key) != saved[key]:
            was = (f"{'with' if saved[key] else 'without'} {flag(key)}, this command "
                   f"{'has' if getattr(args, key) else 'has not'} it" if isinstance(saved[key], bool)
                   else f"with {flag(key)} {saved[key]}, this command has {getattr(args, key)}")
            raise UsageError(f"--resume: {path} was trained {was}; drop {flag(key)} (the "
                             "checkpoint's is used) or start afresh without --resume")
        setattr(args, key, saved.get(key, getattr(args, key)))
    overrides = {}
    for key in OPTIMISATION:
        if key not in given:
            setattr(args, key, saved.get(key, getattr(args, key)))
        elif saved.get(key, _UNSET) != getattr(args, key):
            overrides[key] = (saved.get(key), getattr(args, key))
    return overrides


def keep_global_batch(args, given: set, ckpt: dict, world: int, path: Path) -> list:
    """On resuming with another number of processes, keep the checkpoint's images per step
    (adjusting --batch-size, which is per process), or refuse; returns notes."""
    was_world, was_batch = ckpt["processes"], ckpt["args"]["batch_size"]
    if world == was_world:
        return []
    total = was_world * was_batch
    if "batch_size" in given:
        return [f"{world} process(es) x --batch-size {args.batch_size} = "
                f"{world * args.batch_size} images per step (checkpoint: {was_world} x "
                f"{was_batch} = {total})"]
    if total % world:
        raise UsageError(f"--resume: {path} took {total} images per step ({was_world} "
                         f"process(es) x --batch-size {was_batch}), which {world} processes "
                         f"cannot split evenly: use a number of processes that divides {total}, "
                         "or give --batch-size to change the images per step")
    args.batch_size = total // world
    return [f"--batch-size {args.batch_size} per process keeps the checkpoint's {total} images "
            f"per step ({was_world} process(es) x {was_batch})"]


def newton_settings(args) -> dict:
    """DampedNewton's settings (its parameter group) from the command line."""
    return dict(lr=args.newton_lr, damping=args.damping, min_damping=args.min_damping,
                max_damping=args.max_damping, max_step_norm=args.max_step_norm,
                curvature_interval=args.hessian_freq, gradient_lr=args.lr,
                curvature=args.curvature, mode="trust_region" if args.trust_region else "damped",
                radius=args.radius, max_radius=args.max_radius)


def build_optimizer(model, args):
    if not args.use_hessian:
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    memory = None if args.hessian_memory_gb is None else int(args.hessian_memory_gb * 2**30)
    return DampedNewton(model, memory_limit=memory, **newton_settings(args))


def apply_settings(optimizer, args) -> None:
    """After loading a checkpoint's optimizer state: the settings that run are ``args``'s.

    Settings (the parameter group) follow the command line; the adapted state
    (damping, radius, counters) continues from the checkpoint.
    """
    group = optimizer.param_groups[0]
    if args.use_hessian:
        group.update(newton_settings(args))
    else:
        group.update(lr=args.lr, momentum=args.momentum)


# DampedNewton's names for the settings of newton_settings(), as command-line flags.
SETTING_FLAGS = {"gradient_lr": "--lr", "lr": "--newton-lr", "curvature_interval": "--hessian-freq",
                 "mode": "--trust-region", **{k: flag(k) for k in (
                     "damping", "min_damping", "max_damping", "max_step_norm", "curvature",
                     "radius", "max_radius")}}


def check_newton_settings(args) -> None:
    """DampedNewton's own checks of the settings, on a one-layer stand-in, worded as flags."""
    try:
        DampedNewton(DeepMLPWithTracking(1, 1, 2, 0), **newton_settings(args))
    except ValueError as err:
        names = "|".join(sorted(SETTING_FLAGS, key=len, reverse=True))
        message = re.sub(rf"(?<![\w-])({names})(?!\w)", lambda m: SETTING_FLAGS[m.group(1)],
                         str(err).removeprefix("DampedNewton: "))
        raise UsageError(message) from None


def log_metrics(path: Path, record: dict) -> None:
    """Append ``record`` as a JSON line, through no link (O_NOFOLLOW)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "a") as fh:
            fh.write(json.dumps(record) + "\n")
    except OSError as err:
        raise UsageError(f"cannot append to {path}: {why_not_written(err)}") from None


def superseded_records(path: Path, step: int) -> int:
    """Training and epoch records after ``step``: an interrupted run's, redone after a resume."""
    if not path.exists():
        return 0
    count = 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        count += record.get("event") in ("train", "epoch") and record.get("step", 0) > step
    return count


def describe_steps(args, per_process: int, world: int) -> str:
    """What the run's steps are, as the start-up line says it (``per_process``: images per epoch)."""
    batch = min(args.batch_size, per_process) * world
    last = (per_process % args.batch_size or args.batch_size) * world
    text = (f"{world} processes x batch {args.batch_size} = {batch} images per step" if world > 1
            else f"batch {batch}")
    if not args.use_hessian:
        return f"{text}; SGD lr {args.lr}, momentum {args.momentum}"
    curvature = min(args.hessian_batch_size, batch)
    every = "batch" if args.hessian_freq == 1 else f"{args.hessian_freq} batches"
    return (f"{text}; {'trust-region' if args.trust_region else 'damped Newton'} steps on the "
            f"{args.curvature} every {every}, curvature on the first {curvature} images of each "
            f"batch" + (f" (all {last} of the last, shorter one)" if last < curvature else "")
            + (f", SGD lr {args.lr} between" if args.hessian_freq > 1 else ""))


class Interrupted(UsageError):
    """Ctrl-C (SIGINT) or SIGTERM during training, with what is kept and how to go on."""


def _quiet_thread_deaths(hook_args) -> None:
    """Ctrl-C reaches the data workers too; multiprocessing's file-descriptor server
    thread then fails to reach a dead worker.  That is the interrupt, not a new error:
    no traceback for it (the main thread says what happened)."""
    if issubclass(hook_args.exc_type, (EOFError, OSError, KeyboardInterrupt)) and \
            "_serve" in getattr(hook_args.thread, "name", ""):
        return
    threading.__excepthook__(hook_args)


class _Stop:
    """Ctrl-C or SIGTERM (a scheduler's, or torchrun's when a process fails): stop at the
    next batch; a second signal stops at once.

    The handler only raises on the second signal. Raised from a handler, the
    first would land wherever the main thread happens to be, and Python drops
    and prints exceptions raised where it ignores them (a DataLoader iterator's
    ``__del__``, fork hooks), which would lose the interrupt. Data workers,
    forked with this handler, leave the decision to the main process.
    """
    requested = False
    pid = None  # the main process's
    announce = True

    @classmethod
    def install(cls, announce: bool) -> dict:
        """The handler for SIGINT and SIGTERM; returns the previous ones."""
        cls.requested, cls.pid, cls.announce = False, os.getpid(), announce
        try:
            return {sig: signal.signal(sig, cls.handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: leave the handlers alone
            return {}

    @classmethod
    def handler(cls, signum, frame):
        if os.getpid() != cls.pid:
            return
        if cls.requested:
            raise KeyboardInterrupt
        cls.requested = True
        if cls.announce:
            print(f"\n{signal.Signals(signum).name}: stopping at the next batch (again to stop at "
                  "once)", file=sys.stderr, flush=True)

    @classmethod
    def check(cls):
        if cls.requested:
            raise KeyboardInterrupt

    @classmethod
    def checked(cls, batches):
        for item in batches:
            cls.check()
            yield item


class Saved:
    """The checkpoint this run stands on, for the messages that say what is kept."""

    def __init__(self):
        self.path, self.epoch = None, None  # epoch: of the last.pt this run wrote or resumed

    def __str__(self):
        if self.epoch is None:
            return "no checkpoint of this run had been written yet"
        return f"{self.path} (after epoch {self.epoch}) is intact"

    def advice(self) -> str:
        return ("continue with the same command and --resume" if self.epoch is not None
                else "run the command again to start over")


def main(argv=None):
    args, given = get_args(argv)
    processes = Processes()
    saved = Saved()
    threading.excepthook = _quiet_thread_deaths
    previous = _Stop.install(announce=processes.main)
    where = "" if processes.world == 1 else f" (rank {processes.rank} of {processes.world})"
    try:
        train(args, given, processes, saved)
    except Interrupted as err:
        if processes.main:
            print(f"interrupted: {err}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        if processes.main:
            print("interrupted before training started; nothing was written", file=sys.stderr)
        sys.exit(130)
    except UnreadableImage as err:  # --strict-images; from a data worker, its traceback's end
        message = str(err)
        message = message[max(message.rfind("cannot read image"), 0):].strip()
        sys.exit(f"error{where}: {message}; {saved}: remove or replace the file (or drop "
                 f"--strict-images to skip unreadable images), then {saved.advice()}")
    except UsageError as err:
        sys.exit(f"error{where}: {err}")
    except RuntimeError as err:  # a collective that failed: another process died or stopped
        reason = collective_failure(err) if processes.world > 1 else None
        if reason is None:
            raise
        sys.exit(f"error{where}: {reason}; {saved}: {saved.advice()}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        processes.stop()


def train(args, given: set, processes: Processes, saved: Saved):
    """Set up (or resume) the run, then per epoch: train, save, validate (and save again)."""
    run = Run(args, given, processes, saved)
    if run.finished:
        return
    epoch = run.start_epoch
    try:
        if run.unvalidated is not None:
            run.say(f"validating epoch {run.start_epoch} first: the run that wrote "
                    f"{run.resumed_from} stopped before its validation ended")
            run.validate(run.unvalidated)
        for epoch in range(run.start_epoch, args.epochs):
            record = run.train_epoch(epoch)
            run.save(record)  # the epoch's training is kept before validation, which may fail
            run.validate(record)
    except KeyboardInterrupt:
        raise Interrupted(f"in epoch {epoch + 1}; {saved}; {saved.advice()}") from None
    finally:
        run.close_bar()  # so that any message after it starts on a line of its own
    run.say(f"done: {args.epochs - run.start_epoch} epoch(s) in this run, {args.epochs} in all; "
            f"best val top-1 {run.best_top1:.3f}; checkpoint {run.ckpt_path}, metrics "
            f"{run.metrics_path}")


def resume_point(args, given: set, processes: Processes, saved: Saved, ckpt_path: Path):
    """With --resume: (checkpoint, its path, {option: (checkpoint's, now)}, notes), the
    settings that run applied to ``args`` (the checkpoint's, overridden by the command
    line); without: (None, None, {}, [])."""
    if not args.resume:
        return None, None, {}, []
    path = ckpt_path if args.resume == "auto" else Path(args.resume)
    path = path / "last.pt" if path.is_dir() else path
    ckpt = load_checkpoint(path)
    overrides = merge_resumed_args(args, given, ckpt["args"], path)
    notes = keep_global_batch(args, given, ckpt, processes.world, path)
    if path.resolve() == ckpt_path.resolve():
        saved.epoch = ckpt["epoch"]
    return ckpt, path, overrides, notes


def restore(model, optimizer, ckpt: dict, path: Path, args, classes: list) -> None:
    """Model, optimizer (settings from ``args``) and random state from a checkpoint."""
    if ckpt["classes"] != classes:
        raise UsageError(f"--resume: {path} was trained on other classes than {args.data_dir}")
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, KeyError, ValueError) as err:
        raise UsageError(f"--resume: {path} does not fit this model and optimizer "
                         f"({str(err).splitlines()[0][:160]}); start afresh without --resume") from None
    apply_settings(optimizer, args)
    set_rng_state(ckpt["rng"])


class Run:
    """One training run: its settings, model, optimizer, data and bookkeeping, and the
    steps ``train`` reads through (``train_epoch``, ``save``, ``validate``).

    Set up in ``__init__``: the resume rule, the flag checks, the process group, the data,
    the model and optimizer (restored from the checkpoint), the loaders, the start-up line
    and the first metrics records.  ``finished``: the checkpoint already holds every epoch
    asked for; ``unvalidated``: the record of a resumed epoch whose validation had not ended.
    """

    def __init__(self, args, given: set, processes: Processes, saved: Saved):
        self.args, self.processes, self.saved = args, processes, saved
        self.say = print if processes.main else (lambda *a, **k: None)
        self.where = "" if processes.world == 1 else f" (rank {processes.rank} of {processes.world})"
        self.device = device = processes.resolve_device(args.device)
        ckpt_dir = Path(args.checkpoint_dir)
        self.ckpt_path, self.metrics_path = ckpt_dir / "last.pt", ckpt_dir / "metrics.jsonl"
        saved.path = self.ckpt_path
        ckpt, path, overrides, notes = resume_point(args, given, processes, saved, self.ckpt_path)
        self.resumed_from = path
        for note in notes + check_flags(args, given, processes):
            self.say(f"note: {note}")
        check_device(args, device)
        self.finished = ckpt is not None and ckpt["epoch"] >= args.epochs and ckpt["validated"]
        if self.finished:
            self.say(f"nothing to do: {path} has {ckpt['epoch']} epoch(s) done and --epochs is "
                     f"{args.epochs}; give --epochs {ckpt['epoch'] + 1} or more to train further")
            return

        processes.start(device, args.dist_timeout)
        self.dtype = DTYPES[args.dtype]
        seed_everything(args.seed)
        self.train_set, self.val_set = image_folders(Path(args.data_dir), args.image_size,
                                                     args.seed, args.strict_images)
        num_classes = len(self.train_set.classes)
        prepare_checkpoint_dir(ckpt_dir, clean=processes.main)
        self.model = build_model(3 * args.image_size ** 2, num_classes, args.hidden_dim,
                                 args.num_layers, args.activation, device, self.dtype,
                                 args.arch, (3, args.image_size, args.image_size))
        self.optimizer = build_optimizer(self.model, args)
        self.start_epoch, self.global_step, self.best_top1 = 0, 0, 0.0
        self.unvalidated = None
        if ckpt is not None:
            restore(self.model, self.optimizer, ckpt, path, args, self.train_set.classes)
            self.start_epoch, self.global_step, self.best_top1 = (
                ckpt["epoch"], ckpt["global_step"], ckpt["best_top1"])
            self.unvalidated = None if ckpt["validated"] else ckpt["record"]
            self._say_resumed(path, overrides)

        # Several processes: DDP all-reduces the closure's gradients; each process sees its shard.
        self.net = (DistributedDataParallel(self.model, device_ids=[device.index]
                                            if device.type == "cuda" else None)
                    if processes.launched else None)
        self.sampler = DistributedSampler(self.train_set, num_replicas=processes.world,
                                          rank=processes.rank, shuffle=True, seed=args.seed)
        pin = device.type == "cuda"
        self.train_loader = DataLoader(self.train_set, batch_size=args.batch_size,
                                       sampler=self.sampler, num_workers=args.workers,
                                       pin_memory=pin, collate_fn=collate)
        self.val_loader = DataLoader(Subset(self.val_set, range(processes.rank, len(self.val_set),
                                                                processes.world)),
                                     batch_size=args.batch_size, num_workers=args.workers,
                                     pin_memory=pin, collate_fn=collate)
        self.topk = (1, 5) if num_classes > 5 else (1,)  # top-k with k >= classes is always 1
        self.amp = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp
                    else contextlib.nullcontext)
        self.skipped = {"train": 0, "val": 0}  # unreadable images, this process, this epoch
        self.bar = None
        self._say_start(ckpt, path, overrides)

    def _say_resumed(self, path: Path, overrides: dict) -> None:
        args = self.args
        changed = ", ".join(f"{setting(k, now)} (checkpoint: "
                            f"{setting(k, was) if isinstance(was, bool) else was})"
                            for k, (was, now) in overrides.items())
        self.say(f"resumed from {path}: {self.start_epoch} epoch(s) done, step "
                 f"{self.global_step}" + (f"; from the command line: {changed}" if changed else ""))
        for key in ("damping", "radius"):
            if args.use_hessian and key in overrides:
                self.say(f"note: {flag(key)} is an initial value; the {key} adapted so far "
                         f"continues from the checkpoint (now {self.optimizer.stats[key]})")

    def _say_start(self, ckpt, path, overrides: dict) -> None:
        """The start-up line, and the resume and start records of metrics.jsonl."""
        args, processes = self.args, self.processes
        num_classes = len(self.train_set.classes)
        num_params = sum(p.numel() for p in self.model.parameters())
        self.say(f"{len(self.train_set)} training / {len(self.val_set)} validation images, "
                 f"{num_classes} classes; {args.arch.upper()} {3 * args.image_size ** 2} -> "
                 f"{args.hidden_dim} x {args.num_layers - 1} -> {num_classes}, "
                 f"{num_params:,} parameters, "
                 f"{args.dtype}{' (bf16 autocast)' if args.amp else ''} on {self.device}; "
                 + describe_steps(args, len(self.sampler), processes.world))
        if num_classes == 1:
            self.say("note: one class: the loss is 0 and the accuracy 1 by construction; "
                     "nothing to learn")
        if not processes.main:
            return
        if ckpt is not None:
            log_metrics(self.metrics_path, {
                "event": "resume", "epoch": self.start_epoch, "step": self.global_step,
                "from": str(path), "superseded": superseded_records(self.metrics_path,
                                                                    self.global_step),
                "overrides": {k: now for k, (was, now) in overrides.items()}})
        log_metrics(self.metrics_path, {"event": "start", "epoch": self.start_epoch,
                                        "step": self.global_step, "args": vars(args),
                                        "num_params": num_params,
                                        "processes": processes.world})

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def diverged(self, what: str, epoch: int, batch: int) -> UsageError:
        """Stop without saving: the last good checkpoint stays as it is."""
        if self.processes.main:
            log_metrics(self.metrics_path, {"event": "diverged", "epoch": epoch,
                                            "step": self.global_step, "what": what})
        kept = (f"the last good checkpoint, {self.ckpt_path}, is kept" if self.ckpt_path.exists()
                else "no checkpoint had been written yet")
        hint = " or --newton-lr, or raise --damping" if self.args.use_hessian else ""
        return UsageError(f"{what} at epoch {epoch + 1}, batch {batch + 1}; stopped without "
                          f"saving ({kept}). Lower --lr{hint}.")

    def check_sync(self, log: bool) -> None:
        """All processes must hold the same parameters and optimizer state, bit for bit."""
        prints = self.processes.gather(fingerprint(self.model, self.optimizer))
        if log and self.processes.main:
            log_metrics(self.metrics_path, {"event": "sync", "step": self.global_step,
                                            "fingerprints": prints})
        if len(set(prints)) > 1:
            raise UsageError(f"the processes' parameters or optimizer state differ at step "
                             f"{self.global_step} (fingerprints {prints}); please report this")

    def report(self, unreadable: list, split: str) -> None:
        """Count and name the unreadable images a batch skipped."""
        for item in unreadable:
            self.skipped[split] += 1
            instead = " (the next readable image takes its place)" if split == "train" else ""
            tqdm.write(f"warning{self.where}: skipped unreadable {split} image {item}{instead}",
                       file=sys.stderr)

    def readable(self, batches):
        """Validation batches without their unreadable images (reported)."""
        for x, y, unreadable in batches:
            self.report(unreadable, "val")
            if len(y):
                yield x, y

    def train_step(self, x, y) -> tuple[float, int]:
        """One optimizer step on a batch: (loss, correct predictions)."""
        args, processes = self.args, self.processes
        x = x.to(device=self.device, dtype=self.dtype, non_blocking=True)
        y = y.to(device=self.device, non_blocking=True)
        # DampedNewton's every hessian_freq-th step (n_iter counts them) is a Newton step:
        # no autocast, curvature on the global batch's first images (same on all processes).
        newton = args.use_hessian and self.optimizer.stats["n_iter"] % args.hessian_freq == 0
        curvature_batch = (processes.first_of_global_batch(x, y, args.hessian_batch_size)
                           if args.use_hessian else None)
        try:
            return train_step(self.model, self.optimizer, x, y, curvature_batch, net=self.net,
                              processes=processes,
                              precision=contextlib.nullcontext if newton else self.amp)
        except (InsufficientMemoryError, torch.cuda.OutOfMemoryError) as err:
            raise curvature_too_large(err, self.model, "--hessian-batch-size",
                                      args.hessian_batch_size) from None

    def train_epoch(self, epoch: int) -> dict:
        """Train one epoch (a progress bar with loss, accuracy and rate); its record."""
        args, processes = self.args, self.processes
        self.sampler.set_epoch(epoch)  # the order depends only on (seed, epoch)
        self.train_set.set_epoch(epoch)  # so does every example's augmentation
        self.model.train()
        seen, correct, loss_sum, t0, batch = 0, 0, 0.0, time.time(), 0
        self.skipped["train"] = 0
        total = (len(self.train_loader) if not args.max_batches
                 else min(args.max_batches, len(self.train_loader)))
        self.bar = bar = tqdm(self.train_loader, total=total,
                              desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch",
                              dynamic_ncols=True, disable=not processes.main)
        for batch, (x, y, unreadable) in enumerate(_Stop.checked(bar)):
            if batch >= total:
                break
            self.report(unreadable, "train")
            loss, hits = self.train_step(x, y)
            if not math.isfinite(loss):
                bar.close()
                raise self.diverged(f"the training loss is {loss}", epoch, batch)
            self.global_step += 1
            seen += len(y) * processes.world  # every process's batch has the same length
            correct += hits
            loss_sum += loss * len(y) * processes.world
            stats = {"loss": loss_sum / seen, "acc": correct / seen,
                     "img_per_s": seen / (time.time() - t0)}
            if args.use_hessian:
                s = self.optimizer.stats
                stats.update(damping=s["damping"], rejected=s["rejected"],
                             fallbacks=s["gradient_fallbacks"])
            bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['acc']:.3f}",
                            **{"img/s": f"{stats['img_per_s']:.0f}"},
                            **({"damp": f"{stats['damping'] or 0:.2g}", "rej": stats["rejected"]}
                               if args.use_hessian else {}))
            if self.global_step % args.log_interval == 0 and processes.main:
                log_metrics(self.metrics_path, {"event": "train", "epoch": epoch,
                                                "step": self.global_step, "batch_loss": loss,
                                                **stats})
            if args.check_sync and self.global_step % args.check_sync == 0:
                self.check_sync(log=True)
        bar.close()
        _Stop.check()

        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise self.diverged("the weights are not finite", epoch, batch)
        if processes.world > 1 and not (args.check_sync and self.global_step % args.check_sync == 0):
            self.check_sync(log=bool(args.check_sync))  # not checked at this step yet
        record = {"event": "epoch", "epoch": epoch + 1, "step": self.global_step,
                  "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
                  "epoch_seconds": time.time() - t0,
                  "skipped_images": {"train": int(processes.sum([self.skipped["train"]])[0])}}
        if args.use_hessian:
            record["optimizer"] = self.optimizer.stats
        return record

    def save(self, record: dict) -> None:
        """last.pt after ``record['epoch']`` epochs, before validation and after it."""
        processes, saved = self.processes, self.saved
        validated = "val_loss" in record
        if processes.main:
            try:
                save_checkpoint(self.ckpt_path, {
                    "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "epoch": record["epoch"], "global_step": self.global_step,
                    "best_top1": self.best_top1, "args": vars(self.args),
                    "classes": self.train_set.classes, "rng": rng_state(),
                    "processes": processes.world, "validated": validated, "record": record})
            except (OSError, RuntimeError) as err:
                raise UsageError(f"cannot write the checkpoint {self.ckpt_path}: "
                                 f"{why_not_written(err)}; {saved}: free space or fix the "
                                 f"folder, then {saved.advice()}") from None
            saved.epoch = record["epoch"]
            log_metrics(self.metrics_path, {"event": "checkpoint", "epoch": record["epoch"],
                                            "step": self.global_step, "rank": processes.rank,
                                            "validated": validated})
        processes.sum([1.0])  # the others name it as kept once they know it was written
        saved.epoch = record["epoch"]

    def validate(self, record: dict) -> None:
        """Validate the model after ``record['epoch']`` epochs; complete, print, log and save
        the epoch's record."""
        t0 = time.time()
        self.skipped["val"] = 0
        val = evaluate(self.model, self.readable(_Stop.checked(self.val_loader)), self.topk,
                       self.processes)
        _Stop.check()
        self.best_top1 = max(self.best_top1, val["top1"])
        topk = self.topk
        lost = {**record["skipped_images"],
                "val": int(self.processes.sum([self.skipped["val"]])[0])}
        record = {**record, "val_loss": val["loss"],
                  **{f"val_top{k}": val[f"top{k}"] for k in topk},
                  "epoch_seconds": record["epoch_seconds"] + time.time() - t0,
                  "skipped_images": lost}
        lost = sum(lost.values())
        self.say(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} acc "
                 f"{record['train_acc']:.3f} | val loss {val['loss']:.4f} "
                 + " ".join(f"top-{k} {val[f'top{k}']:.3f}" for k in topk)
                 + f" | {record['epoch_seconds']:.1f}s"
                 + (f" | {lost} unreadable image(s) skipped" if lost else ""))
        if self.processes.main:
            log_metrics(self.metrics_path, record)
        self.save(record)


def main_and_exit() -> None:
    """``main()`` as a script; under torchrun the process then ends without Python's shutdown.

    DistributedDataParallel keeps the gloo process group, and with it the
    group's worker threads, alive until the process ends (a reference torch
    does not release at ``destroy_process_group``). A worker thread that frees
    the last collective's tensor while the interpreter shuts down aborts the
    process ("terminate called without an active exception"), rarely, after a
    run that succeeded. So a launched process ends with ``os._exit`` once its
    output is flushed (its checkpoint and metrics files are already closed).
    """
    if not Processes().launched:
        main()
        return
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code
    except BaseException:  # noqa: BLE001 - reported as Python would, then the same exit
        traceback.print_exc()
        code = 1
    if code is not None and not isinstance(code, int):  # sys.exit("message")
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    main_and_exit()

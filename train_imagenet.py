"""Train a tall-skinny MLP on ImageNet (or any ImageFolder data set) with plain
SGD or with damped Newton steps through the exact, linear-in-depth inverse
Hessian of ``hessian_inverse.py``.

    python train_imagenet.py --data-dir /path/to/imagenet --batch-size 256 --epochs 90 \\
        --lr 0.1 --hidden-dim 512 --num-layers 20 --use-hessian --device cuda

Images are preprocessed as for ImageNet, resized to --image-size and flattened.
With --use-hessian every --hessian-freq-th batch takes a damped Newton step
(DampedNewton) whose curvature comes from the first --hessian-batch-size
images of the batch; the other batches take plain SGD steps with --lr.
Each epoch ends with validation (top-1, top-5), one line of metrics in
<checkpoint-dir>/metrics.jsonl and an atomically written checkpoint
<checkpoint-dir>/last.pt that --resume continues from exactly.
"""

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from damped_newton import DampedNewton
from hessian_inverse import InsufficientMemoryError
from train_utils import (DTYPES, HelpFormatter, UsageError, build_model, curvature_too_large, evaluate,
                         resolve_device, seed_everything, train_step)

FEASIBILITY = """\
feasible sizes with --use-hessian:
  A Newton step takes the structured solver (docs/ALGORITHM.md,
  "Parameter elimination"): each
  layer's parameters are eliminated in closed form, so memory grows with
  sum_l (B_h * w_l)^2 and time with sum_l (B_h * w_l)^3, where B_h is
  --hessian-batch-size and w_l the width; the parameter count (image size
  included) enters only linearly. Measured, float32, 20 layers, 3x32x32
  inputs, 1000 classes, B_h = 4, one Newton factorisation on a 2-core CPU:
    --hidden-dim 128:  0.8 GiB, 2 s
    --hidden-dim 512:  9.6 GiB, 54 s (the seed's command: fits one GPU)
  Doubling B_h or the width multiplies memory by 4 and time by 8
  (B_h 8 at width 512: about 34 GiB). Whatever does not fit stops at the
  first Newton step with the estimate and the option to lower."""


def get_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=FEASIBILITY,
        formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", required=True,
                   help="ImageFolder root with train/<class>/<images> and val/<class>/<images>")
    g.add_argument("--image-size", type=int, default=32,
                   help="images are resized to S x S and flattened to 3*S*S inputs")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="data loading processes")
    g.add_argument("--max-batches", type=int, default=0,
                   help="stop each epoch after this many training batches (0: all)")
    g = p.add_argument_group("model")
    g.add_argument("--hidden-dim", type=int, default=512, help="width of every hidden layer")
    g.add_argument("--num-layers", type=int, default=20, help="total, the output layer included")
    g.add_argument("--activation", default="tanh",
                   choices=["tanh", "sigmoid", "softplus", "gelu", "silu", "relu"],
                   help="hidden activation (smooth ones have a full Hessian)")
    g.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="parameter dtype")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=256, help="images per step")
    g.add_argument("--epochs", type=int, default=90, help="epochs in total (a resumed run counts the done ones)")
    g.add_argument("--lr", type=float, default=0.1,
                   help="SGD learning rate (with --use-hessian: of the gradient steps)")
    g.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (without --use-hessian)")
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
    g.add_argument("--trust-region", action="store_true",
                   help="trust-region steps (radius adapted) instead of damped Newton steps "
                        "(damping adapted); --newton-lr and the damping options then do not apply")
    g.add_argument("--radius", type=float, default=1.0, help="initial trust-region radius")
    g.add_argument("--max-radius", type=float, default=100.0, help="largest trust-region radius")
    g.add_argument("--hessian-memory-gb", type=float, default=None,
                   help="memory the curvature may use (None: the device's free memory)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--seed", type=int, default=0, help="seeds initialisation, shuffling and augmentation")
    g.add_argument("--checkpoint-dir", default="checkpoints",
                   help="where last.pt and metrics.jsonl go")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue from PATH (no PATH: <checkpoint-dir>/last.pt) at the start of "
                        "the next epoch, with the checkpoint's optimizer settings and state")
    g.add_argument("--log-interval", type=int, default=50,
                   help="batches between training lines in metrics.jsonl")
    args = p.parse_args(argv)
    for name in ("image_size", "batch_size", "hessian_batch_size", "hessian_freq", "log_interval"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.epochs < 0 or args.workers < 0 or args.max_batches < 0:
        p.error("--epochs, --workers and --max-batches must be >= 0")
    if not 0 < args.radius <= args.max_radius:
        p.error("need 0 < --radius <= --max-radius")
    return args


# Settings that must match between a checkpoint and the run resuming it.
ARCHITECTURE = ("image_size", "hidden_dim", "num_layers", "activation", "dtype", "use_hessian")

LAYOUT = """expected layout:
  DATA_DIR/train/<class name>/<image files>   e.g. train/n01440764/n01440764_10026.JPEG
  DATA_DIR/val/<class name>/<image files>     the same class folders as train/
(ImageNet's validation images must be sorted into class folders first.)"""


def image_folders(root: Path, image_size: int):
    """train/ and val/ as torchvision ImageFolders, with ImageNet preprocessing at image_size."""
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
            folders[split] = datasets.ImageFolder(str(root / split), transform=transform)
        except (FileNotFoundError, RuntimeError) as err:
            raise UsageError(f"{root / split} is not a usable image folder ({err}); {LAYOUT}") from None
    if folders["train"].classes != folders["val"].classes:
        extra = sorted(set(folders["val"].classes) ^ set(folders["train"].classes))[:5]
        raise UsageError(f"train/ has {len(folders['train'].classes)} classes and val/ has "
                         f"{len(folders['val'].classes)}; they must match (differing: {extra}); {LAYOUT}")
    return folders["train"], folders["val"]


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a temporary file in the same folder, flushed, then os.replace."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def log_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def main(argv=None):
    args = get_args(argv)
    try:
        train(args)
    except UsageError as err:
        sys.exit(f"error: {err}")


def train(args):
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    seed_everything(args.seed)
    train_set, val_set = image_folders(Path(args.data_dir), args.image_size)
    num_classes = len(train_set.classes)
    ckpt_dir = Path(args.checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = ckpt_dir / "last.pt", ckpt_dir / "metrics.jsonl"

    model = build_model(3 * args.image_size ** 2, num_classes, args.hidden_dim, args.num_layers,
                        args.activation, device, dtype)
    if args.use_hessian:
        optimizer = DampedNewton(
            model, lr=args.newton_lr, damping=args.damping, min_damping=args.min_damping,
            max_damping=args.max_damping, max_step_norm=args.max_step_norm,
            curvature_interval=args.hessian_freq, gradient_lr=args.lr,
            memory_limit=None if args.hessian_memory_gb is None else int(args.hessian_memory_gb * 2**30),
            curvature=args.curvature, mode="trust_region" if args.trust_region else "damped",
            radius=args.radius, max_radius=args.max_radius)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)

    start_epoch, global_step, best_top1 = 0, 0, 0.0
    if args.resume:
        path = ckpt_path if args.resume == "auto" else Path(args.resume)
        path = path / "last.pt" if path.is_dir() else path
        if not path.is_file():
            raise UsageError(f"--resume: no checkpoint at {path}")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own file: RNG states, args
        for key in ARCHITECTURE:
            if ckpt["args"][key] != getattr(args, key):
                raise UsageError(f"--resume: {path} was trained with --{key.replace('_', '-')} "
                                 f"{ckpt['args'][key]}, this run has {getattr(args, key)}")
        if ckpt["classes"] != train_set.classes:
            raise UsageError(f"--resume: {path} was trained on other classes than {args.data_dir}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        start_epoch, global_step, best_top1 = ckpt["epoch"], ckpt["global_step"], ckpt["best_top1"]
        print(f"resumed from {path}: {start_epoch} epoch(s) done, step {global_step}")

    num_params = sum(p.numel() for p in model.parameters())
    print(f"{len(train_set)} training / {len(val_set)} validation images, {num_classes} classes; "
          f"MLP {3 * args.image_size ** 2} -> {args.hidden_dim} x {args.num_layers - 1} -> "
          f"{num_classes}, {num_params:,} parameters, {args.dtype} on {device}; "
          + (f"{'trust-region' if args.trust_region else 'damped Newton'} steps on the "
             f"{args.curvature} every {args.hessian_freq} batch(es), curvature on "
             f"{args.hessian_batch_size} images" if args.use_hessian else f"SGD lr {args.lr}"))
    log_metrics(metrics_path, {"event": "start", "epoch": start_epoch, "step": global_step,
                               "args": vars(args), "num_params": num_params})
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
        pin_memory=device.type == "cuda")
    topk = (1, min(5, num_classes))

    def diverged(what, epoch, batch):
        """Stop without saving: the last good checkpoint stays as it is."""
        log_metrics(metrics_path, {"event": "diverged", "epoch": epoch, "step": global_step,
                                   "what": what})
        kept = (f"the last good checkpoint, {ckpt_path}, is kept" if ckpt_path.exists()
                else "no checkpoint had been written yet")
        hint = " or --newton-lr, or raise --damping" if args.use_hessian else ""
        return UsageError(f"{what} at epoch {epoch + 1}, batch {batch + 1}; stopped without "
                          f"saving ({kept}). Lower --lr{hint}.")

    for epoch in range(start_epoch, args.epochs):
        # The shuffle order and the workers' augmentation seeds depend only on (seed, epoch).
        order = torch.Generator().manual_seed(args.seed * 100003 + epoch)
        train_loader = torch.utils.data.DataLoader(
            train_set, batch_size=args.batch_size, shuffle=True, generator=order,
            num_workers=args.workers, pin_memory=device.type == "cuda",
            persistent_workers=False)
        model.train()
        seen, correct, loss_sum, t0, batch = 0, 0, 0.0, time.time(), 0
        total = len(train_loader) if not args.max_batches else min(args.max_batches, len(train_loader))
        bar = tqdm(train_loader, total=total, desc=f"epoch {epoch + 1}/{args.epochs}",
                   unit="batch", dynamic_ncols=True)
        for batch, (x, y) in enumerate(bar):
            if batch >= total:
                break
            x = x.to(device=device, dtype=dtype, non_blocking=True)
            y = y.to(device=device, non_blocking=True)
            curvature_batch = (x[:args.hessian_batch_size], y[:args.hessian_batch_size])
            try:
                loss, hits = train_step(model, optimizer, x, y, curvature_batch)
            except (InsufficientMemoryError, torch.cuda.OutOfMemoryError) as err:
                raise curvature_too_large(err, model, "--hessian-batch-size",
                                          args.hessian_batch_size) from None
            if not math.isfinite(loss):
                bar.close()
                raise diverged(f"the training loss is {loss}", epoch, batch)
            global_step += 1
            seen += len(y)
            correct += hits
            loss_sum += loss * len(y)
            stats = {"loss": loss_sum / seen, "acc": correct / seen,
                     "img_per_s": seen / (time.time() - t0)}
            if args.use_hessian:
                s = optimizer.stats
                stats.update(damping=s["damping"], rejected=s["rejected"],
                             fallbacks=s["gradient_fallbacks"])
            bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['acc']:.3f}",
                            **{"img/s": f"{stats['img_per_s']:.0f}"},
                            **({"damp": f"{stats['damping']:.2g}", "rej": stats["rejected"]}
                               if args.use_hessian else {}))
            if global_step % args.log_interval == 0:
                log_metrics(metrics_path, {"event": "train", "epoch": epoch, "step": global_step,
                                           "batch_loss": loss, **stats})
        bar.close()

        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise diverged("the weights are not finite", epoch, batch)
        val = evaluate(model, val_loader, topk)
        best_top1 = max(best_top1, val["top1"])
        record = {"event": "epoch", "epoch": epoch + 1, "step": global_step,
                  "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
                  "val_loss": val["loss"], "val_top1": val["top1"], f"val_top{topk[1]}": val[f"top{topk[1]}"],
                  "epoch_seconds": time.time() - t0}
        if args.use_hessian:
            record["optimizer"] = optimizer.stats
        log_metrics(metrics_path, record)
        print(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.3f} | "
              f"val loss {val['loss']:.4f} top-1 {val['top1']:.3f} top-{topk[1]} {val[f'top{topk[1]}']:.3f} "
              f"| {record['epoch_seconds']:.1f}s")
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "epoch": epoch + 1, "global_step": global_step, "best_top1": best_top1,
            "args": vars(args), "classes": train_set.classes, "rng": rng_state()})
    print(f"done: {args.epochs} epoch(s), best val top-1 {best_top1:.3f}; checkpoint {ckpt_path}, "
          f"metrics {metrics_path}")


if __name__ == "__main__":
    main()

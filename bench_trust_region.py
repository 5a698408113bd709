"""One trust-region step at image scale: time and memory of the exact trust region.

    python bench_trust_region.py                         # 3072 inputs, width 128, 4 layers
    python bench_trust_region.py --width 256 --layers 8 --classes 1000

The model is ``DeepMLPWithTracking(inputs, width, classes, layers - 1)`` in
float32 (a 32x32 RGB image flattened, as in ``train_imagenet.py``), the
curvature on ``--curvature-batch`` random images, the gradient on
``--batch`` images.  Timed (wall clock, and CPU seconds of the process, which a loaded machine
inflates less): the derivatives (``hessian_operator``), one
:func:`trust_region.trust_region_step` (Lanczos, trial multipliers each with
an exact definiteness test and a structured factorisation), and one
``DampedNewton(mode='trust_region')`` step (the same plus the loss at the
trial point).  Memory: the peak resident set size of the process (Linux
``VmHWM``) before and after, so the rise is what the trust region needed.
"""

import argparse
import time

import torch

import hessian_inverse as hi
from damped_newton import DampedNewton
from trust_region import definiteness, trust_region_step


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (Linux), GiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=int, default=3072)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4, help="in total, the output layer included")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--curvature-batch", type=int, default=4)
    p.add_argument("--batch", type=int, default=64, help="images for the gradient")
    p.add_argument("--radius", type=float, default=1.0)
    p.add_argument("--curvature", default="hessian", choices=["hessian", "ggn"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = hi.DeepMLPWithTracking(args.inputs, args.width, args.classes,
                                   args.layers - 1).to(dtype)
    n = sum(p.numel() for p in model.parameters())
    x = torch.rand(args.batch, args.inputs, dtype=dtype)
    y = torch.randint(0, args.classes, (args.batch,))
    xc, yc = x[:args.curvature_batch], y[:args.curvature_batch]
    print(f"MLP {args.inputs} -> {args.width} x {args.layers - 1} -> {args.classes}, {n:,} "
          f"parameters, {args.dtype}, {torch.get_num_threads()} threads; curvature "
          f"({args.curvature}) on {args.curvature_batch} images, gradient on {args.batch}")

    loss = model(x, y)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    before = peak_rss_gib()
    start = time.perf_counter()
    op = hi.hessian_operator(model, model(xc, yc, track_activations=True),
                             curvature=args.curvature)
    derivatives = time.perf_counter() - start
    start = time.perf_counter()
    test = definiteness(op, 0.0)
    test_time = time.perf_counter() - start
    start, cpu = time.perf_counter(), time.process_time()
    result = trust_region_step(op, grad, args.radius)
    step_time, step_cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"derivatives {derivatives:.2f} s; definiteness at damping 0 {test_time:.3f} s "
          f"(positive definite: {test.positive_definite}); trust_region_step "
          f"{step_time:.1f} s ({step_cpu:.1f} CPU s): {result.iterations} trial multipliers, lambda "
          f"{result.damping:.3g}, |s| {result.step.norm():.4g} (radius {args.radius}), "
          f"predicted reduction {result.predicted_reduction:.3g}, hard case "
          f"{result.hard_case}, converged {result.converged}, lambda_min <= "
          f"{result.min_eigenvalue:.3g}")
    print(f"peak resident memory {before:.2f} GiB before, {peak_rss_gib():.2f} GiB after")

    opt = DampedNewton(model, mode="trust_region", curvature=args.curvature, radius=args.radius)

    def closure():
        opt.zero_grad()
        value = model(x, y)
        value.backward()
        return value

    start, cpu = time.perf_counter(), time.process_time()
    f0 = float(opt.step(closure, lambda: model(xc, yc, track_activations=True)).detach())
    with torch.no_grad():
        f1 = float(model(x, y))
    s = opt.stats
    print(f"DampedNewton(mode='trust_region').step: {time.perf_counter() - start:.1f} s "
          f"({time.process_time() - cpu:.1f} CPU s), loss "
          f"{f0:.4f} -> {f1:.4f}, ratio {s['last_ratio']:.3g}, radius now {s['radius']:.3g}, "
          f"{s['accepted']} accepted / {s['rejected']} rejected")
    print(f"peak resident memory {peak_rss_gib():.2f} GiB at the end")


if __name__ == "__main__":
    main()

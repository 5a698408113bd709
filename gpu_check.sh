#!/usr/bin/env bash
# gpu_check.sh: the GPU checks, in under 10 minutes on one CUDA GPU.  Printing each command
# before it runs, it
#
#   1. runs the tests marked cuda:            python -m pytest -q -m cuda
#   2. benchmarks every route on the GPU at L=1024, width 32, batch 16, float32 and float64
#      (bench_hessian.py --device cuda, single-case mode: each route's time against the
#      fastest exact HVP, its kernels and host synchronisations per call, the GGN against
#      conjugate gradients; float64 adds the LU-rate table);
#   3. benchmarks the original README's ImageNet size: 3072 inputs, width 512, 20 layers,
#      curvature batch 4, 1000 classes, float32;
#   4. trains one epoch of train_imagenet.py --use-hessian --device cuda (width 512, 20
#      layers, 32x32 images) on a generated ImageFolder of PNGs;
#
# and writes every output into one directory ($OUT if set, else ./gpu_check_out, or
# --out DIR): summary.md (a markdown table: step, command, status, seconds, key figures),
# pytest.log, bench_float32.md, bench_float64.md, bench_imagenet.md (the benchmark
# tables), bench.log (their progress), train.log, results.json (every measurement).
# It exits non-zero if any step fails, times out, or the whole run takes 10 minutes or more.
#
#   ./gpu_check.sh                      # on a CUDA machine
#   DEVICE=cpu ./gpu_check.sh --dry     # tiny sizes on the CPU: checks the script itself
#
# Environment: DEVICE (default cuda), PYTHON (default python), OUT (output directory).
set -uo pipefail
cd "$(dirname "$0")"

DRY=0
OUT_DIR="${OUT:-./gpu_check_out}"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry) DRY=1 ;;
        --out) OUT_DIR="$2"; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (use --dry, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
DEVICE="${DEVICE:-cuda}"
PYTHON="${PYTHON:-python}"
BUDGET_S=600
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
STEPS="$WORK/steps.tsv"
: > "$STEPS"
: > "$OUT_DIR/bench.log"
export PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
    # Tiny sizes: the same steps and outputs in a minute or two on a CPU.
    BIG=(--layers 6 --width 4 --batch 2 --classes 3); BIG_NAME="L=6 w4 B2"
    IMAGENET_NAME="input 48, w8, L3, B2, 5 classes"
    IMAGENET=(--layers 3 --width 8 --batch 2 --input-dim 48 --classes 5)
    LIMITS=(--repeats 1 --minres-cap 5 --cg-cap 50 --no-memory)
    LU_BLOCKS=16,32
    TRAIN=(--image-size 4 --hidden-dim 4 --num-layers 3 --batch-size 8 --hessian-batch-size 4
           --workers 0)
    CLASSES=3; TRAIN_IMAGES=8; VAL_IMAGES=3; SIDE=6
    T_TEST=300; T_BENCH=300; T_IMAGENET=300; T_TRAIN=300
else
    BIG=(--layers 1024 --width 32 --batch 16); BIG_NAME="L=1024 w32 B16"
    IMAGENET_NAME="input 3072, w512, L20, B4, 1000 classes"
    IMAGENET=(--layers 20 --width 512 --batch 4 --input-dim 3072 --classes 1000)
    LIMITS=(--repeats 1 --minres-cap 50 --cg-cap 300)
    LU_BLOCKS=512,1024,2048
    TRAIN=(--image-size 32 --hidden-dim 512 --num-layers 20 --batch-size 64
           --hessian-batch-size 4 --workers 2)
    CLASSES=10; TRAIN_IMAGES=32; VAL_IMAGES=8; SIDE=32
    # Per-step limits, 560 s together: the run stays under 10 minutes.
    T_TEST=60; T_BENCH=140; T_IMAGENET=110; T_TRAIN=90
fi

log() { printf '%s\n' "$*" >&2; }

# step NAME SECONDS STDOUT_FILE STDERR_FILE -- command...: run it under `timeout`, print it
# first, record its status and duration in $STEPS.
step() {
    local name="$1" limit="$2" out="$3" err="$4"; shift 5
    local cmd; printf -v cmd '%q ' "$@"
    log "+ $cmd"
    local start end rc
    start=$(date +%s.%N)
    if [ "$out" = "$err" ]; then
        timeout --kill-after=10 "$limit" "$@" >"$out" 2>&1
    else
        timeout --kill-after=10 "$limit" "$@" >"$out" 2>>"$err"
    fi
    rc=$?
    end=$(date +%s.%N)
    local secs; secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.0f", b - a }')
    local status=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="timed out after ${limit} s"
    elif [ "$rc" != 0 ]; then status="failed (exit $rc)"; fi
    log "  -> $name: $status in ${secs} s"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "$cmd" "$out" >> "$STEPS"
}

START=$(date +%s)
log "gpu_check.sh: device $DEVICE, dry run $DRY, outputs in $OUT_DIR"
if ! "$PYTHON" - "$DEVICE" <<'EOF' >&2
import sys, torch
device = sys.argv[1]
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit("DEVICE=%s but torch.cuda.is_available() is False (DEVICE=cpu --dry checks the "
             "script without a GPU)" % device)
EOF
then
    exit 1
fi

# 1. The tests marked cuda.
step "tests marked cuda" "$T_TEST" "$OUT_DIR/pytest.log" "$OUT_DIR/pytest.log" -- \
    "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider

# 2. Every route at L=1024, width 32, batch 16, in float32 and float64.
step "bench float32, $BIG_NAME" "$T_BENCH" "$OUT_DIR/bench_float32.md" "$OUT_DIR/bench.log" -- \
    "$PYTHON" bench_hessian.py --device "$DEVICE" --dtype float32 --damping 1e-2 "${BIG[@]}" \
    "${LIMITS[@]}" --out "$WORK/float32.json"
step "bench float64, $BIG_NAME" "$T_BENCH" "$OUT_DIR/bench_float64.md" "$OUT_DIR/bench.log" -- \
    "$PYTHON" bench_hessian.py --device "$DEVICE" --dtype float64 --damping 1e-3 "${BIG[@]}" \
    "${LIMITS[@]}" --lu-blocks "$LU_BLOCKS" --out "$WORK/float64.json"

# 3. The original README's ImageNet size, float32.
step "bench ImageNet size ($IMAGENET_NAME), float32" "$T_IMAGENET" "$OUT_DIR/bench_imagenet.md" "$OUT_DIR/bench.log" -- \
    "$PYTHON" bench_hessian.py --device "$DEVICE" --dtype float32 --damping 1e-2 "${IMAGENET[@]}" \
    "${LIMITS[@]}" --out "$WORK/imagenet.json"

# 4. One epoch of train_imagenet.py with Newton steps on a generated ImageFolder.
"$PYTHON" - "$WORK/images" "$CLASSES" "$TRAIN_IMAGES" "$VAL_IMAGES" "$SIDE" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root, classes, train, val, side = Path(sys.argv[1]), *map(int, sys.argv[2:])
rng = np.random.default_rng(0)
for split, count in (("train", train), ("val", val)):
    for c in range(classes):
        folder = root / split / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 120, (side, side, 3)).astype(np.uint8)
            pixels[..., c % 3] += 60 + 13 * (c // 3)
            Image.fromarray(pixels).save(folder / f"img{i}.png")
print(f"generated {classes} classes x ({train} + {val}) {side}x{side} PNGs in {root}")
EOF
step "train_imagenet.py, 1 epoch, --use-hessian" "$T_TRAIN" "$OUT_DIR/train.log" "$OUT_DIR/train.log" -- \
    "$PYTHON" train_imagenet.py --data-dir "$WORK/images" --epochs 1 --use-hessian \
    --device "$DEVICE" --checkpoint-dir "$WORK/checkpoints" "${TRAIN[@]}"
cp "$WORK/checkpoints/metrics.jsonl" "$WORK/metrics.jsonl" 2>/dev/null || true

ELAPSED=$(( $(date +%s) - START ))

# The summary table and one results.json.
"$PYTHON" - "$STEPS" "$WORK" "$OUT_DIR" "$ELAPSED" "$BUDGET_S" "$DRY" "$DEVICE" <<'EOF'
import json, sys
from pathlib import Path
steps_file, work, out, elapsed, budget, dry, device = sys.argv[1:]
work, out, elapsed, budget = Path(work), Path(out), int(elapsed), int(budget)

def load(name):
    try:
        return json.loads((work / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None

def figures(data):
    if not data:
        return "no results"
    rows = {r["method"]: r for r in data["records"] if r["section"] == "routes"}
    parts = []
    hvp = next((r for m, r in rows.items() if m.startswith("autograd HVP, double backward")), None)
    for method, r in rows.items():
        if method.startswith("ours") and r.get("t_total"):
            parts.append(f"{method[len('ours, '):]}: {r['t_total']:.3g} s = "
                         f"{r['ratio_to_hvp']:.1f}x HVP, {r['kernels']} kernels "
                         f"({r['kernels'] / hvp['kernels']:.2f}x HVP's), {r['syncs']} syncs, "
                         f"residual {r['residual']:.1e}" if hvp and hvp.get("kernels") else
                         f"{method[len('ours, '):]}: {r['t_total']:.3g} s")
        elif method.startswith("ours"):
            parts.append(f"{method[len('ours, '):]}: {r['note']}")
    if hvp:
        parts.insert(0, f"fastest exact HVP (autograd double backward) {hvp['t_total']:.3g} s, "
                        f"{hvp['kernels']} kernels")
    ggn = [r for r in data["records"] if r["section"].startswith("ggn") and r.get("t_total")]
    exact = [r for r in ggn if r["method"].startswith("ours")]
    cg = [r for r in ggn if r["method"].startswith("CG")]
    if exact and cg:
        e, c = min(exact, key=lambda r: r["t_total"]), min(cg, key=lambda r: r["t_total"])
        parts.append(f"GGN: {e['method'][len('ours, GGN: '):]} {e['t_total']:.3g} s vs "
                     f"{c['method']} {c['t_total']:.3g} s ({c['products']} products): "
                     f"{c['t_total'] / e['t_total']:.1f}x")
    for r in data.get("lu_rates", []):
        parts.append(f"banded_lu {r['dtype']} b={r['block']}: {r['banded_lu_gflops']:.0f} "
                     f"GFLOP/s = {100 * r['fraction']:.0f}% of matmul")
    return "; ".join(parts)

def training():
    try:
        lines = (work / "metrics.jsonl").read_text().strip().splitlines()
        epochs = [r for r in map(json.loads, lines) if r.get("event") == "epoch"]
    except (OSError, ValueError):
        return "no metrics.jsonl"
    if not epochs:
        return "no epoch finished"
    r, opt = epochs[-1], epochs[-1].get("optimizer", {})
    return (f"epoch {r['epoch']} in {r['epoch_seconds']:.1f} s: train loss {r['train_loss']:.4f}, "
            f"val loss {r['val_loss']:.4f}, val top-1 {r['val_top1']:.3f}; Newton steps "
            f"{opt.get('newton_steps')}, accepted {opt.get('accepted')}, rejected "
            f"{opt.get('rejected')}")

keys = {"bench float32": "float32", "bench float64": "float64", "bench ImageNet": "imagenet"}
results = {name: load(name) for name in keys.values()}
rows, failed = [], 0
for line in Path(steps_file).read_text().splitlines():
    name, status, secs, cmd, _ = line.split("\t")
    failed += status != "ok"
    key = next((v for k, v in keys.items() if name.startswith(k)), None)
    figure = (figures(results[key]) if key else training() if name.startswith("train")
              else (out / "pytest.log").read_text().strip().splitlines()[-1:][0]
              if (out / "pytest.log").exists() and (out / "pytest.log").read_text().strip()
              else "")
    rows.append(f"| {name} | `{cmd.strip()}` | {status} | {secs} | {figure.replace('|', '/')} |")
over = elapsed >= budget and dry != "1"
verdict = ("PASSED" if not failed and not over else
           f"FAILED: {failed} step(s) failed" + (f"; took {elapsed} s, over {budget} s" if over else ""))
text = "\n".join([
    f"# gpu_check.sh {'(dry run) ' if dry == '1' else ''}on {device}: {verdict}",
    "", f"Wall time {elapsed} s (budget {budget} s).", "",
    "| step | command | status | seconds | key figures |",
    "| --- | --- | --- | ---: | --- |", *rows, ""])
(out / "summary.md").write_text(text)
(out / "results.json").write_text(json.dumps(results, indent=1))
print(text)
sys.exit(1 if failed or over else 0)
EOF
RC=$?
log "gpu_check.sh: $([ $RC = 0 ] && echo passed || echo FAILED), outputs in $OUT_DIR"
exit $RC

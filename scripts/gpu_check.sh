#!/usr/bin/env bash
# The GPU checks in one command (docs/gpu.md), run from the repository root on a machine with
# one CUDA GPU, torch, transformers, peft and lightning installed, and no network:
#
#   OUT=/some/empty/folder bash scripts/gpu_check.sh
#
# 1. installs the wheels of .whl/ whose distribution the interpreter lacks (hydra-core,
#    omegaconf, datasets, pytest, ...) into /tmp/site, without network or dependency resolution;
# 2. prints the GPU (nvidia-smi) and the versions of torch and the libraries the runs use;
# 3. runs tests/test_gpu.py: the OLMoE-1B-7B-shaped UB-SMoE round (peak memory per tier), then
#    every method on commonsense_tiny in bf16;
# 4. runs benchmarks/native_moe_speed.py with OLMoE-1B-7B's layer shapes in bf16 on CUDA.
#
# Each step has its own time limit, so one hang does not take the others' time; the whole
# script stays under about 8 minutes on an H200. Output goes to the terminal and into $OUT
# (default logs/gpu), flat: gpu_check.log (everything), gpu_report.json (the tests'
# measurements), native_moe_speed.json (the benchmark), summary.txt (each step's exit status).
# The exit status is 0 when every step passed.
set -u

OUT=${OUT:-logs/gpu}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export UBSMOE_GPU_REPORT="$OUT/gpu_report.json"
: > "$OUT/summary.txt"
FAILED=0

# step NAME SECONDS COMMAND...: run COMMAND under a time limit and record its exit status.
step() {
    local name=$1 limit=$2 start rc
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    start=$(date +%s)
    timeout -k 10 "$limit" "$@"
    rc=$?
    echo "=== $name: exit $rc after $(($(date +%s) - start))s"
    echo "$name exit=$rc seconds=$(($(date +%s) - start))" >> "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || FAILED=1
}

install_wheels() {
    # Only the distributions the interpreter lacks: an installed one (e.g. the image's own
    # requests or pytest) is left as it is rather than shadowed by an older or newer copy.
    local missing
    missing=$("$PY" - <<'EOF'
import glob, importlib.metadata as md, os
for wheel in sorted(glob.glob(".whl/*.whl")):
    name = os.path.basename(wheel).split("-")[0]
    try:
        print(f"have {name} {md.version(name)}", file=__import__("sys").stderr)
    except md.PackageNotFoundError:
        print(wheel)
EOF
    ) || return 1
    if [ -z "$missing" ]; then
        echo "nothing to install"
        return 0
    fi
    echo "installing into $SITE:" $missing
    # shellcheck disable=SC2086  # one wheel path per word
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $missing \
        || "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$SITE" $missing
}

environment() {
    nvidia-smi || echo "nvidia-smi failed"
    "$PY" - <<'EOF'
import importlib, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| available", torch.cuda.is_available(), "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
for name in ("transformers", "peft", "lightning", "torchmetrics", "huggingface_hub", "tokenizers", "pyarrow",
             "hydra", "omegaconf", "datasets", "pytest"):
    module = importlib.import_module(name)
    print(f"{name} {getattr(module, '__version__', '?')} {module.__file__}")
import ubsmoe.runner
print("ubsmoe from", ubsmoe.runner.__file__)
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
}

# timeout runs programs, not shell functions: the two functions run in a child bash.
export -f install_wheels environment
export PY SITE
PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rfEs --durations=12 tests/test_gpu.py)

step install 40 bash -c install_wheels
step environment 25 bash -c environment
step every_method_bf16 150 "${PYTEST[@]}" -k "every_method or server_state_on_the_gpu"
step native_kernels_cuda 30 "$PY" -m pytest -p no:cacheprovider -q tests/test_native_kernels_cuda.py
step native_moe_speed 80 "$PY" benchmarks/native_moe_speed.py --dims olmoe-1b-7b --dtype bfloat16 --device cuda \
    --kinds hf,hf_top2,native_k8,native_k2 --out "$OUT/native_moe_speed.json"
step olmoe_ubsmoe_round 150 "${PYTEST[@]}" -k paper_shaped

echo "=== summary"
cat "$OUT/summary.txt"
[ -f "$UBSMOE_GPU_REPORT" ] && cat "$UBSMOE_GPU_REPORT"
exit "$FAILED"

#!/usr/bin/env bash
# Issue 14's GPU checks in one call, for a lent machine (about 6-8 minutes on one H200), from the repo root:
# the --gpu bench (steps, peak memory, sparse layer, entry gradients, LoRA vs PEFT), per-step profiles of uniform
# LoRA and SPT-LoRA, the CUDA tests of the sparse and LoRA modules and the Trainer, and the entry-gradient paths.
# Each part has its own time limit, so one that hangs leaves the others' files. Output: $OUT (default bench/gpu/out).
set -u
OUT=${OUT:-bench/gpu/out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1 SPT_NO_PROGRESS=1
py=${PYTHON:-python3}
part() {  # part SECONDS FILE COMMAND...: run one part, its output and exit status in $OUT/FILE
    local limit=$1 file=$2
    shift 2
    echo "== $* (limit ${limit} s)" >"$OUT/$file"
    timeout "$limit" "$@" >>"$OUT/$file" 2>&1
    echo "== exit status $?" >>"$OUT/$file"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/gpu.txt" 2>&1
git rev-parse HEAD >>"$OUT/gpu.txt" 2>/dev/null
part 330 run_log.txt $py bench/run.py --gpu --skip sensitivity ranking results_query --out "$OUT/results_gpu.json"
part 120 profile_steps.txt $py bench/gpu/profile_steps.py --configs lora spt
part 60 tests_cuda.txt $py -m pytest -q -p no:cacheprovider tests/test_sparse.py tests/test_lora_fused.py tests/test_train.py
part 60 grad_paths.txt $py bench/gpu_grad_paths.py

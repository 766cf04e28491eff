#!/usr/bin/env bash
# The GPU checks, prepared as one call of the `device` tool for a session that is lent a GPU (never CI):
#
#   run(command="bash scripts/gpu_check.sh", timeout_s=540)
#
# It runs on that machine's own python3, which holds PyTorch and Triton (it reaches no registry, and our .venv is
# far over what a call may carry), and installs sokhan alone (--no-deps) into /tmp/site. In order, each step with
# its own time limit so one hang cannot cost the rest:
#   1. the GPU's name, driver and memory;
#   2. the kernel tests compiled natively (TRITON_INTERPRET=0): every Triton kernel against its float64
#      reference, forward and backward, and the models with the kernels against their PyTorch paths;
#   3. benchmarks/kernels.py: time and bandwidth of each kernel against its reference (kernels.json);
#   4. benchmarks/train.py on CUDA: Mamba and transformer step time at equal parameter count (train.json).
# Logs and JSON land in $OUT (the files that come back), else in benchmarks/out/gpu. The CUDA execution provider
# of ONNX Runtime is not among them: the machine has the CPU onnxruntime only (benchmarks/README.md says why).
set -uo pipefail
out=${OUT:-benchmarks/out/gpu}
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/site . \
    >"$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 SOKHAN_PROGRESS=0

step() {  # step NAME SECONDS COMMAND...: run one check, its log in $out/NAME.log, its status in the summary
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
    tail -n 15 "$out/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
step kernel_tests 200 python3 -m pytest -q -p no:cacheprovider -n 4 tests/kernels tests/test_models_kernels.py
step kernels_bench 180 python3 benchmarks/kernels.py --lengths 1024 2048 4096 8192
step train_bench 90 python3 benchmarks/train.py --device cuda --batch-size 32 --steps 20 --warmup 5
cp benchmarks/out/kernels.json benchmarks/out/train.json "$out/" 2>/dev/null
cat "$out/summary.txt"

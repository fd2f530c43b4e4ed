#!/usr/bin/env bash
# The checks that only a GPU machine can make, as one prepared command for a lent machine (the
# figures the README's Benchmarks section still lacks: the model FLOP utilisation of a training step
# on the T5-base-shaped VL-T5, and the throughput of runs sharing one GPU). About 8 minutes:
#
#   bash tools/device_check.sh        # logs to $OUT (the device tool's folder) or ./device_out
#
# It uses the machine's own python3 and torch (no install: the workbench runs from this checkout
# through PYTHONPATH; the benches need none of the packages the GPU image lacks). Each step has its own
# time limit, so one that hangs does not cost the others. On a machine without CUDA every step says
# so and exits at once, which is how a test runs this file.
set -u
out=${OUT:-device_out}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run COMMAND for at most SECONDS, its output also in $out/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit} s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]}"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
  nproc
} 2>&1 | tee "$out/machine.txt"

step mfu 330 "$py" tests/bench/bench_gpu.py --batch 64,256 --compile --cuda-graphs --steps 20
step sharing 150 "$py" tests/bench/bench_sweep.py --gpu

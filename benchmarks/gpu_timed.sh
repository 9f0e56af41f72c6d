#!/usr/bin/env bash
# The timed GPU measurements, each run alone on the GPU (RESULTS.md §4): step-time variants, the 100-epoch
# compiled MoE run, the layer benchmark, fast path vs DataLoader, and the paper recipe's epoch time.
# Needs CIFAR-100 staged in /tmp/c100 (benchmarks/gpu_stage3.sh). Results: $OUT/timed.tgz (+ stdout).
set -uo pipefail
out=${OUT:-/tmp/out}; res=/tmp/res; runs=${RUNS:-/tmp/runs}
mkdir -p "$res" "$runs" "$out"
quiet() { grep -v "^USDT\|UserWarning\|warnings.warn\|Online softmax\|split the\|important use\|^ *$\|_warn_once"; }
step() { echo "=== $1 ($(date +%T))"; }
step profile_step
timeout 200 python3 benchmarks/profile_step.py --out "$res/prof" --steps 60 \
  --variants dense,moe_cap1.25_bench_on,moe_stacked_cap1.25_bench_on,dense_compile_ro,moe_stacked_cap1.25_compile_ro \
  --profile moe_stacked_cap1.25_bench_on 2>&1 | quiet | tail -12
step "fast_moe_compiled, 100 epochs"
timeout 300 python3 -m moecnn.cli train --config fast_moe_compiled train.epochs=100 data.root=/tmp/c100 \
  --out "$runs/moe_stk_e100" 2>&1 | quiet | grep -E "^training|^epoch (1|2|50|100)/|^done|rror" 
timeout 60 python3 -m moecnn.cli eval "$runs/moe_stk_e100" 2>&1 | tail -2
step bench_moe
timeout 150 python3 benchmarks/bench_moe.py --cudnn-benchmark on --out "$res/bench_moe_on.json" 2>&1 | quiet | tail -32
step bench_loader
timeout 120 python3 benchmarks/bench_loader.py --data cifar100 --root /tmp/c100 2>&1 | quiet | tail -5
step "paper recipe epoch time (3 of 150 epochs): as specified (fp32, exact) and compiled"
timeout 90 python3 -m moecnn.cli train --config paper_moe data.root=/tmp/c100 train.stop_after_epochs=3 \
  --out "$runs/paper_time_fp32" 2>&1 | quiet | grep -E "^epoch|rror"
timeout 150 python3 -m moecnn.cli train --config paper_moe data.root=/tmp/c100 train.stop_after_epochs=3 \
  train.precision=bf16 train.channels_last=true model.capacity_factor=1.25 model.stacked=true train.compile=true \
  train.compile_mode=reduce-overhead --out "$runs/paper_time_compiled" 2>&1 | quiet | grep -E "^epoch|rror"
step pack
tar czf "$out/timed.tgz" --exclude='*.pt' -C / tmp/res "${runs#/}/moe_stk_e100" "${runs#/}/paper_time_fp32" \
  "${runs#/}/paper_time_compiled" 2>/dev/null
ls -la "$out"

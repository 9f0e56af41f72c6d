#!/usr/bin/env bash
# The same `moecnn train` command under torchrun with 1 and G GPUs (same global batch), dense and
# ResBlock-MoE (p=4, N=4, k=2), each followed by `moecnn eval`; runs packed (no checkpoints) into $OUT.
#   EPOCHS=35 CONFIGS="fast_baseline_compiled fast_moe_compiled" bash benchmarks/gpu_ddp.sh
# On a machine with one GPU it runs the 1-GPU NCCL command and, as a correctness check of the multi-rank
# path only (not a speed measurement), 2 ranks sharing the GPU over gloo (train.dist_backend=gloo).
# Data must be staged in /tmp/c100 (benchmarks/gpu_stage3.sh). NVLink multicast stays off (device README).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
runs=${RUNS:-/tmp/runs}; out=${OUT:-/tmp/out}; epochs=${EPOCHS:-35}
configs=${CONFIGS:-"fast_baseline_compiled fast_moe_compiled"}
mkdir -p "$runs" "$out"
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
for c in $configs; do
  if (( ngpu >= 2 )); then plan="1:nccl $ngpu:nccl"; else plan="1:nccl 2:gloo"; fi
  for p in $plan; do
    g=${p%%:*}; be=${p##*:}; n="ddp_${c}_g${g}_${be}"
    [[ -f "$runs/$n/final.json" ]] && continue
    torchrun --standalone --nproc_per_node="$g" -m moecnn.cli train --config "$c" --out "$runs/$n" \
      data.root=/tmp/c100 train.epochs="$epochs" train.dist_backend="$be" log.progress=lines \
      > "$runs/$n.log" 2>&1 || { echo "error: $n"; tail -5 "$runs/$n.log"; continue; }
    python3 -m moecnn.cli eval "$runs/$n" >> "$runs/$n.log" 2>&1
    tar czf "$out/$n.tgz" --exclude='*.pt' -C "$runs" "$n" "$n.log"
    grep -h "^done" "$runs/$n.log" | tail -1
  done
done

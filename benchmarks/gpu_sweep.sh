#!/usr/bin/env bash
# Run a list of `moecnn` CIFAR-100 jobs over the GPUs of one machine, a job per GPU at a time, each followed by
# `moecnn eval`, and pack each run (without checkpoints) into $OUT/<name>.tgz. Used for RESULTS.md.
#   bash benchmarks/gpu_sweep.sh JOBFILE        # JOBFILE lines: NAME  CONFIG  [key=value ...]
# Data must be staged in /tmp/c100 first (benchmarks/gpu_stage3.sh). Set MAX_S to bound each training.
set -uo pipefail
jobs_file=$1; runs=${RUNS:-/tmp/runs}; max_s=${MAX_S:-400}; out=${OUT:-/tmp/out}
mkdir -p "$runs" "$out"
ngpu=$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")
run_job() {  # gpu name config overrides...
  local g=$1 n=$2 c=$3; shift 3
  CUDA_VISIBLE_DEVICES=$g timeout "$max_s" python3 -m moecnn.cli train --config "$c" --out "$runs/$n" data.root=/tmp/c100 "$@" \
    && CUDA_VISIBLE_DEVICES=$g timeout 120 python3 -m moecnn.cli eval "$runs/$n"
  tar czf "$out/$n.tgz" --exclude='*.pt' -C "$runs" "$n" 2>/dev/null
}
i=0
while read -r name config rest; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  g=$((i % ngpu))
  # shellcheck disable=SC2086
  run_job "$g" "$name" "$config" $rest > "$runs/$name.log" 2>&1 &
  i=$((i + 1))
  if (( i % ngpu == 0 )); then wait; fi
done < "$jobs_file"
wait
grep -h "^done\|^error" "$runs"/*.log

#!/usr/bin/env bash
# Run a list of `moecnn` CIFAR-100 jobs over the GPUs of one machine, PER_GPU jobs per GPU at a time, each
# followed by `moecnn eval`, and pack each run (without checkpoints) into $OUT/<name>.tgz. Used for RESULTS.md.
#   PER_GPU=3 MAX_S=300 bash benchmarks/gpu_sweep.sh JOBFILE   # JOBFILE lines: NAME  CONFIG  [key=value ...]
# Data must be staged in /tmp/c100 first (benchmarks/gpu_stage3.sh). MAX_S bounds each training; a run cut
# by it keeps its checkpoint and is resumed (`moecnn train --resume`) when the same job list runs again.
# Jobs sharing a GPU share its time: their images/s are not speed measurements (time those alone).
set -uo pipefail
jobs_file=$1; runs=${RUNS:-/tmp/runs}; max_s=${MAX_S:-400}; out=${OUT:-/tmp/out}; per_gpu=${PER_GPU:-1}
mkdir -p "$runs" "$out"
ngpu=$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")
slots=$((ngpu * per_gpu))
run_job() {  # gpu name config overrides...
  local g=$1 n=$2 c=$3; shift 3
  local train=(train --config "$c" --out "$runs/$n" data.root=/tmp/c100 "$@")
  if [[ -f "$runs/$n/final.json" ]]; then train=(); elif [[ -f "$runs/$n/checkpoint.pt" ]]; then train=(train --resume "$runs/$n"); fi
  if (( ${#train[@]} )); then
    CUDA_VISIBLE_DEVICES=$g timeout "$max_s" python3 -m moecnn.cli "${train[@]}" || return 1
  fi
  [[ -d "$runs/$n/eval" ]] || CUDA_VISIBLE_DEVICES=$g timeout 120 python3 -m moecnn.cli eval "$runs/$n"
  tar czf "$out/$n.tgz" --exclude='*.pt' -C "$runs" "$n" 2>/dev/null
}
i=0
while read -r name config rest; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  if (( i >= slots )); then wait -n; fi
  g=$((i % ngpu))
  # shellcheck disable=SC2086
  run_job "$g" "$name" "$config" $rest >> "$runs/$name.log" 2>&1 &
  i=$((i + 1))
done < "$jobs_file"
wait
grep -h "^done\|^error\|Error" "$runs"/*.log | tail -40

#!/usr/bin/env bash
# The GPU measurements behind RESULTS.md, as phases of jobs. On a machine with two GPUs the two columns of a
# phase run side by side, one per GPU (CUDA_VISIBLE_DEVICES), each job alone on its GPU; with one GPU they run
# one after the other. Phases A and B need CIFAR-100 staged in /tmp/c100 (benchmarks/gpu_stage3.sh); runs go
# to $RUNS; each phase packs its results (benchmark JSON, logs, run folders without checkpoints) into
# $OUT/results_<phase>.tgz, and phase A the model of moe_long_s0 in parts of at most 15 MiB.
#   bash benchmarks/gpu_jobs.sh S      # smoke: compiled MoE training on synthetic data, 2 ranks under torchrun
#   bash benchmarks/gpu_jobs.sh P      # benchmarks: profile_step, bench_detection, bench_any_cnn
#   bash benchmarks/gpu_jobs.sh A      # fast_moe_long seeds 0 and 1, fast_moe_compiled, fast_baseline_long
#   bash benchmarks/gpu_jobs.sh B      # seed 2, upcycling, timm models on CIFAR-100, 2-GPU weak scaling
# Each job has a time limit (seconds, LIMIT_*); a training run cut by it continues with 'moecnn train --resume'.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
runs=${RUNS:-/tmp/runs}; out=${OUT:-/tmp/out}; logs=$runs/logs; bench=$runs/bench
mkdir -p "$runs" "$out" "$logs" "$bench"
data="data.root=/tmp/c100 log.progress=lines"
ANY="optim.name=adamw optim.lr=0.002 optim.weight_decay=0.05 optim.batch_size=256 optim.schedule=cosine \
optim.warmup_epochs=2 train.epochs=30 train.compile=false model.small_input=true model.label_smoothing=0.1"
export runs out logs bench data ANY
moecnn() { python3 -m moecnn.cli "$@"; }

train() {  # train NAME CONFIG [overrides...]: train (or continue) a run, then evaluate it
  local name=$1 cfg=$2; shift 2
  if [[ -f "$runs/$name/final.json" ]]; then :
  elif [[ -f "$runs/$name/checkpoint.pt" ]]; then moecnn train --resume "$runs/$name"
  else moecnn train --config "$cfg" --out "$runs/$name" $data "$@"; fi
  [[ -f "$runs/$name/final.json" ]] && moecnn eval "$runs/$name"
}

save_model() {  # the model's tensors in float16 (what comes back is limited to 64 MiB), in <= 15 MiB parts
  python3 - "$runs/$1/checkpoint.pt" "$out/$1.model" <<'PY'
import io, sys, torch
sd = torch.load(sys.argv[1], map_location="cpu", weights_only=True)["model"]
sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
buf = io.BytesIO(); torch.save(sd, buf); b = buf.getvalue(); step = 15 * 2**20
for i in range(0, len(b), step):
    open(f"{sys.argv[2]}.part{i // step}", "wb").write(b[i:i + step])
PY
}

# ---------------------------------------------------------------------------------------------- jobs
job_moe_long_s0() { train moe_long_s0 fast_moe_long train.seed=0 && save_model moe_long_s0; }
job_moe_long_s1() { train moe_long_s1 fast_moe_long train.seed=1; }
job_moe_long_s2() { train moe_long_s2 fast_moe_long train.seed=2; }
job_dense_long() { train dense_long fast_baseline_long; }
job_moe_compiled() { train moe_compiled fast_moe_compiled; }
job_profile() { python3 benchmarks/profile_step.py --steps 20 --warmup 10 --out "$bench/profile_step.json"; }
job_any_cnn() { python3 benchmarks/bench_any_cnn.py --steps 10 --warmup 5 --out "$bench/bench_any_cnn.json"; }
job_detection() {
  python3 benchmarks/bench_detection.py --device cuda --arch resnet18 --image-size 512 --batch 8 --bf16 \
    --steps 20 --warmup 5 --routing level anchor --executions default per_level per_level_stacked per_level_capacity \
    --out "$bench/bench_detection.json"
}
job_upcycle() {  # the dense long run's stage 4 becomes an MoE of 4 copies (+1 % noise), fine-tuned 30 epochs
  train upcycle fast_moe_long model.moe=none "model.targets=[layer4]" model.init=copy_noise \
    model.init_from="$runs/dense_long" train.epochs=30 optim.lr=0.05 optim.warmup_epochs=1
}
job_effnet() {
  train effnet_dense fast_baseline model.source=timm model.name=efficientnet_b0 $ANY
  train effnet_moe fast_baseline model.source=timm model.name=efficientnet_b0 "model.targets=[blocks.5.2,blocks.5.3]" $ANY
}
job_convnext() {
  train convnext_dense fast_baseline model.source=timm model.name=convnext_atto $ANY
  train convnext_moe fast_baseline model.source=timm model.name=convnext_atto \
    "model.targets=[stages.3.blocks.0,stages.3.blocks.1]" $ANY
}
job_ddp2_long() {  # weak scaling: 512 images per GPU on two GPUs, linear learning-rate scaling
  [[ -f "$runs/ddp2_long/final.json" ]] || torchrun --standalone --nproc_per_node=2 -m moecnn.cli train \
    --config fast_moe_long --out "$runs/ddp2_long" $data optim.batch_size=1024 optim.lr=0.8
  [[ -f "$runs/ddp2_long/final.json" ]] && CUDA_VISIBLE_DEVICES=0 moecnn eval "$runs/ddp2_long"
}
job_shapes() { train shapes detection_shapes train.precision=bf16 model.stacked=true; }
export SYN=${SYN:-"data.name=synthetic data.root=null data.synthetic_train_size=20000 data.val_size=2000 train.epochs=2"}
job_smoke() {  # the compiled sync-free recipe and the bucketed default on the GPU, then 2 ranks under torchrun
  moecnn train --config fast_moe_compiled --out "$runs/smoke_ro" $SYN log.progress=lines && moecnn eval "$runs/smoke_ro"
  moecnn train --config fast_moe --out "$runs/smoke_default" $SYN log.progress=lines
  torchrun --standalone --nproc_per_node=2 -m moecnn.cli train --config fast_moe --out "$runs/smoke_ddp" $SYN \
    log.progress=lines train.dist_backend=gloo train.epochs=1
}

column() {  # column GPU LIMIT JOB...: run jobs one after another on one GPU within LIMIT seconds in all
  local gpu=$1 limit=$2; shift 2
  local end=$((SECONDS + limit))
  for j in "$@"; do
    local left=$((end - SECONDS)); (( left > 20 )) || { echo "skipped $j (no time left)"; continue; }
    echo "[gpu $gpu] $j (limit ${left}s)"
    CUDA_VISIBLE_DEVICES=$gpu timeout "$left" bash -c "$(declare -f); $j" > "$logs/$j.log" 2>&1
    echo "[gpu $gpu] $j rc=$? $(tail -1 "$logs/$j.log")"
  done
}

ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
phase() {  # phase LIMIT "JOBS FOR GPU 0" "JOBS FOR GPU 1"
  local limit=$1
  if (( ngpu >= 2 )); then column 0 "$limit" $2 & column 1 "$limit" $3 & wait
  else column 0 "$limit" $2 $3; fi
}

ph=${1:-S}
case "$ph" in
  S) column 0 "${LIMIT_S:-150}" job_smoke; names="smoke_ro smoke_default smoke_ddp" ;;
  P) phase "${LIMIT_P:-470}" "job_profile" "job_detection job_any_cnn"; names="" ;;
  A) phase "${LIMIT_A:-520}" "job_moe_long_s0 job_moe_compiled" "job_moe_long_s1 job_dense_long"
     names="moe_long_s0 moe_long_s1 moe_compiled dense_long" ;;
  B) phase "${LIMIT_B:-330}" "job_moe_long_s2 job_upcycle" "job_effnet job_convnext"
     column 0 "${LIMIT_D:-190}" job_ddp2_long
     names="moe_long_s2 upcycle effnet_dense effnet_moe convnext_dense convnext_moe ddp2_long" ;;
  *) echo "phases: S P A B"; exit 2 ;;
esac
keep=(); for n in $names; do [[ -d "$runs/$n" ]] && keep+=("$n"); done
tar czf "$out/results_$ph.tgz" --exclude='*.pt' --exclude='tb' -C "$runs" logs bench "${keep[@]}"
ls -la "$out"

#!/usr/bin/env bash
# Issue 8's scale run and GPU scaling of step 3, on one multi-GPU host:
#   bash benchmarks/opt13b_step3.sh OUT_DIR [GPUS] [PART]     PART: 13b, scale or all (default)
# 13b:   the pipeline's dry run shows its plan; then for each run of RUNS_13B (default "16:3",
#        DeepSpeed-Chat's stages; e.g. "16:3 32:0 32:0:4" = batch per GPU : critic ZeRO stage
#        [: --generation-tensor-parallel]) `dschat plan` predicts its memory (no GPU work) and
#        the OPT-13B actor (ZeRO-3 across the GPUs, gradient checkpointing) + OPT-350M
#        critic/reward run, random weights, bf16, 256 + 256 tokens, 1 warm-up + 3 measured PPO
#        steps; then the fast engine's CUDA-graph check (EXTRAS=0 skips dry run and check);
# scale: OPT-1.3B + OPT-350M on 1, 2, ... GPUS GPUs (batch 64 per GPU, ZeRO-$ZERO_SCALE, default
#        0) for the scaling efficiency.
# torch's AdamW everywhere (--torch-adam): a fresh machine would otherwise spend ~1 min per
# process group compiling DeepSpeed's FusedAdam. Every run has a time limit and its wall time is
# written beside its output.
set -u
out=${1:?usage: opt13b_step3.sh OUT_DIR [GPUS] [13b|scale|all]}
gpus=${2:-4}
part=${3:-all}
mkdir -p "$out"
common=(--generation-engine fast --old-logprobs generation --deployment-type single_node --torch-adam)

source "$(dirname "$0")/timed.sh"  # timed NAME LIMIT_S CMD...

if [ "$part" = 13b ] || [ "$part" = all ]; then
  if [ "${EXTRAS:-1}" = 1 ]; then
    timed pipeline_dry_run 60 dschat pipeline --actor opt-13b --deployment-type single_node \
      --dry-run
  fi
  # RUNS_13B="16:3 32:0:4": batch per GPU : critic ZeRO stage [: generation tensor parallel]
  for run in ${RUNS_13B:-16:3}; do
    IFS=: read -r b cz tp <<< "$run"
    tp=${tp:-1}
    name="opt13b_n${gpus}_b${b}_c${cz}_tp$tp"
    timed "plan_$name" 60 dschat plan ppo --actor-model opt-13b --actor-random-init \
      --critic-model opt-350m --critic-random-init --per-device-generation-batch-size "$b" \
      --per-device-training-batch-size "$b" --actor-zero-stage 3 --critic-zero-stage "$cz" \
      --actor-gradient-checkpointing --dtype bf16 --generation-tensor-parallel "$tp" \
      --deployment-type single_node --num-gpus "$gpus"
    timed "$name" "${LIMIT_13B:-420}" dschat bench "${common[@]}" --actor opt-13b \
      --critic opt-350m --batch-size "$b" --num-gpus "$gpus" --actor-zero-stage 3 \
      --critic-zero-stage "$cz" --gradient-checkpointing --generation-tensor-parallel "$tp" \
      --steps 3 --warmup 1 --json "$out/$name.json"
  done
  if [ "${EXTRAS:-1}" = 1 ]; then
    timed gpu_check_fast_engine 120 python3 benchmarks/gpu_check_fast_engine.py
  fi
fi
if [ "$part" = scale ] || [ "$part" = all ]; then
  for n in ${SCALE_NS:-$(seq 1 "$gpus")}; do  # SCALE_NS="2 4": only these GPU counts
    case $n in 1|2|4|8) ;; *) continue ;; esac
    z=${ZERO_SCALE:-0}  # ZeRO stage of actor and critic in the scaling runs
    timed "opt1.3b_z${z}_n$n" "${LIMIT_SCALE:-150}" dschat bench "${common[@]}" --batch-size 64 \
      --actor-zero-stage "$z" --critic-zero-stage "$z" --num-gpus "$n" --steps 3 --warmup 2 \
      --json "$out/opt1.3b_z${z}_n$n.json"
  done
fi
grep -h "│  fast" "$out"/*.txt

#!/usr/bin/env bash
# Issue 8's scale run and GPU scaling of step 3, on one multi-GPU host:
#   bash benchmarks/opt13b_step3.sh OUT_DIR [GPUS]
# 1. `dschat plan` predicts the memory of the OPT-13B run (no GPU work);
# 2. OPT-13B actor (ZeRO-3 across the GPUs, gradient checkpointing) + OPT-350M critic/reward,
#    random weights, bf16, 256 + 256 tokens, 1 warm-up + 3 measured PPO steps;
# 3. OPT-1.3B + OPT-350M on 1, 2, ... GPUS GPUs (batch 64 per GPU) for the scaling efficiency.
# `dschat plan` says ~89 GiB per GPU for step 2 on 4 x H200 (batch 16 per GPU).
set -u
out=${1:?usage: opt13b_step3.sh OUT_DIR [GPUS]}
gpus=${2:-4}
mkdir -p "$out"
common=(--generation-engine fast --old-logprobs generation --deployment-type single_node)
dschat plan ppo --actor-model opt-13b --actor-random-init --critic-model opt-350m \
  --critic-random-init --per-device-generation-batch-size 16 --per-device-training-batch-size 16 \
  --actor-zero-stage 3 --critic-zero-stage 3 --actor-gradient-checkpointing --dtype bf16 \
  --deployment-type single_node --num-gpus "$gpus" > "$out/plan_opt13b.txt"
dschat bench "${common[@]}" --actor opt-13b --critic opt-350m --batch-size 16 --num-gpus "$gpus" \
  --actor-zero-stage 3 --critic-zero-stage 3 --gradient-checkpointing --steps 3 --warmup 1 \
  --json "$out/opt13b_n$gpus.json" > "$out/opt13b_n$gpus.txt" 2>&1
n=1
while [ "$n" -le "$gpus" ]; do
  dschat bench "${common[@]}" --batch-size 64 --actor-zero-stage 0 --critic-zero-stage 0 \
    --num-gpus "$n" --steps 3 --warmup 2 --json "$out/opt1.3b_n$n.json" > "$out/opt1.3b_n$n.txt" 2>&1
  n=$((n * 2))
done
grep -h "│  fast" "$out"/*.txt

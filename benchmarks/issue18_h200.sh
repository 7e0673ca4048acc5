#!/usr/bin/env bash
# Issue 18 on one H200: what `dschat bench` gives with no tuning flags (its own choices: ZeRO,
# batch 64 then the largest batch that fits, --old-logprobs auto), step by step, and where the
# decode step's time goes:
#   bash benchmarks/issue18_h200.sh OUT_DIR [PARTS]
# PARTS: comma-separated of ppo, sft, dpo, grpo, rloo, decode (default ppo,sft,dpo,grpo,decode),
# and compile-ab: the fast engine alone at --batch-size ${AB_BATCH:-64} with --compile-decode off,
# auto (the default: compiled on a GPU), then off again (the repeat shows the run-to-run spread);
# zero-ab: the same batch with ZeRO-0 given, then with the stages the bench chooses (ZeRO-1 with
# fp32 gradients where they fit), then ZeRO-0 again; sft-zero-ab: the same for step 1;
# imm-ab: optimizer_step.py's z1 against z1-noimm, then the fast engine at ZeRO-1 and
# --compile-decode off with bf16.immediate_grad_update (as it ships), off (a copy of dschat_cli
# without it), then on again.
# Each part's output and JSON go to OUT_DIR/PART.txt and OUT_DIR/PART.json, wall times to
# OUT_DIR/walls.txt. The first bench compiles DeepSpeed's FusedAdam (~1 min, cached for the rest).
# The device tool brings back at most 8 files: write OUT outside $OUT and end the call with
# `tar czf $OUT/issue18.tgz -C OUT .` (each part leaves a .txt and a .json).
# Split the parts over device calls of at most 10 minutes (e.g. "ppo" alone: its larger batch,
# trained in mini-batches, runs ~100 s more than the first; then "sft,dpo", then "grpo", then
# "decode"); each part has a time limit that keeps such a pair under 9 minutes.
set -u
out=${1:?usage: issue18_h200.sh OUT_DIR [PARTS]}
parts=${2:-ppo,sft,dpo,grpo,decode}
mkdir -p "$out"
export HF_HUB_OFFLINE=1

source "$(dirname "$0")/timed.sh"  # timed NAME LIMIT_S CMD...

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
for part in ${parts//,/ }; do
  case $part in
    ppo)  timed ppo 560 python3 -m dschat_cli bench --json "$out/ppo.json" --output-dir /tmp/b-ppo ;;
    sft)  timed sft 210 python3 -m dschat_cli bench --step sft --json "$out/sft.json" --output-dir /tmp/b-sft ;;
    dpo)  timed dpo 200 python3 -m dschat_cli bench --step dpo --json "$out/dpo.json" --output-dir /tmp/b-dpo ;;
    grpo|rloo)
          timed "$part" 300 python3 -m dschat_cli bench --advantage-estimator "$part" \
            --generation-engine fast --json "$out/$part.json" --output-dir "/tmp/b-$part" ;;
    compile-ab)
          for run in off1:off auto:auto off2:off; do
            timed "ab-${run%%:*}" 240 python3 -m dschat_cli bench --generation-engine fast \
              --batch-size "${AB_BATCH:-64}" --compile-decode "${run#*:}" \
              --json "$out/ab-${run%%:*}.json" --output-dir "/tmp/b-ab-${run%%:*}"
          done ;;
    zero-ab|sft-zero-ab)
          step=$([ "$part" = sft-zero-ab ] && echo "--step sft" || echo "--generation-engine fast")
          for run in z0a:0 chosen: z0b:0; do
            name="${part%-ab}-${run%%:*}" stage=${run#*:}
            timed "$name" 200 python3 -m dschat_cli bench $step --batch-size "${AB_BATCH:-64}" \
              ${stage:+--actor-zero-stage $stage} \
              $([ -n "$stage" ] && [ "$part" = zero-ab ] && echo "--critic-zero-stage $stage") \
              --json "$out/$name.json" --output-dir "/tmp/b-$name"
          done ;;
    imm-ab)
          timed imm-probe 200 python3 "$(dirname "$0")/optimizer_step.py" z1,z1-noimm
          rm -rf /tmp/noimm && mkdir -p /tmp/noimm && cp -r dschat_cli /tmp/noimm/
          sed -i '/"immediate_grad_update"\] = True/d' /tmp/noimm/dschat_cli/config/ds_config.py
          for run in imm1:. noimm:/tmp/noimm imm2:.; do
            name="imm-${run%%:*}"
            (cd "${run#*:}" && timed "$name" 200 python3 -m dschat_cli bench \
              --generation-engine fast --compile-decode off --batch-size "${AB_BATCH:-48}" \
              --actor-zero-stage 1 --critic-zero-stage 1 --json "$out/$name.json" \
              --output-dir "/tmp/b-$name")
          done ;;
    decode)
          timed decode 300 python3 benchmarks/decode_profile.py opt-1.3b 64 256 256 graph,profile,compile ;;
    *) echo "unknown part: $part" >&2; exit 2 ;;
  esac
done
cat "$out/walls.txt"

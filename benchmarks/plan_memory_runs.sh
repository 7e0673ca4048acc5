#!/usr/bin/env bash
# Measure the peak GPU memory of a few step configurations and compare it with `dschat plan`'s
# estimate (benchmarks/plan_vs_peak.py). Needs one GPU; about 6 minutes for all runs on an H200.
#
#   bash benchmarks/plan_memory_runs.sh WORK_DIR [RUN ...]     # RUN: names below; default all
#
# Every run uses random weights of the real architecture (--random-init; the architecture, not
# the weights, sets the memory), sequences filled to their maximum length
# (benchmarks/make_long_pairs.py), runs in this process (--launcher none) for a few steps and
# records peak_memory_gib in its train_summary.json. The comparison is printed at the end and
# written to WORK_DIR/plan_vs_peak.json.
set -uo pipefail
work=${1:?usage: plan_memory_runs.sh WORK_DIR [RUN ...]}
shift
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$work"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
py=${PYTHON:-python3}

[ -f "$work/lp/train.json" ] || $py "$here/make_long_pairs.py" "$work/lp" 400 >/dev/null
[ -f "$work/lpp/train.json" ] || $py "$here/make_long_pairs.py" "$work/lpp" 400 50 256 >/dev/null
# A ~1B Llama and a GPT-2 medium with the locally built tokenizer: other families' activations.
$py - "$work" <<'EOF'
import json, sys
from pathlib import Path
from dschat_cli.models.local_tokenizer import build_local_tokenizer
work = Path(sys.argv[1])
models = {
    "llama-1b": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048,
                 "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 16,
                 "num_key_value_heads": 16, "vocab_size": 32000, "max_position_embeddings": 2048,
                 "tie_word_embeddings": False},
    "gpt2-medium": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 1024,
                    "n_layer": 24, "n_head": 16, "n_positions": 1024, "vocab_size": 50257},
}
for name, cfg in models.items():
    d = work / name
    if not (d / "config.json").is_file():
        d.mkdir(parents=True, exist_ok=True)
        tok = build_local_tokenizer(vocab_size=4096)
        tok.save_pretrained(d)
        ids = {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        cfg.update({k: v if v is not None else tok.eos_token_id for k, v in ids.items()})
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
EOF

sft() {  # NAME MODEL FLAGS...
  local name=$1 model=$2; shift 2
  $py -m dschat_cli sft --model "$model" --random-init --data-path local/jsonfile \
    --data-dir "$work/lp" --data-split 10,0,0 --max-seq-len 512 --num-train-epochs 1 \
    --max-eval-samples 16 --max-steps 3 --launcher none --overwrite --output-dir "$work/runs/$name" "$@"
}
reward() {
  local name=$1 model=$2; shift 2
  $py -m dschat_cli reward --model "$model" --random-init --data-path local/jsonfile \
    --data-dir "$work/lp" --data-split 0,10,0 --max-seq-len 512 --max-eval-samples 16 \
    --max-steps 3 --launcher none --overwrite --output-dir "$work/runs/$name" "$@"
}
ppo() {
  local name=$1; shift
  $py -m dschat_cli ppo --actor-model opt-1.3b --actor-random-init --critic-model opt-350m \
    --critic-random-init --data-path local/jsonfile --data-dir "$work/lpp" --data-split 0,0,10 \
    --max-prompt-seq-len 256 --max-answer-seq-len 256 --max-eval-samples 1 --test-stop-step 2 \
    --num-warmup-steps 0 --launcher none --overwrite --output-dir "$work/runs/$name" "$@"
}

run() {
  case $1 in
    sft_opt1.3b_z0_b16) sft "$1" opt-1.3b --zero-stage 0 --per-device-train-batch-size 16 ;;
    sft_opt1.3b_z2_b32) sft "$1" opt-1.3b --zero-stage 2 --per-device-train-batch-size 32 ;;
    sft_opt1.3b_z3_b16_gc) sft "$1" opt-1.3b --zero-stage 3 --per-device-train-batch-size 16 \
                             --gradient-checkpointing ;;
    sft_opt1.3b_z2_b16_lora) sft "$1" opt-1.3b --zero-stage 2 --per-device-train-batch-size 16 \
                               --lora-dim 128 --only-optimize-lora ;;
    sft_llama1b_z0_b8) sft "$1" "$work/llama-1b" --zero-stage 0 --per-device-train-batch-size 8 ;;
    sft_gpt2m_z2_b16) sft "$1" "$work/gpt2-medium" --zero-stage 2 --per-device-train-batch-size 16 ;;
    reward_opt350m_z0_b16) reward "$1" opt-350m --zero-stage 0 --per-device-train-batch-size 16 ;;
    ppo_z2_b32) ppo "$1" --actor-zero-stage 2 --critic-zero-stage 2 \
                  --per-device-generation-batch-size 32 --per-device-training-batch-size 32 ;;
    ppo_z0_g16_t8) ppo "$1" --actor-zero-stage 0 --critic-zero-stage 0 \
                     --per-device-generation-batch-size 16 --per-device-training-batch-size 8 ;;
    ppo_z2_b32_hf) ppo "$1" --actor-zero-stage 2 --critic-zero-stage 2 --generation-engine hf \
                     --per-device-generation-batch-size 32 --per-device-training-batch-size 32 ;;
    ppo_z0_g16_t8_hf) ppo "$1" --actor-zero-stage 0 --critic-zero-stage 0 --generation-engine hf \
                        --per-device-generation-batch-size 16 --per-device-training-batch-size 8 ;;
    *) echo "unknown run $1"; return 2 ;;
  esac
}

all=(sft_opt1.3b_z0_b16 sft_opt1.3b_z2_b32 sft_opt1.3b_z3_b16_gc sft_opt1.3b_z2_b16_lora
     reward_opt350m_z0_b16 ppo_z2_b32 ppo_z0_g16_t8 ppo_z2_b32_hf ppo_z0_g16_t8_hf
     sft_llama1b_z0_b8 sft_gpt2m_z2_b16)
runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=("${all[@]}")
done_dirs=()
for r in "${runs[@]}"; do
  echo "=== $r"
  start=$SECONDS
  if run "$r" > "$work/$r.log" 2>&1; then
    done_dirs+=("$work/runs/$r")
    echo "ok in $((SECONDS - start)) s"
  else
    echo "FAILED after $((SECONDS - start)) s; last lines of $work/$r.log:"; tail -n 15 "$work/$r.log"
  fi
done
[ ${#done_dirs[@]} -gt 0 ] && $py "$here/plan_vs_peak.py" "${done_dirs[@]}" --json "$work/plan_vs_peak.json"

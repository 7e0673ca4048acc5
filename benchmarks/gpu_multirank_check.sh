#!/usr/bin/env bash
# Issue 8's multi-GPU checks beyond step 3's benchmark, on one multi-GPU host:
#   bash benchmarks/gpu_multirank_check.sh OUT_DIR [GPUS]      (from the repository root)
# 1. all three steps through `dschat pipeline --demo` on GPUS GPUs (data parallel, actor ZeRO-3,
#    reward/critic ZeRO-2): global batch = 16 x GPUS, one set of outputs and log lines (rank 0);
# 2. one rank dies mid-training (rank 1 exits abruptly, as on a GPU fault): every rank stops, the
#    launcher exits non-zero, no worker is left holding a GPU.
set -u
out=${1:?usage: gpu_multirank_check.sh OUT_DIR [GPUS]}
gpus=${2:-4}
mkdir -p "$out"
work=$(mktemp -d)
t0=$SECONDS
timeout --kill-after=20 "${LIMIT_PIPELINE:-420}" dschat pipeline --demo --deployment-type single_node \
  --num-gpus "$gpus" --actor-zero-stage 3 --reward-zero-stage 2 --min-reward-accuracy 0 \
  --output-dir "$work/demo" > "$out/pipeline.txt" 2>&1
echo "pipeline: exit $?, wall $((SECONDS - t0)) s" | tee -a "$out/walls.txt"
cp "$work/demo/summary.md" "$work/demo/summary.json" "$out/" 2>/dev/null
for d in actor-models reward-models step3-models; do
  for f in "$work"/demo/$d/*/metrics.jsonl "$work"/demo/$d/*/run_config.yaml \
           "$work"/demo/$d/*/ds_config*.json; do
    [ -f "$f" ] && cp "$f" "$out/$d.$(basename "$f")"
  done
done
# rank 1 dies once rank 0 has logged a training step (tests/hooks/rank_dies explains the hook)
hook="$PWD/tests/hooks/rank_dies"
t0=$SECONDS
DSCHAT_TEST_DIE_WHEN="$work/die/metrics.jsonl" PYTHONPATH="$hook:${PYTHONPATH:-}" \
  timeout --kill-after=20 "${LIMIT_DIE:-300}" dschat sft --model "$work/demo/demo-base" --data-path local/jsonfile \
  --data-dir "$work/demo/demo-data" --data-split 10,0,0 --output-dir "$work/die" \
  --num-train-epochs 200 --per-device-train-batch-size 8 --max-seq-len 128 --zero-stage 3 \
  --deployment-type single_node --num-gpus "$gpus" > "$out/rank_dies.txt" 2>&1
echo "rank_dies: exit $?, wall $((SECONDS - t0)) s" | tee -a "$out/walls.txt"
sleep 3
{ echo "workers left: $(pgrep -f dschat_cli.worker | wc -l)";
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv; } | tee "$out/after_failure.txt"

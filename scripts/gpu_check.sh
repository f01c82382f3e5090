#!/usr/bin/env bash
# KTO at length on one NVIDIA GPU: a randomly initialised ~1B-parameter Llama (built from a config,
# no download; SmolLM2's 49,152-token vocabulary), bf16, batch 8, at 512 and 2,048 tokens per
# sequence. For each of kto-train's row layouts and TRL's KTOTrainer (with and without precomputed
# reference log-probs), each in its own process (scripts/bench_long.py): step time, tokens/s, peak
# GPU memory and model FLOPs utilisation, one table.
#
#     bash scripts/setup.sh && pip install trl==1.16.0 && bash scripts/gpu_check.sh    # aimed at < 8 min
#     DRY=1 bash scripts/gpu_check.sh       # the same commands on CPU: the 2-layer model, 64 and 128 tokens
#     ZERO=1 bash scripts/gpu_check.sh      # then kto-train under DeepSpeed ZeRO-2 and ZeRO-3 as well
#
# MFU counts 6N FLOPs per policy token (forward + backward) and 2N per KL token (forward only, the
# same number of tokens), N = parameters, over the GPU's dense bf16 peak (PEAK_TFLOPS, 989 for
# H100/H200 SXM); attention FLOPs are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-4}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
OUT=${OUT:-$(mktemp -d)}
if [ -n "${DRY:-}" ]; then
  MODEL=()
  RUNS=(tiny_smollm2:64 tiny_smollm2:128)
  STEPS=2
  export CUDA_VISIBLE_DEVICES=""
else
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  MODEL=(model.tiny.hidden_size=2048 model.tiny.num_layers=16 model.tiny.num_heads=16 model.tiny.intermediate_size=5632
         model.tiny.max_position_embeddings=4096)
  RUNS=(tiny_smollm2:512 tiny_smollm2:2048)
fi
python3 scripts/bench_long.py --runs "${RUNS[@]}" --steps "$STEPS" --peak-tflops "$PEAK_TFLOPS" --set "${MODEL[@]}"

[ -n "${ZERO:-}" ] || exit 0
for stage in zero2 zero3; do
  launcher=(deepspeed --num_gpus 1 --master_port 29650)
  [ -n "${DRY:-}" ] && launcher=(env DS_ACCELERATOR=cpu deepspeed --num_gpus 1 --master_port 29650)
  "${launcher[@]}" "$(command -v kto-train)" model=tiny_smollm2 "${MODEL[@]}" deepspeed=$stage recipe=none \
    trainer.max_steps="$STEPS" trainer.batch_size=8 trainer.micro_batch_size=8 trainer.progress=false \
    dataset.eval=null reference.cache=off hydra.run.dir="$OUT/$stage" > "$OUT/$stage.log" 2>&1 \
    || { tail -40 "$OUT/$stage.log"; exit 1; }
  python3 - "$OUT/$stage" <<'EOF'
import json, statistics, sys
from pathlib import Path
from kto_cli.metrics import read_metrics
run = Path(sys.argv[1])
recs = read_metrics(run, "train")[1:]  # steady state: leave out the first step
summary = json.loads((run / "summary.json").read_text())
gpu = summary.get("peak_gpu_mb")
print(f"{run.name}: {statistics.median(r['tokens/s'] for r in recs):,.0f} policy tokens/s, "
      f"peak GPU memory {'-' if gpu is None else f'{gpu / 1024:.1f} GiB'}, peak RSS {summary['peak_rss_mb']:,.0f} MB")
EOF
done

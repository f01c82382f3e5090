#!/usr/bin/env bash
# KTO on one NVIDIA GPU with DeepSpeed ZeRO-2 and ZeRO-3: a randomly initialised ~1B-parameter Llama
# (built from a config, no download; SmolLM2's 49,152-token vocabulary), bf16, a few steps each.
# Prints step time, tokens/s, peak GPU memory and model FLOPs utilisation per stage.
#
#     bash scripts/setup.sh && bash scripts/gpu_check.sh            # ~5 min on an H100
#     STEPS=20 BATCH=32 bash scripts/gpu_check.sh
#
# MFU counts 6N FLOPs per policy token (forward + backward) and 2N per KL token (forward only, the
# same number of tokens), N = parameters, over the GPU's dense bf16 peak (PEAK_TFLOPS, 989 for
# H100/H200 SXM). Attention FLOPs are left out (sequences here are ~50 tokens).
set -euo pipefail
STEPS=${STEPS:-12}
BATCH=${BATCH:-32}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
OUT=${OUT:-$(mktemp -d)}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
MODEL=(model=tiny_smollm2 model.tiny.hidden_size=2048 model.tiny.num_layers=16 model.tiny.num_heads=16
       model.tiny.intermediate_size=5632)
for stage in zero2 zero3; do
  deepspeed --num_gpus 1 --master_port 29650 "$(command -v kto-train)" "${MODEL[@]}" deepspeed=$stage recipe=none \
    trainer.precision=bf16 trainer.max_steps="$STEPS" trainer.batch_size="$BATCH" \
    trainer.micro_batch_size="$BATCH" trainer.progress=false trainer.save_every=0 dataset.eval=null \
    reference.cache=off hydra.run.dir="$OUT/$stage" > "$OUT/$stage.log" 2>&1 \
    || { tail -40 "$OUT/$stage.log"; exit 1; }
done
python3 - "$OUT" "$PEAK_TFLOPS" <<'EOF'
import json, math, statistics, sys
from pathlib import Path
from safetensors import safe_open
from kto_cli.metrics import read_metrics
out, peak = Path(sys.argv[1]), float(sys.argv[2]) * 1e12
for stage in ("zero2", "zero3"):
    run = out / stage
    n = 0  # parameters, from the exported weights
    for f in (run / "final").glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    recs = read_metrics(run, "train")[2:]  # steady state: leave out the first two steps
    times = [b["time"] - a["time"] for a, b in zip(recs, recs[1:])]
    tok_s = statistics.median(r["tokens/s"] for r in recs)
    summary = json.loads((run / "summary.json").read_text())
    mfu = 8 * n * tok_s / peak
    print(f"{stage}: {n / 1e9:.2f}B params, step {statistics.median(times):.3f} s, {tok_s:,.0f} policy tokens/s, "
          f"peak GPU memory {summary['peak_gpu_mb'] / 1024:.1f} GiB, MFU {100 * mfu:.1f}%")
EOF

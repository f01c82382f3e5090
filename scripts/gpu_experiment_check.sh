#!/usr/bin/env bash
# What the paper-claims experiment (kto-experiment paper_claims) costs per run on one GPU at ~1B and
# ~7B parameters, and that it runs there unchanged. Randomly initialised Llamas of those sizes (built
# from a config, no download) with SmolLM2's tokenizer, under the experiment's own overrides: the
# SFT arm's run (40 steps), a KTO and a DPO arm's run (32 steps), each scored on arith_test (400
# questions: log-probs and greedy answers), and the 200-question validation scoring of the KTO
# model. Random weights never stop early, so their answers run to the spec's token limit: generation
# times are upper bounds. First, the experiment end to end (2 seeds, 4 steps a run) on a 2-layer model.
#
#     TOKENIZER=RUN/final bash scripts/gpu_experiment_check.sh     # any folder with SmolLM2's tokenizer
#     SHAPES=1b ARMS_1b="kto dpo" TOKENIZER=RUN/final bash scripts/gpu_experiment_check.sh
set -euo pipefail
TOKENIZER=${TOKENIZER:?a folder holding SmolLM2's tokenizer, e.g. a kto-train run\'s final/}
SHAPES=${SHAPES:-"1b 7b"}
OUT=${OUT:-$(mktemp -d)}    # results
RUNS=${RUNS:-$(mktemp -d)}  # run dirs (a 7B run's final/ is 27 GB)
mkdir -p "$OUT" "$RUNS"
export KTO_CLI_CACHE=$RUNS/cache
MODEL=(model=tiny_smollm2 model.name_or_path="$TOKENIZER" model.gguf_file=null trainer.progress=false)
# the spec's own overrides and validation ones, so the runs here are the experiment's
EXP=($(python3 -c "from kto_cli.experiment import load_spec; print(' '.join(load_spec('paper_claims').overrides))"))
VALIDATION=($(python3 -c "from kto_cli.experiment import load_spec; print(' '.join(load_spec('paper_claims').validation))"))
shape() {
  case $1 in
    1b) echo model.tiny.hidden_size=2048 model.tiny.num_layers=16 model.tiny.num_heads=16 model.tiny.intermediate_size=5632 ;;
    7b) echo model.tiny.hidden_size=4096 model.tiny.num_layers=32 model.tiny.num_heads=32 model.tiny.intermediate_size=11008 ;;
    test) echo model.tiny.hidden_size=64 model.tiny.num_layers=2 model.tiny.num_heads=4 model.tiny.intermediate_size=128 ;;
  esac
}
train() {  # name overrides...
  local name=$1; shift
  kto-train "${MODEL[@]}" "${EXP[@]}" "$@" hydra.run.dir="$RUNS/$name" > "$RUNS/$name.log" 2>&1 \
    || { tail -30 "$RUNS/$name.log"; return 1; }
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

if [ "${SMOKE:-1}" = 1 ]; then  # SMOKE=0 leaves it out
  start=$(date +%s)
  kto-experiment paper_claims --out "$RUNS/exp" --seeds 0,1 "${MODEL[@]}" trainer.max_steps=4 \
    dataset.max_eval_rows=32 eval.max_prompts=16 > "$RUNS/exp.log" 2>&1 || { tail -30 "$RUNS/exp.log"; exit 1; }
  echo "experiment end to end (2-layer model, 2 seeds, 4 steps a run): $(( $(date +%s) - start )) s" | tee "$OUT/per_run.txt"
  cp "$RUNS/exp/report.md" "$OUT/experiment_report.md"
fi
report() {  # one line per finished run, as soon as it finishes
  python3 - "$RUNS/$1" "$1" <<'EOF' | tee -a "$OUT/per_run.txt"
import json, sys
from pathlib import Path
run, name = Path(sys.argv[1]), sys.argv[2]
s = json.loads((run / "summary.json").read_text())
val = run / "validation" / "seconds"
extra = f", validation scoring (200 questions) {float(val.read_text()):.0f} s" if val.is_file() else ""
print(f"{name}: {s['steps']} steps, run {s['wall_seconds']:.0f} s (reference pass {s['reference_seconds']:.0f} s, "
      f"steps {s['train_seconds']:.0f} s; the rest: loading, held-out scoring, export), peak GPU memory "
      f"{(s['peak_gpu_mb'] or 0) / 1024:.1f} GiB, peak RSS {s['peak_rss_mb'] / 1024:.1f} GiB{extra}")
EOF
}
for s in $SHAPES; do
  arms=ARMS_$s
  for arm in ${!arms:-sft kto dpo}; do
    steps=32; [ "$arm" = sft ] && steps=40
    train "$s-$arm" $(shape "$s") loss=$arm trainer.max_steps=$steps
    if [ "$arm" = kto ]; then
      start=$(date +%s)
      kto-eval "${MODEL[@]}" "${EXP[@]}" $(shape "$s") "${VALIDATION[@]}" \
        eval.model="$RUNS/$s-kto/final" hydra.run.dir="$RUNS/$s-kto/validation" > "$RUNS/$s-kto-val.log" 2>&1
      echo $(( $(date +%s) - start )) > "$RUNS/$s-kto/validation/seconds"
    fi
    rm -rf "$RUNS/$s-$arm/final"
    report "$s-$arm"
  done
done

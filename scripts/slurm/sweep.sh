#!/usr/bin/env bash
# A beta x lambda_D sweep on Slurm as one job array: one point per array task, every point its own
# run dir, all points sharing the reference cache (the first to start computes it, the others wait
# for it and read it).
#
#   bash scripts/slurm/sweep.sh "0.05 0.1 0.5" "1 1.33" --partition gpu --account myproj -- model=llama7b deepspeed=zero3
#
# Arguments: the betas, the lambda_D values, sbatch options, then -- and kto-train overrides for
# every point. SWEEP_DIR (default sweeps/<date-time>) holds one run dir per point; afterwards
#   kto-sweep-report SWEEP_DIR
# writes the table and the plot. (Hydra multirun with hydra/launcher=slurm does the same through
# submitit; this script is for clusters where you would rather submit with sbatch yourself.)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
read -r -a betas <<< "$1"
read -r -a weights <<< "$2"
shift 2
sbatch_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do sbatch_args+=("$1"); shift; done
[ $# -gt 0 ] && shift
SWEEP_DIR=${SWEEP_DIR:-sweeps/$(date +%Y-%m-%d_%H-%M-%S)}
mkdir -p "$SWEEP_DIR"
points="$SWEEP_DIR/points.txt"
: > "$points"
for b in "${betas[@]}"; do
  for w in "${weights[@]}"; do echo "loss.beta=$b loss.desirable_weight=$w" >> "$points"; done
done
n=$(wc -l < "$points")
# each array task reads its line; its run dir is SWEEP_DIR/<task id>, the same after a requeue
sbatch --array=0-$((n - 1)) "${sbatch_args[@]}" --export=ALL,SWEEP_DIR="$SWEEP_DIR",KTO_SLURM_DIR="$here" \
  --output="$SWEEP_DIR/slurm-%A_%a.out" "$here/sweep_point.sbatch" "$@"
echo "submitted $n points; run dirs under $SWEEP_DIR"

#!/usr/bin/env bash
# Ends the runs in gpu_runs/ at their last checkpoint (lopt train --resume --steps LAST exports the best held-out
# optimizer), then compares each with tuned baselines (lopt compare). Usage: scripts/finish_networks_gpu.sh NAME:TASK...
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
lopt() { python -c 'import sys; from lopt.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }
for spec in "$@"; do
  IFS=: read -r name task <<<"$spec"
  last=$(ls "gpu_runs/$name/checkpoints" | sort | tail -1 | sed 's/step_0*//; s/.safetensors//')
  (lopt train "$task" --out "gpu_runs/$name" --resume --steps "$last" &&
   XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 lopt compare "gpu_runs/$name") >>"gpu_runs/$name.compare.log" 2>&1 &
done
wait
for spec in "$@"; do tail -n 12 "gpu_runs/${spec%%:*}.compare.log"; done
tar czf "${OUT:-/tmp/out}/gpu_runs.tgz" gpu_runs

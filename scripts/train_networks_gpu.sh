#!/usr/bin/env bash
# Meta-trains the network-task optimizers on one GPU in time-limited calls (issue 4): every call resumes the runs
# in gpu_runs/ (lopt train --resume), trains until SECONDS have passed, and leaves the run directories tarred in
# $OUT for the next call to carry back. Usage: scripts/train_networks_gpu.sh SECONDS NAME:TASK:FRACTION:OPTIONS...
# where OPTIONS are `lopt train` options joined by commas, e.g. two_moons_256:two_moons:0.3:--hidden-size=256.
set -u
seconds=$1; shift
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
mkdir -p gpu_runs "${OUT:-/tmp/out}"
for spec in "$@"; do
  IFS=: read -r name task fraction options <<<"$spec"
  resume=""; [ -f "gpu_runs/$name/config.json" ] && resume="--resume"
  XLA_PYTHON_CLIENT_MEM_FRACTION=$fraction timeout -s INT "$seconds" \
    python -c 'import sys; from lopt.cli import main; sys.exit(main(sys.argv[1:]))' \
    train "$task" --out "gpu_runs/$name" $resume ${options//,/ } >>"gpu_runs/$name.log" 2>&1 &
done
wait
for spec in "$@"; do name=${spec%%:*}; tail -c 1500 "gpu_runs/$name.log"; echo; done
tar czf "${OUT:-/tmp/out}/gpu_runs.tgz" gpu_runs

#!/usr/bin/env bash
# Meta-trains the general-purpose optimizers on the H200 (one GPU), resumably, within one device call:
#   bash scripts/train_general_gpu.sh SECONDS [INIT_FROM]
# Runs `hierarchical` and `mlp` side by side (each on about 45% of the GPU's memory) with NRES on all six task
# families, each stopped after SECONDS (SIGTERM: the run keeps its last checkpoint and its best exported optimizer),
# and leaves each run directory, without its checkpoints (hundreds of MB of inner states), as a tarball in $OUT.
# A later session continues from the exported optimizer with INIT_FROM (a warm start: fresh inner problems).
set -u
seconds=${1:-480}
init_hier=${2:-}
export PYTHONPATH=src PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
lopt() { python3 -c 'import sys; from lopt.cli import main; sys.exit(main())' "$@"; }
common=(--task-family all --estimator nres --truncation 50 --meta-batch-size 256 --num-particles 1
        --task-option num_groups=8 --task-option max_step_flops=2e7 --clip-value 0.1 --decay-steps 2000
        --steps 100000 --eval-every 25 --eval-problems 64 --checkpoint-every 25 --log-every 5)
hier=(--optimizer hierarchical --learning-rate 1e-3 --seed 1 --out runs/general-hier-h200-1)
[ -n "$init_hier" ] && hier+=(--init-from "$init_hier")
timeout -s TERM "$seconds" bash -c "$(declare -f lopt); lopt train ${common[*]} ${hier[*]}" > "$OUT/hier.log" 2>&1 &
timeout -s TERM "$seconds" bash -c "$(declare -f lopt); lopt train ${common[*]} --optimizer mlp --learning-rate 3e-3 --seed 1 --out runs/general-mlp-h200-2" > "$OUT/mlp.log" 2>&1 &
wait
for run in general-hier-h200-1 general-mlp-h200-2; do
  [ -d "runs/$run" ] && tar -czf "$OUT/$run.tar.gz" --exclude=checkpoints -C runs "$run"
done
tail -n 3 "$OUT"/*.log

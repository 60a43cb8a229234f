#!/usr/bin/env bash
# Meta-trains the general-purpose optimizer on the H200 (one GPU), resumably across device calls:
#   bash scripts/train_general_gpu.sh SECONDS ARCHITECTURE [INIT_FROM]
# Environment: STEPS (stop and export at this outer step), NAME (run name suffix), PROBLEMS (meta-batch, 256),
# SIGMA (0.01), LR (outer Adam), TRAINABLE (key-path prefixes), FAMILIES (--task-family, all; e.g.
# all,ill_conditioned_regression for an opt-in family too), EVAL_HORIZON (held-out unrolls, 200), VALID_WITHHELD
# (fraction of problems never fed a validation loss, 0), BATCH_NOISE (1: training problems draw a batch_fraction,
# the share of each minibatch their loss counts, for gradient noise beyond the batch sizes; unset: off), OBJECTIVE
# (the meta-objective's loss: train, the default, or valid), NUM_GROUPS (shape groups, 6), MAX_STEP_FLOPS (the
# largest inner step sampled, 2e7), CHECKPOINT_EVERY (outer steps, 25; a checkpoint is also written at SIGINT),
# SEED (1; it picks the shapes drawn), PARAM_SCALE_PROBABILITY (the share of training problems with an augmented
# parameter scale, 0.5), OPTIMIZER_OPTIONS (space-separated KEY=VALUE fields of the architecture, e.g.
# direct_step=true; with INIT_FROM, fields added since the trained one was saved start at zero), EVALUATE (1: once
# the run has exported its optimizer, the same call runs `lopt benchmark general <it> --quick` and
# benchmarks/general_family_problems.py with it as a candidate on the GPU, results in $OUT/RUN-benchmark-quick.json and
# $OUT/RUN-family-problems.json; this comes after SECONDS: leave it room), META_LOSS (mean, the default, or log_mean: the
# mean of the log normalized losses, which weighs a problem's relative progress the same whatever its loss level),
# GPU (the CUDA device to run on, so that two runs share a two-GPU machine), CACHE_TARBALL (0: do not return the
# compilation cache; a pair of runs returns it once, after both), REFERENCES (a JSON list of Adam learning rates, e.g.
# [0.001,0.01,0.1]: each problem also runs Adam at those rates and the estimate weighs it by 1 / the best one's
# meta-loss, an objective relative to a tuned Adam; unset: off), PARAM_SCALE_RANGE (a JSON [low,high] of the
# augmented parameter scales, default [0.1,10]; [1,10] draws only problems that want larger steps), BATCH_SIZE_RANGE
# (a JSON [low,high] of the training shapes' batch sizes, default the families' own; [64,512] draws low-noise ones),
# INIT_SCALE_RANGE (a JSON [low,high] of the initialization scales, default [0.5,2]; below 1: starts near a saddle),
# DISTANCE_SCALE_RANGE (a JSON [low,high]: a share of the training problems' solutions lie d times farther from their
# start, d log-uniform there, with nothing at the start to tell; unset: off), DISTANCE_SCALE_PROBABILITY (that share,
# 0.5), ESTIMATOR (nres, the default; pes, es, mixed: Metz 2019's per-coordinate mix of backpropagation through
# each truncation and ES, whose gradient has every meta-parameter's dimension, and takes no REFERENCES; or tbptt:
# backpropagation through each truncation, which takes REFERENCES and step_calibration but no SIGMA), TRUNCATION
# (inner steps per estimate, 50),
# ESTIMATOR_OPTIONS (space-separated KEY=VALUE fields of the estimator, e.g. remat=true), MLP_FORM (how `hierarchical`
# writes its per-coordinate MLP while meta-training, LOPT_JAX_MLP_FORM: matrix, the default here, or auto, the GPU's
# unit-by-unit form; matrix has less than half the equations to trace and compile at every start, docs/SCALING.md).
# Runs gpu_runs/general-ARCHITECTURE-h200 (ignored by git, so it stays on a warm device machine between calls) with
# NRES (or ESTIMATOR) on all six task families: the first call starts it (from INIT_FROM's meta-parameters when
# given), later calls resume it exactly. After SECONDS it gets SIGINT and writes a checkpoint and the best optimizer
# so far (in the run's optimizer/, which comes back with the tarball; the run's export at STEPS replaces it).
# The run directory without its checkpoints (hundreds of MB of inner-problem states) comes back as a tarball in $OUT;
# it holds meta_checkpoint.safetensors (theta, the outer optimizer's state, counters): committed as runs/RUN, it lets
# a later session's fresh machine continue the run (the script copies runs/RUN into gpu_runs/ when the machine has no
# copy of its own; the inner problems then start new episodes, lopt says so).
# Compilations are cached in gpu_runs/jax_cache, so a resumed call does not compile again. The cache also comes back
# as $OUT/jax_cache.tar.gz (11-14 MB): unpacked into gpu_runs/ here (`tar -xzf jax_cache.tar.gz -C gpu_runs`) and
# named in the device call's `carry` (["gpu_runs/jax_cache"]), it spares a fresh machine of the same kind its
# compilation when the run compiles the same programs (same SEED, NUM_GROUPS, PROBLEMS, MAX_STEP_FLOPS and
# architecture): session 11's first outer step came after 42 s instead of 196 s. An 8-group run's cache is larger
# than the 16 MiB a device call returns (session 23): it stays on the machine, where a call on the still-warm
# machine reuses it; CACHE_TARBALL=0 skips the tarball.
set -u
seconds=${1:-480}
arch=${2:-hierarchical}
init=${3:-}
export PYTHONPATH=src PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=gpu_runs/jax_cache
# every program cached, the small ones too (by default those under 1 s are compiled again at every start)
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
run=gpu_runs/general-$arch-h200${NAME:+-$NAME}
args=(--task-family "${FAMILIES:-all}" --estimator "${ESTIMATOR:-nres}" --truncation "${TRUNCATION:-50}"
      --meta-batch-size "${PROBLEMS:-256}" --task-option "eval_horizon=${EVAL_HORIZON:-200}"
      --estimator-option "valid_withheld=${VALID_WITHHELD:-0}" --estimator-option "objective=${OBJECTIVE:-train}"
      --meta-loss "${META_LOSS:-mean}"
      --task-option num_groups="${NUM_GROUPS:-6}" --task-option max_step_flops="${MAX_STEP_FLOPS:-2e7}"
      --clip-value 0.1 --decay-steps 2000 --steps "${STEPS:-100000}" --eval-every 25 --eval-problems 64
      --checkpoint-every "${CHECKPOINT_EVERY:-25}" --log-every 5
      --optimizer "$arch" --seed "${SEED:-1}" --out "$run")
# tbptt perturbs nothing: it has no particles and no sigma
[ "${ESTIMATOR:-nres}" != tbptt ] && args+=(--num-particles 1 --sigma "${SIGMA:-0.01}")
case $arch in hierarchical) args+=(--learning-rate "${LR:-1e-3}");; *) args+=(--learning-rate "${LR:-3e-3}");; esac
[ -n "${TRAINABLE:-}" ] && args+=(--trainable "$TRAINABLE")
for option in ${OPTIMIZER_OPTIONS:-}; do args+=(--optimizer-option "$option"); done
for option in ${ESTIMATOR_OPTIONS:-}; do args+=(--estimator-option "$option"); done
[ "${BATCH_NOISE:-0}" = 1 ] && args+=(--task-option batch_noise=true)
[ -n "${REFERENCES:-}" ] && args+=(--estimator-option "reference_learning_rates=$REFERENCES")
[ -n "${PARAM_SCALE_RANGE:-}" ] && args+=(--task-option "param_scale_range=$PARAM_SCALE_RANGE")
[ -n "${INIT_SCALE_RANGE:-}" ] && args+=(--task-option "init_scale_range=$INIT_SCALE_RANGE")
[ -n "${DISTANCE_SCALE_RANGE:-}" ] && args+=(--task-option "distance_scale_range=$DISTANCE_SCALE_RANGE")
[ -n "${DISTANCE_SCALE_PROBABILITY:-}" ] && args+=(--task-option \
  "distance_scale_probability=$DISTANCE_SCALE_PROBABILITY")
[ -n "${BATCH_SIZE_RANGE:-}" ] && args+=(--task-option "batch_size_range=$BATCH_SIZE_RANGE")
[ -n "${PARAM_SCALE_PROBABILITY:-}" ] && args+=(--task-option "param_scale_probability=$PARAM_SCALE_PROBABILITY")
if [ ! -f "$run/config.json" ] && [ -f "runs/$(basename "$run")/meta_checkpoint.safetensors" ]; then
  mkdir -p gpu_runs && cp -r "runs/$(basename "$run")" "$run"  # a run committed by an earlier session continues
fi
if [ -f "$run/config.json" ]; then
  args=(--resume --out "$run" --steps "${STEPS:-100000}")
elif [ -n "$init" ]; then
  args+=(--init-from "$init")
fi
[ -n "${GPU:-}" ] && export CUDA_VISIBLE_DEVICES=$GPU
log="$OUT/$(basename "$run").log"
mkdir -p gpu_runs
LOPT_JAX_MLP_FORM=${MLP_FORM:-matrix} timeout -s INT -k 60 "$seconds" \
  python3 -c 'import sys; from lopt.cli import main; sys.exit(main())' train "${args[@]}" > "$log" 2>&1
tar -czf "$OUT/$(basename "$run").tar.gz" --exclude=checkpoints -C gpu_runs "$(basename "$run")"
tr '\r' '\n' < "$log" | tail -n 4
if [ "${EVALUATE:-0}" = 1 ] && [ -f "$run/optimizer/config.json" ]; then
  python3 -c 'import sys; from lopt.cli import main; sys.exit(main())' benchmark general "$run/optimizer" --quick \
    --out "$run-benchmark-quick" > "$OUT/$(basename "$run")-benchmark-quick.log" 2>&1
  cp "$run-benchmark-quick/benchmark.json" "$OUT/$(basename "$run")-benchmark-quick.json"
  python3 benchmarks/general_family_problems.py --candidate "$run/optimizer" \
    --out "$OUT/$(basename "$run")-family-problems.json" > "$OUT/$(basename "$run")-family-problems.log" 2>&1
  tail -n 3 "$OUT/$(basename "$run")-family-problems.log"
fi
if [ "${CACHE_TARBALL:-1}" = 1 ]; then tar -czf "$OUT/jax_cache.tar.gz" -C gpu_runs jax_cache; fi

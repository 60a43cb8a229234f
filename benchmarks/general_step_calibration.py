"""An experimental recalibration of `general`'s step size, from how its first steps relate to tuned Adam's.

`step_size_predictability.py` found that on fresh family problems `general`'s step (the RMS of its updates over the
first 20 steps) moves only 0.52 decades per decade of tuned Adam's learning rate, where tuned Adam's own step moves
0.95: too large where small rates are best, too small where large ones are. Its step still predicts the best rate
within 0.45 decades. This variant stretches it: every update is multiplied by exp((k - 1)(r - c)), r the mean over
the steps so far (frozen after the first 20) of the log RMS of `general`'s update, so that log step deviations from c
grow k-fold. Two settings from that study's 96 problems (natural logs): k 1.19, c = ln 10^-1.52 (the least-squares
prediction of tuned Adam's step from `general`'s) and k 1.83, c = ln 10^-1.86 (the two fitted lines mapped onto each
other). Not meta-trained; the constants come from the family problems, none from the benchmark.

  python benchmarks/general_step_calibration.py family [--count 24] [--seed 880000] [--out F]
  python benchmarks/general_step_calibration.py [--stretch 1.19] [--center -1.52] benchmark general --quick --out DIR

(``--center`` in log10.) The second form runs ``lopt benchmark`` with `general` wrapped; give it an ``--out``
directory of its own, or one whose cache holds only the baselines.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from general_trust_ratio import family_comparison  # this folder
from wrapped_benchmark import benchmark_wrapped  # this folder

PROBE_STEPS = 20
SETTINGS = ((1.0, -1.52), (1.19, -1.52), (1.83, -1.86))  # (stretch k, center c in log10); k 1 is the plain `general`


class CalibratedState(NamedTuple):
  inner: Any
  log_scale: jax.Array  # () the log multiplier applied to the last update
  mean_log_rms: jax.Array  # () the mean log RMS of the inner updates over the first PROBE_STEPS steps so far
  count: jax.Array      # () int32 steps seen


def calibrated(inner: optax.GradientTransformationExtraArgs, stretch=1.19, center=-1.52):
  """``inner`` with every update multiplied by exp((stretch - 1)(r - center ln 10)), r the running mean log RMS of
  the inner updates over the first PROBE_STEPS steps (then frozen)."""
  def init(params):
    zero = jnp.zeros((), jnp.float32)
    return CalibratedState(inner.init(params), zero, zero, jnp.zeros((), jnp.int32))

  def update(grads, state, params=None, **extra):
    updates, inner_state = inner.update(grads, state.inner, params, **extra)
    leaves = jax.tree.leaves(updates)
    numel = sum(u.size for u in leaves)
    rms = jnp.sqrt(sum(jnp.sum(jnp.square(u.astype(jnp.float32))) for u in leaves) / max(numel, 1))
    log_rms = jnp.log(jnp.maximum(rms, 1e-30))
    probing = (state.count < PROBE_STEPS) & jnp.isfinite(log_rms) & (rms > 0)
    mean = jnp.where(probing, state.mean_log_rms + (log_rms - state.mean_log_rms) / (state.count + 1),
                     state.mean_log_rms)
    count = state.count + probing.astype(jnp.int32)
    log_scale = jnp.where(count > 0, (stretch - 1) * (mean - center * math.log(10)), 0.0)
    log_scale = jnp.clip(log_scale, -4.6, 4.6)
    factor = jnp.exp(log_scale)
    updates = jax.tree.map(lambda u: u * factor.astype(u.dtype), updates)
    return updates, CalibratedState(inner_state, log_scale, mean, count)
  return optax.GradientTransformationExtraArgs(init, update)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["family"]:
    names = [f"k={k:g},c={c:g}" for k, c in SETTINGS]
    return family_comparison(argv[1:], calibrated, SETTINGS, names, "general_step_calibration.py family")
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--stretch", type=float, default=1.19)
  parser.add_argument("--center", type=float, default=-1.52)
  args, rest = parser.parse_known_args(argv)
  return benchmark_wrapped(lambda trained, transformation: calibrated(transformation, args.stretch, args.center),
                           f"calibrated, stretch {args.stretch:g}, center {args.center:g}", rest)


if __name__ == "__main__":
  sys.exit(main())

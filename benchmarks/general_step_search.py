"""`lopt benchmark` with `general`'s first steps grown by a doubling search on the training loss (a diagnostic).

`general` loses its near-ties in the first 5-30 steps, where its first update is a tenth of tuned Adam's on the
problems that want a large step, and no constant first step wins them all (`general_initial_log_step.py`). This
reads the first step from the problem instead: after each update u(t), the loss's actual change L(t+1) - L(t) is
compared with the change predicted to first order, g(t) . u(t). For a quadratic along u their ratio rho is 1 for a
tiny step, 1/2 at the best step along u and 0 at twice it. While the search runs, every tensor's log step is raised
by ln 2 after each update whose rho lies in (1/2, 2) (a minibatch's noise makes rho land elsewhere, which ends the
search at once); the first update outside ends it, lowering the log steps by ``--back-off`` (natural log), and so
does ``--max-doublings``. From then on the LSTM moves the log steps as in any run.

  python benchmarks/general_step_search.py [--max-doublings 6] [--back-off 0.69] benchmark general --quick --out DIR
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from general_initial_log_step import shifted  # this folder
from general_trust_ratio import predicted_change  # this folder
from wrapped_benchmark import benchmark_wrapped  # this folder


class SearchState(NamedTuple):
  inner: Any
  last_loss: jax.Array   # () L(t), NaN before the first finite loss
  predicted: jax.Array   # () g(t) . u(t) of the last update (0: none)
  searching: jax.Array   # () bool
  doublings: jax.Array   # () int32


def searched(inner: optax.GradientTransformationExtraArgs, max_doublings: int = 6,
             back_off: float = math.log(2.0)) -> optax.GradientTransformationExtraArgs:
  """``inner`` (a `hierarchical` optimizer's transformation, called with ``value=`` the training loss) with its log
  steps grown by the doubling search while it runs."""
  def init(params):
    return SearchState(inner.init(params), jnp.full((), jnp.nan, jnp.float32), jnp.zeros((), jnp.float32),
                       jnp.ones((), bool), jnp.zeros((), jnp.int32))

  def update(grads, state, params=None, value=None, **extra):
    loss = jnp.asarray(jnp.nan if value is None else value, jnp.float32)
    tested = state.searching & jnp.isfinite(loss) & jnp.isfinite(state.last_loss) & (state.predicted < 0)
    rho = (loss - state.last_loss) / jnp.where(state.predicted < 0, state.predicted, -1.0)
    passed = tested & (rho > 0.5) & (rho < 2.0)
    failed = tested & ~passed
    doublings = state.doublings + passed.astype(jnp.int32)
    shift = jnp.where(passed, math.log(2.0), jnp.where(failed, -back_off, 0.0))
    searching = state.searching & ~failed & (doublings < max_doublings)
    updates, inner_state = inner.update(grads, shifted(state.inner, shift), params, value=value, **extra)
    predicted = predicted_change(grads, updates)
    return updates, SearchState(inner_state, jnp.where(jnp.isfinite(loss), loss, state.last_loss),
                                jnp.where(jnp.isfinite(predicted), predicted, 0.0), searching, doublings)
  return optax.GradientTransformationExtraArgs(init, update)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--max-doublings", type=int, default=6)
  parser.add_argument("--back-off", type=float, default=math.log(2.0), help="natural log; 0: keep the last step")
  args, rest = parser.parse_known_args(argv)
  return benchmark_wrapped(lambda trained, inner: searched(inner, args.max_doublings, args.back_off),
                           f"step search, {args.max_doublings} doublings, back-off {args.back_off:g}", rest)


if __name__ == "__main__":
  sys.exit(main())

"""The calibration term and the meta-loss on the run's own training distribution, at general's meta-parameters and
at the pilot's export: the same estimator, initial state and keys, each theta on its own trajectories."""
import json, sys, time, numpy as np, jax
from lopt.meta.config import MetaTrainConfig
from lopt.meta import train, estimators
from lopt.trained import load
run, count = sys.argv[1], int(sys.argv[2])
config = MetaTrainConfig.from_dict(json.load(open(run + "/config.json")))
task, optimizer = train.task_from(config), train.optimizer_from(config)
estimator = train.estimator_from(config, task, optimizer)
estimate = jax.jit(estimator.estimate)
for name in ("general", run + "/optimizer"):
  theta = jax.tree.map(jax.numpy.asarray, load(name).theta)
  state = estimator.init(theta, jax.random.key(123))
  out, start = [], time.time()
  for k in range(count):
    state, _, m = estimate(theta, state, jax.random.key(1000 + k))
    out.append((float(m.meta_loss), float(m.extra["step_calibration"]), float(m.extra["step_log_gap"])))
  out = np.array(out)
  print(name, "over", count, "estimates (first 5 left out: the stagger):", "meta-loss %.4f, term %.3f +- %.3f, signed gap %+.3f"
        % (out[5:, 0].mean(), out[5:, 1].mean(), out[5:, 1].std(ddof=1) / np.sqrt(count - 5), out[5:, 2].mean()),
        "per estimate term", np.round(out[:, 1], 2).tolist(), f"({time.time() - start:.0f} s)", flush=True)

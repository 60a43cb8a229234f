"""Held-out score (the run's own held-out problems) of general and the pilot's export."""
import json, sys, numpy as np, jax
from lopt.meta.config import MetaTrainConfig
from lopt.meta import train
from lopt.trained import load
run = sys.argv[1]
config = MetaTrainConfig.from_dict(json.load(open(run + "/config.json")))
task, optimizer = train.task_from(config), train.optimizer_from(config)
eval_task, horizon = train.held_out_tasks(config, task)
evaluate = train.build_evaluator(eval_task, optimizer, horizon)
keys = train.held_out_keys(config.seed, config.num_eval_problems)
for name in ("general", run + "/optimizer"):
  scores = np.asarray(evaluate(load(name).theta, keys))
  print(name, "mean", float(np.mean(scores)), "per problem", np.round(scores, 4).tolist(), flush=True)

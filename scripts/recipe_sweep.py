"""Meta-training recipe sweep: train several configurations and report each one's held-out loss.

  python scripts/recipe_sweep.py OUT.json '{"num_steps": 1500}' '{"input_scale": 0.1}' '{"output_scale": 10}' ...

The first JSON object is the base (over the demo preset); each further one is a variant over that base. Results go
to OUT.json (one record per variant: settings, best held-out loss and step, seconds, device).
"""

import json
import sys
import time

import jax

from lopt.meta.config import PRESETS
from lopt.meta.train import meta_train


def main(out_path: str, base: str, *variants: str) -> None:
  base_config = PRESETS["demo"].replace(**json.loads(base))
  records = []
  for variant in variants or ("{}",):
    config = base_config.replace(**json.loads(variant))
    started = time.perf_counter()
    state = meta_train(config)
    records.append({"variant": json.loads(variant), "best_held_out_loss": state.best_score,
                    "best_step": state.best_step, "skipped_steps": state.skipped_steps,
                    "seconds": round(time.perf_counter() - started, 1), "device": str(jax.devices()[0]),
                    "config": config.to_dict()})
    print(json.dumps({k: records[-1][k] for k in ("variant", "best_held_out_loss", "best_step", "seconds")}),
          flush=True)
    with open(out_path, "w") as f:
      json.dump(records, f, indent=1)


if __name__ == "__main__":
  main(*sys.argv[1:])

"""The shipped `general` in PyTorch, used exactly as the README says, against torch.optim.Adam with a tuned learning
rate and at 1e-3, on PyTorch models that meta-training never saw, side by side in one run.

  python benchmarks/general_torch.py [--quick] [--device cpu|cuda] [--optimizer NAME|PATH] [--out results.json]

Seven problems built here (not lopt's JAX suite): an MLP, a CNN and an autoencoder on scikit-learn's digits, an MLP
regression on its diabetes data, logistic regression on breast cancer (convex, full batch), a GRU classifying
sequences and a one-layer transformer sorting tokens. `general` gets ``LearnedOptimizer(model.parameters(),
"general", num_steps=T)`` and ``step(loss=loss)``, with ``valid_loss=`` (the held-out split) every 10 steps. Adam's
learning rate is chosen among 9 values (1e-4..1, half decades) by the mean training loss on tuning seeds; every
optimizer is then run on other evaluation seeds. Prints the mean training loss over the run, the final loss and
their ratios to tuned Adam per problem, and the win rates; --out writes them as JSON with machine, versions, date.
``--optimizer`` puts another trained optimizer (a name or a meta-training run's exported directory) in general's
place, used the same way; the results still call it "general".
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch
from torch import nn

LEARNING_RATES = tuple(float(x) for x in 10.0 ** np.arange(-4.0, 0.01, 0.5))
TUNING_SEEDS, EVAL_SEEDS = (1000, 1001), (2000, 2001, 2002)
VALID_EVERY = 10
FINAL_FRACTION = 0.05
DIVERGENCE_FACTOR = 10.0


# -- data (all offline: scikit-learn's bundled sets or generated) -----------------------------------------------------

def _split(x: np.ndarray, y: np.ndarray, seed: int = 0, valid_fraction: float = 0.2):
  order = np.random.default_rng(seed).permutation(len(x))
  cut = int(len(x) * (1 - valid_fraction))
  return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def _standardize(train: np.ndarray, *others):
  mean, std = train.mean(0), train.std(0) + 1e-6
  return [(a - mean) / std for a in (train, *others)]


def digits():
  from sklearn.datasets import load_digits
  data = load_digits()
  (x, y), (vx, vy) = _split(data.data.astype(np.float32) / 16.0, data.target.astype(np.int64))
  return (x, y), (vx, vy)


def diabetes():
  from sklearn.datasets import load_diabetes
  data = load_diabetes()
  (x, y), (vx, vy) = _split(data.data.astype(np.float32), data.target.astype(np.float32)[:, None])
  x, vx = _standardize(x, vx)
  y, vy = _standardize(y, vy)
  return (x, y), (vx, vy)


def breast_cancer():
  from sklearn.datasets import load_breast_cancer
  data = load_breast_cancer()
  (x, y), (vx, vy) = _split(data.data.astype(np.float32), data.target.astype(np.int64))
  x, vx = _standardize(x, vx)
  return (x, y), (vx, vy)


def majority_sequences(count: int = 2000, length: int = 24, seed: int = 0):
  """Sequences of +-1 plus noise; the label says whether the first 6 entries sum to more than zero."""
  rng = np.random.default_rng(seed)
  signs = rng.choice([-1.0, 1.0], size=(count, length, 1)).astype(np.float32)
  x = signs + 0.5 * rng.normal(size=signs.shape).astype(np.float32)
  y = (signs[:, :6, 0].sum(1) > 0).astype(np.int64)
  return _split(x, y)


def sort_tokens(count: int = 4000, length: int = 8, vocab: int = 10, seed: int = 0):
  """Token sequences and their sorted versions (predict every position)."""
  rng = np.random.default_rng(seed)
  x = rng.integers(0, vocab, size=(count, length)).astype(np.int64)
  return _split(x, np.sort(x, axis=1))


# -- models ----------------------------------------------------------------------------------------------------------

class SortTransformer(nn.Module):
  def __init__(self, vocab: int = 10, length: int = 8, width: int = 32):
    super().__init__()
    self.embed, self.position = nn.Embedding(vocab, width), nn.Parameter(0.02 * torch.randn(length, width))
    layer = nn.TransformerEncoderLayer(width, 4, 64, dropout=0.0, batch_first=True)
    self.encoder, self.readout = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), nn.Linear(width, vocab)

  def forward(self, tokens):
    return self.readout(self.encoder(self.embed(tokens) + self.position))


class SequenceGRU(nn.Module):
  def __init__(self, hidden: int = 32):
    super().__init__()
    self.gru, self.readout = nn.GRU(1, hidden, batch_first=True), nn.Linear(hidden, 2)

  def forward(self, x):
    return self.readout(self.gru(x)[0][:, -1])


def cross_entropy(logits, y):
  return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def mse(prediction, target):
  return nn.functional.mse_loss(prediction, target)


class Problem:
  """A model builder, a loss, data, a batch size (None: full batch) and a horizon."""

  def __init__(self, name, build, loss, data, batch_size, horizon, reshape=None):
    self.name, self.build, self.loss, self.batch_size, self.horizon = name, build, loss, batch_size, horizon
    (x, y), (vx, vy) = data()
    if reshape is not None:
      x, vx = reshape(x), reshape(vx)
    self.train, self.valid = (torch.as_tensor(x), torch.as_tensor(y)), (torch.as_tensor(vx), torch.as_tensor(vy))


def problems() -> list[Problem]:
  image = lambda x: x.reshape(-1, 1, 8, 8)  # noqa: E731
  return [
      Problem("digits_mlp", lambda: nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
                                                  nn.Linear(128, 10)), cross_entropy, digits, 32, 500),
      Problem("digits_cnn", lambda: nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                                                  nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                                                  nn.Flatten(), nn.Linear(32 * 16, 10)),
              cross_entropy, digits, 64, 300, reshape=image),
      Problem("digits_autoencoder", lambda: nn.Sequential(nn.Linear(64, 32), nn.ELU(), nn.Linear(32, 8), nn.ELU(),
                                                          nn.Linear(8, 32), nn.ELU(), nn.Linear(32, 64)),
              lambda out, y: mse(out, y), lambda: _autoencoding(digits()), 64, 400),
      Problem("diabetes_mlp", lambda: nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                                                    nn.Linear(64, 1)), mse, diabetes, 16, 400),
      Problem("breast_cancer_logistic", lambda: nn.Linear(30, 2), cross_entropy, breast_cancer, None, 300),
      Problem("sequence_gru", SequenceGRU, cross_entropy, majority_sequences, 32, 400),
      Problem("sort_transformer", SortTransformer, cross_entropy, sort_tokens, 32, 400),
  ]


def _autoencoding(data):
  (x, _), (vx, _) = data
  return (x, x), (vx, vx)


# -- running ---------------------------------------------------------------------------------------------------------

def run(problem: Problem, optimizer_name: str, learning_rate: float | None, seed: int, horizon: int,
        device: str, learned: str = "general") -> np.ndarray:
  """(horizon,) training losses of one run; the rest NaN from the first non-finite loss on. ``optimizer_name``
  "general" runs the trained optimizer ``learned``, anything else torch's Adam at ``learning_rate``."""
  torch.manual_seed(seed)
  model = problem.build().to(device)
  x, y = (a.to(device) for a in problem.train)
  vx, vy = (a.to(device) for a in problem.valid)
  if optimizer_name == "general":
    from lopt.torch import LearnedOptimizer
    optimizer = LearnedOptimizer(model.parameters(), learned, num_steps=horizon)
  else:
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
  batches = torch.Generator().manual_seed(seed + 7)
  losses = np.full(horizon, np.nan)
  for t in range(horizon):
    if problem.batch_size is None:
      bx, by = x, y
    else:
      index = torch.randint(0, x.shape[0], (problem.batch_size,), generator=batches).to(device)
      bx, by = x[index], y[index]
    optimizer.zero_grad()
    loss = problem.loss(model(bx), by)
    loss.backward()
    value = loss.item()
    losses[t] = value
    if not math.isfinite(value):
      break
    if optimizer_name == "general":
      valid = None
      if t % VALID_EVERY == 0:
        with torch.no_grad():
          valid = float(problem.loss(model(vx), vy))
      optimizer.step(loss=value, valid_loss=valid)
    else:
      optimizer.step()
  return losses


def summarize(losses: np.ndarray) -> tuple[float, float]:
  """(mean training loss over the run, final loss over the last 5%); inf when the run diverged."""
  first = losses[0]
  if not np.all(np.isfinite(losses)) or np.max(losses) > DIVERGENCE_FACTOR * max(first, 1e-12):
    return math.inf, math.inf
  final = losses[-max(1, int(round(FINAL_FRACTION * len(losses)))):]
  return float(np.mean(losses)), float(np.mean(final))


def evaluate(problem: Problem, name: str, learning_rate, seeds, horizon: int, device: str,
             learned: str = "general") -> dict:
  runs = [summarize(run(problem, name, learning_rate, s, horizon, device, learned)) for s in seeds]
  means, finals = zip(*runs)
  return {"mean_loss": float(np.mean(means)), "final_loss": float(np.mean(finals)),
          "diverged_seeds": int(sum(math.isinf(m) for m in means))}


def benchmark(quick: bool, device: str, learned: str = "general", say=lambda line: print(line, flush=True)) -> dict:
  rows = {}
  for problem in problems():
    horizon = problem.horizon // 2 if quick else problem.horizon
    started = time.perf_counter()
    tuning = {lr: evaluate(problem, "adam", lr, TUNING_SEEDS[:1] if quick else TUNING_SEEDS, horizon, device)
              ["mean_loss"] for lr in LEARNING_RATES}
    best = min(tuning, key=tuning.get)
    results = {"adam_tuned": {"learning_rate": best, **evaluate(problem, "adam", best, EVAL_SEEDS, horizon, device)},
               "adam_1e-3": evaluate(problem, "adam", 1e-3, EVAL_SEEDS, horizon, device),
               "general": evaluate(problem, "general", None, EVAL_SEEDS, horizon, device, learned)}
    general, tuned = results["general"], results["adam_tuned"]
    rows[problem.name] = {"horizon": horizon, "batch_size": problem.batch_size, "results": results,
                          "ratio_mean_loss": general["mean_loss"] / tuned["mean_loss"],
                          "ratio_final_loss": general["final_loss"] / tuned["final_loss"],
                          "seconds": round(time.perf_counter() - started, 1)}
    say(f"{problem.name:24s} adam lr {best:<8.3g} general/tuned adam: mean {rows[problem.name]['ratio_mean_loss']:.3f}"
        f"  final {rows[problem.name]['ratio_final_loss']:.3f}  general/adam 1e-3 mean "
        f"{general['mean_loss'] / results['adam_1e-3']['mean_loss']:.3f}  ({rows[problem.name]['seconds']} s)")
  wins = lambda a, b, metric: float(np.mean([r["results"][a][metric] < r["results"][b][metric]  # noqa: E731
                                             for r in rows.values()]))
  summary = {f"win_rate_{metric}_vs_{b}": wins("general", b, metric)
             for b in ("adam_tuned", "adam_1e-3") for metric in ("mean_loss", "final_loss")}
  summary["diverged_runs"] = sum(r["results"]["general"]["diverged_seeds"] for r in rows.values())
  return {"problems": rows, "summary": summary}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="half the horizons, one tuning seed")
  parser.add_argument("--device", default="cpu")
  parser.add_argument("--optimizer", default="general", help="the trained optimizer in general's place")
  parser.add_argument("--out", help="write the results as JSON here")
  args = parser.parse_args(argv)
  result = benchmark(args.quick, args.device, args.optimizer)
  for key, value in result["summary"].items():
    print(f"{key}: {value:.0%}" if key.startswith("win") else f"{key}: {value}")
  if args.out:
    import lopt
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    result.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  machine={"device": device_name, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "platform": platform.platform(), "python": sys.version.split()[0],
                           "torch": torch.__version__, "lopt": lopt.__version__, "quick": args.quick},
                  optimizer=args.optimizer)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())

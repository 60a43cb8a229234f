"""Slope of log10 update RMS on log10 tuned-Adam lr for results files of step_size_predictability.py, on their common
seeds; with a bootstrap over problems of the slope difference."""
import json, sys, numpy as np
files = sys.argv[1:]
rows = [{r["seed"]: r for r in map(json.loads, open(f)) if "seed" in r} for f in files]
seeds = sorted(set.intersection(*[set(r) for r in rows]))
y = np.log10([rows[0][s]["adam_learning_rate"] for s in seeds])
steps = [np.array([r[s]["features"]["log_update_rms"] for s in seeds]) / np.log(10) for r in rows]
adam = np.array([rows[0][s]["adam_log_update_rms"] for s in seeds]) / np.log(10)
slope = lambda v, idx=slice(None): np.polyfit(y[idx], v[idx], 1)[0]
print(f"{len(seeds)} problems, seeds {seeds[0]}..{seeds[-1]}; tuned Adam's step slope {slope(adam):.3f}")
rng = np.random.default_rng(0)
boot = [rng.integers(0, len(seeds), len(seeds)) for _ in range(2000)]
for f, v in zip(files, steps):
  b = [slope(v, i) for i in boot]
  rmse = np.sqrt(np.mean((v - adam) ** 2))
  print(f"{f}: slope {slope(v):.3f} (bootstrap 95% {np.percentile(b, 2.5):.3f}..{np.percentile(b, 97.5):.3f}), "
        f"mean log10 step {v.mean():.3f}, RMS distance to tuned Adam's step {rmse:.3f} decades, "
        f"mean signed {np.mean(v - adam):+.3f}")
if len(files) == 2:
  d = [slope(steps[1], i) - slope(steps[0], i) for i in boot]
  print(f"slope difference (2nd - 1st) {slope(steps[1]) - slope(steps[0]):+.3f}, bootstrap 95% "
        f"{np.percentile(d, 2.5):+.3f}..{np.percentile(d, 97.5):+.3f}")

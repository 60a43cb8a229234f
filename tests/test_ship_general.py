"""scripts/ship_general.py: what the shipped `general`'s config.json records of a graft, its runs and its benchmark."""

import json

import numpy as np
import pytest

import lopt
from conftest import load_script
from lopt.pytree import flatten_by_path


@pytest.fixture(scope="module")
def ship():
  return load_script("scripts/ship_general.py")


def _run(path, seconds, held_out):
  """A run directory whose metrics.jsonl was resumed once (the clock restarts at the second segment)."""
  path.mkdir()
  records = [{"step": 5, "seconds": seconds[0], "held_out_loss": held_out[0], "inner_steps": 100},
             {"step": 10, "seconds": seconds[1], "held_out_loss": held_out[1], "inner_steps": 200}]
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def _benchmark(path, names):
  problems = {"least_squares": {"learned": {n: {"ratio_mean_loss": 0.9 + i, "ratio_final_loss": 0.8,
                                                 "speedup": 1.2, "curves": [1.0]} for i, n in enumerate(names)}}}
  settings = {"quick": False, "problems": ["least_squares"], "tuning_seeds": 3, "eval_seeds": 5, "valid_every": 10,
              "learned": {}}
  data = {"date": "2026-12-03", "machine": {"devices": ["cpu"]}, "seconds": 1.0, "settings": settings,
          "summary": {n: {"num_problems": 1, "index": i} for i, n in enumerate(names)}, "problems": problems}
  path.write_text(json.dumps(data))
  return path


def test_a_graft_ships_with_its_lineage_donor_benchmark_entry_and_a_dated_change(ship, tmp_path):
  graft = load_script("benchmarks/theta_graft.py")
  theta_edit = load_script("benchmarks/theta_edit.py")
  donor, source = tmp_path / "donor", tmp_path / "graft"
  theta_edit.main(["general-v1", str(donor), "lstm/w=0.5"])
  graft.main(["general-v1", str(donor), str(source), "lstm"])
  runs = [_run(tmp_path / "base-run", (10.0, 30.0), (0.5, 0.4)), _run(tmp_path / "donor-run", (20.0, 5.0), (0.3, 0.6))]
  bench = _benchmark(tmp_path / "bench.json", ["general", "candidate"])
  out = tmp_path / "shipped"
  ship.main([str(source), "--run", f"{runs[0]}:H200", "--run", f"{runs[1]}:2 CPU cores", "--benchmark", str(bench),
             "--benchmark-name", "candidate", "--what", "a graft", "--why", "it wins more", "--destination", str(out)])
  shipped, given = lopt.load(out), lopt.load(source)
  assert all(np.array_equal(a, b) for a, b in zip(flatten_by_path(shipped.theta).values(),
                                                   flatten_by_path(given.theta).values()))
  info = shipped.config["info"]
  assert [r["run"] for r in info["lineage"]] == ["base-run", "donor-run"]
  assert info["lineage"][1]["seconds"] == 25.0 and info["lineage"][1]["best_held_out_loss"] == 0.3
  assert info["compute_hours"] == {"H200": round(30 / 3600, 3), "2 CPU cores": round(25 / 3600, 3)}
  assert info["benchmark"]["summary"]["index"] == 1  # the entry named, not `general`'s
  assert info["benchmark"]["problems"]["least_squares"] == {"ratio_mean_loss": 1.9, "ratio_final_loss": 0.8,
                                                            "speedup": 1.2}
  assert info["graft"]["taken"] == ["lstm/b", "lstm/w"] and info["graft"]["donor"] == str(donor)
  assert info["graft"]["donor_training"] == lopt.load("general-v1").config["info"]["training"]
  assert [c["what"] for c in info["changes"]][-1] == "a graft"
  assert len(info["changes"]) == len(lopt.load("general-v1").config["info"]["changes"]) + 1


def test_a_benchmark_without_the_named_entry_is_refused(ship, tmp_path):
  bench = _benchmark(tmp_path / "bench.json", ["general"])
  with pytest.raises(SystemExit, match="no learned optimizer named 'nope'; it has general"):
    ship.benchmark_summary(bench, "nope")

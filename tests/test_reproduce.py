"""``lopt reproduce``: a reduced run (linear regression only, few problems and seeds: every task takes the same
path through compare, analyze and the report) and its user errors."""

import json
import re

import pytest

from lopt.cli import main

SMALL_TASKS = ["linear_regression"]


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
  """One reduced reproduce shared by the tests below (it is the slow part). ``--tuning shipped`` takes the baselines'
  full-grid hyperparameters recorded with the shipped optimizers (the full grid itself is `compare`'s, tested
  elsewhere), which keeps this under two minutes on a 2-core CPU."""
  out = tmp_path_factory.mktemp("reproduce")
  code = main(["reproduce", *SMALL_TASKS, "--out", str(out), "--eval-problems", "16", "--analysis-seeds", "16",
               "--analysis-problems", "2", "--tuning", "shipped"])
  assert code == 0
  return out


def test_reproduce_writes_every_file(reproduced):
  for task in SMALL_TASKS:
    for name in ("results.json", "table.md", "loss_curves.png"):
      assert (reproduced / task / "comparison" / name).is_file()
    assert (reproduced / task / "analysis" / "summary.json").is_file()
    for figure in ("momentum", "clipping", "schedule", "adaptation"):
      assert (reproduced / task / "analysis" / f"{figure}.png").is_file()
  for name in ("findings.json", "findings.md", "reproduce.html"):
    assert (reproduced / name).is_file()


def test_findings_hold_the_numbers(reproduced):
  findings = json.loads((reproduced / "findings.json").read_text())
  assert set(findings["tasks"]) == set(SMALL_TASKS)
  for task in findings["tasks"].values():
    comparison = task["comparison"]
    assert comparison["tuning_mode"] == "shipped"
    assert comparison["num_eval_problems"] == 16
    for baseline in ("sgd", "momentum", "rmsprop", "adam"):
      row = comparison["baselines"][baseline]
      assert row["ratio"] > 0 and row["baseline_se"] >= 0
    for key in ("momentum", "clipping", "schedule", "adaptation"):
      assert task[key]["status"] in ("reproduced", "partly reproduced", "did not reproduce")
  linear = findings["tasks"]["linear_regression"]
  assert linear["momentum"]["optimal_beta"] == pytest.approx(0.881, abs=0.01)
  # The shipped linear-regression optimizer beats tuned Adam (ratio 0.37 on 128 problems).
  assert linear["comparison"]["learned"] < linear["comparison"]["baselines"]["adam"]["baseline"]


def test_report_is_self_contained(reproduced):
  page = (reproduced / "reproduce.html").read_text()
  assert "data:image/png;base64," in page
  assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", page)
  assert "http://" not in page and "https://" not in page
  for task in SMALL_TASKS:
    assert task in page


def test_unknown_task_exits_2(tmp_path, capsys):
  assert main(["reproduce", "no_such_task", "--out", str(tmp_path / "out")]) == 2
  assert "unknown task" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_load_accepts_a_shipped_name():
  import lopt
  trained = lopt.load("rosenbrock")
  assert trained.path.name == "rosenbrock"
  assert trained.config["info"]["training"]["task"] == "rosenbrock"


def test_auto_tuning_is_local_on_the_network_tasks():
  from lopt.reproduce import tuning_mode
  assert [tuning_mode(t, "auto") for t in ("linear_regression", "rosenbrock", "two_moons", "digits_cnn")] == \
      ["full", "full", "local", "local"]
  assert tuning_mode("two_moons", "full") == "full"


def test_local_candidates_surround_the_shipped_optimum():
  import numpy as np
  from lopt.reproduce import local_candidates
  candidates = local_candidates({"learning_rate": 0.01, "b1": 0.9, "b2": 0.99})
  np.testing.assert_allclose(candidates["learning_rate"], 0.01 * 10.0**np.array([-0.5, -0.25, 0, 0.25, 0.5]))
  assert set(candidates["b1"]) == {0.9} and set(candidates["b2"]) == {0.99}

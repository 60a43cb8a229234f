"""``lopt analyze`` dispatches on the architecture: update-function analyses for any, recurrent ones only for an
architecture with a RecurrentView (a clear exit 2 otherwise); shipped optimizers are analyzed by name."""

from __future__ import annotations

import json

import pytest

from lopt.cli import main
from lopt.meta.config import MetaTrainConfig, OptimizerSection
from lopt.meta.train import meta_train


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
  run = tmp_path_factory.mktemp("mlp") / "run"
  config = MetaTrainConfig(optimizer=OptimizerSection("mlp", {"hidden_size": 8}), horizon=12, meta_batch_size=4,
                           num_steps=4, eval_every=2, checkpoint_every=2, learning_rate=1e-2)
  meta_train(config, run, progress=False)
  return run


def test_mlp_gets_the_update_function_analyses(mlp_run, capsys):
  assert main(["analyze", str(mlp_run), "--problems", "2"]) == 0
  summary = json.loads((mlp_run / "analysis" / "summary.json").read_text())
  assert summary["source"]["recurrent"] is False and set(summary["source"]["figures"]) == {"clipping.png",
                                                                                          "schedule.png"}
  assert "momentum" not in summary and summary["schedule"]["shape"] in ("flat", "warm-up", "decay",
                                                                        "warm-up then decay")
  assert summary["schedule"]["num_steps"] == 11  # alpha_eff at each of the 12 steps
  assert main(["report", str(mlp_run)]) == 0
  html = (mlp_run / "report.html").read_text()
  assert "per-parameter MLP" in html and "No fixed point" not in html


@pytest.mark.parametrize("analysis", ["fixed_points", "momentum", "adaptation"])
def test_recurrent_analyses_of_a_non_recurrent_architecture_exit_2(mlp_run, capsys, analysis):
  assert main(["analyze", str(mlp_run), "--analyses", analysis]) == 2
  err = capsys.readouterr().err
  assert "needs a recurrent architecture" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unknown_analysis_exits_2(mlp_run, capsys):
  assert main(["analyze", str(mlp_run), "--analyses", "telepathy"]) == 2
  assert "unknown analysis 'telepathy'" in capsys.readouterr().err


def test_a_run_without_an_exported_optimizer_says_so(tmp_path, capsys):
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "config.json").write_text(json.dumps(MetaTrainConfig().to_dict()))
  for command in (["compare", str(run)], ["analyze", str(run)]):
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "holds no trained optimizer yet" in err and "--resume" in err and "'format'" not in err


def test_shipped_optimizers_are_analyzed_by_name(tmp_path, monkeypatch):
  from lopt.pipeline.analyze import resolve
  optimizer, theta, task = resolve("two_moons")  # a name, as lopt.load takes it (lopt 0.1 refused it)
  assert optimizer.hidden_size == 64 and task.name == "two_moons"
  monkeypatch.chdir(tmp_path)
  assert main(["analyze", "no_such_optimizer"]) == 2

"""benchmarks/theta_edit.py: a copy of a learned optimizer with named meta-parameters multiplied, the rest untouched;
and step_size_predictability's reachable slope, which a prediction's regression to the mean bounds."""

import numpy as np
import pytest

import lopt
from lopt.pytree import flatten_by_path
from conftest import ROOT, load_script


@pytest.fixture(scope="module")
def theta_edit():
  return load_script("benchmarks/theta_edit.py")


def test_the_copy_multiplies_only_the_named_leaves_and_records_the_edit(theta_edit, tmp_path):
  out = tmp_path / "gain2"
  assert theta_edit.main(["general", str(out), "step/alignment=2", "step/b=-1"]) == 0
  original, copy = lopt.load("general"), lopt.load(out)
  flat = lambda trained: flatten_by_path(trained.theta)  # noqa: E731
  before, after = flat(original), flat(copy)
  assert before.keys() == after.keys()
  for name in before:
    factor = {"step/alignment": 2.0, "step/b": -1.0}.get(name, 1.0)
    np.testing.assert_array_equal(np.asarray(after[name]), np.asarray(before[name]) * factor)
    assert np.asarray(after[name]).dtype == np.asarray(before[name]).dtype
  assert copy.config["info"]["edit"] == {"source": "general", "multiplied": {"step/alignment": 2.0, "step/b": -1.0}}
  assert copy.optimizer.config() == original.optimizer.config()  # the same architecture, its fields as written today


@pytest.mark.parametrize("item, message", [("step/nope=2", "no meta-parameter step/nope; known: "),
                                           ("step/alignment", "is not KEY=FACTOR"),
                                           ("step/alignment=two", "is not KEY=FACTOR"),
                                           ("=2", "is not KEY=FACTOR")])
def test_a_bad_edit_says_what_is_allowed_and_writes_nothing(theta_edit, tmp_path, item, message):
  with pytest.raises(SystemExit, match=message):
    theta_edit.main(["general", str(tmp_path / "out"), item])
  assert not (tmp_path / "out" / "config.json").exists()


def test_the_reachable_slope_is_the_held_out_predictions_own(monkeypatch):
  """Features that fix lr* give held-out predictions of slope ~1; features that carry half of it (the rest noise the
  features cannot see) give about R^2, well below 1, though the regression is right on average."""
  monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
  predictability = load_script("benchmarks/step_size_predictability.py")
  rng = np.random.default_rng(0)
  n, names = 200, predictability.FEATURES

  def rows(signal_share):
    y = rng.normal(-2.0, 0.75, n)
    seen = np.sqrt(signal_share) * (y - y.mean()) + np.sqrt(1 - signal_share) * rng.normal(0, 0.75, n)
    features = rng.normal(0, 1, (n, len(names)))
    features[:, 0] = seen  # one statistic carries what can be known of lr*; the others are noise
    return [{"adam_learning_rate": 10.0 ** y[i], "adam_log_update_rms": np.log(10) * y[i],
             "features": dict(zip(names, map(float, features[i])))} for i in range(n)]

  exact = predictability.summarize(rows(1.0))["leave_one_out"]["prediction_slope"]
  half = predictability.summarize(rows(0.5))["leave_one_out"]["prediction_slope"]
  assert exact == pytest.approx(1.0, abs=0.05)
  assert half == pytest.approx(0.5, abs=0.12)


def test_a_field_that_shapes_no_meta_parameter_is_set_not_multiplied(theta_edit, tmp_path):
  """``max_log_step=8``: the copy has that bound and the same meta-parameters; a bound the spec refuses is an error
  naming the field, and nothing is written."""
  out = tmp_path / "limit8"
  assert theta_edit.main(["general", str(out), "max_log_step=8"]) == 0
  original, copy = lopt.load("general"), lopt.load(out)
  assert (original.optimizer.max_log_step, copy.optimizer.max_log_step) == (5.0, 8.0)
  before, after = flatten_by_path(original.theta), flatten_by_path(copy.theta)
  assert all(np.array_equal(np.asarray(after[k]), np.asarray(before[k])) for k in before)
  assert copy.config["info"]["edit"] == {"source": "general", "multiplied": {}, "set": {"max_log_step": 8.0}}
  with pytest.raises(SystemExit, match="max_log_step"):
    theta_edit.main(["general", str(tmp_path / "bad"), "max_log_step=20"])
  assert not (tmp_path / "bad" / "config.json").exists()


@pytest.fixture(scope="module")
def theta_graft():
  return load_script("benchmarks/theta_graft.py")


def test_a_graft_takes_the_named_parts_from_the_donor_and_keeps_the_rest(theta_graft, theta_edit, tmp_path):
  """The copy's lstm/* and context/* are the donor's, every other leaf and the fields the base's; a prefix that names
  nothing is an error listing the known ones, and nothing is written."""
  donor = tmp_path / "donor"
  theta_edit.main(["general", str(donor), "lstm/w=0.5", "context/b=2", "step/w=3", "max_log_step=8"])
  out = tmp_path / "graft"
  assert theta_graft.main(["general", str(donor), str(out), "lstm,context"]) == 0
  base, given, copy = (flatten_by_path(lopt.load(p).theta) for p in ("general", donor, out))
  for name in base:
    source = given if name.startswith(("lstm/", "context/")) else base
    np.testing.assert_array_equal(np.asarray(copy[name]), np.asarray(source[name]))
  assert not np.array_equal(np.asarray(copy["lstm/w"]), np.asarray(base["lstm/w"]))   # the graft is not vacuous
  assert lopt.load(out).optimizer.max_log_step == 5.0   # the base's fields
  assert lopt.load(out).config["info"]["graft"]["taken"] == ["lstm/b", "lstm/w", "context/b", "context/w"]
  assert "benchmark" in lopt.load("general").config["info"]
  assert "benchmark" not in lopt.load(out).config["info"]   # the base's numbers are not the copy's
  with pytest.raises(SystemExit, match="no meta-parameter under 'nope'; known: "):
    theta_graft.main(["general", str(donor), str(tmp_path / "bad"), "nope"])
  assert not (tmp_path / "bad" / "config.json").exists()


def test_a_weighted_graft_moves_the_named_parts_that_far_toward_the_donor(theta_graft, theta_edit, tmp_path):
  """--weight 0.5 puts the grafted leaves halfway between base and donor; 0 gives the base back; a weight that is not
  finite is refused before anything is written."""
  donor = tmp_path / "donor"
  theta_edit.main(["general", str(donor), "lstm/w=3", "step/w=3"])
  base, given = (flatten_by_path(lopt.load(p).theta) for p in ("general", donor))
  for weight in (0.5, 0.0):
    out = tmp_path / f"w{weight}"
    assert theta_graft.main(["general", str(donor), str(out), "lstm", "--weight", str(weight)]) == 0
    copy = flatten_by_path(lopt.load(out).theta)
    for name in base:
      expected = np.asarray(base[name])
      if name.startswith("lstm/"):
        expected = (expected + weight * (np.asarray(given[name]) - expected)).astype(expected.dtype)
      np.testing.assert_allclose(np.asarray(copy[name]), expected, rtol=1e-6, atol=0)
    assert lopt.load(out).config["info"]["graft"]["weight"] == weight
  halfway = flatten_by_path(lopt.load(tmp_path / "w0.5").theta)["lstm/w"]
  assert not np.allclose(np.asarray(halfway), np.asarray(given["lstm/w"]))   # not the donor's
  with pytest.raises(SystemExit):
    theta_graft.main(["general", str(donor), str(tmp_path / "bad"), "lstm", "--weight", "nan"])
  assert not (tmp_path / "bad" / "config.json").exists()

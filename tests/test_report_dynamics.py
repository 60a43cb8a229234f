"""`lopt analyze` and `lopt report` end to end on a small optimizer; the report renders in headless Chromium."""

import json
import re
import shutil
import subprocess

import jax
import numpy as np
import pytest

from lopt.checkpoint import save_optimizer
from lopt.cli import main
from lopt.optimizers import GRUOptimizer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IMAGE_CHECK = """<script>
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var out = document.createElement('div'); out.id = 'image-check';
  out.textContent = 'images ' + loaded + '/' + images.length; document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
  """A small GRU optimizer (random weights, a momentum-ish readout) analyzed and reported from the CLI."""
  directory = tmp_path_factory.mktemp("analyze") / "optimizer"
  optimizer = GRUOptimizer(hidden_size=6)
  theta = {k: np.asarray(v) for k, v in optimizer.init(jax.random.key(0)).items()}
  theta["readout_weights"] = np.asarray(-0.3 * jax.random.normal(jax.random.key(1), (6, 1)))
  save_optimizer(directory, optimizer, theta)
  assert main(["analyze", str(directory), "--task", "linear_regression", "--problems", "2"]) == 0
  assert main(["report", str(directory)]) == 0
  return directory


def test_analyze_writes_summary_and_figures(analyzed):
  summary = json.loads((analyzed / "analysis" / "summary.json").read_text())
  for key in ("fixed_points", "momentum", "clipping", "schedule", "adaptation", "pca", "source"):
    assert key in summary
  assert summary["momentum"]["heavy_ball"]["optimal_beta"] == pytest.approx(0.8819, abs=1e-3)
  for name in summary["source"]["figures"]:
    assert (analyzed / "analysis" / name).read_bytes()[:4] == b"\x89PNG"
  assert len(summary["source"]["figures"]) == 5


def test_report_is_self_contained(analyzed):
  page = (analyzed / "report.html").read_text()
  assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
  assert "http://" not in page and "https://" not in page
  assert page.count("data:image/png;base64,") == 5
  for title in ("Momentum", "Gradient clipping", "Learning-rate schedule", "Learning-rate adaptation"):
    assert title in page


def test_user_mistakes_exit_2(tmp_path, analyzed, capsys):
  assert main(["analyze", str(tmp_path / "missing")]) == 2
  assert main(["analyze", str(analyzed)]) == 2  # a saved optimizer without training config needs --task
  assert "--task" in capsys.readouterr().err
  assert main(["report", str(tmp_path)]) == 2


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(analyzed, tmp_path):
  from matplotlib.image import imread
  page = (analyzed / "report.html").read_text()
  checked = tmp_path / "checked.html"
  checked.write_text(page.replace("</body>", IMAGE_CHECK + "</body>"))
  flags = CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]
  dom = subprocess.run([CHROMIUM, *flags, "--virtual-time-budget=5000", "--dump-dom", checked.as_uri()],
                       capture_output=True, text=True, timeout=120).stdout
  match = re.search(r"images (\d+)/(\d+)", dom)
  assert match, "the image check did not run"
  assert match.group(1) == match.group(2) == "5"
  shot = tmp_path / "shot.png"
  subprocess.run([CHROMIUM, *flags, "--window-size=1200,2400", f"--screenshot={shot}",
                  (analyzed / "report.html").as_uri()], capture_output=True, timeout=120)
  pixels = imread(shot)[..., :3]
  assert pixels.std() > 0.05, "blank page"
  assert np.mean(np.any(pixels < 0.9, axis=-1)) > 0.02, "almost nothing drawn"

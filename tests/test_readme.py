"""The README's Python snippets run as written (with the demo run shortened and written to a temporary directory)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_the_jax_and_the_torch_snippets():
  blocks = python_blocks()
  assert any("as_optax()" in b for b in blocks) and any("LearnedOptimizer(model.parameters()" in b for b in blocks)


def test_the_python_snippets_run(tmp_path, monkeypatch):
  pytest.importorskip("torch")
  monkeypatch.chdir(tmp_path)
  namespace = {}
  for block in python_blocks():
    code = block.replace('PRESETS["demo"]', 'PRESETS["demo"].replace(num_steps=2, horizon=10, meta_batch_size=2, '
                                             'num_eval_problems=2, eval_every=1)')
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 -- our own README
  assert (tmp_path / "runs" / "lr" / "optimizer" / "config.json").is_file()

"""The layout's rules: no import cycle among lopt's modules (imports inside functions count too: a cycle hidden in a
function is still two modules that need each other), and one folder per architecture."""

from __future__ import annotations

import ast
from pathlib import Path

import lopt
from lopt import architectures

ROOT = Path(lopt.__file__).parent


def module_name(path: Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
  """{module: lopt modules it imports}; ``from package import name`` counts as importing ``package.name`` when that
  is a module, else ``package``."""
  modules = {module_name(p): p for p in ROOT.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    edges = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
      else:
        continue
      edges |= {t for t in targets if t in modules and t != name}
    graph[name] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, " -> ".join(cycle)


def test_each_architecture_is_one_folder():
  for name, spec in architectures.REGISTRY.items():
    folder = ROOT / "architectures" / name
    assert (folder / "spec.py").is_file() and (folder / "optimizer.py").is_file(), name
    assert spec.jax_class.startswith(f"lopt.architectures.{name}."), name
    if spec.torch_class is not None:
      assert spec.torch_class.startswith(f"lopt.architectures.{name}."), name

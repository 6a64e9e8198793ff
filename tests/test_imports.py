"""Imports flow one way: data, models, losses, retrieval -> experiment -> evaluate -> train.

The module graph of cir_jax (every `import` / `from cir_jax... import`, at any
depth of a file, read with `ast`) has no cycle, and the layers never import
upwards; evaluation does not load the trainer.
"""
import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "cir_jax"
# module -> modules it must never import (directly or through others).
UPWARDS = {
    "cir_jax.experiment": {"cir_jax.evaluate", "cir_jax.train"},
    "cir_jax.evaluate": {"cir_jax.train"},
}
LOWER = ("cir_jax.data", "cir_jax.models", "cir_jax.losses", "cir_jax.retrieval")


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
  modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        edges |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module:
        # `from pkg import sub` imports the submodule pkg.sub; `from mod import name`, mod.
        edges |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                  else node.module for a in node.names}
    graph[name] = {e for e in edges if e in modules and e != name}
  return graph


def reachable(graph, start) -> set[str]:
  seen, stack = set(), [start]
  while stack:
    for nxt in graph[stack.pop()] - seen:
      seen.add(nxt)
      stack.append(nxt)
  return seen


def test_no_import_cycle():
  graph = import_graph()
  cycles = sorted(m for m in graph if m in reachable(graph, m) and not graph[m] <= {m})
  assert not cycles, f"modules on an import cycle: {cycles}"


def test_layers_import_downwards_only():
  graph = import_graph()
  for module, forbidden in UPWARDS.items():
    assert not reachable(graph, module) & forbidden, module
  for module in graph:
    if module.startswith(LOWER):
      upper = {"cir_jax.experiment", "cir_jax.evaluate", "cir_jax.train"}
      assert not reachable(graph, module) & upper, module


def test_evaluate_does_not_load_the_trainer():
  code = ("import sys, cir_jax.evaluate; "
          "print(sorted(m for m in sys.modules if m == 'cir_jax.train'))")
  out = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True,
                       text=True, timeout=300, check=True).stdout
  assert out.strip().splitlines()[-1] == "[]"

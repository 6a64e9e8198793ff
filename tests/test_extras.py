"""The accelerator extras of pyproject.toml install the same jax as the base pin.

`pip install -e '.[cuda12]'` / `'.[tpu]'` (README, "GPUs, TPU pods and several hosts")
must not drift from `dependencies`' `jax==X`: a GPU or TPU install would otherwise
pull another jax than the one the suite is tested with (or fail to resolve).
"""
import importlib.metadata
import pathlib
import tomllib

from packaging.requirements import Requirement

PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
ACCELERATOR_EXTRAS = {"cuda12": "cuda12", "tpu": "tpu"}  # our extra -> jax's extra


def _project() -> dict:
  return tomllib.loads(PYPROJECT.read_text())["project"]


def _jax_requirements(requirements) -> list[Requirement]:
  return [r for r in map(Requirement, requirements) if r.name == "jax"]


def test_accelerator_extras_pin_the_base_jax():
  project = _project()
  (base,) = _jax_requirements(project["dependencies"])
  assert str(base.specifier).startswith("=="), f"base jax pin {base} is not exact"
  for ours, theirs in ACCELERATOR_EXTRAS.items():
    (req,) = _jax_requirements(project["optional-dependencies"][ours])
    assert req.extras == {theirs}, f"extra {ours!r}: {req}"
    assert req.specifier == base.specifier, f"extra {ours!r} pins {req}, base pins {base}"


def test_jax_defines_the_extras_we_name():
  # The installed jax is the pinned one here; for an extra jax does not define, pip only
  # warns and installs the CPU-only jaxlib.
  provided = set(importlib.metadata.metadata("jax").get_all("Provides-Extra") or [])
  assert set(ACCELERATOR_EXTRAS.values()) <= provided, sorted(provided)

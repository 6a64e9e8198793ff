"""Every config file loads, its names resolve, its whole experiment traces (shapes only), and
command-line overrides work (typos fail)."""
import importlib
import pathlib
import subprocess
import sys

import jax
import pytest

from cir_jax import experiment
from cir_jax import losses
from cir_jax.data import registry
from cir_jax.models import build
from cir_jax.models import composers

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*.py") if p.stem not in ("common", "__init__"))


def _check_names(config):
  assert config.model.composer in composers.COMPOSERS
  assert config.model.image_encoder in build.IMAGE_ENCODERS
  assert config.model.text_encoder in build.TEXT_ENCODERS
  assert config.loss.name in losses.LOSSES
  assert config.data.name in registry.LOADERS
  assert config.batch_size > 0 and config.num_train_steps > 0


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_loads_and_names_resolve(path):
  module = importlib.import_module(f"configs.{path.stem}")
  assert "python -m cir_jax." in module.__doc__, "the docstring must hold the run command"
  _check_names(module.get_config())


# Config arguments that change the model or the loss: traced like the defaults.
VARIANTS = [("cirplant_cirr", "token_norm=l2,set_negatives=4"),
            ("attribute_operator_mit_states", "rank=8"),
            ("tirg_table5", "dataset=fashion200k,row=gate_only"),
            ("tirg_table5", "dataset=mit_states,row=residual_only"),
            ("tirg_table5", "dataset=mit_states,row=last_conv"),
            ("tirg_table5", "dataset=css,row=last_fc"),
            ("tirg_table5", "dataset=fashion200k,row=k2")]


@pytest.mark.parametrize("path,arg", [(p, None) for p in CONFIG_FILES]
                         + [(CONFIG_DIR / f"{n}.py", a) for n, a in VARIANTS],
                         ids=lambda v: v.stem if isinstance(v, pathlib.Path) else (v or ""))
def test_config_experiment_traces(path, arg):
  # Model, optimiser (parameter groups included) and train state of the paper config,
  # traced with eval_shape: no FLOPs, no memory, but every shape and name must fit.
  config = importlib.import_module(f"configs.{path.stem}").get_config(arg)
  _check_names(config)
  if config.model.text_encoder in build.PRETRAINED_TEXT_ENCODERS:
    config.data.tokenizer = "/checkpoint"  # read only when data is tokenised, not traced
  mesh = experiment.make_mesh(config)
  state = jax.eval_shape(lambda: experiment.build(config, mesh, range(1000)).state)
  assert jax.tree.leaves(state.params), path.stem


def test_css_config_switches():
  from configs import tirg_css  # pylint: disable=g-import-not-at-top
  paper, cpu = tirg_css.get_config(), tirg_css.get_config("cpu")
  assert (paper.num_train_steps, paper.optimizer.learning_rate, paper.batch_size) == (150_000, 0.01, 32)
  assert paper.model.image_encoder == "resnet18" and paper.loss.name == "soft_triplet"
  assert cpu.num_train_steps < paper.num_train_steps
  two_d = tirg_css.get_config("cpu,query_2d")
  assert two_d.data.query_render == "2d" and two_d.model.separate_query_encoder
  with pytest.raises(ValueError, match="unknown config argument 'cpuu'"):
    tirg_css.get_config("cpuu")


def test_command_line_overrides_and_typos():
  repo = CONFIG_DIR.parent
  script = ("import sys; from absl import app, flags; from cir_jax.utils import flags as f; "
            "f.define_flags(); app.run(lambda argv: print('OK', flags.FLAGS.config.batch_size, "
            "flags.FLAGS.config.model.composer))")
  ok = subprocess.run([sys.executable, "-c", script, "--config=configs/tirg_css.py:cpu",
                       "--config.batch_size=64", "--config.model.composer=image_only",
                       "--workdir=unused"], cwd=repo, capture_output=True, text=True, timeout=120)
  assert "OK 64 image_only" in ok.stdout, ok.stderr[-2000:]
  typo = subprocess.run([sys.executable, "-m", "cir_jax.train", "--config=configs/tirg_css.py",
                         "--config.batch_sze=64", "--workdir=unused"], cwd=repo,
                        capture_output=True, text=True, timeout=120)
  assert typo.returncode != 0 and "batch_sze" in typo.stderr


def test_table5_rows_change_one_thing_each():
  from configs import tirg_table5  # pylint: disable=g-import-not-at-top
  full = {d: tirg_table5.get_config(f"dataset={d}") for d in tirg_table5.DATASETS}
  assert (full["fashion200k"].model.composer, full["fashion200k"].loss.name) == (
      "tirg", "batch_classification")
  assert (full["mit_states"].model.composer, full["mit_states"].loss.name) == (
      "tirg", "soft_triplet")
  assert (full["css"].model.composer, full["css"].loss.name) == ("tirg_lastconv", "soft_triplet")
  expected = {"gate_only": ("model.composer_kwargs.use_residual", False),
              "residual_only": ("model.composer_kwargs.use_gate", False),
              "last_fc": ("model.composer", "tirg"),
              "last_conv": ("model.composer", "tirg_lastconv"),
              "k2": ("loss.name", "soft_triplet"), "kB": ("loss.name", "batch_classification")}
  flat = lambda c: {".".join(k): v for k, v in _flatten(c.to_dict())}
  for dataset in tirg_table5.DATASETS:
    base = flat(full[dataset])
    for row, (key, value) in expected.items():
      changed = flat(tirg_table5.get_config(f"dataset={dataset},row={row}"))
      assert changed[key] == value
      diff = {k for k in set(base) | set(changed) if base.get(k) != changed.get(k)}
      assert diff <= {key}, (dataset, row, diff)
  with pytest.raises(ValueError, match="row='gate'"):
    tirg_table5.get_config("row=gate")
  with pytest.raises(ValueError, match="FashionIQ has none"):
    importlib.import_module("configs.cirplant_fashioniq").get_config("set_negatives=2")


def _flatten(d, prefix=()):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


@pytest.mark.parametrize("name,trunk_factor", [
    ("tirg_fashion200k", 0.1), ("tirg_mit_states", 0.1), ("tirg_cirr", 0.1),
    ("tirg_fashioniq", 0.1), ("tirg_css", 1.0)])
def test_tirg_learning_rate_groups_follow_google_tirg(name, trunk_factor):
  # google/tirg main.py: on real-image datasets the pretrained trunk learns at 0.1x, its fc
  # (our target_proj) and everything else at 1x; CSS keeps one rate. Weight decay off here
  # so the first SGD update is -lr * multiplier * grad.
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cir_jax import optim  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{name}").get_config()
  assert config.model.image_encoder == "resnet18" and config.init_from == ""
  config.optimizer.weight_decay = 0.0
  params = {"image_encoder": {"encoder": {"kernel": jnp.ones(3)}},
            "target_proj": {"kernel": jnp.ones(3)}, "composer": {"w": jnp.ones(3)}}
  tx = optim.make_optimizer(config.optimizer, params)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  lr = config.optimizer.learning_rate
  assert float(updates["target_proj"]["kernel"][0]) == pytest.approx(-lr)
  assert float(updates["composer"]["w"][0]) == pytest.approx(-lr)
  assert float(updates["image_encoder"]["encoder"]["kernel"][0]) == pytest.approx(-lr * trunk_factor)

"""Reproduces the CSS table of the TIRG paper (Table 4, and the CSS column of Table 5).

Trains every composer with the same data, budget and seeds through
`cir_jax.train.train_and_evaluate`, in the 3D->3D and 2D->3D settings, and writes
`results.md` (mean +- std over seeds of R@1 beside the paper's numbers, then
R@5/10/50), `results.json` (every run and the aggregates) and `results.png` (a
bar chart, ours vs the paper).

  # CPU scale (configs/tirg_css.py:cpu budget, narrow ResNet), 3 seeds:
  python tools/reproduce_css.py --out runs/css_table --config_arg cpu --seeds 0,1,2
  # Paper scale (150k steps, ResNet-18, 64 px) on a GPU:
  python tools/reproduce_css.py --out runs/css_table_full --seeds 0,1,2,3,4
  # A quick look: two composers, one seed, 50 steps:
  python tools/reproduce_css.py --out /tmp/css --config_arg cpu --composers concat,tirg_lastconv \\
      --seeds 0 --steps 50

Consecutive seeds (0,1,2) train together as one program (`config.num_seeds`,
cir_jax/seeds.py: the replicas in one vmapped step, each evaluated), in
`<out>/<setting>/<method>/seeds<first>-<last>`; other seed lists, or
--sequential_seeds, train one run per seed in `<out>/<setting>/<method>/seed<k>`.
Either way an interrupted sweep resumes: finished runs (a results.json at the
requested step) are read back, unfinished ones continue from their last checkpoint.
"""
import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # pylint: disable=g-import-not-at-top

from cir_jax import train  # pylint: disable=g-import-not-at-top
from tools import css_table  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parents[1]
SETTINGS = ("3d", "2d")


@dataclasses.dataclass(frozen=True)
class Method:
  """One row: a composer (with options and config overrides) and the paper's R@1."""
  name: str
  label: str
  composer: str
  kwargs: dict = dataclasses.field(default_factory=dict)
  overrides: dict = dataclasses.field(default_factory=dict)
  paper: dict = dataclasses.field(default_factory=dict)   # setting -> "73.7+-1.0" text
  table: str = "4"                                         # "4" or "5" (ablation)


# The paper's numbers: Table 4 (R@1, 3D->3D and 2D->3D) and Table 5 (CSS column).
METHODS = (
    Method("image_only", "Image only", "image_only", paper={"3d": "6.3", "2d": "6.3"}),
    Method("text_only", "Text only", "text_only", paper={"3d": "0.1", "2d": "0.1"}),
    Method("concat", "Concatenate", "concat", paper={"3d": "60.6±0.8", "2d": "27.3"}),
    Method("show_and_tell", "Show and Tell", "show_and_tell",
           paper={"3d": "33.0±3.2", "2d": "6.0"}),
    Method("param_hashing", "Parameter hashing", "param_hashing",
           paper={"3d": "60.5±1.9", "2d": "31.4"}),
    Method("relationship", "Relationship", "relationship", paper={"3d": "62.1±1.2", "2d": "30.6"}),
    Method("mrn", "MRN", "mrn", paper={"3d": "60.1±2.7", "2d": "26.8"}),
    Method("film", "FiLM", "film", paper={"3d": "65.6±0.5", "2d": "43.7"}),
    Method("tirg_lastconv", "TIRG (mod. at last conv)", "tirg_lastconv",
           paper={"3d": "73.7±1.0", "2d": "46.6"}),
    Method("tirg", "TIRG mod. at last fc", "tirg", paper={"3d": "71.2"}, table="5"),
    Method("tirg_lastconv_gate_only", "TIRG gated feature only", "tirg_lastconv",
           kwargs={"use_residual": False}, paper={"3d": "6.5"}, table="5"),
    Method("tirg_lastconv_residual_only", "TIRG residual feature only", "tirg_lastconv",
           kwargs={"use_gate": False}, paper={"3d": "60.6"}, table="5"),
    # google/tirg's batch-based classification uses the dot product of the scaled features.
    Method("tirg_lastconv_k_b", "TIRG DML loss K = B", "tirg_lastconv",
           overrides={"loss.name": "batch_classification", "loss.kernel": "dot"},
           paper={"3d": "69.8"}, table="5"),
)
METHODS_BY_NAME = {m.name: m for m in METHODS}


def load_config_module(path: str):
  spec = importlib.util.spec_from_file_location("reproduce_config", path)
  if spec is None:
    raise FileNotFoundError(f"--config {path!r} is not a Python config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def set_field(config, key: str, value):
  """config['a.b'] = value, coercing strings to the existing field's type; unknown keys fail."""
  node, *path = config, *key.split(".")
  *parents, last = path
  for p in parents:
    node = node[p]
  if last not in node:
    raise KeyError(f"--set {key}: the config has no field {key!r}")
  old = node[last]
  if isinstance(value, str) and not isinstance(old, str):
    if isinstance(old, bool):
      value = value.lower() in ("1", "true", "yes")
    elif isinstance(old, tuple):
      value = tuple(type(old[0])(v) if old else v for v in filter(None, value.split(":")))
    else:
      value = type(old)(value)
  node[last] = value


def make_config(args, method: Method, setting: str, seed: int, num_seeds: int = 1):
  """The experiment config of one run: configs/tirg_css.py[:config_arg] plus the run's fields
  (seeds seed .. seed + num_seeds - 1 in one program when num_seeds > 1)."""
  config = load_config_module(args.config).get_config(args.config_arg or None)
  config.model.composer = method.composer
  config.model.composer_kwargs = dict(method.kwargs)
  config.seed = seed
  config.num_seeds = num_seeds
  config.data.query_render = setting
  config.model.separate_query_encoder = setting == "2d"  # the paper's separate 2D/3D encoders
  if args.steps:
    config.num_train_steps = args.steps
    config.eval_every_steps = args.steps
    config.checkpoint_every_steps = min(config.checkpoint_every_steps, args.steps)
  if args.image_size:
    config.data.image_size = args.image_size
  for key, value in method.overrides.items():
    set_field(config, key, value)
  for item in args.set:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--set {item!r}: expected key=value")
    set_field(config, key, value)
  config.lock()
  return config


def read_finished(workdir: pathlib.Path, steps: int) -> Optional[dict]:
  """The run's results.json if it finished at `steps`, else None."""
  path = workdir / "results.json"
  if not path.exists():
    return None
  results = json.loads(path.read_text())
  return results if results.get("step") == steps else None


def seconds_per_step(workdir: pathlib.Path) -> Optional[float]:
  """Median training time per step from the run's metrics.jsonl (compilation excluded)."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return None
  rates = []
  for line in path.read_text().splitlines():
    rate = json.loads(line).get("perf/steps_per_sec")
    if rate:
      rates.append(rate)
  return float(1.0 / np.median(rates)) if rates else None


def together(seeds: list[int], sequential: bool) -> bool:
  """Whether `seeds` train as one multi-seed program (consecutive, more than one)."""
  return (not sequential and len(seeds) > 1
          and seeds == list(range(seeds[0], seeds[0] + len(seeds))))


def _run_seeds_together(args, method: Method, setting: str, out: pathlib.Path) -> list[dict]:
  """One program for all seeds; one record per seed (seconds_per_step: all replicas' step)."""
  seeds = args.seeds
  config = make_config(args, method, setting, seeds[0], num_seeds=len(seeds))
  workdir = out / setting / method.name / f"seeds{seeds[0]}-{seeds[-1]}"
  results = read_finished(workdir, config.num_train_steps)
  wall = None
  if results is None:
    print(f"[reproduce_css] training {setting} {method.name} seeds {seeds} in one program -> "
          f"{workdir}", flush=True)
    start = time.perf_counter()
    results = train.train_and_evaluate(config, str(workdir))
    wall = time.perf_counter() - start
  else:
    print(f"[reproduce_css] done already: {setting} {method.name} seeds {seeds}", flush=True)
  per_seed = results.get("per_seed") or [{"seed": seeds[0], "metrics": results["metrics"]}]
  return [{"setting": setting, "method": method.name, "seed": r["seed"], "step": results["step"],
           "metrics": r["metrics"], "wall_seconds": wall,
           "seconds_per_step": seconds_per_step(workdir),
           "num_queries": results.get("num_queries"), "num_gallery": results.get("num_gallery")}
          for r in per_seed]


def run_all(args) -> list[dict]:
  """Trains (or reads back) every (setting, method, seed) run; returns one record per seed."""
  out = pathlib.Path(args.out)
  records = []
  for setting in args.settings:
    for name in args.composers:
      method = METHODS_BY_NAME[name]
      if together(args.seeds, args.sequential_seeds):
        records += _run_seeds_together(args, method, setting, out)
        continue
      for seed in args.seeds:
        config = make_config(args, method, setting, seed)
        workdir = out / setting / name / f"seed{seed}"
        results = read_finished(workdir, config.num_train_steps)
        wall = None
        if results is None:
          print(f"[reproduce_css] training {setting} {name} seed {seed} -> {workdir}", flush=True)
          start = time.perf_counter()
          results = train.train_and_evaluate(config, str(workdir))
          wall = time.perf_counter() - start
        else:
          print(f"[reproduce_css] done already: {setting} {name} seed {seed}", flush=True)
        records.append({
            "setting": setting, "method": name, "seed": seed, "step": results["step"],
            "metrics": results["metrics"], "wall_seconds": wall,
            "seconds_per_step": seconds_per_step(workdir),
            "num_queries": results.get("num_queries"), "num_gallery": results.get("num_gallery"),
        })
  return records


def budget_lines(args, config) -> list[str]:
  """How the numbers were obtained (the same for every run)."""
  d = config.data
  return [
      f"- config: `{os.path.relpath(args.config, REPO)}:{args.config_arg}` "
      f"{' '.join('--set ' + s for s in args.set)}".rstrip(),
      f"- {config.num_train_steps} steps x batch {config.batch_size} "
      f"({config.optimizer.name}, lr {config.optimizer.learning_rate}), loss {config.loss.name}"
      + (" (the K = B row: batch_classification)" if "tirg_lastconv_k_b" in args.composers
         else ""),
      f"- image encoder {config.model.image_encoder}, embedding {config.model.embed_dim}, "
      f"{d.image_size} px",
      f"- CSS: {d.num_scenes} scenes / {d.num_queries} queries per split (seed {d.dataset_seed}),"
      f" evaluated on `{d.eval_split}`"
      + (f" (first {d.eval_max_queries} queries only)" if d.eval_max_queries else " (all queries)"),
      f"- seeds {','.join(map(str, args.seeds))} (model init and data order; same dataset"
      + ("; trained together in one program, config.num_seeds" if together(
          args.seeds, args.sequential_seeds) else "") + "); std is the sample std over seeds",
      "- 2D->3D: 2D query renders, 3D gallery, separate query/target image encoders "
      "(as in the paper)",
  ]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="directory for the runs and the results")
  parser.add_argument("--config", default=str(REPO / "configs" / "tirg_css.py"))
  parser.add_argument("--config_arg", default="", help="e.g. 'cpu' (configs/tirg_css.py:cpu)")
  parser.add_argument("--steps", type=int, default=0, help="0 = the config's num_train_steps")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
  parser.add_argument("--composers", default=",".join(METHODS_BY_NAME),
                      help=f"comma-separated methods of {list(METHODS_BY_NAME)}")
  parser.add_argument("--settings", default="3d,2d", help="3d (3D->3D) and/or 2d (2D->3D)")
  parser.add_argument("--image_size", type=int, default=0, help="0 = the config's size")
  parser.add_argument("--sequential_seeds", action="store_true",
                      help="one run per seed instead of consecutive seeds in one program")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. --set data.num_scenes=20 (repeatable)")
  args = parser.parse_args(argv)
  args.seeds = [int(s) for s in args.seeds.split(",") if s]
  args.composers = [c for c in args.composers.split(",") if c]
  args.settings = [s for s in args.settings.split(",") if s]
  unknown = [c for c in args.composers if c not in METHODS_BY_NAME]
  if unknown:
    parser.error(f"unknown --composers {unknown}; valid: {list(METHODS_BY_NAME)}")
  bad = [s for s in args.settings if s not in SETTINGS]
  if bad:
    parser.error(f"unknown --settings {bad}; valid: {list(SETTINGS)}")
  if not args.seeds:
    parser.error("--seeds needs at least one seed")
  return args


def main(argv=None):
  args = parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  records = run_all(args)
  config = make_config(args, METHODS_BY_NAME[args.composers[0]], args.settings[0], args.seeds[0])
  summary = css_table.aggregate(records)
  (out / "results.json").write_text(json.dumps({"runs": records, "summary": summary}, indent=2))
  methods = [METHODS_BY_NAME[c] for c in args.composers]
  (out / "results.md").write_text(
      css_table.markdown(methods, args.settings, summary, budget_lines(args, config)))
  css_table.bar_chart(methods, args.settings, summary, out / "results.png")
  print(f"[reproduce_css] wrote {out / 'results.md'} and {out / 'results.png'}")
  return summary


if __name__ == "__main__":
  main()

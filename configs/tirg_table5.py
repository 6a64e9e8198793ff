"""TIRG paper Table 5 (ablations, R@1) on Fashion200k, MIT-States and CSS: one row per run.

`dataset=` fashion200k | mit_states | css picks the paper config (configs/tirg_<dataset>.py,
its full model: fc-level TIRG with K = B on Fashion200k, fc-level with K = 2 on MIT-States,
last-conv with K = 2 on CSS); `row=` changes one thing:
  full           the paper config as is ("Our Full Model")
  gate_only      "- gated feature only": TIRG without the residual branch
  residual_only  "- residue feature only": TIRG without the gate
  last_fc        "mod. at last fc": fc-level TIRG
  last_conv      "mod. at last conv": TIRG on the last conv map
  k2             "DML loss, K = 2": soft triplet (Eq. 5)
  kB             "DML loss, K = B": batch classification (Eq. 6)
  python -m cir_jax.train --config configs/tirg_table5.py:dataset=mit_states,row=gate_only \
      --config.data.manual_dir=/path/to/mit_states --workdir runs/table5_mit_gate_only
Everything else (steps, optimiser, encoders, data) is the dataset config's; `cpu` passes
through to configs/tirg_css.py.
"""
from configs import common
from configs import tirg_css
from configs import tirg_fashion200k
from configs import tirg_mit_states

DATASETS = {"fashion200k": tirg_fashion200k, "mit_states": tirg_mit_states, "css": tirg_css}
ROWS = ("full", "gate_only", "residual_only", "last_fc", "last_conv", "k2", "kB")


def get_config(arg=None):
  arg = common.parse_arg(arg, dataset="mit_states", row="full", cpu=False, steps=0)
  if arg.dataset not in DATASETS:
    raise ValueError(f"tirg_table5: dataset={arg.dataset!r}; valid: {sorted(DATASETS)}")
  if arg.row not in ROWS:
    raise ValueError(f"tirg_table5: row={arg.row!r}; valid: {list(ROWS)}")
  passed = [f"steps={arg.steps}"] if arg.steps else []
  if arg.cpu:
    if arg.dataset != "css":
      raise ValueError("tirg_table5: cpu is only for dataset=css")
    passed.append("cpu")
  c = DATASETS[arg.dataset].get_config(",".join(passed) or None)
  if arg.row == "gate_only":
    c.model.composer_kwargs.use_residual = False
  elif arg.row == "residual_only":
    c.model.composer_kwargs.use_gate = False
  elif arg.row == "last_fc":
    c.model.composer = "tirg"
  elif arg.row == "last_conv":
    c.model.composer = "tirg_lastconv"
  elif arg.row == "k2":
    c.loss.name = "soft_triplet"
  elif arg.row == "kB":
    c.loss.name = "batch_classification"
  return c

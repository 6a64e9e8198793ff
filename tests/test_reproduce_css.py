"""tools/reproduce_css.py end to end on a tiny CSS: tables, chart, resume."""
import json

import numpy as np
import pytest
from PIL import Image

from tools import css_table
from tools import reproduce_css

TINY = ["data.image_size=32", "data.num_scenes=20", "data.num_queries=50",
        "model.image_encoder=resnet_tiny", "model.embed_dim=16", "model.word_dim=8",
        "model.text_hidden_dim=16", "batch_size=8", "eval.batch_size=16", "eval.block_size=8",
        "log_every_steps=1"]


@pytest.mark.slow
def test_small_sweep_writes_both_tables_and_a_png_and_resumes(tmp_path, capsys):
  out = tmp_path / "sweep"
  argv = ["--out", str(out), "--config_arg", "cpu", "--steps", "3", "--seeds", "0",
          "--composers", "image_only,tirg_lastconv_gate_only", "--settings", "3d",
          "--set", f"data.data_dir={tmp_path / 'tfds'}"]
  for item in TINY:
    argv += ["--set", item]
  summary = reproduce_css.main(argv)
  assert set(summary["3d"]) == {"image_only", "tirg_lastconv_gate_only"}
  text = (out / "results.md").read_text()
  assert "| Image only | " in text and "| 6.3 |" in text                  # Table 4 row + paper
  assert "| TIRG gated feature only | " in text and "| 6.5 |" in text   # Table 5 row + paper
  assert "3 steps x batch 8" in text and "R@50" in text
  with Image.open(out / "results.png") as png:
    assert png.format == "PNG" and png.size[0] > 100 and png.size[1] > 100
    png.verify()
  runs = json.loads((out / "results.json").read_text())["runs"]
  assert [r["step"] for r in runs] == [3, 3]
  # Resume: a second call reads the finished runs back instead of training again.
  result = out / "3d" / "image_only" / "seed0" / "results.json"
  before = result.stat().st_mtime_ns
  capsys.readouterr()
  again = reproduce_css.main(argv)
  assert "done already" in capsys.readouterr().out and result.stat().st_mtime_ns == before
  assert again == summary


def test_aggregate_and_table_cells():
  records = [{"setting": "3d", "method": "concat", "seed": s, "step": 5, "seconds_per_step": t,
              "metrics": {"R@1": r, "R@5": r + 10}} for s, r, t in [(0, 50.0, 0.1), (1, 60.0, 0.3)]]
  summary = css_table.aggregate(records)
  entry = summary["3d"]["concat"]
  assert entry["R@1"]["mean"] == 55.0 and entry["R@1"]["n"] == 2
  np.testing.assert_allclose(entry["R@1"]["std"], np.std([50.0, 60.0], ddof=1))
  assert entry["seconds_per_step"] == pytest.approx(0.2)
  assert css_table.paper_value("73.7±1.0") == (73.7, 1.0)
  assert css_table.paper_value("6.3") == (6.3, 0.0)
  method = reproduce_css.METHODS_BY_NAME["concat"]
  text = css_table.markdown([method], ["3d", "2d"], summary, ["- budget"])
  assert "| Concatenate | 55.0 ± 7.1 | 60.6±0.8 | — | 27.3 |" in text


def test_bad_flags_name_the_valid_choices():
  with pytest.raises(SystemExit):
    reproduce_css.parse_args(["--out", "x", "--composers", "tirgg"])
  config_args = reproduce_css.parse_args(["--out", "x", "--set", "data.num_scene=3"])
  with pytest.raises(KeyError, match="no field 'data.num_scene'"):
    reproduce_css.make_config(config_args, reproduce_css.METHODS[0], "3d", 0)


def test_run_configs_follow_the_paper_settings():
  args = reproduce_css.parse_args(["--out", "x", "--config_arg", "cpu", "--steps", "7"])
  ablation = reproduce_css.METHODS_BY_NAME["tirg_lastconv_k_b"]
  config = reproduce_css.make_config(args, ablation, "2d", 3)
  assert config.model.composer == "tirg_lastconv" and config.loss.name == "batch_classification"
  assert config.data.query_render == "2d" and config.model.separate_query_encoder
  assert config.seed == 3 and config.num_train_steps == 7 and config.eval_every_steps == 7
  gate_only = reproduce_css.make_config(
      args, reproduce_css.METHODS_BY_NAME["tirg_lastconv_gate_only"], "3d", 0)
  assert dict(gate_only.model.composer_kwargs) == {"use_residual": False}
  assert not gate_only.model.separate_query_encoder

"""tools/device_check.py end to end at tiny sizes, in a subprocess that cannot import
TensorFlow, TensorFlow Datasets or Pillow (the bare accelerator machines have none)."""
import os
import subprocess
import sys

import pytest

from tests import xla_flags
from tests.conftest import REPO

# Imports of these modules fail in the child, as on a machine without them.
BLOCK = """
import sys, runpy
for name in ("tensorflow", "tensorflow_datasets", "PIL"):
  sys.modules[name] = None
sys.argv = ["tools/device_check.py"] + sys.argv[1:]
runpy.run_path("tools/device_check.py", run_name="__main__")
"""
# Two of the check's three methods (the loop over methods is what is exercised).
CSS_METHODS = ("tirg_lastconv", "image_only")


@pytest.mark.slow
def test_device_check_runs_without_tensorflow(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  env["XLA_FLAGS"] = xla_flags.for_devices(1)
  out = subprocess.run(
      [sys.executable, "-c", BLOCK, "--tiny", "--out", str(tmp_path / "runs"),
       "--css_seeds", "2", "--css_methods", ",".join(CSS_METHODS)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=1200, check=False)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  text = out.stdout
  table = text[text.index("## device check"):]
  for row in ("| TIRG/resnet_tiny 32px b8 bfloat16 |", "| Combiner clip_vision_tiny",
              "| gallery top-50 64 x 512 x 16 f32 |", "| CSS tirg_lastconv/resnet_tiny"):
    assert row in table, table
  assert "skipped" not in table, table
  for method in CSS_METHODS:
    assert f"| {method} | " in table, table
  assert "2 seeds" in table and "R@1" in table
  # The runs were trained and evaluated by the trainer, from device-resident data.
  log = (tmp_path / "runs" / "css" / "3d" / "image_only").rglob("log.txt")
  assert any("batches are drawn inside the train step" in p.read_text() for p in log)

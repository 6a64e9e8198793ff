"""tools/retrieve.py on a tiny trained workdir: top-k printed, a plausible PNG written."""
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests import train_subprocess as ts

TOOL = ts.REPO / "tools" / "retrieve.py"


@pytest.fixture(scope="module")
def trained(tiny_css_run):
  return tiny_css_run  # (env, workdir): the session's tiny CSS run


def _tool(env, workdir, *args):
  result = subprocess.run(
      [sys.executable, str(TOOL), f"--config={env['config']}", f"--workdir={workdir}", *args],
      cwd=ts.REPO, env=env["env"], capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  return result.stdout


def _check_png(path, rows, k):
  image = Image.open(path)
  assert image.format == "PNG"
  from tools import retrieve  # pylint: disable=g-import-not-at-top
  width = 2 * retrieve.MARGIN + (retrieve.CELL + retrieve.MARGIN) * (k + 1) + retrieve.TEXT_WIDTH
  assert image.size[0] == width
  assert rows * retrieve.CELL < image.size[1] < rows * (retrieve.CELL + 60)
  pixels = np.asarray(image.convert("RGB"))
  assert pixels.std() > 10  # images were drawn, not a blank canvas
  return pixels


@pytest.mark.slow
def test_random_queries_figure(trained):
  env, workdir = trained
  out = env["root"] / "random.png"
  stdout = _tool(env, workdir, "--random=3", "--k=4", f"--out={out}")
  assert len(re.findall(r"^query \d+: reference \S+ \+ '.+'$", stdout, re.M)) == 3, stdout
  ranks = re.findall(r"^\s+(\d)\. \S+  score -?\d+\.\d{4}", stdout, re.M)
  assert ranks == ["1", "2", "3", "4"] * 3, stdout
  assert f"wrote {out}" in stdout
  _check_png(out, rows=3, k=4)


@pytest.mark.slow
def test_reference_image_against_a_folder(trained, tmp_path):
  env, workdir = trained
  gallery = tmp_path / "gallery"
  gallery.mkdir()
  rng = np.random.default_rng(0)
  for i in range(5):
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(gallery / f"g{i}.png")
  reference = tmp_path / "ref.png"
  Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(reference)
  out = tmp_path / "folder.png"
  stdout = _tool(env, workdir, f"--reference={reference}", "--text=make it red",
                 f"--gallery_dir={gallery}", "--k=3", f"--out={out}")
  listed = re.findall(r"^\s+\d\. (g\d\.png)  score", stdout, re.M)
  assert len(listed) == 3 and len(set(listed)) == 3, stdout  # the reference itself never listed
  _check_png(out, rows=1, k=3)

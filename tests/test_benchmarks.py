"""Smoke tests of the benchmark tools (no timing assertions: they only must not rot).

tools/benchmark_vs_pytorch.py normally imports google/tirg's checkout; here a
tiny stand-in directory written by the test has the same module names and the
same Python-2-era constructs the runtime shims exist for (`range(n) + range(m)`,
a legacy autograd Function with instance forward/backward, `.cuda()` calls).
"""
import os
import pathlib
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import benchmark_vs_pytorch as vs  # noqa: E402  pylint: disable=g-import-not-at-top

STAND_IN_FUNCTIONS = '''
import numpy as np
import torch


class MyTripletLossFunc(torch.autograd.Function):
  """Legacy style, as google/tirg's torch_functions.py: state on the instance."""

  def __init__(self, triplets):
    super(MyTripletLossFunc, self).__init__()
    self.triplets = triplets

  def forward(self, features):
    self.save_for_backward(features)
    f = features.detach().numpy()
    loss = sum(np.sum((f[i] - f[j]) ** 2) for i, j, _ in self.triplets) / len(self.triplets)
    return torch.FloatTensor((loss,))

  def backward(self, grad_output):
    features, = self.saved_tensors
    f = features.detach().numpy()
    g = np.zeros_like(f)
    for i, j, _ in self.triplets:
      g[i] += 2 * (f[i] - f[j]) / len(self.triplets)
      g[j] -= 2 * (f[i] - f[j]) / len(self.triplets)
    return torch.from_numpy(g) * float(grad_output.data[0])
'''

STAND_IN_MODELS = '''
import torch
import torch_functions


class TIRG(torch.nn.Module):
  """Tiny stand-in with google/tirg's constructor and compute_loss signature."""

  def __init__(self, texts, embed_dim):
    super(TIRG, self).__init__()
    self.words = sorted({w for t in texts for w in t.split()})
    self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    self.embed = torch.nn.Embedding(len(self.words), 4)

  def compute_loss(self, imgs_query, modification_texts, imgs_target, soft_triplet_loss=True):
    ids = torch.tensor([self.words.index(t.split()[0]) for t in modification_texts]).cuda()
    q = self.conv(imgs_query).mean(dim=(2, 3)) + self.embed(ids)
    t = self.conv(imgs_target).mean(dim=(2, 3))
    labels = range(q.shape[0]) + range(t.shape[0])  # Python 2 lists
    triplets = [[i, i + q.shape[0], 0] for i in range(q.shape[0])]
    assert len(labels) == 2 * q.shape[0]
    return torch_functions.MyTripletLossFunc(triplets)(torch.cat([q, t]))
'''


@pytest.fixture()
def stand_in_dir(tmp_path):
  (tmp_path / "torch_functions.py").write_text(textwrap.dedent(STAND_IN_FUNCTIONS))
  (tmp_path / "img_text_composition_models.py").write_text(textwrap.dedent(STAND_IN_MODELS))
  return tmp_path


def test_legacy_function_adapter_gives_the_legacy_gradient(stand_in_dir, monkeypatch):
  monkeypatch.syspath_prepend(str(stand_in_dir))
  monkeypatch.setattr(torch.Tensor, "cuda", torch.Tensor.cuda)  # the shim replaces these
  monkeypatch.setattr(torch.nn.Module, "cuda", torch.nn.Module.cuda)
  for name in ("img_text_composition_models", "torch_functions"):
    monkeypatch.delitem(sys.modules, name, raising=False)
  models = vs._apply_shims(str(stand_in_dir))
  functions = sys.modules["torch_functions"]
  x = torch.tensor([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]], requires_grad=True)
  loss = functions.MyTripletLossFunc([[0, 1, 2]])(x)
  loss.backward()
  # Hand-worked: loss = |x0 - x1|^2 = 0.25 + 9; d/dx0 = 2 (x0 - x1), d/dx1 = -that.
  np.testing.assert_allclose(loss.item(), 9.25)
  np.testing.assert_allclose(x.grad.numpy(), [[1.0, 6.0], [-1.0, -6.0], [0.0, 0.0]])
  assert models.range(3) == [0, 1, 2]
  for name in ("img_text_composition_models", "torch_functions"):
    sys.modules.pop(name, None)


def test_summarize_hand_worked():
  # 20 ex/s at batch 10 = 2 steps/s x 1 GFLOP = 2 GFLOP/s: 2% of 100, 1% of 200.
  out = vs.summarize({"torch": [10.0, 20.0, 30.0], "jax": [15.0, 20.0, 60.0]}, batch=10,
                     flops_per_step=1e9, peaks={"torch": 1e11, "jax": 2e11})
  assert out["torch"] == {"min": 10.0, "median": 20.0, "max": 30.0, "pct_peak": 2.0}
  assert out["jax"]["median"] == 20.0 and out["jax"]["pct_peak"] == 1.0
  assert out["ratio"] == 1.0
  np.testing.assert_allclose(out["round_ratios"], [1.5, 1.0, 2.0])


@pytest.mark.slow  # two worker processes each import jax/TF and compile (~30 s quiet)
def test_alternated_run_end_to_end(stand_in_dir, monkeypatch):
  """Both worker processes start, alternate, and report sane numbers."""
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(pathlib.Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
  args = vs.parse_args(["--tirg_dir", str(stand_in_dir), "--batch", "4", "--threads", "1",
                        "--rounds", "2", "--steps", "1", "--warmup", "0", "--peak_n", "64",
                        "--image_encoder", "resnet_tiny", "--conv_impl", "matmul",
                        "--embed_dim", "8", "--text_len", "3", "--steps_per_call", "2"])
  lines = []
  result = vs.compare(args, 16, log=lines.append)
  assert [l.split()[3] for l in lines] == ["torch", "jax", "jax", "torch"]  # A/B, B/A
  for side in vs.SIDES:
    s = result[side]
    assert 0 < s["min"] <= s["median"] <= s["max"] and s["pct_peak"] > 0
  assert len(result["round_ratios"]) == 2 and result["ratio"] > 0
  assert result["flops_per_step"] > 0 and result["xla_flops_per_step"] > 0


def test_a_call_of_k_steps_reports_one_steps_flops():
  """XLA counts a while loop's body once: step_flops of a K-step call is one step's."""
  import benchmark  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from cir_jax import experiment  # pylint: disable=g-import-not-at-top
  from tests import fakes  # pylint: disable=g-import-not-at-top
  rows = {}
  for k in (1, 3):
    config = fakes.tiny_config(steps_per_call=k)
    mesh = experiment.make_mesh(config, jax.devices()[:1])
    rows[k] = benchmark.bench_config(config, mesh, warmup=1, steps=1)
  assert rows[1]["flops"] > 0 and rows[3]["examples/s"] > 0
  np.testing.assert_allclose(rows[3]["flops"], rows[1]["flops"], rtol=0.01)


def test_progress_summary_excludes_the_compiling_first_update(monkeypatch):
  """`make demo` ends with this line: examples/s after the first (compiling) update."""
  from cir_jax.utils import logging as log_lib  # pylint: disable=g-import-not-at-top
  clock = iter([100.0, 160.0, 170.0, 180.0])   # init, step 1 (compile), steps 11 and 21
  monkeypatch.setattr(log_lib.time, "perf_counter", lambda: next(clock))
  progress = log_lib.Progress(total_steps=21, start_step=0, batch_size=8)
  assert "too few" in progress.summary()
  assert progress.update(1) == {"perf/first_steps_sec": 60.0}
  progress.update(11)
  progress.update(21)
  # 20 steps x 8 examples in 20 s after the first update: 8.0 examples/s.
  assert progress.summary().startswith("step throughput: 8.0 examples/s (20 steps x 8 in 20.0s")


def test_conv_layers_are_resnet18s_and_flops_hand_worked():
  import benchmark_conv_layers as layers  # pylint: disable=g-import-not-at-top
  convs = layers.resnet18_convs(224)
  assert [(name, hw) for name, *_, hw in convs] == [
      ("stem 7x7/2", 224), ("stage0 3x3", 56), ("stage1 3x3/2", 56), ("stage1 1x1/2", 56),
      ("stage1 3x3", 28), ("stage2 3x3/2", 28), ("stage2 1x1/2", 28), ("stage2 3x3", 14),
      ("stage3 3x3/2", 14), ("stage3 1x1/2", 14), ("stage3 3x3", 7)]
  assert [hw for *_, hw in layers.resnet18_convs(64)] == [64, 16, 16, 16, 8, 8, 8, 4, 4, 4, 2]
  # stem at 224: 112 x 112 outputs x 7 x 7 x 3 x 64 MACs per image.
  assert layers.conv_flops(32, 3, 64, 7, 2, 224) == 2 * 32 * 112 * 112 * 7 * 7 * 3 * 64
  assert layers.conv_flops(1, 64, 128, 3, 2, 56) == 2 * 28 * 28 * 9 * 64 * 128
  assert layers.conv_flops(1, 64, 128, 1, 2, 56) == 2 * 28 * 28 * 64 * 128   # the shortcut


def test_conv_layers_end_to_end_and_restores_the_cpu_affinity(capsys):
  import benchmark_conv_layers as layers  # pylint: disable=g-import-not-at-top
  before = os.sched_getaffinity(0)
  rows = layers.main(["--size", "32", "--batch", "2", "--rounds", "1", "--steps", "1",
                      "--threads", "1", "--layers", "stem 7x7/2,stage3 3x3"])
  assert os.sched_getaffinity(0) == before
  assert [r["layer"] for r in rows] == ["stem 7x7/2", "stage3 3x3"]
  assert all(r[k] > 0 for r in rows for k in ("torch_fwd", "jax_fwd", "torch_bwd", "jax_bwd"))
  out = capsys.readouterr().out
  assert "| stem 7x7/2 | 32x32x3 | xla |" in out and "| stage3 3x3 | 1x1x512 | matmul |" in out
  # 'auto' follows the network's input size, as the model does: all native above 128 px.
  rows = layers.main(["--size", "160", "--batch", "1", "--rounds", "1", "--steps", "1",
                      "--threads", "1", "--layers", "stage3 3x3", "--xla_options", "default"])
  out = capsys.readouterr().out
  assert "| stage3 3x3 | 5x5x512 | xla |" in out and "XLA options default" in out

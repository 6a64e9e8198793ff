"""tools/profile_train_step.py: its HLO and trace parsing on hand-written inputs, and one tiny
end-to-end run (no timing assertions: the tool must only not rot)."""
import gzip
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
import profile_train_step as prof  # noqa: E402  pylint: disable=g-import-not-at-top

HLO = """HloModule jit_step

%fused_computation.1 (p0: f32[2,8,8,3], p1: f32[3,3,3,4]) -> f32[2,8,8,4] {
  %p0 = f32[2,8,8,3]{3,2,1,0} parameter(0)
  %p1 = f32[3,3,3,4]{3,2,1,0} parameter(1)
  ROOT %convolution.1 = f32[2,8,8,4]{3,2,1,0} convolution(%p0, %p1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
}

%fused_computation.2 (p0: f32[16,27], p1: f32[27,4]) -> f32[16,4] {
  %p0 = f32[16,27]{1,0} parameter(0)
  %p1 = f32[27,4]{1,0} parameter(1)
  ROOT %dot.1 = f32[16,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[2,8,8,3], b: f32[3,3,3,4], c: f32[16,27], d: f32[27,4]) -> f32[16,4] {
  %ynn_fusion.7 = f32[2,8,8,4]{3,2,1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.1
  %ynn_fusion.9 = f32[16,4]{1,0} fusion(%c, %d), kind=kCustom, calls=%fused_computation.2
  %conv_general_dilated.3 = f32[2,8,8,4]{3,2,1,0} convolution(%a, %b), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
  ROOT %dot.5 = f32[16,4]{1,0} dot(%c, %d), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""


def test_fusions_map_to_their_convolution_or_dot():
  contents = prof.fusion_contents(HLO)
  conv = "conv f32[2,8,8,4]{3,2,1,0} window={size=3x3 pad=1_1x1_1}"
  dot = "dot f32[16,4]{1,0} lhs_contracting_dims={1}"
  # Library fusions by what they call; Eigen's convolutions and dots (their own thunks)
  # by themselves; the instructions inside fused computations never run as thunks.
  assert {k: v for k, v in contents.items() if k.startswith(("ynn", "conv_general", "dot.5"))} == {
      "ynn_fusion.7": conv, "ynn_fusion.9": dot, "conv_general_dilated.3": conv, "dot.5": dot}


def test_trace_is_grouped_per_step_and_host_events_are_left_out(tmp_path):
  events = [{"ph": "X", "name": n, "dur": d} for n, d in [
      ("ynn_fusion.7", 3000), ("ynn_fusion.7", 1000), ("ynn_fusion.9", 2000),
      ("concatenate.3", 1500), ("concatenate.4", 500), ("ThunkExecutor::Execute", 9000),
      ("$api.py:2479 block_until_ready", 9000), ("PjitFunction(jit(step))", 9000)]]
  events.append({"ph": "i", "name": "ynn_fusion.7"})   # an instant event has no duration
  # An older run's trace in the same directory is ignored: the newest file is read.
  stale = [{"ph": "X", "name": "stale.1", "dur": 1}]
  for run, trace in (("0_old_run", stale), ("1_new_run", events)):
    (tmp_path / run).mkdir()
    with gzip.open(tmp_path / run / "perfetto_trace.json.gz", "wt") as f:
      json.dump({"traceEvents": trace}, f)
  os.utime(tmp_path / "0_old_run" / "perfetto_trace.json.gz", (1, 1))
  totals = prof.thunk_times(str(tmp_path))
  assert totals == {"ynn_fusion.7": 4000, "ynn_fusion.9": 2000, "concatenate.3": 1500,
                    "concatenate.4": 500}
  groups, thunks = prof.group(totals, prof.fusion_contents(HLO), steps=2)
  assert groups == [("conv", 2.0, 0.5), ("dot", 1.0, 0.25), ("concatenate", 1.0, 0.25)]
  assert thunks[0] == (2.0, "ynn_fusion.7", "conv f32[2,8,8,4]{3,2,1,0} window={size=3x3 pad=1_1x1_1}")


def test_tool_runs_end_to_end_at_tiny_sizes(tmp_path, capsys):
  groups = prof.main(["--size", "32", "--batch", "4", "--image_encoder", "resnet_tiny",
                      "--embed_dim", "16", "--steps", "1", "--top", "5",
                      "--trace_dir", str(tmp_path)])
  names = [name for name, _, _ in groups]
  assert "conv" in names or "dot" in names, names
  assert abs(sum(share for _, _, share in groups) - 1.0) < 1e-6
  out = capsys.readouterr().out
  assert "| op group | ms/step | share |" in out and "slowest 5 thunks" in out

"""Process-0 logging: a text log, TensorBoard scalars, and a progress line with ETA."""
import datetime
import json
import logging
import pathlib
import sys
import time

import jax
import numpy as np


DETAIL_LOG = "detail.log"


def quiet_console(workdir=None):
  """Keeps the console to our own lines: libraries' Python INFO logs (Orbax, TFDS, JAX)
  go only to `<workdir>/detail.log` (if `workdir` is a directory); warnings and errors
  still reach the console.
  TFDS's progress bars are turned off (our loaders print their own progress)."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.get_absl_handler().setLevel(logging.WARNING)
  if workdir and pathlib.Path(workdir).is_dir() and jax.process_index() == 0:
    path = pathlib.Path(workdir)
    detail = logging.FileHandler(path / DETAIL_LOG)
    detail.setLevel(logging.INFO)
    detail.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(detail)
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:  # accelerator images without TensorFlow
    return
  tfds.disable_progress_bar()


class Logger:
  """Prints on process 0 and appends to `<workdir>/log.txt`."""

  def __init__(self, workdir=None, stream=sys.stdout):
    self.path = pathlib.Path(workdir) / "log.txt" if workdir else None
    self.stream = stream

  def __call__(self, message: str):
    if jax.process_index() != 0:
      return
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=self.stream, flush=True)
    if self.path is not None:
      with self.path.open("a") as f:
        f.write(f"[{stamp}] {message}\n")


def _scalar_metadata():
  from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
  return summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))


METRICS_JSONL = "metrics.jsonl"


def read_metrics(workdir, last_step=None) -> list[dict]:
  """The rows of `<workdir>/metrics.jsonl` (steps <= `last_step` if given), in file order.

  A line that does not parse (cut short by a kill during a write) is skipped.
  """
  path = pathlib.Path(workdir) / METRICS_JSONL
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(row, dict) and (last_step is None or row.get("step", 0) <= last_step):
      rows.append(row)
  return rows


class SummaryWriter:
  """TensorBoard scalars under `<workdir>/tensorboard` and JSON lines in
  `<workdir>/metrics.jsonl`, written by process 0 only.

  With `start_step` (a resumed run) the rows of steps after it, written before an
  interruption and about to be trained again, are first dropped from
  metrics.jsonl, so every step appears once (TensorBoard event files are left
  as they are).
  """

  def __init__(self, workdir, start_step=None):
    self.writer = None
    self.jsonl = pathlib.Path(workdir) / METRICS_JSONL
    if jax.process_index() == 0 and start_step is not None and self.jsonl.exists():
      kept = read_metrics(workdir, start_step)
      partial = self.jsonl.with_name(f".{METRICS_JSONL}.tmp")
      partial.write_text("".join(json.dumps(row) + "\n" for row in kept))
      partial.replace(self.jsonl)  # a kill now leaves the old file or the new, never half
    self.primary = jax.process_index() == 0
    if self.primary:
      try:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
      except ImportError:  # a machine without TensorFlow: metrics.jsonl only
        tf = None
      if tf is not None:
        self.writer = tf.summary.create_file_writer(str(pathlib.Path(workdir) / "tensorboard"))

  def scalars(self, step: int, values: dict):
    if not self.primary:
      return
    scalars = {}
    for name, value in values.items():
      value = np.asarray(value)
      if value.ndim == 0 and np.issubdtype(value.dtype, np.number):
        scalars[name] = float(value)
    # tf.summary.scalar needs the `tensorboard` package (not a dependency of
    # tensorflow 2.21); the core op with the scalar plugin's metadata writes the
    # same event that TensorBoard's scalars dashboard reads.
    if self.writer is not None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      with self.writer.as_default(step=step):
        for name, value in scalars.items():
          tf.summary.write(name, tf.constant(value, tf.float32), metadata=_scalar_metadata())
      self.writer.flush()
    with self.jsonl.open("a") as f:
      f.write(json.dumps({"step": step, **scalars}) + "\n")

  def close(self):
    if self.writer is not None:
      self.writer.close()


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
  """Steps/s, examples/s and ETA over the steps since the last update.

  The first update after (re)start includes compilation and is reported apart.
  """

  def __init__(self, total_steps: int, start_step: int, batch_size: int, what: str = "step"):
    self.total, self.batch_size, self.what = total_steps, batch_size, what
    self.last_step, self.last_time = start_step, time.perf_counter()
    self.start_time = self.last_time
    self.rate = None
    self.warm_step = self.warm_time = None   # where the first (compiling) update ended

  def update(self, step: int) -> dict:
    now = time.perf_counter()
    steps, elapsed = step - self.last_step, now - self.last_time
    first = self.rate is None
    self.rate = steps / elapsed if elapsed > 0 else 0.0
    self.last_step, self.last_time = step, now
    out = {"perf/steps_per_sec": self.rate, "perf/examples_per_sec": self.rate * self.batch_size}
    if first:
      out = {"perf/first_steps_sec": elapsed}
      self.warm_step, self.warm_time = step, now
    return out

  def summary(self) -> str:
    """One line: examples/s over all updates after the first (which includes compilation)."""
    if self.warm_step is None or self.last_step <= self.warm_step:
      return f"{self.what} throughput: too few logged {self.what}s after the first to measure"
    steps, elapsed = self.last_step - self.warm_step, self.last_time - self.warm_time
    rate = steps * self.batch_size / elapsed
    return (f"{self.what} throughput: {rate:.1f} examples/s ({steps} {self.what}s x "
            f"{self.batch_size} in {elapsed:.1f}s, after the first {self.what}(s) incl. compile)")

  def line(self, step: int, metrics: dict) -> str:
    parts = [f"{self.what} {step}/{self.total}"]
    for key in ("loss", "batch_R@1", "batch_R@10"):
      if key in metrics:
        parts.append(f"{key} {float(metrics[key]):.4g}")
    if "perf/steps_per_sec" in metrics and self.rate:
      plural = (self.what[:-1] + "ies" if self.what.endswith("y") else
                self.what + ("es" if self.what.endswith(("ch", "sh", "s", "x")) else "s"))
      parts.append(f"{self.rate:.2f} {plural}/s ({self.rate * self.batch_size:.0f} ex/s)")
      parts.append(f"ETA {_duration((self.total - step) / self.rate)}")
    elif "perf/first_steps_sec" in metrics:
      parts.append(f"first step(s) incl. compile {metrics['perf/first_steps_sec']:.1f}s")
    parts.append(f"elapsed {_duration(time.perf_counter() - self.start_time)}")
    return " | ".join(parts)

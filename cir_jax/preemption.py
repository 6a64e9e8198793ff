"""Stop training cleanly on SIGTERM / SIGINT (preemption, Ctrl-C).

The handler only sets a flag; the training loop polls `requested(step)` after
each call of the train step (one step, or `steps_per_call` steps), saves a
checkpoint of the step it just finished and returns. Doing nothing else inside
the handler matters: it runs between two Python bytecodes of the main thread,
possibly in the middle of a print or of an Orbax save.

Multi-process runs: a scheduler usually signals every process, but not at the
same instant, and a process that stops alone would leave the others waiting in
a collective forever. So with several processes the flags are combined with
one tiny all-gather after each call that reaches a multiple of `sync_every`
steps, and all processes stop at the same (synchronised) step; between those
steps a signal is only remembered. The latency of a stop is therefore up to
`sync_every` steps (or one call, if that is longer); keep it well inside the
scheduler's grace period. One process alone checks after every call.

A second signal while the first is pending raises KeyboardInterrupt (stop now,
without saving), so a stuck run can still be interrupted.

Exit status: a run stopped this way exits with EXIT_PREEMPTED (75, EX_TEMPFAIL:
"temporary failure, try again"), not 0, so a scheduler can tell "preempted,
resubmit the same command" from "finished" (0) and from a failure (1).
"""
import signal
import threading
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_PREEMPTED = 75  # os.EX_TEMPFAIL (that name is Unix-only)


def exit_status(result) -> Optional[int]:
  """The command line's exit status for train_and_evaluate's `result`: EXIT_PREEMPTED
  if a signal stopped training, else None (0)."""
  return EXIT_PREEMPTED if isinstance(result, dict) and result.get("preempted") else None


class StopRequest:
  """Context manager: installs the handlers on entry, restores the previous ones on exit."""

  def __init__(self, sync_every: int = 10, signals=SIGNALS):
    if sync_every < 1:
      raise ValueError(f"preemption_sync_every_steps={sync_every} must be >= 1")
    self.sync_every = sync_every
    self.signals = tuple(signals)
    self.received: Optional[int] = None  # the first signal number seen by this process
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.received is not None:
      raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without saving")
    self.received = signum

  def __enter__(self) -> "StopRequest":
    # signal.signal only works in the main thread; elsewhere (a notebook
    # worker thread) training simply runs without preemption handling.
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}
    return False

  @property
  def installed(self) -> bool:
    return bool(self._previous)

  @property
  def name(self) -> str:
    return signal.Signals(self.received).name if self.received is not None else "none"

  def requested(self, step: int, steps_done: int = 1) -> bool:
    """True iff every process should stop after `step` (the same answer on all of them).

    `steps_done`: steps the last call ran (step - steps_done, step]; processes
    agree when those crossed a multiple of sync_every.
    """
    if jax.process_count() == 1:
      return self.received is not None
    if step // self.sync_every == (step - steps_done) // self.sync_every:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.received is not None))
    return bool(np.any(flags))

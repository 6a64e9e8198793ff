"""The `--workdir` of training and evaluation, checked before anything is written or read."""
import pathlib


def check_workdir(workdir, create: bool) -> pathlib.Path:
  """Returns `workdir` as a Path after checking that it can be the run's directory.

  Args:
    workdir: the --workdir flag (str or Path).
    create: training: create it if missing; evaluation: it must exist.

  Raises:
    ValueError: empty (`--workdir ""` would write into the current directory).
    NotADirectoryError: it is a file.
    FileNotFoundError: evaluation of a workdir that does not exist.
  """
  if not str(workdir if workdir is not None else "").strip():
    raise ValueError(f"--workdir={workdir!r} is empty: name a directory for checkpoints, logs "
                     f"and results (e.g. --workdir runs/my_run)")
  path = pathlib.Path(workdir)
  if path.exists() and not path.is_dir():
    raise NotADirectoryError(f"--workdir={str(workdir)!r} is a file, not a directory")
  if not path.exists():
    if not create:
      raise FileNotFoundError(f"--workdir={str(workdir)!r}: no such workdir (train into it "
                              f"first, or check the path)")
    path.mkdir(parents=True, exist_ok=True)  # processes of one run may race here
  return path

"""Up-front checks of user-supplied dataset locations, with errors that name them.

Real datasets (CIRR, FashionIQ, Fashion200k, MIT-States) are read from a
`data.manual_dir` the user downloaded. A wrong path should fail at once, naming
the config field and what was expected there, not deep inside a loader as an
opaque "No such file" on some derived path.
"""
import pathlib
from typing import Sequence


def require_dir(path, what: str, contains: Sequence[str] = ()) -> pathlib.Path:
  """Returns `path` as a Path if it is a directory holding every entry of `contains`.

  Args:
    path: the directory (str or Path; '~' is expanded).
    what: how the user set it, e.g. 'data.manual_dir' (named in the error).
    contains: relative paths (files or folders) that must exist inside it.

  Raises:
    ValueError: `path` is empty (the field was never set).
    FileNotFoundError: `path` is not a directory, or misses some of `contains`.
  """
  if not str(path or "").strip():
    raise ValueError(f"{what} is not set: point it at the downloaded dataset "
                     f"(e.g. --config.{what}=/path/to/it)")
  directory = pathlib.Path(path).expanduser()
  if not directory.is_dir():
    kind = "is a file, not a directory" if directory.exists() else "does not exist"
    raise FileNotFoundError(f"{what}={str(path)!r} {kind}")
  missing = [name for name in contains if not (directory / name).exists()]
  if missing:
    raise FileNotFoundError(f"{what}={str(path)!r} lacks {missing}; expected it to contain "
                            f"{list(contains)}")
  return directory

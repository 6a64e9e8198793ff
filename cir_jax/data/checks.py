"""Up-front checks of user-supplied dataset locations, with errors that name them.

Real datasets (CIRR, FashionIQ, Fashion200k, MIT-States) are read from a
`data.manual_dir` the user downloaded. A wrong path should fail at once, naming
the config field, the path and what belongs there, not deep inside TFDS as an
assertion about some derived path.
"""
import pathlib


def require_manual_dir(data_config, instructions: str) -> pathlib.Path:
  """Returns `data_config.manual_dir` as a Path if it is a directory.

  Args:
    data_config: `config.data`.
    instructions: the dataset's MANUAL_DOWNLOAD_INSTRUCTIONS (appended to errors).

  Raises:
    ValueError: data.manual_dir is empty (never set).
    FileNotFoundError: it does not exist or is a file.
  """
  path = str(data_config.manual_dir or "").strip()
  if not path:
    raise ValueError("data.manual_dir is empty.\n" + instructions)
  directory = pathlib.Path(path).expanduser()
  if not directory.is_dir():
    kind = "is a file, not a directory" if directory.exists() else "does not exist"
    raise FileNotFoundError(f"data.manual_dir={path!r} {kind}.\n" + instructions)
  return directory

"""Datasets by name: `load_split(config.data, split)` -> RetrievalSplit."""
from typing import Callable


def _css(data_config, split, log):
  from cir_jax.data import css_split  # pylint: disable=g-import-not-at-top
  return css_split.load_css_split(data_config, split, log=log)


LOADERS: dict[str, Callable] = {
    "css": _css,
}


def load_split(data_config, split: str, log=print):
  """Loads split `split` of the dataset `data_config.name`."""
  if data_config.name not in LOADERS:
    raise ValueError(f"unknown dataset {data_config.name!r}; valid datasets: {sorted(LOADERS)}")
  return LOADERS[data_config.name](data_config, split, log)

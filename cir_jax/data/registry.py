"""Datasets by name: `load_split(config.data, split)` -> RetrievalSplit."""
from typing import Callable


def _css(data_config, split, log):
  source = data_config.get("css_source", "tfds")
  if source == "numpy":  # no TensorFlow Datasets needed (tools/device_check.py)
    from cir_jax.data import css_numpy  # pylint: disable=g-import-not-at-top
    return css_numpy.load_css_split_numpy(data_config, split, log=log)
  if source != "tfds":
    raise ValueError(f"data.css_source={source!r}; valid: ['tfds', 'numpy']")
  from cir_jax.data import css_split  # pylint: disable=g-import-not-at-top
  return css_split.load_css_split(data_config, split, log=log)


def _manual(module, function):
  """A loader that imports cir_jax.data.<module> only when that dataset is used."""
  def load(data_config, split, log):
    import importlib  # pylint: disable=g-import-not-at-top
    return getattr(importlib.import_module(f"cir_jax.data.{module}"), function)(
        data_config, split, log=log)
  return load


LOADERS: dict[str, Callable] = {
    "css": _css,
    "cirr": _manual("cirr", "load_cirr_split"),
    "fashioniq": _manual("fashioniq", "load_fashioniq_split"),
    "fashion200k": _manual("fashion200k", "load_fashion200k_split"),
    "mit_states": _manual("mit_states", "load_mit_states_split"),
}


def load_split(data_config, split: str, log=print):
  """Loads split `split` of the dataset `data_config.name`."""
  if data_config.name not in LOADERS:
    raise ValueError(f"unknown dataset {data_config.name!r}; valid datasets: {sorted(LOADERS)}")
  return LOADERS[data_config.name](data_config, split, log)

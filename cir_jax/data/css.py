"""TFDS builder of the synthetic CSS (Color, Shape, Size) dataset (TIRG paper, 4.3).

Nothing is downloaded: scenes and texts come from `css_scenes`, pictures from
`css_render`. Each example is one query (reference image + modification text ->
target image) with both renders of both images:

  query_id, ref_id, target_id, ref_label, target_label   int64
  text        tfds Text, e.g. "make middle-center object red"
  template    ClassLabel 'add' | 'remove' | 'change'
  ref_image_2d, ref_image_3d, target_image_2d, target_image_3d   uint8 [S, S, 3] PNG

Ids and labels are per split: one image per distinct scene, `image_id ==
scene_label` (see `css_scenes.generate_split`). Every image of a split is the
reference or the target of at least one of its queries (every reference scene
gets a query), so the gallery is the set of unique ids among refs and targets.

Configs: 'img64' (default) and 'img128' are the paper's sizes (1000 reference
scenes and 16000 queries per split, seed 0). Any other parameters are a config
named 'img{S}_s{scenes}_q{queries}_seed{seed}', which `tfds.builder('css/<name>')`
and `CSS(config=<name>)` accept, e.g. 'img32_s20_q50_seed0' for a tiny test set.
Use `build_css(...)` to get a prepared builder.
"""
import dataclasses
import io
import re

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from cir_jax.data import css_render
from cir_jax.data import css_scenes
from cir_jax.utils import logging as log_lib

DEFAULT_NUM_SCENES = 1000
DEFAULT_NUM_QUERIES = 16000
DEFAULT_SEED = 0
_NAME_PATTERN = re.compile(r"img(\d+)(?:_s(\d+)_q(\d+)_seed(\d+))?")
# zlib level 6 (PIL's default) is ~10% smaller than level 1 and only ~0.2 ms
# slower per 64 px image; each distinct image is encoded once per split.
_PNG_COMPRESS_LEVEL = 6

_CITATION = """
@inproceedings{vo2019composing,
  title={Composing Text and Image for Image Retrieval -- An Empirical Odyssey},
  author={Vo, Nam and Jiang, Lu and Sun, Chen and Murphy, Kevin and Li, Li-Jia and
          Fei-Fei, Li and Hays, James},
  booktitle={CVPR},
  year={2019}
}
"""


@dataclasses.dataclass(eq=False)
class CSSConfig(tfds.core.BuilderConfig):
  """Generation parameters of one CSS variant (both splits)."""
  image_size: int = 64
  num_scenes: int = DEFAULT_NUM_SCENES
  num_queries: int = DEFAULT_NUM_QUERIES
  seed: int = DEFAULT_SEED


def config_name(image_size: int, num_scenes: int = DEFAULT_NUM_SCENES,
                num_queries: int = DEFAULT_NUM_QUERIES, seed: int = DEFAULT_SEED) -> str:
  """'img64' for the paper's sizes, else 'img{S}_s{scenes}_q{queries}_seed{seed}'."""
  if (num_scenes, num_queries, seed) == (DEFAULT_NUM_SCENES, DEFAULT_NUM_QUERIES, DEFAULT_SEED):
    return f"img{image_size}"
  return f"img{image_size}_s{num_scenes}_q{num_queries}_seed{seed}"


def make_config(image_size: int = 64, num_scenes: int = DEFAULT_NUM_SCENES,
                num_queries: int = DEFAULT_NUM_QUERIES, seed: int = DEFAULT_SEED) -> CSSConfig:
  """Checks the parameters and returns the config named by `config_name`."""
  if image_size < 16:
    raise ValueError(f"CSS image_size must be >= 16 pixels, got {image_size}")
  if num_scenes < 1 or num_queries < num_scenes:
    raise ValueError(f"CSS needs 1 <= num_scenes <= num_queries (every reference gets a "
                     f"query), got num_scenes={num_scenes}, num_queries={num_queries}")
  if seed < 0:
    raise ValueError(f"CSS seed must be >= 0, got {seed}")
  return CSSConfig(
      name=config_name(image_size, num_scenes, num_queries, seed),
      description=(f"{image_size}px renders, {num_scenes} reference scenes and "
                   f"{num_queries} queries per split, seed {seed}"),
      image_size=image_size, num_scenes=num_scenes, num_queries=num_queries, seed=seed)


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="png", compress_level=_PNG_COMPRESS_LEVEL)
  return buffer.getvalue()


class CSS(tfds.core.GeneratorBasedBuilder):
  """CSS: 3x3-grid scenes, add/remove/change texts, 2D and 3D renders, CoGenT split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Generated in numpy (no CLEVR/Blender); CoGenT A/B split."}
  BUILDER_CONFIGS = [make_config(64), make_config(128)]
  # Nothing is downloaded, so there are no URL checksums. Saying so up front also
  # avoids TFDS 4.9.10 locating a checksums file through `importlib_resources`,
  # which it imports without declaring it (tensorflow/datasets#11212).
  url_infos = None

  @classmethod
  def get_builder_config(cls, name, version=None):
    """Predefined configs, or one parsed from a 'img{S}_s{scenes}_q{queries}_seed{seed}' name."""
    config = super().get_builder_config(name, version)
    if config is not None:
      return config
    match = _NAME_PATTERN.fullmatch(name)
    if match is None:
      return None  # TFDS then raises, listing the predefined configs
    size, scenes, queries, seed = match.groups()
    if scenes is None:
      return make_config(int(size))
    return make_config(int(size), int(scenes), int(queries), int(seed))

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    image = lambda: tfds.features.Image(shape=(size, size, 3), encoding_format="png")
    return self.dataset_info_from_configs(
        description=("Synthetic CSS (Color, Shape, Size) composed-retrieval dataset of the "
                     "TIRG paper, one example per query (reference + text -> target), "
                     "2D and 3D renders, CLEVR CoGenT compositional train/test split."),
        features=tfds.features.FeaturesDict({
            "query_id": np.int64,
            "text": tfds.features.Text(),
            "template": tfds.features.ClassLabel(names=css_scenes.TEMPLATES),
            "ref_id": np.int64,
            "target_id": np.int64,
            "ref_label": np.int64,
            "target_label": np.int64,
            "ref_image_2d": image(),
            "ref_image_3d": image(),
            "target_image_2d": image(),
            "target_image_3d": image(),
        }),
        homepage="https://github.com/google/tirg",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # generated, nothing to download
    return {split: self._generate_examples(split) for split in css_scenes.SPLITS}

  def _generate_examples(self, split):
    config = self.builder_config
    queries, scenes = css_scenes.generate_split(split, config.num_scenes, config.num_queries,
                                                config.seed)
    encoded = {}  # (image_id, render) -> PNG bytes; references recur ~16 times

    def png(image_id, render):
      key = (image_id, render)
      if key not in encoded:
        draw = css_render.render_2d if render == "2d" else css_render.render_3d
        encoded[key] = _png(draw(scenes[image_id], config.image_size))
      return encoded[key]

    # Generating the paper-size splits takes minutes: report ~10 times with an ETA.
    log, every = log_lib.Logger(), max(1, len(queries) // 10)
    progress = log_lib.Progress(len(queries), 0, 1, what=f"css/{split} query")
    progress.update(0)  # nothing compiles here: give a rate from the first line on
    for i, q in enumerate(queries, start=1):
      example = dict(q)
      for side in ("ref", "target"):
        for render in ("2d", "3d"):
          example[f"{side}_image_{render}"] = png(q[f"{side}_id"], render)
      yield q["query_id"], example
      if i % every == 0 or i == len(queries):
        log(progress.line(i, progress.update(i)))


def build_css(data_dir, image_size: int = 64, num_scenes: int = DEFAULT_NUM_SCENES,
              num_queries: int = DEFAULT_NUM_QUERIES, seed: int = DEFAULT_SEED) -> CSS:
  """Generates CSS into `data_dir` (once; later calls only open it) and returns the builder.

  Args:
    data_dir: TFDS data directory; files go to <data_dir>/css/<config name>/<version>.
    image_size: side of the square renders in pixels.
    num_scenes: reference scenes per split.
    num_queries: queries per split (>= num_scenes).
    seed: generation seed; the data do not depend on image_size.

  Returns:
    The prepared `CSS` builder (`.as_dataset(split='train'|'test')`, `.info`).
  """
  make_config(image_size, num_scenes, num_queries, seed)  # clear errors before TFDS's
  builder = CSS(data_dir=str(data_dir),
                config=config_name(image_size, num_scenes, num_queries, seed))
  builder.download_and_prepare()
  return builder

"""Each paper's image preprocessing (cir_jax/data/preprocess.py) against a PIL reference.

The reference is torchvision's arithmetic on PIL images, written out here:
Resize(S) = PIL resize of the short side to S and the long side to
int(S * long / short); CenterCrop(S) = offsets round((side - S) / 2); TargetPad
= CLIP4Cir's zero padding. Ours implements PIL's resampling arithmetic, so the
outputs must be identical (random noise, the hardest input for rounding).
"""
import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cir_jax import sharding
from cir_jax.data import pipeline
from cir_jax.data import preprocess
from cir_jax.data.tables import RetrievalSplit
from cir_jax.data.vocab import Vocabulary

_PIL_FILTER = {"resize_center_crop": Image.BILINEAR, "clip": Image.BICUBIC,
               "targetpad": Image.BICUBIC}


def reference(image: np.ndarray, size: int, mode: str, ratio: float = 1.25) -> np.ndarray:
  """uint8 [h, w, 3] -> uint8 [size, size, 3] with PIL and torchvision's formulas."""
  h, w = image.shape[:2]
  if mode == "targetpad" and max(w, h) / min(w, h) >= ratio:
    scaled = max(w, h) / ratio
    hp, vp = max(int((scaled - w) / 2), 0), max(int((scaled - h) / 2), 0)
    padded = np.zeros((h + 2 * vp, w + 2 * hp, 3), np.uint8)
    padded[vp:vp + h, hp:hp + w] = image
    image, (h, w) = padded, padded.shape[:2]
  long = max(w, h)
  new_w, new_h = (size, int(size * long / w)) if w <= h else (int(size * long / h), size)
  resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), _PIL_FILTER[mode]))
  top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
  return resized[top:top + size, left:left + size]


def _noise(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["resize_center_crop", "clip", "targetpad"])
@pytest.mark.parametrize("hw", [(200, 300), (300, 200)])  # 300x200 and 200x300 (w x h)
@pytest.mark.parametrize("size", [224, 64, 97])
def test_matches_pil_reference(mode, hw, size):
  image = _noise(*hw)
  ours = preprocess.preprocess_image(tf.constant(image), size, mode).numpy().astype(int)
  ref = reference(image, size, mode).astype(int)
  assert ours.shape == ref.shape == (size, size, 3)
  np.testing.assert_array_equal(ours, ref)
  squashed = preprocess.preprocess_image(tf.constant(image), size, "squash").numpy().astype(int)
  assert np.abs(squashed - ref).mean() > 10  # the old behaviour is far from the reference


def test_geometry_of_crop_and_target_pad():
  # A 300x200 (w x h) white image with a 1-px red column at x = 0 and a blue one at x = 299.
  image = np.full((200, 300, 3), 255, np.uint8)
  image[:, 0] = (255, 0, 0)
  image[:, -1] = (0, 0, 255)
  crop = preprocess.preprocess_image(tf.constant(image), 100, "resize_center_crop").numpy()
  # Resize to 150x100 then crop x in [25, 125): both coloured edges are cut away.
  assert (crop == 255).all()
  padded = preprocess.target_pad(tf.constant(image), 1.25).numpy()
  assert padded.shape == (240, 300, 3)  # ratio 1.5 >= 1.25: pad h to 300 / 1.25 = 240
  assert (padded[:20] == 0).all() and (padded[-20:] == 0).all()
  np.testing.assert_array_equal(padded[20:220], image)
  square = image[:, :240]  # ratio 1.2 < 1.25: unchanged
  np.testing.assert_array_equal(preprocess.target_pad(tf.constant(square), 1.25).numpy(),
                                square)
  out = preprocess.preprocess_image(tf.constant(image), 224, "targetpad").numpy()
  assert (out[:15] == 0).all() and (out[-15:] == 0).all()  # black bands: 20 * 224/240 px
  assert (out[25:200] == 255).all()


def test_bad_mode_is_named():
  with pytest.raises(ValueError, match="data.preprocess='crop'"):
    preprocess.check("crop")
  with pytest.raises(ValueError, match="target_pad_ratio=0.5"):
    preprocess.check("targetpad", 0.5)


def test_pipelines_apply_the_configured_preprocessing(tmp_path):
  images = [_noise(200, 300, 1), _noise(300, 200, 2)]
  paths = []
  for i, image in enumerate(images):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(image).save(paths[-1])
  split = RetrievalSplit(
      name="files", images=None, image_paths=paths, image_labels=np.arange(2),
      image_ids=["a", "b"], ref_index=np.array([0, 1]), target_index=np.array([1, 0]),
      target_label=np.array([1, 0]), texts=["x", "y"])
  vocab = Vocabulary.build(split.texts)
  kwargs = pipeline.preprocess_kwargs(ml_collections.ConfigDict(
      {"preprocess": "targetpad", "target_pad_ratio": 1.25}))
  mesh = sharding.make_mesh(jax.devices()[:1])
  data = pipeline.EvalPipeline(split, vocab, 4, 2, mesh, 64, **kwargs)
  gallery = np.asarray(next(data.gallery_batches())["image"])
  for image, got in zip(images, gallery):
    np.testing.assert_array_equal(got, reference(image, 64, "targetpad"))
  train = pipeline.TrainPipeline(split, vocab, 4, 2, mesh, 0, 64, **kwargs)
  batch = next(train.batches(0))
  q = train.step_indices(0).numpy()
  for row, query in enumerate(q):
    want = reference(images[split.target_index[query]], 64, "targetpad")
    np.testing.assert_array_equal(np.asarray(batch["target_image"])[row], want)

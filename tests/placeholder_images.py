"""Tiny placeholder images for the real-dataset tests (no real images exist here).

Each image is an 8x8 PNG of one colour that encodes an integer code
(R = code // 256, G = code % 256), so a fake model can recover which file it
was given after tf.data decodes it; a constant image survives resizing exactly.
"""
import io
import os

import jax
import jax.numpy as jnp
from PIL import Image


def png_bytes(code: int, size: int = 8) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (size, size), (code // 256, code % 256, 0)).save(buf, format="PNG")
  return buf.getvalue()


def write_images(paths, codes=None):
  """Writes a placeholder PNG at every path (code = its position unless `codes`)."""
  for i, p in enumerate(paths):
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
      f.write(png_bytes(i if codes is None else codes[i]))


def decode_code(images):
  """uint8 [B, S, S, 3] placeholder images -> int32 [B] codes."""
  px = images[:, 0, 0].astype(jnp.int32)
  return px[:, 0] * 256 + px[:, 1]


class OneHotModel:
  """A fake RetrievalModel: target = one_hot(code), query = one_hot(code of the reference).

  Every non-reference gallery image then scores 0 for a query, so the ranking is
  the gallery order with the reference first: expected recalls are hand-computable.
  """

  def __init__(self, dim: int):
    self.dim = dim

  def apply(self, variables, *args, train=False, method=None):
    del variables, train
    return method(*args)

  def encode_target(self, images):
    return jax.nn.one_hot(decode_code(images), self.dim)

  def encode_query(self, ref_image, text_ids, text_mask):
    del text_ids, text_mask
    return jax.nn.one_hot(decode_code(ref_image), self.dim), {}

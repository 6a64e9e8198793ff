"""Each paper's image preprocessing, as TF ops on one decoded image (inside tf.data).

uint8 [h, w, 3] -> uint8 [S, S, 3]. Mean/std normalisation is not done here:
pixels stay uint8 until the device, where each image encoder applies its own
(`pixel_mean`/`pixel_std`: ImageNet for ResNets, CLIP's for CLIP towers).

Modes (`data.preprocess`):

* 'squash': resize to S x S, ignoring the aspect ratio (antialiased bilinear).
  Not a paper's choice; kept for generated data and old runs.
* 'resize_center_crop': google/tirg main.py (Fashion200k, MIT-States):
  torchvision `Resize(S)` (short side to S, PIL bilinear) + `CenterCrop(S)`,
  the same for training and testing (no random crop or flip).
* 'clip': openai/CLIP's `_transform`: `Resize(S, BICUBIC)` + `CenterCrop(S)`
  (SSN's Hugging Face CLIPImageProcessor does the same).
* 'targetpad': CLIP4Cir's `targetpad_transform` (src/data_utils.py): if
  max(w, h) / min(w, h) >= r (`data.target_pad_ratio`, 1.25), zero-pad the
  short side, int((max(w, h) / r - side) / 2) pixels on each end, then 'clip'.

torchvision's arithmetic is reproduced exactly: the long side becomes
int(S * long / short) and the crop offset round((side - S) / 2) (round half to
even, as Python's round). The resize is PIL's own algorithm for 8-bit images
(Resample.c: antialiased separable kernels, 22-bit fixed-point weights, a
horizontal pass rounded to uint8, then a vertical pass) in TF integer ops, so
the output is bit-exact with PIL's (the test compares them); each pass
computes only the pixels the crop keeps. SSN's Hugging Face CLIPImageProcessor
crops at floor((side - S) / 2) instead: 1 pixel apart when side - S is odd
and (side - S - 1) / 2 is odd.
"""
import tensorflow as tf

MODES = ("squash", "resize_center_crop", "clip", "targetpad")
_METHOD = {"resize_center_crop": "bilinear", "clip": "bicubic", "targetpad": "bicubic"}


def check(mode: str, pad_ratio: float = 1.25) -> None:
  if mode not in MODES:
    raise ValueError(f"data.preprocess={mode!r}; valid: {list(MODES)}")
  if mode == "targetpad" and not pad_ratio >= 1.0:
    raise ValueError(f"data.target_pad_ratio={pad_ratio} must be >= 1 (CLIP4Cir uses 1.25)")


def _to_uint8(x):
  return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)


def target_pad(image, ratio: float):
  """CLIP4Cir's TargetPad: zero-pad the short side when the aspect ratio is >= `ratio`."""
  shape = tf.shape(image, out_type=tf.int64)
  h, w = shape[0], shape[1]
  hf, wf = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
  long = tf.maximum(hf, wf)
  scaled = long / ratio
  # int() truncates toward zero; negative amounts are clamped to 0 anyway.
  hp = tf.maximum(tf.cast(tf.math.floor((scaled - wf) / 2), tf.int64), 0)
  vp = tf.maximum(tf.cast(tf.math.floor((scaled - hf) / 2), tf.int64), 0)
  pad = long / tf.minimum(hf, wf) >= ratio
  hp, vp = tf.where(pad, hp, 0), tf.where(pad, vp, 0)
  return tf.pad(image, [[vp, vp], [hp, hp], [0, 0]])


def resized_size(h, w, size: int):
  """torchvision Resize(size): short side -> size, long side -> int(size * long / short)."""
  short, long = tf.minimum(h, w), tf.maximum(h, w)
  new_long = tf.cast(tf.math.floor(tf.cast(size * long, tf.float64) /
                                   tf.cast(short, tf.float64)), tf.int64)
  size = tf.constant(size, tf.int64)
  return tf.where(h <= w, size, new_long), tf.where(h <= w, new_long, size)


def crop_offset(side, size: int):
  """torchvision CenterCrop: round((side - size) / 2), half to even like Python's round."""
  return tf.cast(tf.round(tf.cast(side - size, tf.float64) / 2), tf.int64)


_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}
_PRECISION_BITS = 22  # PIL's fixed point for 8-bit images (32 - 8 - 2)


def _pil_filter(x, method: str):
  """PIL's bilinear (triangle) and bicubic (a = -0.5) kernels, float64, PIL's operation order."""
  x = tf.abs(x)
  if method == "bilinear":
    return tf.where(x < 1.0, 1.0 - x, tf.zeros_like(x))
  a = -0.5
  inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
  outer = (((x - 5) * x + 8) * x - 4) * a
  return tf.where(x < 1.0, inner, tf.where(x < 2.0, outer, tf.zeros_like(x)))


def _trunc_int(x):
  """C's (int) cast of a float64: truncation toward zero."""
  return tf.cast(x, tf.int64)  # tf.cast truncates toward zero


def pil_coefficients(in_size, new_size, start, count: int, method: str):
  """PIL's resampling weights for outputs [start, start + count) of in_size -> new_size.

  PIL's precompute_coeffs + normalize_coeffs_8bpc (Resample.c): a kernel widened
  by max(1, in/out) (antialiasing), taps [xmin, xmax) around each output centre,
  normalised, then rounded to 22-bit fixed point.

  Returns:
    (first input index int64 [count], weights int64 [count, K]); taps past
    xmax have weight 0.
  """
  in_f = tf.cast(in_size, tf.float64)
  scale = in_f / tf.cast(new_size, tf.float64)
  filterscale = tf.maximum(scale, 1.0)
  support = _SUPPORT[method] * filterscale
  ksize = tf.cast(tf.math.ceil(support), tf.int64) * 2 + 1
  xx = tf.cast(start + tf.range(count, dtype=tf.int64), tf.float64)
  center = (xx + 0.5) * scale
  xmin = tf.maximum(_trunc_int(center - support + 0.5), 0)
  xmax = tf.minimum(_trunc_int(center + support + 0.5), tf.cast(in_size, tf.int64)) - xmin
  taps = tf.range(ksize, dtype=tf.int64)[None]
  w = _pil_filter((tf.cast(taps + xmin[:, None], tf.float64) - center[:, None] + 0.5)
                  / filterscale, method)
  w = tf.where(taps < xmax[:, None], w, tf.zeros_like(w))
  total = tf.reduce_sum(w, axis=1, keepdims=True)
  w = tf.where(total != 0, w / tf.where(total != 0, total, 1.0), w)
  fixed = w * float(1 << _PRECISION_BITS)
  q = _trunc_int(tf.where(w < 0, fixed - 0.5, fixed + 0.5))
  return xmin, q


def _resample_rows(image, new_len, start, out_len: int, method: str):
  """Resizes the rows (axis 0) of uint8 [n, m, 3] to `new_len` as PIL does for 8-bit images
  and keeps rows [start, start + out_len) (only those are computed): uint8 [out_len, m, 3].

  PIL's integer arithmetic (ImagingResample{Horizontal,Vertical}_8bpc): the int32
  sum of pixel * fixed-point weight, plus 2^21, shifted right by 22, clipped to 0..255.
  """
  in_len = tf.shape(image, out_type=tf.int64)[0]
  xmin, q = pil_coefficients(in_len, new_len, start, out_len, method)
  taps = tf.range(tf.shape(q, out_type=tf.int64)[1])
  index = tf.minimum(xmin[:, None] + taps[None], in_len - 1)              # [out, K]
  pixels = tf.gather(tf.cast(image, tf.int32), index)                      # [out, K, m, 3]
  acc = tf.reduce_sum(pixels * tf.cast(q, tf.int32)[:, :, None, None], axis=1)
  acc += 1 << (_PRECISION_BITS - 1)
  return tf.cast(tf.clip_by_value(tf.bitwise.right_shift(acc, _PRECISION_BITS), 0, 255),
                 tf.uint8)


def resize_center_crop(image, size: int, method: str):
  """torchvision Resize(size) + CenterCrop(size) of uint8 [h, w, 3] -> uint8 [size, size, 3].

  PIL's order for 8-bit images: horizontal pass, uint8 rounding, vertical pass;
  each pass computes only the columns/rows the crop keeps. Bit-exact with PIL.
  """
  shape = tf.shape(image, out_type=tf.int64)
  h, w = shape[0], shape[1]
  new_h, new_w = resized_size(h, w, size)
  # Rows are gathered (contiguous copies), so each pass resamples axis 0 of a transpose.
  x = _resample_rows(tf.transpose(image, [1, 0, 2]), new_w, crop_offset(new_w, size), size,
                     method)                                               # [size, h, 3]
  return _resample_rows(tf.transpose(x, [1, 0, 2]), new_h, crop_offset(new_h, size), size,
                        method)


def preprocess_image(image, size: int, mode: str = "squash", pad_ratio: float = 1.25):
  """uint8 [h, w, 3] -> uint8 [size, size, 3] by `mode` (module docstring)."""
  check(mode, pad_ratio)
  if mode == "squash":
    return _to_uint8(tf.image.resize(image, [size, size], antialias=True))
  if mode == "targetpad":
    image = target_pad(image, pad_ratio)
  out = resize_center_crop(image, size, _METHOD[mode])
  return tf.ensure_shape(out, [size, size, 3])

"""Fast numpy renderers of CSS scenes: flat 2D blobs and a 3D-looking version.

TIRG paper, section 4.3.1: "Each image comes in a simple 2D blobs version and a
3D rendered version." The paper used Blender through the CLEVR toolkit; here
both renders are analytic so that a 32k-query dataset is drawn in seconds:

  2D: a plain background; cube -> square, sphere -> circle, cylinder -> triangle,
      centred in its cell of the 3x3 grid; large objects are ~1.8x small ones.
  3D: a pinhole camera above and in front of a ground plane whose 3x3 board is
      drawn in perspective (far rows smaller and higher). Cubes show shaded top
      and side faces, cylinders a lit top ellipse over a shaded body, spheres
      per-pixel Lambert + specular shading; every object casts a soft shadow.
      Objects are painted far to near, so near objects occlude far ones.

Shapes are drawn from signed distances (in pixels) evaluated inside each
object's bounding box, which gives anti-aliased edges at any image size. An
object's look depends only on (shape, size, cell, image size) up to a colour
factor, so each of those 54 per image size is drawn once into a cached,
colour-free sprite; painting a scene is then 3 array operations per object
(~0.15 ms per 64 px image). Rendering is deterministic: the same scene gives
identical bytes, whatever was drawn before.
"""
import functools
from typing import NamedTuple, Optional

import numpy as np

from cir_jax.data import css_scenes

# CLEVR's colour palette (RGB), in css_scenes.COLORS order.
PALETTE = np.array([[87, 87, 87], [173, 35, 35], [42, 75, 215], [29, 105, 20],
                    [129, 74, 25], [129, 38, 192], [41, 208, 208], [255, 238, 51]], np.float32)
BACKGROUND_2D = np.array([240, 240, 240], np.float32)

# 2D: half-extent of an object as a fraction of a cell, by size (small, large).
_HALF_2D = (0.2, 0.36)

# 3D world: X right, Y up, Z away from the camera; ground is Y = 0; one cell = 1 unit.
_HALF_3D = (0.2, 0.34)       # half side of a cube / radius of a sphere, by size
_CYLINDER_RADIUS = 0.85      # fraction of the half side (cylinders look wide otherwise)
_ROW_Z = (5.6, 4.6, 3.6)     # depth of grid rows 0 (top = far) .. 2 (bottom = near)
# High enough that rows do not hide each other much, low enough to look 3D.
_CAMERA = np.array([0.0, 5.5, 0.8])
_LOOK_AT = np.array([0.0, 0.3, 4.35])
_FOCAL = 1.65                # in image widths: the near edge of the board just fits
# Light from above-left: lit tops, half-lit left faces, dark front/right faces,
# and a sphere highlight up-left of the centre (seen from the camera).
_LIGHT = np.array([-0.5, 0.85, -0.05]) / np.linalg.norm([-0.5, 0.85, -0.05])
_AMBIENT, _DIFFUSE, _SPECULAR = 0.4, 0.6, 0.45
_SHADOW = 0.45               # darkening at the shadow's centre
_GROUND, _BOARD, _FAR = (176, 176, 172), (190, 190, 186), (214, 214, 216)


def _camera_axes():
  forward = _LOOK_AT - _CAMERA
  forward /= np.linalg.norm(forward)
  right = np.cross([0.0, 1.0, 0.0], forward)
  right /= np.linalg.norm(right)
  return right, np.cross(forward, right), forward


_RIGHT, _UP, _FORWARD = _camera_axes()
_AXES = np.stack([_RIGHT, _UP, _FORWARD])   # world -> camera rotation
_LIGHT_CAM = _AXES @ _LIGHT * np.array([1.0, 1.0, -1.0])  # z toward the viewer
_HALFWAY_CAM = (_LIGHT_CAM + [0.0, 0.0, 1.0]) / np.linalg.norm(_LIGHT_CAM + [0.0, 0.0, 1.0])


def _project(points, size):
  """World points [..., 3] -> (x, y) pixel coordinates [..., 2] and depth [...]."""
  cam = (np.asarray(points, np.float64) - _CAMERA) @ _AXES.T
  depth = cam[..., 2]
  xy = np.stack([0.5 + _FOCAL * cam[..., 0] / depth, 0.5 - _FOCAL * cam[..., 1] / depth], -1)
  return xy * size, depth


def _shade(normal_world):
  """Lambert factor of a flat face with the given world normal."""
  return _AMBIENT + _DIFFUSE * max(0.0, float(np.dot(normal_world, _LIGHT)))


def _ground_xz(cell):
  """Ground position (X, Z) of a grid cell's centre."""
  return float(cell % 3 - 1), _ROW_Z[cell // 3]


# ----------------------------------------------------------------------------- primitives


def _box(extent_x, extent_y, size):
  """Integer pixel window [y0:y1, x0:x1] covering float extents (+1 px for anti-aliasing)."""
  x0 = max(int(np.floor(min(extent_x))) - 1, 0)
  x1 = min(int(np.ceil(max(extent_x))) + 1, size)
  y0 = max(int(np.floor(min(extent_y))) - 1, 0)
  y1 = min(int(np.ceil(max(extent_y))) + 1, size)
  return y0, y1, x0, x1


def _pixel_centres(y0, y1, x0, x1):
  """Pixel-centre coordinates ys [h, 1], xs [1, w] of a window."""
  return (np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5,
          np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5)


def _polygon_sdf(ys, xs, vertices):
  """Signed distance (pixels, negative inside) to a convex polygon [N, 2] (x, y)."""
  v = np.asarray(vertices, np.float32)
  edge = np.roll(v, -1, axis=0) - v
  normal = np.stack([edge[:, 1], -edge[:, 0]], -1)
  normal /= np.linalg.norm(normal, axis=-1, keepdims=True) + 1e-12
  offset = np.sum(normal * v, -1)
  # Point the normals outwards whatever the winding.
  flip = np.where(normal @ v.mean(0) - offset > 0, -1.0, 1.0).astype(np.float32)
  normal, offset = normal * flip[:, None], offset * flip
  dist = (normal[:, 0, None, None] * xs[None] + normal[:, 1, None, None] * ys[None]
          - offset[:, None, None])
  return dist.max(0)


def _ellipse_sdf(ys, xs, cx, cy, rx, ry):
  """Approximate signed distance (pixels) to an axis-aligned ellipse."""
  q = np.sqrt(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2)
  return (q - 1.0) * min(rx, ry)


def _coverage(sdf):
  return np.clip(0.5 - sdf, 0.0, 1.0)


class _Sprite(NamedTuple):
  """One object drawn at one cell and image size, independent of its colour.

  Painting is `region = region * keep + shade * colour + glow`, three array ops,
  so a scene costs a few microseconds per object once its sprites are cached.
  """
  window: tuple     # (y0, y1, x0, x1) in pixels
  keep: np.ndarray  # float32 [h, w, 1]: 1 - coverage
  shade: np.ndarray  # float32 [h, w, 1]: coverage x shading factor
  glow: Optional[np.ndarray]  # float32 [h, w, 1]: coverage x specular (0..255), or None


def _sprite(window, parts, specular=None):
  """Builds the sprite of the union of non-overlapping parts [(sdf [h, w], shade)].

  `shade` is a scalar or an [h, w] map multiplying the object's colour. Parts are
  mixed in order by their coverage (anti-aliased inner edges) and the union is
  blended by the coverage of the nearest part, so no background seam shows
  between adjacent faces.
  """
  y0, y1, x0, x1 = window
  shade = np.broadcast_to(np.float32(parts[0][1]), (y1 - y0, x1 - x0)).astype(np.float32)
  nearest = parts[0][0]
  for sdf, part_shade in parts[1:]:
    shade = shade + _coverage(sdf) * (np.float32(part_shade) - shade)
    nearest = np.minimum(nearest, sdf)
  alpha = _coverage(nearest)
  return _Sprite(window, _frozen(1.0 - alpha), _frozen(alpha * shade),
                 None if specular is None else _frozen(alpha * specular))


def _frozen(a):
  """float32 [h, w, 1] copy of a map, read-only: sprites are shared through the cache."""
  a = np.ascontiguousarray(a[..., None], np.float32)
  a.flags.writeable = False
  return a


def _paint(image, sprite, colour):
  y0, y1, x0, x1 = sprite.window
  region = image[y0:y1, x0:x1]
  region *= sprite.keep
  region += sprite.shade * colour
  if sprite.glow is not None:
    region += sprite.glow


def _to_uint8(image):
  return np.clip(image + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- 2D


def anchor_2d(obj, size):
  """(row, col) of a pixel inside `obj`'s 2D blob (its cell centre)."""
  return int((obj.cell // 3 + 0.5) * size / 3), int((obj.cell % 3 + 0.5) * size / 3)


@functools.lru_cache(maxsize=None)
def _sprite_2d(shape: str, size_index: int, cell: int, image_size: int) -> _Sprite:
  step = image_size / 3
  cx, cy = (cell % 3 + 0.5) * step, (cell // 3 + 0.5) * step
  half = _HALF_2D[size_index] * step
  window = _box((cx - 1.1 * half, cx + 1.1 * half), (cy - 1.1 * half, cy + 1.1 * half),
                image_size)
  ys, xs = _pixel_centres(*window)
  if shape == "cube":
    sdf = np.maximum(np.abs(xs - cx), np.abs(ys - cy)) - half
  elif shape == "sphere":
    sdf = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2) - half
  else:  # cylinder: an upward triangle around the cell centre
    sdf = _polygon_sdf(ys, xs, [(cx, cy - 1.1 * half), (cx + 1.1 * half, cy + 0.8 * half),
                                (cx - 1.1 * half, cy + 0.8 * half)])
  return _sprite(window, [(sdf, 1.0)])


def render_2d(scene, size: int = 64) -> np.ndarray:
  """Flat 2D render of a scene.

  Args:
    scene: tuple of css_scenes.Obj.
    size: image side in pixels.

  Returns:
    uint8 [size, size, 3].
  """
  image = np.empty((size, size, 3), np.float32)
  image[:] = BACKGROUND_2D
  for obj in scene:
    _paint(image, _sprite_2d(css_scenes.SHAPES[obj.shape], obj.size, obj.cell, size),
           PALETTE[obj.color])
  return _to_uint8(image)


# ----------------------------------------------------------------------------- 3D


@functools.lru_cache(maxsize=8)
def _ground(size):
  """Empty-scene image [S, S, 3] float32 and ground coordinates X, Z [S, S] (inf off-ground)."""
  ys, xs = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
  ray = (_FORWARD + ((xs / size - 0.5) / _FOCAL)[..., None] * _RIGHT
         - ((ys / size - 0.5) / _FOCAL)[..., None] * _UP)
  with np.errstate(divide="ignore"):
    t = np.where(ray[..., 1] < 0, -_CAMERA[1] / ray[..., 1], np.inf)
  gx, gz = _CAMERA[0] + t * ray[..., 0], _CAMERA[2] + t * ray[..., 2]
  near, far = _ROW_Z[2] - 0.5, _ROW_Z[0] + 0.5
  on_board = (np.abs(gx) < 1.5) & (gz > near) & (gz < far)
  image = np.where(on_board[..., None], np.float32(_BOARD), np.float32(_GROUND))
  # Faint cell borders about one pixel wide at every depth: t / (focal * size) is
  # the length of ground one pixel spans there.
  pixel = t / (_FOCAL * size)
  border = np.minimum(np.abs(gx - 0.5 - np.round(gx - 0.5)),
                      np.abs(gz - near - np.round(gz - near)))
  near_board = (np.abs(gx) < 1.5 + pixel) & (gz > near - pixel) & (gz < far + pixel)
  ink = np.where(near_board, 0.35 * np.clip(1.0 - border / pixel, 0, 1), 0)
  image = image * (1 - ink[..., None]) + ink[..., None] * 120.0
  fog = np.clip((t - 4.0) / 8.0, 0, 1)[..., None]  # far ground fades to a hazy grey
  image = image * (1 - fog) + fog * np.float32(_FAR)
  return image.astype(np.float32), gx.astype(np.float32), gz.astype(np.float32)


def background_3d(size: int = 64) -> np.ndarray:
  """The 3D render of an empty scene, uint8 [size, size, 3]."""
  return _to_uint8(_ground(size)[0])


def anchor_3d(obj, size):
  """(row, col) of a pixel on `obj` in the 3D render, away from edges and highlights.

  The centre of a cube's or cylinder's top face; for a sphere a point down-right
  of its centre (the highlight is up-left). The camera is high enough that this
  point is never hidden by a nearer object.
  """
  x, z = _ground_xz(obj.cell)
  half = _HALF_3D[obj.size]
  if css_scenes.SHAPES[obj.shape] == "sphere":
    (px, py), depth = _project([x, half, z], size)
    offset = 0.3 * size * _FOCAL * half / depth
    return int(py + offset), int(px + offset)
  (px, py), _ = _project([x, 2 * half, z], size)
  return int(py), int(px)


@functools.lru_cache(maxsize=None)
def _shadow(size_index: int, cell: int, image_size: int):
  """(window, factor float32 [h, w, 1]) darkening the ground under an object."""
  x, z = _ground_xz(cell)
  half = _HALF_3D[size_index]
  # Cast away from the light, as far as the object's height allows.
  sx, sz = x - _LIGHT[0] / _LIGHT[1] * half, z - _LIGHT[2] / _LIGHT[1] * half
  radius = 1.45 * half
  corners = [[sx + a * radius, 0.0, sz + b * radius] for a in (-1, 1) for b in (-1, 1)]
  points, _ = _project(corners, image_size)
  window = y0, y1, x0, x1 = _box(points[:, 0], points[:, 1], image_size)
  _, gx, gz = _ground(image_size)
  dist = np.sqrt((gx[y0:y1, x0:x1] - sx) ** 2 + (gz[y0:y1, x0:x1] - sz) ** 2) / radius
  return window, _frozen(1.0 - _SHADOW * np.clip((1.0 - dist) / 0.45, 0.0, 1.0))


def _cube(x, z, h, size):
  faces = {  # outward normal -> corners (dx, y, dz)
      (0, 1, 0): [(-h, 2 * h, -h), (h, 2 * h, -h), (h, 2 * h, h), (-h, 2 * h, h)],
      (0, 0, -1): [(-h, 0, -h), (h, 0, -h), (h, 2 * h, -h), (-h, 2 * h, -h)],
      (-1, 0, 0): [(-h, 0, -h), (-h, 0, h), (-h, 2 * h, h), (-h, 2 * h, -h)],
      (1, 0, 0): [(h, 0, -h), (h, 0, h), (h, 2 * h, h), (h, 2 * h, -h)],
  }
  visible = []
  for normal, corners in faces.items():
    world = np.array([x, 0.0, z]) + np.array(corners)
    if np.dot(_CAMERA - world.mean(0), normal) > 0:  # back-face culling
      visible.append((_project(world, size)[0], _shade(normal)))
  points = np.concatenate([p for p, _ in visible])
  window = _box(points[:, 0], points[:, 1], size)
  ys, xs = _pixel_centres(*window)
  return _sprite(window, [(_polygon_sdf(ys, xs, p), k) for p, k in visible])


def _sphere(x, z, radius, size):
  (cx, cy), depth = _project([x, radius, z], size)
  r = size * _FOCAL * radius / depth
  window = _box((cx - r, cx + r), (cy - r, cy + r), size)
  ys, xs = _pixel_centres(*window)
  nx, ny = (xs - cx) / r, (cy - ys) / r  # camera-space normal, z toward the viewer
  rr = nx * nx + ny * ny
  nz = np.sqrt(np.maximum(1.0 - rr, 0.0))
  lambert = np.maximum(nx * _LIGHT_CAM[0] + ny * _LIGHT_CAM[1] + nz * _LIGHT_CAM[2], 0.0)
  highlight = np.maximum(nx * _HALFWAY_CAM[0] + ny * _HALFWAY_CAM[1] + nz * _HALFWAY_CAM[2],
                         0.0) ** 40
  return _sprite(window, [((np.sqrt(rr) - 1.0) * r, _AMBIENT + _DIFFUSE * lambert)],
                 specular=255.0 * _SPECULAR * highlight)


def _cylinder(x, z, h, size):
  radius = _CYLINDER_RADIUS * h
  ends = np.array([[x, 0.0, z], [x, 2 * h, z]])
  (bottom, top), depth = _project(ends, size)
  rx = size * _FOCAL * radius / depth
  # A horizontal circle seen from above is squashed by the sine of the view elevation.
  ry = rx * (_CAMERA[1] - ends[:, 1]) / np.linalg.norm(ends - _CAMERA, axis=-1)
  window = _box((bottom[0] - rx[0], bottom[0] + rx[0], top[0] - rx[1], top[0] + rx[1]),
                (top[1] - ry[1], bottom[1] + ry[0]), size)
  ys, xs = _pixel_centres(*window)
  body = np.minimum(
      _polygon_sdf(ys, xs, [(top[0] - rx[1], top[1]), (top[0] + rx[1], top[1]),
                            (bottom[0] + rx[0], bottom[1]), (bottom[0] - rx[0], bottom[1])]),
      _ellipse_sdf(ys, xs, bottom[0], bottom[1], rx[0], ry[0]))
  # Curved side: the normal turns from left to right across the body.
  s = np.clip((xs - 0.5 * (top[0] + bottom[0])) / rx.mean(), -1.0, 1.0)
  lambert = np.maximum(s * _LIGHT_CAM[0] + np.sqrt(1.0 - s * s) * _LIGHT_CAM[2], 0.0)
  side = np.broadcast_to(_AMBIENT + _DIFFUSE * lambert, body.shape)
  top_sdf = _ellipse_sdf(ys, xs, top[0], top[1], rx[1], ry[1])
  return _sprite(window, [(body, side), (top_sdf, _shade((0, 1, 0)))])


_SHAPES_3D = {"cube": _cube, "sphere": _sphere, "cylinder": _cylinder}


@functools.lru_cache(maxsize=None)
def _sprite_3d(shape: str, size_index: int, cell: int, image_size: int) -> _Sprite:
  x, z = _ground_xz(cell)
  return _SHAPES_3D[shape](x, z, _HALF_3D[size_index], image_size)


def render_3d(scene, size: int = 64) -> np.ndarray:
  """3D-looking render of a scene (perspective ground plane, shading, shadows).

  Args:
    scene: tuple of css_scenes.Obj.
    size: image side in pixels.

  Returns:
    uint8 [size, size, 3].
  """
  image = _ground(size)[0].copy()
  for obj in scene:  # shadows lie on the ground, under every object
    (y0, y1, x0, x1), factor = _shadow(obj.size, obj.cell, size)
    image[y0:y1, x0:x1] *= factor
  # Painter's order: far rows first (scenes are sorted by cell, row 0 = far),
  # so nearer objects occlude farther ones.
  for obj in sorted(scene):
    _paint(image, _sprite_3d(css_scenes.SHAPES[obj.shape], obj.size, obj.cell, size),
           PALETTE[obj.color])
  return _to_uint8(image)

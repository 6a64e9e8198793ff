"""Scenes and modification templates of the CSS (Color, Shape, Size) dataset.

TIRG paper, section 4.3.1: objects on a 3x3 grid, 8 colours x 3 shapes x 2 sizes;
a query is a reference scene plus a template text ("add red cube", "remove
middle-center object", "make yellow sphere small") and the target scene is the
reference with the text applied. This module is pure Python/numpy: it draws
scenes and texts; `css_render` draws the pictures and `css` writes the TFDS files.

Scene representation: a tuple of `Obj(cell, color, shape, size)` of ints sorted by
cell. A cell holds at most one object, so the sorted tuple is canonical and
doubles as the `scene_key`: two scenes with the same objects compare equal.
Cells are row-major, row 0 at the top of the 2D render (the far row in 3D).

Reference scenes hold 1..5 objects (uniform), so every reference can lose an
object (remove/change always have something to match) and gain one (add always
has a free cell). Targets hold 0..6 objects.

Compositional split (CLEVR CoGenT, conditions A and B; `SPLIT_COLORS`): in train,
cubes are gray/blue/brown/yellow and cylinders red/green/purple/cyan; in test
it is the other way round; spheres take any colour in both. Of the 24 (shape,
colour) combinations, 8 are train-only, 8 test-only and 8 (spheres) shared. Every
object of a split (references and targets, including added and recoloured ones)
uses only that split's combinations: `add` draws the new object from the
allowed combinations, and a `change` to a colour that some matched object may
not take in this split is re-drawn (never silently produced).

Texts are lower-case words separated by single spaces, without punctuation:
  add:    "add [size] [colour] (shape|object) [to position]"; each attribute is
          mentioned with probability 1/2, unmentioned ones are random (the
          position among the free cells).
  remove: "remove <selector>"; every object matching the selector is removed.
  change: "make <selector> <colour or size>"; every matching object is changed.
A selector names either a position ("middle-center object", probability 1/4) or
a non-empty subset of {size, colour, shape} of one existing object ("large
objects", "yellow sphere"); the noun is plural iff it matches several objects.
The new value of a change differs from that object's value, so the target always
differs from the reference.
"""
from typing import NamedTuple, Optional

import numpy as np

COLORS = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")
SHAPES = ("cube", "sphere", "cylinder")
SIZES = ("small", "large")
POSITIONS = ("top-left", "top-center", "top-right",
             "middle-left", "middle-center", "middle-right",
             "bottom-left", "bottom-center", "bottom-right")
TEMPLATES = ("add", "remove", "change")
SPLITS = ("train", "test")
NUM_CELLS = 9
MIN_OBJECTS, MAX_OBJECTS = 1, 5  # per reference scene, inclusive

_CUBE_TRAIN = ("gray", "blue", "brown", "yellow")
_CYLINDER_TRAIN = ("red", "green", "purple", "cyan")
# CLEVR CoGenT condition A (train) and B (test): shape -> allowed colours.
SPLIT_COLORS = {
    "train": {"cube": _CUBE_TRAIN, "sphere": COLORS, "cylinder": _CYLINDER_TRAIN},
    "test": {"cube": _CYLINDER_TRAIN, "sphere": COLORS, "cylinder": _CUBE_TRAIN},
}
_SPLIT_INDEX = {s: i for i, s in enumerate(SPLITS)}  # salts the seed per split
_POSITION_SELECTOR_PROB = 0.25
_MAX_REDRAWS = 1000


class Obj(NamedTuple):
  """One object: indices into POSITIONS (cell), COLORS, SHAPES and SIZES."""
  cell: int
  color: int
  shape: int
  size: int


Scene = tuple  # tuple[Obj, ...] sorted by cell; also the canonical scene_key


def allowed_combinations(split: str) -> np.ndarray:
  """Returns bool [len(SHAPES), len(COLORS)]: may (shape, colour) appear in `split`."""
  if split not in SPLIT_COLORS:
    raise ValueError(f"unknown CSS split {split!r}; valid splits: {list(SPLITS)}")
  table = np.zeros((len(SHAPES), len(COLORS)), bool)
  for shape, colors in SPLIT_COLORS[split].items():
    table[SHAPES.index(shape), [COLORS.index(c) for c in colors]] = True
  return table


def make_scene(objects) -> Scene:
  """Canonical scene (the scene_key) from any iterable of Obj / 4-tuples; checks cells."""
  scene = tuple(sorted(Obj(*map(int, o)) for o in objects))
  cells = [o.cell for o in scene]
  if len(set(cells)) != len(cells) or any(not 0 <= c < NUM_CELLS for c in cells):
    raise ValueError(f"invalid CSS scene (cells must be distinct, in 0..8): {scene}")
  return scene


def random_scene(rng: np.random.Generator, split: str) -> Scene:
  """Draws a reference scene of MIN_OBJECTS..MAX_OBJECTS objects allowed in `split`."""
  combos = np.argwhere(allowed_combinations(split))  # [K, 2] (shape, colour)
  n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
  cells = rng.choice(NUM_CELLS, size=n, replace=False)
  kinds = combos[rng.integers(len(combos), size=n)]
  sizes = rng.integers(len(SIZES), size=n)
  return make_scene(zip(cells, kinds[:, 1], kinds[:, 0], sizes))


def _draw_selector(rng, scene):
  """Picks one object (the anchor) and which of its attributes name it.

  Returns:
    (anchor, selector, matched): selector maps 'cell'|'size'|'color'|'shape' to
    the anchor's value; matched is the tuple of scene objects it matches (so
    never empty: it contains the anchor).
  """
  anchor = scene[int(rng.integers(len(scene)))]
  if rng.random() < _POSITION_SELECTOR_PROB:
    selector = {"cell": anchor.cell}
  else:
    mask = int(rng.integers(1, 8))  # non-empty subset of (size, color, shape)
    selector = {f: getattr(anchor, f) for bit, f in enumerate(("size", "color", "shape"))
                if mask >> bit & 1}
  matched = tuple(o for o in scene if all(getattr(o, f) == v for f, v in selector.items()))
  return anchor, selector, matched


def _selector_text(selector, plural: bool) -> str:
  """'middle-center object', 'large red cubes', 'yellow sphere', 'small objects'."""
  if "cell" in selector:
    return f"{POSITIONS[selector['cell']]} object"
  words = []
  if "size" in selector:
    words.append(SIZES[selector["size"]])
  if "color" in selector:
    words.append(COLORS[selector["color"]])
  words.append(SHAPES[selector["shape"]] if "shape" in selector else "object")
  if plural:
    words[-1] += "s"
  return " ".join(words)


def _draw_add(rng, scene, split):
  allowed = np.argwhere(allowed_combinations(split))
  free = sorted(set(range(NUM_CELLS)) - {o.cell for o in scene})
  shape, color = allowed[int(rng.integers(len(allowed)))]
  new = Obj(free[int(rng.integers(len(free)))], int(color), int(shape),
            int(rng.integers(len(SIZES))))
  say_size, say_color, say_shape, say_cell = rng.random(4) < 0.5
  words = ["add"]
  if say_size:
    words.append(SIZES[new.size])
  if say_color:
    words.append(COLORS[new.color])
  words.append(SHAPES[new.shape] if say_shape else "object")
  if say_cell:
    words += ["to", POSITIONS[new.cell]]
  return " ".join(words), make_scene(scene + (new,))


def _draw_remove(rng, scene, split):
  del split  # removing never creates a combination
  _, selector, matched = _draw_selector(rng, scene)
  target = make_scene(o for o in scene if o not in matched)
  return f"remove {_selector_text(selector, len(matched) > 1)}", target


def _draw_change(rng, scene, split):
  anchor, selector, matched = _draw_selector(rng, scene)
  if rng.random() < 0.5:
    field, names = "color", COLORS
    choices = [c for c in range(len(COLORS)) if c != anchor.color]
    value = choices[int(rng.integers(len(choices)))]
    allowed = allowed_combinations(split)
    if not all(allowed[o.shape, value] for o in matched):
      return None  # would create a combination of the other split: re-draw
  else:
    field, names = "size", SIZES
    value = 1 - anchor.size
  target = make_scene(o._replace(**{field: value}) if o in matched else o for o in scene)
  return f"make {_selector_text(selector, len(matched) > 1)} {names[value]}", target


_DRAW = {"add": _draw_add, "remove": _draw_remove, "change": _draw_change}


def draw_modification(rng: np.random.Generator, scene: Scene, split: str,
                      template: Optional[str] = None):
  """Draws a modification of `scene` that stays inside `split`'s combinations.

  Args:
    rng: the split's generator (advanced in place).
    scene: a reference scene (1..8 objects).
    split: 'train' or 'test'.
    template: 'add' | 'remove' | 'change', or None for uniform.

  Returns:
    (template, text, target_scene); target_scene != scene.
  """
  if template is None:
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
  for _ in range(_MAX_REDRAWS):
    drawn = _DRAW[template](rng, scene, split)
    if drawn is not None:
      return (template,) + drawn
  raise RuntimeError(f"no valid {template!r} modification of {scene} in {split}")


def _reference_order(rng, num_scenes: int, num_queries: int) -> np.ndarray:
  """Reference index of every query: each reference once, the rest uniform, shuffled.

  Every reference must be the reference of some query because the gallery is
  derived from the images that appear in queries.
  """
  if num_queries < num_scenes:
    raise ValueError(f"num_queries={num_queries} < num_scenes={num_scenes}: every reference "
                     "scene needs at least one query")
  extra = rng.integers(num_scenes, size=num_queries - num_scenes)
  return rng.permutation(np.concatenate([np.arange(num_scenes), extra]))


def generate_split(split: str, num_scenes: int, num_queries: int, seed: int):
  """Generates one CSS split as plain data (deterministic in (split, seed)).

  Image identity: one image per distinct scene. A reference or target whose
  scene already exists in the split reuses that image's id, so
  `image_id == scene_label` and the gallery (all unique images of the split) has
  no duplicates; ids are numbered in order of first appearance, references first.

  Args:
    split: 'train' or 'test' (selects the combinations and salts the seed).
    num_scenes: number of reference scenes drawn (some may coincide).
    num_queries: number of queries, >= num_scenes (each reference gets >= 1).
    seed: dataset seed.

  Returns:
    (queries, scenes): queries is a list of dicts with keys query_id, text,
    template, ref_id, target_id, ref_label, target_label; scenes maps every
    image_id of the split to its scene (a tuple of Obj).
  """
  if split not in SPLITS:
    raise ValueError(f"unknown CSS split {split!r}; valid splits: {list(SPLITS)}")
  if num_scenes < 1:
    raise ValueError(f"num_scenes must be >= 1, got {num_scenes}")
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_INDEX[split]]))
  ids, scenes = {}, {}

  def image_id(scene):
    if scene not in ids:
      ids[scene] = len(ids)
      scenes[ids[scene]] = scene
    return ids[scene]

  references = [random_scene(rng, split) for _ in range(num_scenes)]
  for scene in references:
    image_id(scene)
  queries = []
  for query_id, r in enumerate(_reference_order(rng, num_scenes, num_queries)):
    template, text, target = draw_modification(rng, references[r], split)
    ref_id, target_id = ids[references[r]], image_id(target)
    queries.append(dict(query_id=query_id, text=text, template=template, ref_id=ref_id,
                        target_id=target_id, ref_label=ref_id, target_label=target_id))
  return queries, scenes

"""Cached features for frozen towers: run a frozen encoder once per image, train from its output.

`config.data.cache_frozen_features`:

* 'auto' (default): cache when it is exact, else compute on the fly with a log
  line saying why not;
* 'on': the same, but a frozen image tower that cannot be cached is an error;
* 'off': always on the fly.

A tower is cached when (a) it is frozen from step 0: `model.frozen_*_encoder`
(inference mode, no gradient) AND every one of its parameters is in
`optimizer.freeze` (no update, no weight decay), so its weights are those of
the restored state for the whole run; a tower fixed only from
`optimizer.freeze_after_steps` (SSN on FashionIQ) trains before the switch and
is never cached; (b) its training output is a function of its own input alone
(no dropout: checked by tracing the tower with train=True and looking for a use
of the dropout key; a frozen BERT keeps its dropout, so it is not cached); (c)
it reads only its input (the text tower of a `joint_text_image` composer reads
image tokens; an image tower modulated by the text cannot be frozen at all, the
adapters refuse it); (d) one replica (`num_seeds` = 1: the replicas' towers are initialised from
different seeds, and init_from with several seeds is not supported). Training
and evaluation images get the same `data.preprocess` (the pipelines have no
augmentation), so features computed once with the evaluation pipeline are the
ones the on-the-fly path computes every step. The image tower(s) must be
cacheable for caching to apply; the text tower is cached in addition when it is
cacheable too (a frozen text tower beside a trained image tower runs on the fly).

Only the feature keys the training forward reads are kept (traced: e.g. the
Combiner reads 'projected' [d], not 'tokens' [1 + N, C]). The tables go on
every device when their bytes fit `data.device_memory_fraction` of one device
(cir_jax/data/device_data.py's sizing) and are gathered inside the train step;
otherwise they are written to `<workdir>/feature_cache/<table>-<key>/` as .npy
files (memory-mapped; each process gathers its batch slice on the host), key = a hash of the tower's weights (params and batch statistics), its name
and dtype, `data.preprocess`, the pad ratio, the image size, the split's name
and images (paths, or the bytes of an in-memory table), the feature keys; a
resumed run finds them again. Every file's checksum is checked on load; a
mismatch (corrupt file, wrong shapes) is logged and the features recomputed.
Evaluation always runs the towers on the fly (its splits are other images).
"""
import dataclasses
import hashlib
import json
import pathlib
import shutil
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from cir_jax import param_groups
from cir_jax import seeds as seeds_lib
from cir_jax import sharding
from cir_jax.data import batching
from cir_jax.data import device_data
from cir_jax.data import feature_data
from cir_jax.models import retrieval_model

MODES = ("auto", "on", "off")
FIELD = "data.cache_frozen_features"
CACHE_DIR = "feature_cache"
FORMAT_VERSION = 1
IMAGE_TOWERS = ("image_encoder", "query_image_encoder")


def mode(config) -> str:
  """data.cache_frozen_features ('off' for configs that predate the field)."""
  value = config.data.get("cache_frozen_features", "off")
  if value not in MODES:
    raise ValueError(f"{FIELD}={value!r}; valid: {list(MODES)}")
  return value


@dataclasses.dataclass
class Plan:
  """What is cached: the image tower(s) always, the text tower if `text`, and the
  feature keys the training forward reads: 'ref' (reference images), 'target'
  (targets and set negatives), 'text'."""
  text: bool
  keys: dict


# ----------------------------------------------------------------------------- analysis


def _live_inputs(closed_jaxpr) -> list[bool]:
  """Which inputs of a jaxpr its outputs depend on (a backward liveness pass).

  Conservative: an equation whose output is live makes all its inputs live
  (sub-jaxprs of jit/scan/custom rules are not looked into), and so does an
  equation with effects.
  """
  jaxpr = closed_jaxpr.jaxpr
  live = {v for v in jaxpr.outvars if not isinstance(v, jax_core.Literal)}
  for eqn in reversed(jaxpr.eqns):
    if eqn.effects or any(v in live for v in eqn.outvars):
      live.update(v for v in eqn.invars if not isinstance(v, jax_core.Literal))
  return [v in live for v in jaxpr.invars]


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _tower_fn(attr: str):
  """(module, input...) -> the tower's output dict in training mode (for `model.apply`)."""
  if attr == "text_encoder":
    return lambda m, ids, mask: m.text_encoder(ids, mask, train=True)
  return lambda m, images: getattr(m, attr)(
      retrieval_model._pixels(getattr(m, attr), images), train=True)  # pylint: disable=protected-access


def _tower_inputs(config, attr: str, batch: int = 2):
  s, length = config.data.image_size, config.data.max_text_len
  if attr == "text_encoder":
    return (jax.ShapeDtypeStruct((batch, length), jnp.int32),
            jax.ShapeDtypeStruct((batch, length), jnp.bool_))
  return (jax.ShapeDtypeStruct((batch, s, s, 3), jnp.uint8),)


def _uses_dropout(model, variables, config, attr: str) -> bool:
  """Whether the tower's training output depends on the dropout key (traced, no FLOPs)."""
  def run(variables, key, *inputs):
    return model.apply(variables, *inputs, rngs={"dropout": key}, method=_tower_fn(attr))
  jaxpr = jax.make_jaxpr(run)(variables, jax.random.key(0), *_tower_inputs(config, attr))
  n_vars = len(jax.tree.leaves(variables))
  return _live_inputs(jaxpr)[n_vars]


def feature_shapes(model, variables, config, attr: str) -> dict:
  """The tower's output dict for one example: key -> ShapeDtypeStruct [...] (no batch axis)."""
  out = jax.eval_shape(lambda v, *x: model.apply(v, *x, method=_tower_fn(attr)),
                       variables, *_tower_inputs(config, attr, 1))
  return {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in out.items()}


def used_keys(model, variables, config, example: dict, shapes: dict) -> dict:
  """Feature keys the training forward reads, per batch entry ('ref_features', ...).

  `example`: the batch without the cached towers' inputs; `shapes`: batch key ->
  {feature key -> ShapeDtypeStruct [...]}. Traced with jax.make_jaxpr.
  """
  b = config.batch_size
  batch = dict(example)
  for name, tree in shapes.items():
    lead = (b, config.loss.get("set_negatives", 0)) if name == "set_negative_features" else (b,)
    batch[name] = {k: jax.ShapeDtypeStruct(lead + v.shape, v.dtype) for k, v in tree.items()}

  def forward(variables, batch, key):
    return model.apply(variables, batch, train=True, rngs={"dropout": key},
                       mutable=["batch_stats"])
  jaxpr = jax.make_jaxpr(forward)(variables, batch, jax.random.key(0))
  live = _live_inputs(jaxpr)[len(jax.tree.leaves(variables)):]
  paths = [param_groups.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(batch)[0]]
  used = {p for p, is_live in zip(paths, live) if is_live}
  return {name: sorted(k for k in tree if f"{name}/{k}" in used) for name, tree in shapes.items()}


def _fully_frozen(patterns, shapes, prefix: str) -> bool:
  """Every parameter under `prefix` ('image_encoder/') matches one of `patterns`."""
  if not patterns:
    return False
  labels = param_groups.frozen_labels(shapes, tuple(patterns))
  flat = jax.tree_util.tree_flatten_with_path(labels)[0]
  mine = [label for path, label in flat if param_groups.path_str(path).startswith(prefix)]
  return bool(mine) and all(label == param_groups.FROZEN for label in mine)


def _why_not(config, model, variables, attr: str) -> Optional[str]:
  """None if tower `attr` can be cached, else the reason (for the log line or the error)."""
  kind = "text" if attr == "text_encoder" else "image"
  params = variables["params"]
  if not config.model.get(f"frozen_{kind}_encoder", False):
    if _fully_frozen(config.optimizer.get("freeze_after", ()), params, f"{attr}/"):
      return (f"{attr} trains until optimizer.freeze_after_steps="
              f"{config.optimizer.get('freeze_after_steps', 0)} (only towers frozen from step "
              f"0 are cached)")
    return f"model.frozen_{kind}_encoder is False"
  if not _fully_frozen(config.optimizer.get("freeze", ()), params, f"{attr}/"):
    return (f"optimizer.freeze does not cover every {attr}/ parameter (updates or weight "
            f"decay would change the weights the features were computed with)")
  if kind == "text" and getattr(model.composer, "joint_text_image", False):
    return f"composer {config.model.composer!r} feeds image tokens into the text tower"
  if _uses_dropout(model, variables, config, attr):
    return f"{attr} uses dropout in training (its output is not a function of its input)"
  return None


def _decline(value: str, why: str, log, auto_note: str = "") -> None:
  """The image tower cannot be cached: an error under 'on', a log line under 'auto'."""
  if value == "on":
    raise ValueError(f"{FIELD}='on' but the image tower cannot be cached: {why}. Set "
                     f"{FIELD}='auto' or 'off' (features on the fly)")
  log(f"{FIELD}='auto': not applied ({why}{auto_note}); features are computed on the fly")


def resolve(config, model, variables, log=print) -> Optional[Plan]:
  """The Plan for `config` (None = compute every tower on the fly); logs what applies.

  `variables`: {'params', 'batch_stats'} of the train state, for their shapes
  only (ShapeDtypeStructs are enough).
  Raises ValueError naming data.cache_frozen_features when it is 'on' and the
  image tower cannot be cached.
  """
  value = mode(config)
  if value == "off":
    return None
  frozen_image = config.model.get("frozen_image_encoder", False)
  frozen_text = config.model.get("frozen_text_encoder", False)
  if value == "auto" and not (frozen_image or frozen_text):
    # Nothing frozen from step 0; say so when a tower is frozen mid-run (SSN on FashionIQ).
    if config.optimizer.get("freeze_after", ()):
      log(f"{FIELD}='auto': not applied, towers fixed by optimizer.freeze_after train until "
          f"step {config.optimizer.get('freeze_after_steps', 0)} (only towers frozen from "
          f"step 0 are cached); features are computed on the fly")
    return None
  if seeds_lib.num_seeds(config) > 1:
    return _decline(value, f"num_seeds={config.num_seeds}: each replica's towers are "
                    f"initialised from its own seed (and init_from is single-replica), so no "
                    f"features are shared", log)
  variables = _abstract(variables)
  towers = [a for a in IMAGE_TOWERS if getattr(model, a, None) is not None]
  image_reasons = {a: r for a in towers if (r := _why_not(config, model, variables, a))}
  text_reason = _why_not(config, model, variables, "text_encoder")
  if image_reasons:
    return _decline(value, "; ".join(image_reasons.values()), log,
                    auto_note="; a frozen text tower alone is not cached, the trained image "
                              "tower dominates the step")
  text = text_reason is None
  if frozen_text and not text:
    log(f"{FIELD}: the text tower runs on the fly ({text_reason})")
  # Which feature keys the training forward reads (the rest is not kept).
  image_shapes = feature_shapes(model, variables, config, "image_encoder")
  shapes = {"ref_features": (feature_shapes(model, variables, config, "query_image_encoder")
                             if model.query_image_encoder is not None else image_shapes),
            "target_features": image_shapes}
  if config.loss.get("set_negatives", 0):
    shapes["set_negative_features"] = image_shapes
  b, length = config.batch_size, config.data.max_text_len
  example = {}  # the rest of a training batch (experiment.example_batch without the images)
  if config.loss.get("set_negatives", 0):
    example["set_negative_mask"] = jax.ShapeDtypeStruct((b, config.loss.set_negatives), jnp.bool_)
  if text:
    shapes["text_features"] = feature_shapes(model, variables, config, "text_encoder")
  else:
    example["text_ids"] = jax.ShapeDtypeStruct((b, length), jnp.int32)
    example["text_mask"] = jax.ShapeDtypeStruct((b, length), jnp.bool_)
  used = used_keys(model, variables, config, example, shapes)
  negatives = set(used.get("set_negative_features", ()))
  keys = {"ref": used["ref_features"], "target": sorted(set(used["target_features"]) | negatives)}
  if text:
    keys["text"] = used["text_features"]
  log(f"{FIELD}={value!r}: caching the frozen image tower" + (" and text tower" if text else "")
      + f" (feature keys kept: {keys})")
  return Plan(text=text, keys=keys)


# ----------------------------------------------------------------------------- computing


def _quiet(*_):
  pass


def _image_batches(config, split, table: str, vocab, mesh):
  """Global uint8 [B, S, S, 3] batches of the split's `table` ('images' or 'query_images')
  with the evaluation pipeline's preprocessing; rows past the table are padding."""
  b = config.eval.batch_size
  array = getattr(split, table)
  if array is not None:
    local = sharding.local_batch_size(b, mesh, "eval.batch_size")
    for index in batching.padded_batches(len(array), b, local):
      yield sharding.to_global({"x": array[index]}, mesh)["x"]
    return
  from cir_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow: files)
  eval_pipe = pipeline.EvalPipeline(split, vocab, config.data.max_text_len, b, mesh,
                                    config.data.image_size, log=_quiet,
                                    **pipeline.preprocess_kwargs(config.data))
  for batch in eval_pipe.gallery_batches():
    yield batch["image"]


def _text_batches(config, ids, mask, mesh):
  b = config.eval.batch_size
  local = sharding.local_batch_size(b, mesh, "eval.batch_size")
  for index in batching.padded_batches(len(ids), b, local):
    yield sharding.to_global({"ids": ids[index], "mask": mask[index]}, mesh)


def compute_features(model, variables, attr: str, keys, batches, rows: int, out: dict, mesh):
  """Fills `out` (key -> array [rows, ...]) with tower `attr`'s features of `batches`.

  The tower runs as in the training step (train=True; a cached tower is frozen and
  has no dropout, see the module docstring), jitted over the mesh.
  """
  def run(variables, inputs):
    args = (inputs["ids"], inputs["mask"]) if isinstance(inputs, dict) else (inputs,)
    features = model.apply(variables, *args, rngs={"dropout": jax.random.key(0)},
                           method=_tower_fn(attr))
    return {k: features[k] for k in keys}
  fn = jax.jit(run, out_shardings=sharding.replicated(mesh))
  start = 0
  for inputs in batches:
    features = jax.device_get(fn(variables, inputs))
    n = min(rows - start, len(jax.tree.leaves(inputs)[0]))
    for k in keys:
      out[k][start:start + n] = features[k][:n]
    start += n
  if start != rows:
    raise RuntimeError(f"computed features of {start} rows, expected {rows}")
  return out


@dataclasses.dataclass
class Table:
  """One feature table: `name` ('images', 'query_images', 'texts'), the tower `attr`,
  the `keys` kept, its number of `rows` and per-key ShapeDtypeStructs [...]."""
  name: str
  attr: str
  keys: list
  rows: int
  shapes: dict

  def nbytes(self) -> int:
    return self.rows * sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize
                           for s in self.shapes.values())


def tables_of(plan: Plan, config, model, variables, split) -> list[Table]:
  """The feature tables a split needs under `plan`."""
  separate = model.query_image_encoder is not None or split.query_images is not None

  def table(name, attr, keys, rows):
    shapes = feature_shapes(model, variables, config, attr)
    return Table(name, attr, list(keys), rows, {k: shapes[k] for k in keys})

  g = split.num_images
  if separate:
    out = [table("images", "image_encoder", plan.keys["target"], g),
           table("query_images", "query_image_encoder" if model.query_image_encoder is not None
                 else "image_encoder", plan.keys["ref"], g)]
  else:
    out = [table("images", "image_encoder", sorted(set(plan.keys["target"]) | set(plan.keys["ref"])),
                 g)]
  if plan.text:
    out.append(table("texts", "text_encoder", plan.keys["text"], split.num_queries))
  return out


# ----------------------------------------------------------------------------- workdir store


def _hash_tree(h, tree):
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    leaf = np.asarray(jax.device_get(leaf))
    h.update(f"{param_groups.path_str(path)}:{leaf.dtype}:{leaf.shape};".encode())
    h.update(np.ascontiguousarray(leaf).tobytes())


def cache_key(config, variables, table: Table, split, text_ids=None, text_mask=None) -> str:
  """sha256 of everything the table's features depend on (see the module docstring)."""
  data = config.data
  meta = {"version": FORMAT_VERSION, "table": table.name, "tower": table.attr,
          "keys": sorted(table.keys), "rows": table.rows, "dtype": config.model.dtype,
          "split": split.name}
  if table.attr == "text_encoder":
    meta.update(encoder=config.model.text_encoder, tokenizer=data.get("tokenizer", "vocab"),
                max_text_len=data.max_text_len)
  else:
    meta.update(encoder=config.model.image_encoder, image_size=data.image_size,
                preprocess=data.get("preprocess", "squash"),
                pad_ratio=float(data.get("target_pad_ratio", 1.25)))
  h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
  _hash_tree(h, variables["params"].get(table.attr, {}))
  _hash_tree(h, variables["batch_stats"].get(table.attr, {}))
  if table.attr == "text_encoder":
    h.update(np.ascontiguousarray(text_ids).tobytes() + np.ascontiguousarray(text_mask).tobytes())
  elif getattr(split, table.name) is not None:
    h.update(np.ascontiguousarray(getattr(split, table.name)).tobytes())
  else:
    h.update("\n".join(str(p) for p in split.image_paths).encode())
  return h.hexdigest()


def _file_sha256(path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      h.update(chunk)
  return h.hexdigest()


def cache_dir(workdir, table: Table, key: str) -> pathlib.Path:
  return pathlib.Path(workdir) / CACHE_DIR / f"{table.name}-{key[:20]}"


def load_cached(directory: pathlib.Path, table: Table, key: str) -> dict:
  """Memory-mapped key -> [rows, ...] arrays of a cache directory, checked against `table`
  and `key` (meta.json and every file's sha256). Raises ValueError saying what is wrong."""
  meta_path = directory / "meta.json"
  if not meta_path.exists():
    raise ValueError(f"{meta_path} is missing (an interrupted write)")
  meta = json.loads(meta_path.read_text())
  if meta.get("key") != key:
    raise ValueError(f"{meta_path} holds key {meta.get('key')!r}, expected {key!r}")
  out = {}
  for k, shape in table.shapes.items():
    path = directory / f"{k}.npy"
    if _file_sha256(path) != meta["sha256"].get(k):
      raise ValueError(f"{path}: checksum mismatch (corrupt or modified)")
    array = np.load(path, mmap_mode="r")
    want = (table.rows,) + tuple(shape.shape)
    if array.shape != want or array.dtype != np.dtype(shape.dtype):
      raise ValueError(f"{path}: {array.dtype} {array.shape}, expected {np.dtype(shape.dtype)} "
                       f"{want}")
    out[k] = array
  return out


def _write(directory: pathlib.Path, key: str, arrays: dict):
  """Writes arrays and meta.json to a temporary sibling, then renames it into place."""
  tmp = directory.with_name(f".{directory.name}.tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  sums = {}
  for k, array in arrays.items():
    np.save(tmp / f"{k}.npy", array)
    sums[k] = _file_sha256(tmp / f"{k}.npy")
  (tmp / "meta.json").write_text(json.dumps({"key": key, "sha256": sums}, indent=1))
  shutil.rmtree(directory, ignore_errors=True)
  tmp.replace(directory)


def _sync(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------- training data


@dataclasses.dataclass
class Pending:
  """What setup_training returns when features are cached: they are computed from the
  restored state (`build`), after resume / init_from."""
  plan: Plan
  split: Any
  vocab: Any

  def build(self, experiment, workdir, log=print):
    return build_train_data(self.plan, experiment, self.split, self.vocab, workdir, log)


def build_train_data(plan: Plan, experiment, split, vocab, workdir: Optional[str], log=print,
                     placement: Optional[str] = None):
  """Computes (or loads) the cached features of `split` with the experiment's current
  weights -> FeatureTrainData (tables on the mesh) or HostFeatureData (workdir .npy).

  `placement`: None decides by size (data.device_memory_fraction of one device);
  'device' / 'host' force it (tests, benchmarks). The host path needs `workdir`.
  """
  config, model, mesh = experiment.config, experiment.model, experiment.mesh
  variables = {"params": experiment.state.params, "batch_stats": experiment.state.batch_stats}
  tables = tables_of(plan, config, model, _abstract(variables), split)
  index = feature_data.index_tables(split, vocab, config.data.max_text_len, plan.text,
                                    config.loss.get("set_negatives", 0), log)
  ids = mask = None
  if plan.text:
    ids, mask = batching.encode_texts(split, vocab, config.data.max_text_len, _quiet)
  need = sum(t.nbytes() for t in tables)
  if placement is None:
    fraction = config.data.get("device_memory_fraction", 0.25)
    have = device_data.device_memory_bytes()
    placement = "device" if need <= fraction * have else "host"
    if placement == "host":
      log(f"{FIELD}: features ({need / 2**30:.2f} GiB) exceed data.device_memory_fraction="
          f"{fraction} of one device ({have / 2**30:.1f} GiB); keeping them in "
          f"{pathlib.Path(workdir or '?') / CACHE_DIR}")
  if placement == "host" and workdir is None:
    raise ValueError("cached features that do not fit the device need a workdir")

  def batches(table):
    if table.attr == "text_encoder":
      return _text_batches(config, ids, mask, mesh)
    return _image_batches(config, split, table.name, vocab, mesh)

  features = {}
  for table in tables:
    if placement == "device":
      out = {k: np.empty((table.rows,) + s.shape, s.dtype) for k, s in table.shapes.items()}
      features[table.name] = _computed(model, variables, table, batches(table), out, mesh, log,
                                       split)
      continue
    key = cache_key(config, variables, table, split, ids, mask)
    directory = cache_dir(workdir, table, key)
    if directory.exists():
      try:
        features[table.name] = load_cached(directory, table, key)
        log(f"{FIELD}: reusing {directory}")
        continue
      except (ValueError, OSError, KeyError) as e:
        log(f"{FIELD}: cannot reuse {directory}: {e}; recomputing")
    if jax.process_index() == 0:
      out = {k: np.empty((table.rows,) + s.shape, s.dtype) for k, s in table.shapes.items()}
      _write(directory, key, _computed(model, variables, table, batches(table), out, mesh, log,
                                       split))
      log(f"{FIELD}: wrote {directory}")
    else:  # every process takes part in the jitted pass; process 0 writes
      out = {k: np.empty((table.rows,) + s.shape, s.dtype) for k, s in table.shapes.items()}
      _computed(model, variables, table, batches(table), out, mesh, log, split)
    _sync(f"feature_cache_{table.name}")
    features[table.name] = load_cached(directory, table, key)
  cls = feature_data.FeatureTrainData if placement == "device" else feature_data.HostFeatureData
  return cls(split, features, index, config.batch_size, mesh, config.seed, log=log)


def _computed(model, variables, table: Table, batches, out, mesh, log, split) -> dict:
  start = time.perf_counter()
  compute_features(model, variables, table.attr, table.keys, batches, table.rows, out, mesh)
  log(f"{FIELD}: {split.name} {table.name}: {table.rows} rows of {table.keys} computed with "
      f"the frozen {table.attr} in {time.perf_counter() - start:.1f} s")
  return out

"""MIT-States classification with compositionally novel labels (TIRG paper 4.2.2, Table 3).

Table 3 as published (`Table3Model`, `train_table3`, `classify_nearest_pair`): the
paper learns an embedding for each noun, phi_n, and each adjective, phi_a, composes
them with TIRG into phi_an = TIRG(phi_n, phi_a) (the noun in the image slot, the
adjective in the text slot), embeds an image x by ResNet + FC into the same shared
space, phi_x, and labels x with argmax_t kappa(phi_t, phi_x) over the unseen test
(adj, noun) pairs of the compositional split of [31, 33] (closed world). The paper
gives no loss for this task; ours is its Eq. 6 with the composed TRAINING pairs as
the classes: softmax cross-entropy of kappa(phi_x, phi_an) = s * cos over all
training pairs (`table3_loss`), s the learnable scale of the retrieval models.

`prototype` variant (ours, not the paper's; `evaluate_prototype_variant`): reuses a
trained retrieval model instead of training word embeddings: phi_n comes from
TRAINING images of noun n (whose adjectives differ, so no test image is used),
phi_a is the text "<adj>", and

  prototype(a, n) = normalize(mean_x normalize(compose(x, "<a>")))  over train images x of n

("make this <noun> <adj>"), i.e. the average retrieval query for that pair.
Test images are embedded with the target encoder and classified by the
nearest prototype (cosine); accuracy is top-1 over the test pairs.
Only the [N] predictions and the accuracy reach the host.
"""
import dataclasses
import functools
import json
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cir_jax import evaluate as evaluate_lib
from cir_jax import losses
from cir_jax import optim
from cir_jax import xla_cpu
from cir_jax.data import manual
from cir_jax.data import mit_states
from cir_jax.models.composers import tirg as tirg_lib
from cir_jax.models.retrieval_model import IMAGENET_MEAN
from cir_jax.models.retrieval_model import IMAGENET_STD
from cir_jax.models.retrieval_model import l2_normalize
from cir_jax.models.retrieval_model import normalize_pixels

# --------------------------------------------------------------------------------------
# Table 3 as published: TIRG over learned noun and adjective embeddings.
# --------------------------------------------------------------------------------------


class PairComposer(nn.Module):
  """phi_an = TIRG(phi_n, phi_a): int adjective [P], noun [P] -> [P, embed_dim].

  The noun embedding takes TIRG's image slot (it is modified), the adjective the
  text slot (the modification), as in the paper's "combination phi_an".
  """
  num_adjectives: int
  num_nouns: int
  embed_dim: int = 512

  @nn.compact
  def __call__(self, adjective, noun, train: bool = False):
    phi_n = nn.Embed(self.num_nouns, self.embed_dim, name="noun_embedding")(noun)
    phi_a = nn.Embed(self.num_adjectives, self.embed_dim, name="adjective_embedding")(adjective)
    out, _ = tirg_lib.TIRG(embed_dim=self.embed_dim, name="tirg")(
        {"embedding": phi_n}, {"pooled": phi_a}, train=train)
    return out


class Table3Model(nn.Module):
  """Images and composed (adj, noun) labels in one shared space, both scaled unit vectors.

  Attributes:
    image_encoder: module, input [B, ...] (pixels, or features in tests) -> dict with
      'pooled' [B, C] (ResNet-18 in the paper).
    num_adjectives, num_nouns: vocabulary sizes.
    embed_dim: the shared space (512 in TIRG).
    init_scale: the learnable scale s of kappa = s^2 cos (TIRG's NormalizationLayer).
  """
  image_encoder: nn.Module
  num_adjectives: int
  num_nouns: int
  embed_dim: int = 512
  init_scale: float = 4.0

  def setup(self):
    self.image_fc = nn.Dense(self.embed_dim)
    self.pair_composer = PairComposer(self.num_adjectives, self.num_nouns, self.embed_dim)
    self.norm_scale = self.param("norm_scale", nn.initializers.constant(self.init_scale), ())

  def embed_images(self, x, train: bool = False):
    """[B, ...] -> phi_x [B, embed_dim]."""
    pooled = self.image_encoder(x, train=train)["pooled"]
    return self.norm_scale * l2_normalize(self.image_fc(pooled))

  def embed_pairs(self, adjective, noun, train: bool = False):
    """int [P], [P] -> phi_an [P, embed_dim]."""
    return self.norm_scale * l2_normalize(self.pair_composer(adjective, noun, train=train))

  def __call__(self, x, adjective, noun, train: bool = False):
    return self.embed_images(x, train), self.embed_pairs(adjective, noun, train)


def table3_loss(image_emb, pair_emb, label):
  """Eq. 6 with the composed training pairs as classes: phi_x [B, d], phi_an [P, d], int [B]."""
  return losses.batch_classification_loss(image_emb, pair_emb, label, kernel="dot")


@jax.jit
def classify_nearest_pair(image_emb, pair_emb):
  """t(x) = argmax_t kappa(phi_t, phi_x): [N, d], [P, d] -> int [N] (index into the pairs)."""
  return jnp.argmax(losses.similarity(image_emb, pair_emb, "dot"), axis=-1)


@dataclasses.dataclass(frozen=True)
class PairVocabulary:
  """Words and pairs of the compositional split.

  adjectives, nouns: sorted words (embedding rows). train_pairs / test_pairs: int
  [P, 2] (adjective row, noun row), sorted by name; the test pairs are the classes.
  """
  adjectives: tuple
  nouns: tuple
  train_pairs: np.ndarray
  test_pairs: np.ndarray

  @classmethod
  def build(cls, train: list, test: list) -> "PairVocabulary":
    """train, test: [(path, adj, noun)]; every test word must occur in training."""
    adjectives = tuple(sorted({a for _, a, _ in train}))
    nouns = tuple(sorted({n for _, _, n in train}))
    missing = (sorted({a for _, a, _ in test} - set(adjectives))
               + sorted({n for _, _, n in test} - set(nouns)))
    if missing:
      raise ValueError(f"MIT-States Table 3: test words {missing[:5]} never occur in training, "
                       f"so their embeddings are never learned; the compositional split must "
                       f"see every adjective and noun in training")
    a_row, n_row = {a: i for i, a in enumerate(adjectives)}, {n: i for i, n in enumerate(nouns)}
    pairs = lambda items: np.asarray(sorted({(a_row[a], n_row[n]) for _, a, n in items}),
                                     np.int64).reshape(-1, 2)
    return cls(adjectives, nouns, pairs(train), pairs(test))

  def labels(self, items: list, pairs: np.ndarray) -> np.ndarray:
    """int [len(items)]: row of each image's (adj, noun) in `pairs`."""
    row = {(int(a), int(n)): i for i, (a, n) in enumerate(pairs)}
    a_row = {a: i for i, a in enumerate(self.adjectives)}
    n_row = {n: i for i, n in enumerate(self.nouns)}
    return np.asarray([row[(a_row[a], n_row[n])] for _, a, n in items], np.int64)


def make_train_step(model: Table3Model, tx: optax.GradientTransformation):
  """jit step(params, batch_stats, opt_state, x [B, ...], label [B], train_pairs [P, 2])."""

  @functools.partial(jax.jit, compiler_options=xla_cpu.train_compiler_options())
  def step(params, batch_stats, opt_state, x, label, train_pairs):
    def loss_fn(p):
      (image_emb, pair_emb), updates = model.apply(
          {"params": p, "batch_stats": batch_stats}, x, train_pairs[:, 0], train_pairs[:, 1],
          train=True, mutable=["batch_stats"])
      return table3_loss(image_emb, pair_emb, label), updates["batch_stats"]

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  return step


def init_table3(model: Table3Model, example_x, train_pairs, seed: int = 0):
  """(params, batch_stats) of `model` for inputs shaped like `example_x`."""
  variables = model.init(jax.random.key(seed), example_x, jnp.asarray(train_pairs[:, 0]),
                         jnp.asarray(train_pairs[:, 1]))
  return variables["params"], variables.get("batch_stats", {})


def table3_accuracy(model, variables, test_x_batches, test_labels, test_pairs) -> float:
  """Top-1 % of `test_labels` [N] by the nearest composed test pair, images in batches."""
  embed = jax.jit(lambda v, x: model.apply(v, x, method=Table3Model.embed_images))
  pairs = model.apply(variables, jnp.asarray(test_pairs[:, 0]), jnp.asarray(test_pairs[:, 1]),
                      method=Table3Model.embed_pairs)
  pred = np.concatenate([np.asarray(classify_nearest_pair(embed(variables, x), pairs))
                         for x in test_x_batches])
  return 100.0 * float(np.mean(pred[:len(test_labels)] == test_labels))


def _image_batches(root, items, image_size, batch, seed=None):
  """uint8 [batch, S, S, 3] numpy batches of MIT-States images (squashed to S x S), with
  the int positions of the items; shuffled and repeated forever when `seed` is given."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  paths = [str(pathlib.Path(root) / p) for p, _, _ in items]
  ds = tf.data.Dataset.from_tensor_slices((paths, np.arange(len(paths))))
  if seed is not None:
    ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True).repeat()

  def load(path, i):
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image = tf.image.resize(image, (image_size, image_size), antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), i

  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch, drop_remainder=seed is not None).prefetch(2).as_numpy_iterator()


def train_table3(config, workdir, log=print) -> dict[str, Any]:
  """Trains Table3Model on the compositional train split and scores the unseen test pairs.

  Reads data.manual_dir, data.image_size, model.image_encoder / embed_dim / init_scale,
  optimizer, batch_size, num_train_steps, log_every_steps, seed. One process, one
  device; the image tower starts from scratch (model.image_encoder). Writes
  <workdir>/results.json.
  """
  from cir_jax.models import build as build_lib  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(config.data.manual_dir)
  train = mit_states.list_images(root, "train", "compositional")
  test = mit_states.list_images(root, "test", "compositional")
  vocab = PairVocabulary.build(train, test)
  train_labels = vocab.labels(train, vocab.train_pairs)
  test_labels = vocab.labels(test, vocab.test_pairs)
  encoder = build_lib.build_image_encoder(config.model)
  pixels = lambda images: normalize_pixels(images, getattr(encoder, "pixel_mean", IMAGENET_MEAN),
                                           getattr(encoder, "pixel_std", IMAGENET_STD))
  model = Table3Model(encoder, len(vocab.adjectives), len(vocab.nouns), config.model.embed_dim,
                      config.model.init_scale)
  s = config.data.image_size
  params, stats = init_table3(model, jnp.zeros((1, s, s, 3)), vocab.train_pairs, config.seed)
  tx = optim.make_optimizer(config.optimizer, params)
  opt_state = tx.init(params)
  step_fn = make_train_step(model, tx)
  train_pairs = jnp.asarray(vocab.train_pairs)
  log(f"MIT-States Table 3: {len(train)} training images over {len(vocab.train_pairs)} pairs; "
      f"{len(test)} test images over {len(vocab.test_pairs)} unseen pairs")
  batches = _image_batches(root, train, s, config.batch_size, seed=config.seed)
  for step in range(1, config.num_train_steps + 1):
    images, rows = next(batches)
    params, stats, opt_state, loss = step_fn(params, stats, opt_state, pixels(images),
                                             jnp.asarray(train_labels[rows]), train_pairs)
    if step % config.log_every_steps == 0 or step == config.num_train_steps:
      log(f"step {step}: loss {float(loss):.4f}")
  variables = {"params": params, "batch_stats": stats}
  test_x = (pixels(images) for images, _ in _image_batches(root, test, s, config.eval.batch_size))
  accuracy = table3_accuracy(model, variables, test_x, test_labels, vocab.test_pairs)
  log(f"MIT-States Table 3: {accuracy:.2f}% top-1 over {len(vocab.test_pairs)} unseen pairs")
  results = {"split": "mit_states/compositional/test", "num_queries": len(test),
             "num_gallery": len(vocab.test_pairs), "step": config.num_train_steps,
             "protocol": "TIRG 4.2.2 Table 3: nearest TIRG(noun, adjective) embedding among "
                         "the unseen test pairs", "metrics": {"accuracy": accuracy}}
  pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
  (pathlib.Path(workdir) / "results.json").write_text(json.dumps(results, indent=2))
  return results


# --------------------------------------------------------------------------------------
# The prototype variant (ours): a trained retrieval model, prototypes of composed images.
# --------------------------------------------------------------------------------------


def prototype_table(train_images: list, test_images: list, images_per_noun: int, seed: int):
  """Queries that build the pair prototypes.

  Args:
    train_images, test_images: [(relative path, adj, noun)] from mit_states.list_images.
    images_per_noun: at most this many train images of a noun per pair (seeded draw).
    seed: draw seed.

  Returns:
    (pairs ['adj noun'], query train-image rows [M], query adjectives [M],
    query pair ids [M], test pair ids [N]).
  """
  pairs = sorted({f"{a} {n}" for _, a, n in test_images})
  pair_id = {p: i for i, p in enumerate(pairs)}
  by_noun: dict = {}
  for i, (_, _, n) in enumerate(train_images):
    by_noun.setdefault(n, []).append(i)
  unseen = sorted({p.split()[1] for p in pairs} - set(by_noun))
  if unseen:
    raise ValueError(f"MIT-States classification: test nouns {unseen[:5]} have no training "
                     f"images; the compositional split must see every noun in training")
  rng = np.random.default_rng(seed)
  rows, adjs, ids = [], [], []
  for p in pairs:
    adj, noun = p.split()
    cand = by_noun[noun]
    chosen = (cand if len(cand) <= images_per_noun
              else sorted(rng.choice(cand, images_per_noun, replace=False).tolist()))
    rows += chosen
    adjs += [adj] * len(chosen)
    ids += [pair_id[p]] * len(chosen)
  test_ids = np.asarray([pair_id[f"{a} {n}"] for _, a, n in test_images], np.int64)
  return pairs, np.asarray(rows, np.int64), adjs, np.asarray(ids, np.int64), test_ids


@jax.jit
def _classify(query_emb, query_pair, image_emb, num_pairs_array):
  num_pairs = num_pairs_array.shape[0]
  q = query_emb / jnp.linalg.norm(query_emb, axis=-1, keepdims=True)
  proto = jax.ops.segment_sum(q, query_pair, num_segments=num_pairs)
  proto /= jnp.maximum(jnp.linalg.norm(proto, axis=-1, keepdims=True), 1e-12)
  x = image_emb / jnp.linalg.norm(image_emb, axis=-1, keepdims=True)
  return jnp.argmax(x @ proto.T, axis=-1)


def classify_by_prototype(query_emb, query_pair, image_emb, num_pairs: int) -> np.ndarray:
  """Nearest-prototype labels: queries [M, d] with pair ids [M], images [N, d] -> int [N].

  Padded query rows must carry pair id >= num_pairs (dropped by segment_sum).
  """
  return np.asarray(jax.device_get(_classify(query_emb, query_pair, image_emb,
                                             jnp.zeros(num_pairs))))


def evaluate_prototype_variant(config, model, vocab, mesh, variables, log=print,
                            images_per_noun: int = 32) -> dict[str, Any]:
  """The prototype variant's accuracy (ours, module docstring) of a trained retrieval model."""
  root = pathlib.Path(config.data.manual_dir)
  train = mit_states.list_images(root, "train", "compositional")
  test = mit_states.list_images(root, "test", "compositional")
  pairs, rows, adjs, pair_of_query, test_ids = prototype_table(
      train, test, images_per_noun, config.data.dataset_seed)
  used = sorted(set(rows.tolist()))
  images = [train[i] for i in used] + test
  new_row = {r: i for i, r in enumerate(used)}
  split = manual.assemble(
      "mit_states/compositional/classification", [p for p, _, _ in images],
      [str(root / p) for p, _, _ in images], np.arange(len(images)),
      np.asarray([new_row[r] for r in rows]), np.full(len(rows), -1), np.full(len(rows), -1),
      adjs, skip_missing=False, protocol="", log=log,
      instructions=mit_states.MANUAL_DOWNLOAD_INSTRUCTIONS)
  evaluator = evaluate_lib.Evaluator(config, model, vocab, mesh, log=log, retrieval_split=split)
  queries = evaluator.embed_queries(variables)
  gallery = evaluator.embed_gallery(variables)
  query_pair = np.full(queries.shape[0], len(pairs), np.int64)
  query_pair[:len(rows)] = pair_of_query
  test_rows = np.arange(len(used), len(images))
  pred = classify_by_prototype(queries, query_pair, jnp.take(gallery, test_rows, axis=0),
                               len(pairs))
  accuracy = 100.0 * float(np.mean(pred == test_ids))
  log(f"MIT-States compositional classification (prototype variant): {accuracy:.2f}% top-1 "
      f"over {len(pairs)} unseen pairs, {len(test)} test images")
  return {"split": split.name, "num_queries": len(test), "num_gallery": len(pairs),
          "protocol": ("prototype variant of TIRG 4.2.2 (ours, not the paper's): nearest (adj, "
                       "noun) prototype among the unseen test pairs; "
                       f"prototype = mean composed query of <= {images_per_noun} training "
                       "images of the noun with the adjective text"),
          "skipped": {}, "metrics": {"accuracy": accuracy}}


if __name__ == "__main__":
  from cir_jax.utils import flags as flags_lib  # pylint: disable=g-import-not-at-top
  flags_lib.run(train_table3, creates_workdir=True)

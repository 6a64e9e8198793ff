"""MIT-States classification with compositionally novel labels (TIRG paper 4.2.2, Table 3).

The paper composes a noun feature phi_n with an adjective feature phi_a by TIRG
into phi_an and labels an image x with argmax_t kappa(phi_t, phi_x) over the
unseen test (adj, noun) pairs of the compositional split of [31, 33].

Our composer's inputs are an image and a text, so we compose the pair as the
trained retrieval model does: phi_n comes from images of noun n (its TRAINING
images, whose adjectives differ, so no test image is used), phi_a is the text
"<adj>", and

  prototype(a, n) = normalize(mean_x normalize(compose(x, "<a>")))  over train images x of n

("make this <noun> <adj>"), i.e. the average retrieval query for that pair.
Test images are embedded with the target encoder and classified by the
nearest prototype (cosine); accuracy is top-1 over the test pairs (closed
world, as Table 3). Only the [N] predictions and the accuracy reach the host.
"""
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cir_jax import evaluate as evaluate_lib
from cir_jax.data import manual
from cir_jax.data import mit_states


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


def classify(query_emb, query_pair, image_emb, num_pairs: int) -> np.ndarray:
  """Nearest-prototype labels: queries [M, d] with pair ids [M], images [N, d] -> int [N].

  Padded query rows must carry pair id >= num_pairs (dropped by segment_sum).
  """
  return np.asarray(jax.device_get(_classify(query_emb, query_pair, image_emb,
                                             jnp.zeros(num_pairs))))


def evaluate_classification(config, model, vocab, mesh, variables, log=print,
                            images_per_noun: int = 32) -> dict[str, Any]:
  """Table 3 accuracy of a trained model on the compositional split (see module docstring)."""
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
  pred = classify(queries, query_pair, jnp.take(gallery, test_rows, axis=0), len(pairs))
  accuracy = 100.0 * float(np.mean(pred == test_ids))
  log(f"MIT-States compositional classification: {accuracy:.2f}% top-1 over {len(pairs)} "
      f"unseen pairs, {len(test)} test images")
  return {"split": split.name, "num_queries": len(test), "num_gallery": len(pairs),
          "protocol": ("TIRG 4.2.2: nearest (adj, noun) prototype among the unseen test pairs; "
                       f"prototype = mean composed query of <= {images_per_noun} training "
                       "images of the noun with the adjective text"),
          "skipped": {}, "metrics": {"accuracy": accuracy}}

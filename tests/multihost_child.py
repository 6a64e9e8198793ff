"""One process of the multi-process test (launched by tests/test_multihost.py).

  python -m tests.multihost_child --overrides '{"batch_size": 8, ...}' --workdir DIR \
      [--topk_out FILE]

Trains and evaluates `fakes.tiny_config(**overrides)` with
`train.train_and_evaluate` (the overrides carry `distributed=True` and the
coordinator address, process count and id), then, with --topk_out, also runs
`retrieval.evaluate_retrieval(return_topk=...)` on fixed random embeddings whose
rows are split over the processes, and writes the fetched ids and recall: the
ids of a cross-process top-k must reach every process.
"""
import argparse
import json

import jax
import numpy as np

from cir_jax import retrieval
from cir_jax import sharding
from cir_jax import train
from tests import fakes


def topk_embeddings(num_queries=24, num_gallery=40, dim=8, seed=5):
  """The fixed query/gallery embeddings of the top-k check (also used by the test)."""
  rs = np.random.RandomState(seed)
  q = rs.randn(num_queries, dim).astype(np.float32)
  g = rs.randn(num_gallery, dim).astype(np.float32)
  return q, g


def global_topk(k: int) -> dict:
  """Top-k ids and Recall@K of `topk_embeddings` with rows sharded over all processes."""
  q, g = topk_embeddings()
  mesh = sharding.make_mesh()
  rows = lambda x: sharding.to_global(
      {"x": x.reshape(jax.process_count(), -1, x.shape[1])[jax.process_index()]}, mesh)["x"]
  labels = np.arange(g.shape[0]) % 10
  target = labels[np.arange(q.shape[0]) % g.shape[0]]
  metrics, ids = retrieval.evaluate_retrieval(rows(q), rows(g), labels, target, ks=(1, 5),
                                              mesh=mesh, return_topk=k, block_size=8)
  return {"ids": np.asarray(ids).tolist(), "metrics": metrics}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--overrides", required=True, help="JSON dict for fakes.tiny_config")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--topk_out", default="")
  args = parser.parse_args()
  config = fakes.tiny_config(**json.loads(args.overrides))
  train.train_and_evaluate(config, args.workdir)
  if args.topk_out:
    with open(args.topk_out, "w") as f:
      json.dump(global_topk(k=5), f)


if __name__ == "__main__":
  main()

"""Several seeds in one program: S independent replicas of one config, stacked.

With `config.num_seeds = S` (> 1) every leaf of the train state gets a leading
replica axis of size S: replica i is exactly the run of `config.seed + i`
(its own params init, dropout, optimiser state and data order), and one jitted
step (`jax.vmap` over that axis, the batch still sharded over 'data') trains all
of them. Evaluation scores each replica and reports the mean, the sample std
(ddof=1) and every seed's numbers, so one program yields a table with error bars.
"""
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cir_jax import sharding


def num_seeds(config) -> int:
  """config.num_seeds (1 when absent); a value below 1 is an error naming the field."""
  n = int(config.get("num_seeds", 1))
  if n < 1:
    raise ValueError(f"num_seeds={n} must be >= 1")
  return n


def seed_list(config) -> list[int]:
  """The seeds of the replicas: config.seed, config.seed + 1, ..."""
  return [int(config.seed) + i for i in range(num_seeds(config))]


def current_step(state) -> int:
  """The step of a train state (all replicas share it)."""
  return int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])


def replica(tree: Any, i: int) -> Any:
  """Replica i of a stacked pytree (leaves [S, ...] -> [...])."""
  return jax.tree.map(lambda x: x[i], tree)


def host_scalars(metrics: dict) -> tuple[dict, dict]:
  """Per-replica step metrics ([S] arrays on the host) -> (logged, worst).

  logged: the mean over replicas of each metric, and 'loss/seed<i>' for each
  replica i; worst: the largest value over replicas (what the divergence
  monitor checks, so a single diverging replica stops the run).
  """
  logged, worst = {}, {}
  for key, value in metrics.items():
    value = np.asarray(value, np.float64)
    logged[key] = float(value.mean())
    worst[key] = float(value.max())
    if key == "loss":
      logged.update({f"loss/seed{i}": float(v) for i, v in enumerate(value)})
  return logged, worst


def aggregate(per_seed: list[dict], seeds: list[int]) -> dict:
  """Evaluation results of each replica -> one results dict with mean +- std per metric.

  'metrics' holds the mean over replicas (so tools reading results.json keep
  working), 'metrics_std' the sample standard deviation (ddof=1; 0 for one
  seed), 'per_seed' [{'seed', 'metrics'}] every replica's own numbers.
  """
  out = {k: v for k, v in per_seed[0].items() if k not in ("metrics", "topk")}
  names = list(per_seed[0]["metrics"])
  values = {k: np.asarray([r["metrics"][k] for r in per_seed], np.float64) for k in names}
  out["metrics"] = {k: float(v.mean()) for k, v in values.items()}
  out["metrics_std"] = {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0
                        for k, v in values.items()}
  out["per_seed"] = [{"seed": s, "metrics": r["metrics"]} for s, r in zip(seeds, per_seed)]
  return out


def format_spread(results: dict) -> str:
  """'R@1 25.31 +- 1.20 | R@5 ...  (n seeds)' for a results dict from `aggregate`."""
  std = results.get("metrics_std", {})
  cells = [f"{k} {v:.2f} ± {std.get(k, 0.0):.2f}" for k, v in results["metrics"].items()]
  return " | ".join(cells) + f"  (mean ± std over {len(results.get('per_seed', []))} seeds)"


class StackedPipelines:
  """Host input of S replicas: one TrainPipeline per seed, batches stacked [S, B, ...]
  (the replica axis replicated, the batch axis sharded over 'data')."""

  def __init__(self, pipelines: list, mesh):
    self.pipelines, self.mesh = pipelines, mesh
    spec = NamedSharding(mesh, P(None, sharding.DATA_AXIS))
    self._stack = jax.jit(lambda batches: jax.tree.map(lambda *x: jnp.stack(x), *batches),
                          out_shardings=spec)

  def batches(self, start_step: int = 0) -> Iterator[dict]:
    iterators = [p.batches(start_step) for p in self.pipelines]
    try:
      for batches in zip(*iterators):
        yield self._stack(list(batches))
    finally:
      for it in iterators:
        it.close()

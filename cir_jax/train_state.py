"""The train state (a plain pytree) and its sharded initialisation."""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from cir_jax import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


def create_train_state(model, tx: optax.GradientTransformation, example_batch: dict, seed: int,
                       mesh, num_seeds: int = 1) -> TrainState:
  """Initialises params, BatchNorm statistics and optimiser state, replicated over `mesh`.

  The init is jitted with `out_shardings`, so nothing is materialised unsharded
  on a single device first. `example_batch` only provides shapes and dtypes.
  With num_seeds = S > 1 every leaf has a leading replica axis [S, ...] and
  replica i is the state of seed `seed + i` (cir_jax/seeds.py).
  """

  def init(rng):
    params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    batch = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), example_batch)
    variables = model.init({"params": params_rng, "dropout": dropout_rng}, batch, train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      rng=jax.random.key_data(state_rng))

  fn = lambda r: init(jax.random.wrap_key_data(r))
  if num_seeds == 1:
    rng = jax.random.key_data(jax.random.key(seed))
  else:
    rng = jnp.stack([jax.random.key_data(jax.random.key(seed + i)) for i in range(num_seeds)])
    fn = jax.vmap(fn)
  abstract = jax.eval_shape(fn, rng)
  out_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  return jax.jit(fn, out_shardings=out_shardings)(rng)

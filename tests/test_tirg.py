"""TIRG Eq. 1-3 (fc level and last-conv) against an independent NumPy implementation.

The Flax modules run with perturbed parameters and non-trivial BatchNorm
statistics (eval mode), so a swapped weight, a missing ReLU, the gate applied to
the text instead of the image, or w_g / w_r exchanged all change the output.
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np

from cir_jax.models.composers import tirg

EPS = 1e-5  # flax BatchNorm's default epsilon


def perturbed(variables, seed=0):
  """Every leaf replaced by random values (variances positive)."""
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  out = {}
  for path, leaf in flat.items():
    value = rng.normal(0, 0.5, np.shape(leaf)).astype(np.float32)
    if path[-1] == "var":
      value = rng.uniform(0.5, 2.0, np.shape(leaf)).astype(np.float32)
    out[path] = value
  return flax.traverse_util.unflatten_dict(out)


def batch_norm(x, params, stats):
  return (x - stats["mean"]) / np.sqrt(stats["var"] + EPS) * params["scale"] + params["bias"]


def relu(x):
  return np.maximum(x, 0)


def sigmoid(x):
  return 1 / (1 + np.exp(-x))


def dense(x, p):
  return x @ p["kernel"] + p["bias"]


def conv3x3_same(x, p):
  """[B, H, W, Cin] -> [B, H, W, Cout], zero 'SAME' padding, stride 1."""
  b, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((b, h, w, p["kernel"].shape[-1]), np.float64)
  for dy in range(3):
    for dx in range(3):
      out += np.einsum("bhwc,cd->bhwd", padded[:, dy:dy + h, dx:dx + w], p["kernel"][dy, dx])
  return out + p["bias"]


def test_fc_tirg_equals_numpy_eq_1_to_3():
  rng = np.random.default_rng(1)
  x, t = rng.normal(size=(5, 6)).astype(np.float32), rng.normal(size=(5, 4)).astype(np.float32)
  module = tirg.TIRG(embed_dim=6)
  variables = perturbed(module.init(jax.random.key(0), {"embedding": x}, {"pooled": t}))
  got, _ = module.apply(variables, {"embedding": x}, {"pooled": t})
  p, s = variables["params"], variables["batch_stats"]
  xt = np.concatenate([x, t], axis=1)
  gate = sigmoid(dense(relu(batch_norm(xt, p["gate_norm"], s["gate_norm"])), p["gate_fc"]))  # Eq. 2
  res = dense(relu(dense(relu(batch_norm(xt, p["res_norm"], s["res_norm"])), p["res_fc1"])),
              p["res_fc2"])                                                                   # Eq. 3
  want = p["w_gate"] * gate * x + p["w_res"] * res                                           # Eq. 1
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_last_conv_tirg_equals_numpy_eq_1_to_3():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)   # [B, h, w, C]
  t = rng.normal(size=(2, 3)).astype(np.float32)
  module = tirg.TIRGLastConv()
  variables = perturbed(module.init(jax.random.key(0), {"feature_map": x}, {"pooled": t}), seed=3)
  got, _ = module.apply(variables, {"feature_map": x}, {"pooled": t})
  p, s = variables["params"], variables["batch_stats"]
  xt = np.concatenate([x, np.broadcast_to(t[:, None, None, :], (2, 3, 4, 3))], axis=-1)

  def branch(name):  # BN([x, t]) -> conv3x3 -> ReLU -> conv3x3, as google/tirg's TIRGLastConv
    y = batch_norm(xt, p[f"{name}_norm"], s[f"{name}_norm"])
    return conv3x3_same(relu(conv3x3_same(y, p[f"{name}_conv1"])), p[f"{name}_conv2"])

  want = p["w_gate"] * sigmoid(branch("gate")) * x + p["w_res"] * branch("res")
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_ablations_drop_one_term():
  rng = np.random.default_rng(4)
  x, t = rng.normal(size=(3, 6)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
  full = tirg.TIRG(embed_dim=6)
  variables = perturbed(full.init(jax.random.key(0), {"embedding": x}, {"pooled": t}))
  both, _ = full.apply(variables, {"embedding": x}, {"pooled": t})
  parts = {}
  for name, kwargs, keep in (("gate", dict(use_residual=False), "gate"),
                             ("res", dict(use_gate=False), "res")):
    sub = {k: {n: v for n, v in variables[k].items() if n.startswith(keep) or n.startswith("w_")}
           for k in variables}
    parts[name], _ = tirg.TIRG(embed_dim=6, **kwargs).apply(sub, {"embedding": x}, {"pooled": t})
  np.testing.assert_allclose(parts["gate"] + parts["res"], both, rtol=1e-5, atol=1e-5)
  assert not np.allclose(parts["gate"], both) and not np.allclose(parts["res"], both)
  assert jnp.all(jnp.isfinite(both))

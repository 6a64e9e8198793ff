"""TIRG: Text Image Residual Gating (TIRG paper, section 3.2, Eq. 1-3).

  phi_xt = w_g * f_gate(phi_x, phi_t) + w_r * f_res(phi_x, phi_t)        (Eq. 1)
  f_gate = sigmoid(W_g2 * ReLU(W_g1 * [phi_x, phi_t])) (.) phi_x          (Eq. 2)
  f_res  = W_r2 * ReLU(W_r1 * [phi_x, phi_t])                             (Eq. 3)

w_g and w_r are learnable scalars initialised to 1 and 10 as in google/tirg.
`TIRG` applies this at the fc level (Fashion200k, MIT-States); `TIRGLastConv`
on the last conv feature map with the text broadcast over H x W and 3x3
convolutions (CSS). `use_gate` / `use_residual` give the ablations of Table 5.
"""
import functools

import flax.linen as nn
import jax.numpy as jnp

from cir_jax.models import conv as conv_lib


def _gate_weights(module):
  w_g = module.param("w_gate", nn.initializers.constant(1.0), (), jnp.float32)
  w_r = module.param("w_res", nn.initializers.constant(10.0), (), jnp.float32)
  return w_g, w_r


def _check_switches(use_gate, use_residual):
  if not (use_gate or use_residual):
    raise ValueError("tirg needs use_gate or use_residual (or both); both are False")


class TIRG(nn.Module):
  """fc-level TIRG on [B, d] image and text embeddings.

  Layers follow google/tirg: gate = fc(ReLU(BN([x, t]))), residual =
  fc(ReLU(fc(ReLU(BN([x, t]))))), so the gate's first "W_g1" is the BN affine.
  """
  embed_dim: int = 512
  use_gate: bool = True
  use_residual: bool = True
  output_kind = "embedding"

  @nn.compact
  def __call__(self, image, text, train: bool = False):
    _check_switches(self.use_gate, self.use_residual)
    x = image["embedding"]
    xt = jnp.concatenate([x, text["pooled"]], axis=-1)
    w_g, w_r = _gate_weights(self)
    out, aux = 0.0, {}
    if self.use_gate:
      g = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="gate_norm")(xt))
      gate = nn.sigmoid(nn.Dense(self.embed_dim, name="gate_fc")(g))
      out = out + w_g * gate * x
      aux["gate_mean"] = gate.mean()
    if self.use_residual:
      r = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="res_norm")(xt))
      r = nn.relu(nn.Dense(2 * self.embed_dim, name="res_fc1")(r))
      out = out + w_r * nn.Dense(self.embed_dim, name="res_fc2")(r)
    return out, aux


class TIRGLastConv(nn.Module):
  """Spatial TIRG on the last conv feature map [B, h, w, C] (Eq. 1-3 with 3x3 convs).

  Each branch: BN([x, t]) -> conv3x3(C + d) -> ReLU -> conv3x3(C), as google/tirg's
  TIRGLastConv. The output is a feature map; the retrieval model pools it and
  applies the image projection shared with the targets.

  Attributes:
    conv_impl: lowering of the 3x3 convolutions ('xla' | 'matmul'; 'auto' as
      cir_jax/models/conv.py); the model builder passes model.conv_impl resolved
      with the image size, the same lowering as the image encoder's.
  """
  use_gate: bool = True
  use_residual: bool = True
  conv_impl: str = "auto"
  output_kind = "feature_map"

  @nn.compact
  def __call__(self, image, text, train: bool = False):
    _check_switches(self.use_gate, self.use_residual)
    x = image["feature_map"]
    b, h, w, c = x.shape
    t = jnp.broadcast_to(text["pooled"][:, None, None, :], (b, h, w, text["pooled"].shape[-1]))
    xt = jnp.concatenate([x, t], axis=-1)
    w_g, w_r = _gate_weights(self)

    def branch(name):
      y = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"{name}_norm")(xt)
      conv = functools.partial(conv_lib.Conv, kernel_size=(3, 3), conv_impl=self.conv_impl)
      y = nn.relu(conv(xt.shape[-1], name=f"{name}_conv1")(y))
      return conv(c, name=f"{name}_conv2")(y)

    out, aux = 0.0, {}
    if self.use_gate:
      gate = nn.sigmoid(branch("gate"))
      out = out + w_g * gate * x
      aux["gate_mean"] = gate.mean()
    if self.use_residual:
      out = out + w_r * branch("res")
    return out, aux

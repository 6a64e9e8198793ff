"""Relationship: a Relation Network over pairs of local image features and the text.

TIRG paper, section 3.1: "Relationship [43] ... first uses CNN to extract a 2D
feature map from image, then create a set of relationship features, each is a
concatenation of the text feature phi_t and 2 local features in the 2D feature
map; this set of features is passed through an MLP and the result is summed to
get a single feature. Another MLP is applied to obtain the output phi_xt."
Original method: Santoro, Raposo, Barrett, Malinowski, Pascanu, Battaglia and
Lillicrap, "A simple neural network module for relational reasoning", NIPS
2017: objects are the h*w cells of the last conv map, each tagged with its
(x, y) coordinate; RN = f_phi(sum_{i,j} g_theta(o_i, o_j, q)) over all (h*w)^2
ordered pairs; g_theta has 4 ReLU layers and f_phi 2 hidden ReLU layers with
dropout before the output layer (widths 256 there).

Normalisation (ours; `normalize=True`, the default). Santoro et al.'s RN has no
normalisation inside g/f; trained end to end for retrieval with the TIRG recipe
(SGD lr 0.01, soft triplet, the target encoder learning too) it learned nothing
(CSS R@1 0.1, below text-only): its query starts unrelated to the target space
and nearly constant (mean query-query cosine 0.99 at init: the sum over pairs of
ReLU features is dominated by a component shared by every input), so the
cheapest way down for the loss is to collapse the targets until every distance
is equal, loss -> log 2 = 0.693, where it stays (the loss of a 16-query batch on a
random split: 1.47 -> 0.69 after 40 steps, still 0.69 after 200). BatchNorm on
the composer's inputs, as google/tirg's Concat and TIRG composers have, and on the
summed relation feature (which removes that shared component) lets it learn: the
same run reaches 0.25 after 160 steps (He instead of LeCun init changed nothing).
The TIRG paper does not describe the baseline's layers beyond the quote above.

All pairs are vectorised: g_theta's first layer is linear in the concatenation
[o_i, o_j, q], so it is computed as A o_i + B o_j + C q on [B, N, H] tensors and
broadcast to [B, N, N, H], never materialising the [B, N^2, 2D + d] input.
"""
import flax.linen as nn
import jax.numpy as jnp


def cell_coordinates(h: int, w: int):
  """[h * w, 2] (row, col) coordinates of the cells of an h x w map, in [-1, 1], row-major."""
  rows = jnp.linspace(-1.0, 1.0, h) if h > 1 else jnp.zeros((1,))
  cols = jnp.linspace(-1.0, 1.0, w) if w > 1 else jnp.zeros((1,))
  grid = jnp.stack(jnp.meshgrid(rows, cols, indexing="ij"), axis=-1)
  return grid.reshape(h * w, 2)


class RelationNetwork(nn.Module):
  """f_phi(sum_{i,j} g_theta([o_i, o_j, q])): objects [B, N, D], query [B, d] -> [B, out_dim].

  A function of the SET of objects: permuting the N objects does not change it.

  Attributes:
    out_dim: output width.
    hidden_dim: width of every hidden layer of g_theta and f_phi.
    g_layers: ReLU layers of g_theta (>= 1).
    f_layers: hidden ReLU layers of f_phi before its linear output layer.
    dropout: dropout rate before f_phi's output layer (Santoro et al.: 0.5).
    normalize: BatchNorm on the objects and the question before g_theta, and on
      the summed relation feature before f_phi (module docstring); False is
      Santoro et al.'s plain RN, which collapses in our retrieval training.
  """
  out_dim: int
  hidden_dim: int = 256
  g_layers: int = 4
  f_layers: int = 2
  dropout: float = 0.5
  normalize: bool = True

  @nn.compact
  def __call__(self, objects, query, train: bool = False):
    if self.g_layers < 1:
      raise ValueError(f"relationship needs g_layers >= 1, got {self.g_layers}")
    h = self.hidden_dim
    if self.normalize:
      objects = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                             name="object_norm")(objects)
      query = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="text_norm")(query)
    # First g layer on [o_i, o_j, q], split by input block (see module docstring).
    left = nn.Dense(h, name="g0_left")(objects)                     # [B, N, H]
    right = nn.Dense(h, use_bias=False, name="g0_right")(objects)  # [B, N, H]
    text = nn.Dense(h, use_bias=False, name="g0_text")(query)      # [B, H]
    pairs = nn.relu(left[:, :, None, :] + right[:, None, :, :] + text[:, None, None, :])
    for i in range(1, self.g_layers):
      pairs = nn.relu(nn.Dense(h, name=f"g{i}")(pairs))            # [B, N, N, H]
    x = pairs.sum(axis=(1, 2))
    if self.normalize:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="relation_norm")(x)
    for i in range(self.f_layers):
      x = nn.relu(nn.Dense(h, name=f"f{i}")(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.out_dim, name="f_out")(x)


class Relationship(nn.Module):
  """Relation Network composer on the last conv map (output_kind 'embedding').

  Objects are the h*w cells of image['feature_map'] [B, h, w, C] with their
  coordinates appended ([B, h*w, C + 2]); the question is text['pooled'].
  """
  embed_dim: int = 512
  hidden_dim: int = 256
  g_layers: int = 4
  f_layers: int = 2
  dropout: float = 0.5
  normalize: bool = True
  output_kind = "embedding"

  @nn.compact
  def __call__(self, image, text, train: bool = False):
    fmap = image["feature_map"]
    b, h, w, c = fmap.shape
    coords = jnp.broadcast_to(cell_coordinates(h, w)[None], (b, h * w, 2)).astype(fmap.dtype)
    objects = jnp.concatenate([fmap.reshape(b, h * w, c), coords], axis=-1)
    out = RelationNetwork(self.embed_dim, self.hidden_dim, self.g_layers, self.f_layers,
                          self.dropout, self.normalize,
                          name="relation_network")(objects, text["pooled"], train)
    return out, {}

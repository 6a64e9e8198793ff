"""CLIP's modified ResNet (RN50/RN50x4 towers) loaded from an open_clip-layout state dict
matches a torch reference built here from the architecture (random weights, eval-mode BN)."""
import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch

import torch  # a required test extra (pyproject [test]): missing it is an error
from torch import nn

from cir_jax import pretrained
from cir_jax.models import build
from cir_jax.models import clip_resnet
from configs import combiner_cirr
from configs import combiner_stage1_cirr

TOL = 1e-5
# width 8 -> stages of 32/64/128/256 channels; 64 px -> a 2x2 last map, so attention
# pooling mixes 5 tokens; layer1 and layer3 have a block with an identity shortcut.
TINY = dict(layers=(2, 1, 2, 1), width=8, output_dim=24, heads=4, image_size=64)


# ----------------------------------------------- torch reference (written from the paper)


class RefBottleneck(nn.Module):
  """Stride-1 convs; avg-pool after the 3x3 and before the shortcut's 1x1 when stride 2."""

  def __init__(self, cin, planes, stride):
    super().__init__()
    self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(4 * planes)
    self.stride = stride
    self.downsample = None
    if stride > 1 or cin != 4 * planes:
      # indices 0/1 as in open_clip's Sequential (its "-1" is the parameter-free pool)
      self.downsample = nn.ModuleList([nn.Conv2d(cin, 4 * planes, 1, bias=False),
                                       nn.BatchNorm2d(4 * planes)])

  def forward(self, x):
    pool = (lambda t: nn.functional.avg_pool2d(t, self.stride)) if self.stride > 1 else (
        lambda t: t)
    y = torch.relu(self.bn1(self.conv1(x)))
    y = pool(torch.relu(self.bn2(self.conv2(y))))
    y = self.bn3(self.conv3(y))
    identity = x
    if self.downsample is not None:
      identity = self.downsample[1](self.downsample[0](pool(x)))
    return torch.relu(y + identity)


class RefAttnPool(nn.Module):

  def __init__(self, cells, dim, heads, out):
    super().__init__()
    self.positional_embedding = nn.Parameter(torch.randn(cells + 1, dim) / dim**0.5)
    self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
    self.c_proj = nn.Linear(dim, out)
    self.heads = heads

  def forward(self, x):
    n, c = x.shape[:2]
    x = x.flatten(2).transpose(1, 2)                              # [N, HW, C]
    x = torch.cat([x.mean(1, keepdim=True), x], 1) + self.positional_embedding
    heads = lambda t: t.reshape(n, -1, self.heads, c // self.heads).transpose(1, 2)
    q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
    att = torch.softmax(q @ k.transpose(-1, -2) / (c // self.heads)**0.5, dim=-1)
    y = (att @ v).transpose(1, 2).reshape(n, -1, c)
    return self.c_proj(y)[:, 0]


class RefModifiedResNet(nn.Module):

  def __init__(self, layers, width, output_dim, heads, image_size):
    super().__init__()
    h = width // 2
    self.conv1, self.bn1 = nn.Conv2d(3, h, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(h)
    self.conv2, self.bn2 = nn.Conv2d(h, h, 3, padding=1, bias=False), nn.BatchNorm2d(h)
    self.conv3 = nn.Conv2d(h, width, 3, padding=1, bias=False)
    self.bn3 = nn.BatchNorm2d(width)
    cin = width
    for i, depth in enumerate(layers):
      planes = width * 2**i
      blocks = []
      for j in range(depth):
        blocks.append(RefBottleneck(cin, planes, 2 if i > 0 and j == 0 else 1))
        cin = 4 * planes
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.attnpool = RefAttnPool((image_size // 32)**2, 32 * width, heads, output_dim)

  def forward(self, x):
    for i in (1, 2, 3):
      x = torch.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
    x = nn.functional.avg_pool2d(x, 2)
    for i in (1, 2, 3, 4):
      x = getattr(self, f"layer{i}")(x)
    return self.attnpool(x), x


def _reference(seed=0):
  torch.manual_seed(seed)
  model = RefModifiedResNet(**TINY)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics and affine
        n = m.num_features
        m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
        m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
        m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
        m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
      if isinstance(m, nn.Linear):
        m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
  return model.eval()


def _save_open_clip(model, directory):
  """An open_clip download: open_clip_config.json + open_clip_model.safetensors with the
  image tower under `visual.` next to (a stand-in for) the text tower's tensors."""
  state = {f"visual.{k}": v.contiguous() for k, v in model.state_dict().items()}
  state["logit_scale"] = torch.tensor(4.6)
  state["transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(96, 32)
  state["text_projection"] = torch.zeros(32, TINY["output_dim"])
  directory.mkdir(parents=True, exist_ok=True)
  safetensors.torch.save_file(state, str(directory / clip_resnet.OPEN_CLIP_WEIGHTS))
  model_cfg = {"embed_dim": TINY["output_dim"],
               "vision_cfg": {"image_size": TINY["image_size"], "layers": list(TINY["layers"]),
                              "width": TINY["width"], "head_width": 32 * TINY["width"] // TINY["heads"],
                              "patch_size": None},
               "text_cfg": {"context_length": 16, "vocab_size": 99, "width": 32, "heads": 4,
                            "layers": 1}}
  (directory / clip_resnet.OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": model_cfg}))
  return directory


def _images(seed=0):
  size = TINY["image_size"]
  images = np.random.default_rng(seed).standard_normal((2, size, size, 3)).astype(np.float32)
  return images, torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
  root = tmp_path_factory.mktemp("open_clip")
  model = _reference()
  source = _save_open_clip(model, root / "download")
  directory = clip_resnet.prepare_open_clip_directory(str(source), str(root / "prepared"))
  module, variables = pretrained.load_pretrained(directory, "clip_resnet")
  return model, module, variables


@pytest.mark.parametrize("conv_impl", ["xla", "matmul"])
def test_open_clip_checkpoint_matches_torch_reference(loaded, conv_impl):
  model, module, variables = loaded
  assert (module.layers, module.width, module.output_dim, module.heads, module.image_size) == (
      TINY["layers"], TINY["width"], TINY["output_dim"], TINY["heads"], TINY["image_size"])
  assert "layer1_0" in variables["batch_stats"] and "downsample_1" in variables["batch_stats"][
      "layer1_0"]
  images, pixels = _images()
  module = module.clone(conv_impl=conv_impl)
  embedding, aux = jax.jit(module.apply)(variables, images)
  with torch.no_grad():
    ref_embedding, ref_map = model(pixels)
  ref_map = ref_map.permute(0, 2, 3, 1).numpy()
  assert aux["feature_map"].shape == ref_map.shape == (2, 2, 2, 256)
  np.testing.assert_allclose(aux["feature_map"], ref_map, atol=TOL, rtol=TOL)
  np.testing.assert_allclose(embedding, ref_embedding.numpy(), atol=TOL, rtol=TOL)
  np.testing.assert_allclose(aux["pooled"], ref_map.mean(axis=(1, 2)), atol=TOL, rtol=TOL)


def test_train_mode_uses_batch_statistics_like_torch(loaded):
  model, module, variables = loaded
  images, pixels = _images(1)
  apply = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))
  (embedding, _), updates = apply(variables, images)
  train_model = _reference().train()
  with torch.no_grad():
    ref_embedding, _ = train_model(pixels)
  np.testing.assert_allclose(embedding, ref_embedding.numpy(), atol=1e-4, rtol=1e-4)
  before = variables["batch_stats"]["bn1"]["mean"]
  assert not np.allclose(updates["batch_stats"]["bn1"]["mean"], before)


def test_mismatched_checkpoint_names_the_keys(tmp_path):
  source = _save_open_clip(_reference(), tmp_path / "download")
  directory = clip_resnet.prepare_open_clip_directory(str(source), str(tmp_path / "prepared"))
  module = clip_resnet.ModifiedResNet(**dict(TINY, layers=(2, 1, 3, 1)))
  with pytest.raises(ValueError, match="layer3_2"):
    pretrained.load_variables(directory, "clip_resnet", module)
  with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
    clip_resnet.prepare_open_clip_directory(str(tmp_path), str(tmp_path / "x"))


def test_wrong_image_size_is_an_error(loaded):
  _, module, variables = loaded
  with pytest.raises(ValueError, match="64x64"):
    module.apply(variables, np.zeros((1, 32, 32, 3), np.float32))


def test_open_clip_presets():
  assert clip_resnet.module_kwargs(
      {"embed_dim": 640, "vision_cfg": {"image_size": 288, "layers": [4, 6, 10, 6],
                                        "width": 80}}, ()) == dict(
      layers=(4, 6, 10, 6), width=80, output_dim=640, heads=40, image_size=288)
  for name, preset in (("clip_rn50", clip_resnet.RN50), ("clip_rn50x4", clip_resnet.RN50x4)):
    m = preset()
    assert clip_resnet.PRESETS[name] is preset and m.heads == 32 * m.width // 64


@pytest.mark.parametrize("get_config,image_encoder,text_encoder,embed_dim,size", [
    (combiner_cirr.get_config, "clip_rn50", "clip_text_rn50", 1024, 224),
    (combiner_stage1_cirr.get_config, "clip_rn50x4", "clip_text_rn50x4", 640, 288)])
def test_combiner_configs_build_rn_towers(get_config, image_encoder, text_encoder, embed_dim,
                                          size):
  config = get_config()
  config.model.image_encoder, config.model.text_encoder = image_encoder, text_encoder
  config.model.embed_dim = embed_dim
  model = build.build_model(config.model, vocab_size=49408)
  assert model.image_encoder.family == "clip_resnet"
  batch = {"ref_image": jax.ShapeDtypeStruct((2, size, size, 3), jnp.uint8),
           "target_image": jax.ShapeDtypeStruct((2, size, size, 3), jnp.uint8),
           "text_ids": jax.ShapeDtypeStruct((2, 77), jnp.int32),
           "text_mask": jax.ShapeDtypeStruct((2, 77), bool)}
  variables = jax.eval_shape(lambda b: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(0)}, b), batch)
  tower = variables["params"]["image_encoder"]["encoder"]
  width = 64 if image_encoder == "clip_rn50" else 80
  assert tower["attnpool"]["positional_embedding"].shape == ((size // 32)**2 + 1, 32 * width)
  assert tower["attnpool"]["c_proj"]["kernel"].shape == (32 * width, embed_dim)
  query, target, _ = jax.eval_shape(lambda v, b: model.apply(v, b), variables, batch)
  assert query.shape == target.shape == (2, embed_dim)


# ------------------------------------- the text tower of an open_clip RN checkpoint


class RefTextBlock(nn.Module):
  """open_clip's ResidualAttentionBlock names: ln_1, attn (packed in_proj), ln_2, mlp.c_fc/c_proj."""

  def __init__(self, width, heads):
    super().__init__()
    self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
    self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
    self.mlp = nn.Sequential(collections.OrderedDict(
        c_fc=nn.Linear(width, 4 * width), c_proj=nn.Linear(4 * width, width)))

  def forward(self, x, mask):
    y = self.ln_1(x)
    x = x + self.attn(y, y, y, attn_mask=mask, need_weights=False)[0]
    h = self.mlp.c_fc(self.ln_2(x))
    return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))  # QuickGELU


class RefText(nn.Module):

  def __init__(self, vocab=99, context=16, width=32, heads=4, layers=2, embed=24):
    super().__init__()
    self.token_embedding = nn.Embedding(vocab, width)
    self.positional_embedding = nn.Parameter(torch.randn(context, width) * 0.1)
    self.transformer = nn.Module()
    self.transformer.resblocks = nn.ModuleList(RefTextBlock(width, heads) for _ in range(layers))
    self.ln_final = nn.LayerNorm(width)
    self.text_projection = nn.Parameter(torch.randn(width, embed) * width**-0.5)

  def forward(self, ids):
    length = ids.shape[1]
    mask = torch.full((length, length), float("-inf")).triu(1)
    x = self.token_embedding(ids) + self.positional_embedding[:length]
    for block in self.transformer.resblocks:
      x = block(x, mask)
    x = self.ln_final(x)
    return x[torch.arange(len(ids)), ids.argmax(-1)] @ self.text_projection


def test_open_clip_text_tower_loads_into_clip_text_encoder(tmp_path):
  torch.manual_seed(1)
  text = RefText().eval()
  with torch.no_grad():
    for m in text.modules():
      if isinstance(m, nn.LayerNorm):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
      if isinstance(m, nn.MultiheadAttention):
        m.in_proj_bias.normal_(0, 0.1)
  source = _save_open_clip(_reference(), tmp_path / "download")
  state = safetensors.torch.load_file(str(source / clip_resnet.OPEN_CLIP_WEIGHTS))
  state = {k: v for k, v in state.items() if k.startswith("visual.")}
  state.update({k: v.contiguous() for k, v in text.state_dict().items()})
  state["logit_scale"] = torch.tensor(4.6)
  safetensors.torch.save_file(state, str(source / clip_resnet.OPEN_CLIP_WEIGHTS))
  cfg = json.loads((source / clip_resnet.OPEN_CLIP_CONFIG).read_text())
  cfg["model_cfg"]["text_cfg"]["layers"] = 2
  cfg["model_cfg"]["quick_gelu"] = True
  (source / clip_resnet.OPEN_CLIP_CONFIG).write_text(json.dumps(cfg))

  directory = clip_resnet.prepare_open_clip_text_directory(str(source), str(tmp_path / "text"))
  module, variables = pretrained.load_pretrained(directory, "clip_text")
  assert (module.eos_token_id, module.projection_dim, module.hidden_act) == (2, 24, "quick_gelu")
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 90, (3, 12))
  ids[0, 5], ids[1, 11], ids[2, 0] = 98, 98, 98   # the EOT token: the highest id
  ids[0, 6:] = 0                                  # padding after it, as open_clip's tokenizer
  mask = (np.arange(12)[None] <= np.argmax(ids, -1)[:, None]).astype(np.int32)
  embedding, _ = jax.jit(module.apply)(variables, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
  with torch.no_grad():
    ref = text(torch.from_numpy(ids)).numpy()
  np.testing.assert_allclose(embedding, ref, atol=TOL, rtol=TOL)

  # a tower with fewer layers than the checkpoint names the left-over tensors
  with pytest.raises(ValueError, match="resblocks.1"):
    clip_resnet.open_clip_text_state(safetensors.numpy.load_file(
        str(source / clip_resnet.OPEN_CLIP_WEIGHTS)), num_layers=1)

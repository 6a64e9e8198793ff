"""Generated data and tiny checkpoints for the pretrained-encoder methods (SSN, Combiner, CIRPLANT).

* `cirr_like_split`: a split in CIRR's shape: images in sets of six near-duplicates,
  each query's reference and target in one set, `candidates` = the set minus the
  reference, every image its own label, and texts that name the target's
  "colour" (so the target is learnable from reference + text).
* `use_split`: points a config's dataset at generated splits (patches the registry).
* `run_steps`: `tests.fakes.run_steps` (a few train steps of the trainer's own code).
* `tiny_clip_checkpoint` / `bert_tokenizer_dir`: save_pretrained directories.
"""
import jax
import numpy as np

from cir_jax.data import registry
from cir_jax.data.tables import RetrievalSplit
from cir_jax.models import build  # noqa: F401 (tests use fakes.build)
from tests import fakes

COLOURS = ("red", "green", "blue", "yellow", "white", "black")
SET_SIZE = 6


def cirr_like_split(num_sets=4, queries_per_set=6, image_size=32, seed=0,
                    name="fake_cirr/train") -> RetrievalSplit:
  """Sets of 6 images sharing a random background, member k tinted with colour k."""
  rng = np.random.default_rng(seed)
  palette = np.array([[220, 30, 30], [30, 200, 30], [30, 30, 220], [220, 220, 30],
                      [235, 235, 235], [15, 15, 15]], np.float32)
  images = []
  for _ in range(num_sets):
    background = rng.uniform(0, 255, (image_size, image_size, 3))
    for k in range(SET_SIZE):
      image = background.copy()
      image[image_size // 4: 3 * image_size // 4, image_size // 4: 3 * image_size // 4] = palette[k]
      images.append(np.clip(image + rng.normal(0, 8, image.shape), 0, 255))
  images = np.asarray(images, np.uint8)
  ref, tgt, texts, cands = [], [], [], []
  for s in range(num_sets):
    for _ in range(queries_per_set):
      r, t = rng.choice(SET_SIZE, 2, replace=False)
      ref.append(s * SET_SIZE + r)
      tgt.append(s * SET_SIZE + t)
      texts.append(f"make it {COLOURS[t]}")
      cands.append([s * SET_SIZE + k for k in range(SET_SIZE) if k != r])
  g = len(images)
  return RetrievalSplit(
      name=name, images=images, image_labels=np.arange(g, dtype=np.int64),
      image_ids=[f"img{i}" for i in range(g)], ref_index=np.asarray(ref, np.int64),
      target_index=np.asarray(tgt, np.int64), target_label=np.asarray(tgt, np.int64),
      texts=texts, candidates=np.asarray(cands, np.int64),
      query_ids=[str(i) for i in range(len(ref))]).validate()


def use_split(monkeypatch, config, train_split, eval_split=None):
  """Makes `config.data.name` load the given generated splits."""
  eval_split = eval_split or train_split

  def load(data_config, split, log):
    del data_config, log
    return train_split if split == config.data.train_split else eval_split

  monkeypatch.setitem(registry.LOADERS, config.data.name, load)


def run_steps(config, split, devices, steps=2, evaluate=False):
  """`tests.fakes.run_steps` as a tuple: (losses, state, model[, before, after])."""
  run = fakes.run_steps(config, split, devices, steps, evaluate)
  return tuple(run) if evaluate else tuple(run)[:3]


def assert_sharded_equals_single(config, steps=2):
  """Two SGD steps on 1 and on 8 devices give the same losses and params.

  SGD because Adam would blow float noise on exactly-zero gradients (attention
  key biases) up to +-lr and hide the comparison; the model and loss are tested.
  """
  config.optimizer.name, config.optimizer.learning_rate = "sgd", 0.1
  split = cirr_like_split(num_sets=3)
  losses_1, state_1, _ = run_steps(config, split, devices=1, steps=steps)
  losses_8, state_8, _ = run_steps(config, split, devices=8, steps=steps)
  np.testing.assert_allclose(losses_8, losses_1, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state_1.params), jax.tree.leaves(state_8.params)):
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
  assert losses_1[0] != losses_1[1]  # the params really moved


def tiny_clip_checkpoint(directory, hidden=32, seed=0):
  """A random transformers CLIPModel matching 'clip_vision_tiny' / 'clip_text_tiny'."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=99, hidden_size=hidden, intermediate_size=37,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                       bos_token_id=97, eos_token_id=98, pad_token_id=98),
      vision_config=dict(hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, image_size=32, patch_size=8),
      projection_dim=32)
  model = transformers.CLIPModel(config).eval()
  model.save_pretrained(directory)
  return str(directory), model


def bert_tokenizer_dir(directory, words=()):
  """A tiny uncased WordPiece tokenizer knowing the words of the generated texts."""
  import transformers  # pylint: disable=g-import-not-at-top
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "make", "it", *COLOURS, *words]
  (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
  transformers.BertTokenizer(vocab=str(directory / "vocab.txt"),
                             do_lower_case=True).save_pretrained(directory)
  return str(directory)



def assert_protocol_results(results, config, split, steps=1):
  """`train_and_evaluate`'s results follow the config's protocol on the generated `split`
  (used as every category's val split for FashionIQ): the metric names of config.eval.ks
  (and CIRR's subset recall, since the split has image sets), values in [0, 100] that
  never decrease with K, and the counts of the split."""
  assert results["step"] == steps
  ks = tuple(config.eval.ks)
  metrics = results["metrics"]
  if config.data.name == "fashioniq":
    expected = {f"{c}/R@{k}" for c in ("dress", "shirt", "toptee") for k in ks}
    expected |= {"avg/R@10", "avg/R@50", "avg/mean(R@10,R@50)"}
    assert set(metrics) >= expected, sorted(metrics)
    assert results["num_queries"] == 3 * split.num_queries
    families = [[f"{c}/R@{k}" for k in ks] for c in ("dress", "shirt", "toptee")]
  else:
    assert {f"R@{k}" for k in ks} <= set(metrics), sorted(metrics)
    assert {"R_subset@1", "R_subset@2", "R_subset@3"} <= set(metrics)
    assert results["num_queries"] == split.num_queries
    assert results["num_gallery"] == split.num_images
    families = [[f"R@{k}" for k in ks], ["R_subset@1", "R_subset@2", "R_subset@3"]]
  assert all(0.0 <= v <= 100.0 for v in metrics.values()), metrics
  for family in families:
    values = [metrics[name] for name in family]
    assert values == sorted(values), (family, values)

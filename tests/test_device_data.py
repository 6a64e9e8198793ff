"""Device-resident training data (cir_jax/data/device_data.py) and the shared order.

The device path must draw exactly the tf.data pipeline's batches (same order, same
images, texts and set negatives) and train to the same parameters; CSS from the NumPy
generator must equal the TFDS builder's split.
"""
import jax
import numpy as np
import pytest

from cir_jax import experiment
from cir_jax import train
from cir_jax.data import css_numpy
from cir_jax.data import css_split
from cir_jax.data import device_data
from cir_jax.data import order
from cir_jax.data import pipeline
from cir_jax.data.vocab import Vocabulary
from tests import fakes
from tests import pretrained_fakes


def test_order_numpy_and_jax_agree_and_each_epoch_is_a_permutation():
  for n, b in [(20, 8), (7, 7), (1000, 3)]:
    step_fn = jax.jit(lambda s, seed, n=n, b=b: order.step_indices_jax(seed, s, n, b))
    for seed in (0, 5):
      for s in (0, 1, 2, 3, 17, 4000):
        np.testing.assert_array_equal(order.step_indices_np(seed, s, n, b),
                                      np.asarray(step_fn(s, np.int32(seed))))
  # drop_last: 2 full batches of 8 per epoch of 20, each epoch 16 distinct queries.
  stream = np.concatenate([order.step_indices_np(0, s, 20, 8) for s in range(10)])
  for epoch in range(5):
    chunk = stream[epoch * 16:(epoch + 1) * 16]
    assert len(set(chunk.tolist())) == 16
    np.testing.assert_array_equal(chunk, order.epoch_permutation_np(0, epoch, 20)[:16])
  assert not np.array_equal(stream[:16], stream[16:32])
  assert len(set(stream.tolist())) == 20  # dropped ones come back in other epochs


def test_groups_draw_one_member_per_group_per_epoch():
  groups = order.Groups(np.repeat(np.arange(30), [1, 2, 3, 4, 5, 6] * 5))  # 105 queries
  drawn = np.zeros(105, np.int64)
  for s in range(200 * 3):  # 3 batches of 10 groups per epoch
    q = order.step_indices_np(1, s, groups.num, 10, groups)
    owner = np.repeat(np.arange(30), [1, 2, 3, 4, 5, 6] * 5)[q]
    assert len(set(owner.tolist())) == 10
    drawn[q] += 1
  assert (drawn > 0).all()  # every member of every group was drawn
  six = np.repeat(np.arange(30), [1, 2, 3, 4, 5, 6] * 5) == 5  # first group of size 6
  share = drawn[six] / drawn[six].sum()
  np.testing.assert_allclose(share, 1 / 6, atol=0.06)


def _device_batches(data, steps):
  gather = jax.jit(data.batch)
  return [jax.device_get(gather(data.tables, s)) for s in range(steps)]


@pytest.mark.parametrize("kind", ["random_2d_queries", "cirr_set_negatives"])
def test_first_batches_equal_the_tf_data_pipelines(kind):
  if kind == "random_2d_queries":   # separate query renders (CSS 2D->3D), 3 epochs in 9 steps
    split = fakes.random_split(num_images=12, num_queries=24)
    split.query_images = 255 - split.images
    negatives = 0
  else:                             # CIRR-like image sets as extra negatives
    split = pretrained_fakes.cirr_like_split()
    negatives = 3
  mesh = experiment.make_mesh(fakes.tiny_config(), jax.devices()[:4])
  vocab = Vocabulary.build(split.texts)
  host = pipeline.TrainPipeline(split, vocab, 8, 8, mesh, 3, 32, log=lambda *_: None,
                                set_negatives=negatives)
  device = device_data.DeviceTrainData(split, vocab, 8, 8, mesh, 3, log=lambda *_: None,
                                       set_negatives=negatives)
  expected = [jax.device_get(b) for b, _ in zip(host.batches(0), range(9))]
  got = _device_batches(device, 9)
  assert set(got[0]) == set(expected[0])
  for step, (a, b) in enumerate(zip(expected, got)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"step {step} {key}")


def test_device_placement_trains_to_the_host_placements_parameters():
  config = fakes.tiny_config("tirg")
  split = fakes.random_split(num_images=16, num_queries=24)
  mesh = experiment.make_mesh(config, jax.devices()[:2])
  vocab = Vocabulary.build(split.texts)
  host = pipeline.TrainPipeline(split, vocab, 16, 8, mesh, 0, 32, log=lambda *_: None)
  device = device_data.DeviceTrainData(split, vocab, 16, 8, mesh, 0, log=lambda *_: None)
  exp = experiment.build(config, mesh, vocab)
  init = jax.device_get(exp.state)
  states, losses = [], []
  for data in (None, device):
    state = jax.device_put(init, jax.tree.map(lambda x: x.sharding, exp.state))
    step = train.make_train_step(exp.model, exp.tx, config.loss, mesh, data=data)
    inputs = host.batches(0) if data is None else iter(lambda: device.tables, None)
    run_losses = []
    for _ in range(4):
      state, metrics = step(state, next(inputs))
      run_losses.append(float(metrics["loss"]))
    states.append(jax.device_get(state.params))
    losses.append(run_losses)
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_placement_rules():
  split = fakes.random_split()
  data = fakes.tiny_config().data
  assert device_data.resolve_placement(data, split) == "host"    # the base default
  data.placement = "auto"
  assert device_data.resolve_placement(data, split) == "device"
  data.device_memory_fraction = 1e-12
  assert device_data.resolve_placement(data, split, log=lambda *_: None) == "host"
  data.placement = "device"
  with pytest.raises(ValueError, match="device_memory_fraction"):
    device_data.resolve_placement(data, split)
  files = fakes.random_split()
  files.images, files.image_paths = None, [f"/x/{i}.png" for i in range(files.num_images)]
  with pytest.raises(ValueError, match="reads image files"):
    device_data.resolve_placement(data, files)
  data.placement = "gpu"
  with pytest.raises(ValueError, match="valid: \\['auto', 'device', 'host'\\]"):
    device_data.resolve_placement(data, split)


def test_css_numpy_split_equals_the_tfds_builders(tmp_path):
  data = fakes.tiny_config().data
  data.data_dir, data.num_scenes, data.num_queries = str(tmp_path), 6, 12
  data.query_render = "2d"
  for split in ("train", "test"):
    a = css_split.load_css_split(data, split, log=lambda *_: None)
    b = css_numpy.load_css_split_numpy(data, split, log=lambda *_: None)
    for field in ("images", "query_images", "image_labels", "ref_index", "target_index",
                  "target_label"):
      np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert list(a.texts) == list(b.texts) and list(a.image_ids) == list(b.image_ids)
    assert list(a.query_ids) == list(b.query_ids) and a.name == b.name


def test_python_tokenisation_equals_tensorflows():
  texts = ["Make the RED cube blue!", "a\tb  c, d\u0130x \u00c9", "x", "one two three four five",
           "zzz unknown-words"]
  vocab = Vocabulary.build(texts[:3])
  for max_len in (3, 8):
    a, b = vocab.encode(texts, max_len), vocab.encode_python(texts, max_len)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]

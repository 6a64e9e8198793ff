"""Random RetrievalSplits for benchmarks and tests (no dataset needed)."""
import numpy as np

from cir_jax.data.tables import RetrievalSplit

WORDS = ("add", "remove", "make", "red", "blue", "cube", "sphere", "small", "large", "top-left")


def random_split(num_images=24, num_queries=40, image_size=32, num_labels=None, seed=0,
                 name="random/train") -> RetrievalSplit:
  """Random images and 1-4 word texts; `num_labels` groups images into target sets."""
  rng = np.random.default_rng(seed)
  num_labels = num_labels or num_images
  texts = [" ".join(rng.choice(WORDS, size=rng.integers(1, 5))) for _ in range(num_queries)]
  target_index = rng.integers(0, num_images, num_queries)
  labels = rng.permutation(np.arange(num_images) % num_labels)
  return RetrievalSplit(
      name=name,
      images=rng.integers(0, 256, (num_images, image_size, image_size, 3), dtype=np.uint8),
      image_labels=labels.astype(np.int64),
      image_ids=[f"img{i}" for i in range(num_images)],
      ref_index=rng.integers(0, num_images, num_queries).astype(np.int64),
      target_index=target_index.astype(np.int64),
      target_label=labels[target_index].astype(np.int64),
      texts=texts,
  ).validate()

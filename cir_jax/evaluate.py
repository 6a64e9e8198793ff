"""Gallery evaluation (Recall@K on device), each dataset's protocol, and its command line.

  python -m cir_jax.evaluate --config configs/tirg_css.py --workdir runs/css

restores the newest checkpoint of the workdir (without loading the training
split: the vocabulary is the workdir's) and evaluates `config.data.eval_split`
with the dataset's protocol. Embeddings are computed batch by batch on device
and concatenated there; the gallery stays sharded; recall is computed on device
and only scalars (and top ids when asked) reach the host.

`make_evaluator` is the one entry the trainer and `evaluate_workdir` share:
FashionIQ (as SSN / CLIP4Cir report it) scores each category (dress, shirt,
toptee) against its own val gallery and reports R@10 and R@50 per category,
their averages over the categories and the mean of the two averages; every
other dataset is one `Evaluator`.
"""
import json
import pathlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cir_jax import experiment as experiment_lib
from cir_jax import retrieval
from cir_jax import seeds as seeds_lib
from cir_jax import sharding
from cir_jax.data import device_data
from cir_jax.data import registry
from cir_jax.utils import logging as log_lib
from cir_jax.utils import workdir as workdir_lib

# Progress lines per pass over a gallery or the queries (only for passes of at
# least this many batches: small evaluations stay quiet).
PROGRESS_LINES = 5


GALLERY_VARIANTS = ("exclude_ref", "include_ref")


class Evaluator:
  """Embeds one split's queries and gallery with a model and scores them."""

  def __init__(self, config, model, vocab, mesh, split: Optional[str] = None, log=print,
               retrieval_split=None):
    """`retrieval_split` (a RetrievalSplit) replaces loading `split` from the registry."""
    self.config, self.mesh, self.log = config, mesh, log
    self.split = (retrieval_split if retrieval_split is not None else
                  registry.load_split(config.data, split or config.data.eval_split, log=log))
    if (self.split.images is not None
        and config.data.get("placement", "host") in ("auto", "device")):
      # In-memory table: NumPy slices, the same batches without TensorFlow.
      self.data = device_data.ArrayEvalPipeline(
          self.split, vocab, config.data.max_text_len, config.eval.batch_size, mesh,
          max_queries=config.data.eval_max_queries, log=log)
    else:
      from cir_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
      self.data = pipeline.EvalPipeline(self.split, vocab, config.data.max_text_len,
                                        config.eval.batch_size, mesh, config.data.image_size,
                                        max_queries=config.data.eval_max_queries, log=log,
                                        **pipeline.preprocess_kwargs(config.data))
    out = sharding.batch_sharding(mesh)
    self._encode_target = jax.jit(
        lambda v, images: model.apply(v, images, train=False, method=model.encode_target),
        out_shardings=out)
    self._encode_query = jax.jit(
        lambda v, b: model.apply(v, b["ref_image"], b["text_ids"], b["text_mask"], train=False,
                                 method=model.encode_query)[0],
        out_shardings=out)

  def _embed(self, encode, batches, num_items: int, what: str) -> jax.Array:
    """Concatenated `encode(batch)` over `batches`, logging '<what> batch i/n ... ETA'
    PROGRESS_LINES times on passes of at least PROGRESS_LINES batches.

    Steps are dispatched asynchronously; before a progress line the batch's
    result is waited for, so the rate reported is work done, not dispatch.
    """
    total = self.data.num_steps(num_items)
    every = max(1, total // PROGRESS_LINES)
    progress = log_lib.Progress(total, 0, self.data.global_batch, what=f"{what} batch")
    parts = []
    for i, batch in enumerate(batches, start=1):
      parts.append(encode(batch))
      if total >= PROGRESS_LINES and (i % every == 0 or i == total):
        parts[-1].block_until_ready()
        self.log(progress.line(i, progress.update(i)))
    return jnp.concatenate(parts)

  def embed_gallery(self, variables) -> jax.Array:
    """[G_padded, d] sharded gallery embeddings (rows past G are padding)."""
    return self._embed(lambda b: self._encode_target(variables, b["image"]),
                       self.data.gallery_batches(), self.split.num_images, "gallery")

  def embed_queries(self, variables) -> jax.Array:
    """[Q_padded, d] query embeddings (rows past the evaluated queries are padding)."""
    return self._embed(lambda b: self._encode_query(variables, b),
                       self.data.query_batches(), self.data.num_queries, "query")

  def evaluate(self, variables, return_topk: int = 0) -> dict[str, Any]:
    """Returns {'split', 'num_queries', 'num_gallery', 'protocol', 'skipped', 'metrics'}.

    `metrics` holds 'R@K' (percent) for the first of `config.eval.gallery_variants`
    ('exclude_ref': the reference is removed from its own ranking; 'include_ref':
    it stays), '<variant>/R@K' for the others, 'R_subset@K' and CIRR's headline
    '(R@5+R_subset@1)/2' when the split has subset candidates. A split without
    targets (CIRR test1, FashionIQ test) has no recall: `metrics` is empty and
    'topk' holds the first max(return_topk, 50) ids (reference excluded) for a
    submission file. With return_topk > 0, 'topk' is [Q, return_topk] gallery ids.
    """
    split, n_q = self.split, self.data.num_queries
    gallery = self.embed_gallery(variables)
    queries = self.embed_queries(variables)
    g_pad, q_pad = gallery.shape[0], queries.shape[0]

    def pad(values, size, fill):
      out = np.full(size, fill, np.int64)
      out[:len(values)] = values
      return out

    has_target = np.asarray(split.target_index[:n_q]) >= 0
    if has_target.any() != has_target.all():
      raise ValueError(f"{split.name}: {int((~has_target).sum())} of {n_q} queries have no "
                       f"target; recall needs a target for every query")
    variants = tuple(self.config.eval.gallery_variants)
    for v in variants:
      if v not in GALLERY_VARIANTS:
        raise ValueError(f"eval.gallery_variants has {v!r}; valid: {list(GALLERY_VARIANTS)}")
    common = dict(query_valid=np.arange(q_pad) < n_q,
                  gallery_valid=np.arange(g_pad) < split.num_images,
                  block_size=self.config.eval.block_size)
    ref = pad(split.ref_index[:n_q], q_pad, -1)
    protocol = (split.protocol
                or "reference image excluded; hit = gallery image with the target's label")
    metrics, top = {}, None
    if not has_target.any():
      # No labels (test split): recall is undefined, only the ranking is produced.
      k = min(max(return_topk, 50), split.num_images)
      _, top = retrieval.gallery_topk(queries, gallery, k, self.mesh, exclude_index=ref,
                                      block_size=common["block_size"],
                                      gallery_valid=common["gallery_valid"])
      top = np.asarray(jax.device_get(top))
      protocol += "; no targets in this split: top-k ids (reference excluded) only, no recall"
    for i, variant in enumerate(variants if has_target.any() else ()):
      kwargs = {}
      if split.candidates is not None and i == 0:
        cand = np.full((q_pad, split.candidates.shape[1]), -1, np.int64)
        cand[:n_q] = split.candidates[:n_q]
        kwargs = dict(subset_candidates=cand,
                      subset_target=pad(split.target_index[:n_q], q_pad, 0))
      result = retrieval.evaluate_retrieval(
          queries, gallery,
          gallery_labels=pad(split.image_labels, g_pad, -1),
          target_labels=pad(split.target_label[:n_q], q_pad, -2),
          exclude_index=ref if variant == "exclude_ref" else np.full(q_pad, -1, np.int64),
          ks=tuple(self.config.eval.ks), mesh=self.mesh,
          return_topk=return_topk if i == 0 else 0, **common, **kwargs)
      result, top = (result if return_topk and i == 0 else (result, top))
      prefix = "" if i == 0 else f"{variant}/"
      metrics.update({prefix + k: v for k, v in result.items()})
    if "R@5" in metrics and "R_subset@1" in metrics:
      metrics["(R@5+R_subset@1)/2"] = (metrics["R@5"] + metrics["R_subset@1"]) / 2
    if has_target.any():
      protocol += "; gallery variants: " + ", ".join(
          f"{v} ({'headline' if i == 0 else v + '/R@K'})" for i, v in enumerate(variants))
    out = {"split": split.name, "num_queries": int(n_q), "num_gallery": int(split.num_images),
           "protocol": protocol, "skipped": dict(split.skipped), "metrics": metrics}
    if top is not None:
      out["topk"] = top[:n_q]
    return out


def metric_order(name: str) -> tuple:
  """Sort key: metrics by family in order of appearance, then by K ('R@1' < 'R@5' < 'R@10')."""
  head, _, k = name.rpartition("@")
  return (head, int(k)) if k.isdigit() else (name, -1)


def format_table(results: dict) -> str:
  """A one-row Markdown table of the recall metrics, each family ordered by K."""
  names = list(results["metrics"])
  families = list(dict.fromkeys(metric_order(n)[0] for n in names))
  names.sort(key=lambda n: (families.index(metric_order(n)[0]), metric_order(n)[1]))
  header = "| split | queries | gallery | " + " | ".join(names) + " |"
  rule = "|" + "---|" * (3 + len(names))
  std = results.get("metrics_std")  # several seeds: mean ± std
  row = (f"| {results['split']} | {results['num_queries']} | {results['num_gallery']} | "
         + " | ".join(f"{results['metrics'][n]:.2f}" + (f" ± {std[n]:.2f}" if std else "")
                      for n in names) + " |")
  return "\n".join([header, rule, row])


def write_results(workdir, results: dict):
  """Writes `<workdir>/results.json` (process 0)."""
  if jax.process_index() != 0:
    return
  serialisable = {k: v for k, v in results.items() if k != "topk"}
  path = pathlib.Path(workdir) / "results.json"
  path.write_text(json.dumps(serialisable, indent=2, sort_keys=True))


def aggregate_fashioniq(per_category: dict[str, dict]) -> dict[str, Any]:
  """Combines per-category results (Evaluator.evaluate dicts) into one results dict.

  Every gallery variant of `config.eval.gallery_variants` is aggregated the
  same way; its keys keep the variant prefix (e.g. 'avg/include_ref/R@10').

  Args:
    per_category: {'dress': results, 'shirt': results, 'toptee': results}, each
      with metrics 'R@10', 'R@50' (and '<variant>/R@10', ...).

  Returns:
    Results dict with metrics '<category>/<metric>', 'avg/[<variant>/]R@K' and
    'avg/[<variant>/]mean(R@10,R@50)'.
  """
  cats = list(per_category)
  metrics = {f"{c}/{k}": v for c in cats for k, v in per_category[c]["metrics"].items()}
  first = per_category[cats[0]]["metrics"]
  prefixes = sorted({k[:-len("R@10")] for k in first if k.endswith("R@10")})
  for p in prefixes:
    for k in ("R@10", "R@50"):
      if f"{p}{k}" not in first:
        raise ValueError(f"FashionIQ needs {p}{k}; set eval.ks to include 10 and 50")
      metrics[f"avg/{p}{k}"] = sum(per_category[c]["metrics"][f"{p}{k}"] for c in cats) / len(cats)
    metrics[f"avg/{p}mean(R@10,R@50)"] = (metrics[f"avg/{p}R@10"] + metrics[f"avg/{p}R@50"]) / 2
  skipped: dict = {}
  for c in cats:
    for k, v in per_category[c].get("skipped", {}).items():
      skipped[k] = skipped.get(k, 0) + v
  return {"split": "fashioniq/val/" + "+".join(cats),
          "num_queries": sum(per_category[c]["num_queries"] for c in cats),
          "num_gallery": sum(per_category[c]["num_gallery"] for c in cats),
          "protocol": ("FashionIQ: each category ranked against its own val gallery, then "
                       "averaged; " + per_category[cats[0]]["protocol"]),
          "skipped": skipped, "metrics": metrics}


class FashionIQEvaluator:
  """FashionIQ's protocol: one Evaluator per category's val split, then `aggregate_fashioniq`."""

  def __init__(self, config, model, vocab, mesh, log=print, categories=None):
    from cir_jax.data import fashioniq  # pylint: disable=g-import-not-at-top  (TensorFlow)
    categories = fashioniq.CATEGORIES if categories is None else categories
    self.evaluators = {}
    for cat in categories:
      cfg = config.copy_and_resolve_references()
      cfg.data.category = cat
      cfg.data.eval_split = "val"
      self.evaluators[cat] = Evaluator(cfg, model, vocab, mesh, log=log)

  def evaluate(self, variables) -> dict[str, Any]:
    return aggregate_fashioniq({cat: e.evaluate(variables)
                                for cat, e in self.evaluators.items()})


def make_evaluator(config, model, vocab, mesh, log=print):
  """The evaluator of `config`'s dataset protocol: `.evaluate(variables) -> results dict`.

  FashionIQ: all three categories, averaged (FashionIQEvaluator); every other
  dataset: `config.data.eval_split` (Evaluator). Training and `evaluate_workdir`
  both use it, so a results.json always holds the same protocol's numbers.
  """
  if config.data.name == "fashioniq":
    return FashionIQEvaluator(config, model, vocab, mesh, log=log)
  return Evaluator(config, model, vocab, mesh, log=log)


def evaluate_state(evaluator, state, config) -> dict[str, Any]:
  """Evaluates a train state: one results dict, or with config.num_seeds > 1 every
  replica's, combined by `seeds.aggregate` (metrics = mean, metrics_std, per_seed)."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  n = seeds_lib.num_seeds(config)
  if n == 1:
    return evaluator.evaluate(variables)
  per_seed = [evaluator.evaluate(seeds_lib.replica(variables, i)) for i in range(n)]
  return seeds_lib.aggregate(per_seed, seeds_lib.seed_list(config))


def evaluate_workdir(config, workdir) -> dict:
  """Restores the newest checkpoint of `workdir` and evaluates it with its protocol."""
  workdir = workdir_lib.check_workdir(workdir, create=False)
  log = log_lib.Logger(workdir)
  experiment, step = experiment_lib.restore_for_evaluation(config, workdir, log)
  evaluator = make_evaluator(config, experiment.model, experiment.vocab, experiment.mesh, log=log)
  results = evaluate_state(evaluator, experiment.state, config)
  results["step"] = step
  log(format_table(results))
  write_results(workdir, results)
  return results



if __name__ == "__main__":
  from cir_jax.utils import flags as flags_lib  # pylint: disable=g-import-not-at-top
  flags_lib.run(evaluate_workdir)

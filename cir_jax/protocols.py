"""Protocols that combine several evaluations: FashionIQ's three-category average.

FashionIQ (as SSN / CLIP4Cir report it): each category (dress, shirt, toptee)
is scored against its own val gallery; the table gives R@10 and R@50 per
category, their averages over the categories, and the mean of the two averages.
Every gallery variant of `config.eval.gallery_variants` is aggregated the same
way, its keys keep the variant prefix (e.g. 'avg/include_ref/R@10').
"""
from typing import Any

from cir_jax import evaluate as evaluate_lib
from cir_jax.data import fashioniq


def aggregate_fashioniq(per_category: dict[str, dict]) -> dict[str, Any]:
  """Combines per-category results (Evaluator.evaluate dicts) into one results dict.

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


def evaluate_fashioniq(config, model, vocab, mesh, variables, log=print,
                       categories=fashioniq.CATEGORIES) -> dict[str, Any]:
  """Evaluates every FashionIQ category's val split and aggregates (see module docstring)."""
  per_category = {}
  for cat in categories:
    cfg = config.copy_and_resolve_references()
    cfg.data.category = cat
    cfg.data.eval_split = "val"
    per_category[cat] = evaluate_lib.Evaluator(cfg, model, vocab, mesh, log=log).evaluate(
        variables)
  return aggregate_fashioniq(per_category)

"""Tables and the bar chart of tools/reproduce_css.py (ours beside the TIRG paper's numbers).

`aggregate` turns per-run records into mean/std over seeds; `markdown` lays them
out like the paper's Table 4 (R@1, 3D->3D and 2D->3D) and Table 5 (CSS
ablations) with a second table of R@5/10/50; `bar_chart` draws a PNG with PIL
(no plotting dependency).
"""
import collections
import pathlib

import numpy as np

SETTING_NAMES = {"3d": "3D-to-3D", "2d": "2D-to-3D"}
KS = ("R@1", "R@5", "R@10", "R@50")


def aggregate(records: list[dict]) -> dict:
  """{setting: {method: {metric: {'mean', 'std', 'n'}, 'seconds_per_step': float|None}}}.

  std is the sample standard deviation over seeds (ddof=1), 0 for one seed.
  """
  groups = collections.defaultdict(list)
  for r in records:
    groups[(r["setting"], r["method"])].append(r)
  summary = collections.defaultdict(dict)
  for (setting, method), runs in groups.items():
    entry = {}
    for k in runs[0]["metrics"]:
      values = np.array([run["metrics"][k] for run in runs], np.float64)
      entry[k] = {"mean": float(values.mean()), "n": len(values),
                  "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    times = [run["seconds_per_step"] for run in runs if run["seconds_per_step"]]
    entry["seconds_per_step"] = float(np.median(times)) if times else None
    summary[setting][method] = entry
  return dict(summary)


def paper_value(text: str) -> tuple[float, float]:
  """'73.7±1.0' -> (73.7, 1.0); '6.3' -> (6.3, 0.0)."""
  mean, _, std = text.partition("±")
  return float(mean), float(std or 0.0)


def _cell(summary, setting, method, metric="R@1") -> str:
  entry = summary.get(setting, {}).get(method)
  if not entry or metric not in entry:
    return "—"
  m = entry[metric]
  return f"{m['mean']:.1f} ± {m['std']:.1f}" if m["n"] > 1 else f"{m['mean']:.1f}"


def markdown(methods, settings, summary, budget: list[str]) -> str:
  """results.md: Table 4 and Table 5 layouts with the paper beside ours, then R@5/10/50."""
  lines = ["# CSS: composers of the TIRG paper (Vo et al., CVPR 2019), reproduced", "",
           "Recall@1 in percent (mean ± std over seeds); the paper's numbers beside ours.", "",
           "## Budget", *budget, "", "## Table 4: R@1 on CSS", ""]
  header = "| Method |" + "".join(f" {SETTING_NAMES[s]} (ours) | {SETTING_NAMES[s]} (paper) |"
                                   for s in settings)
  rule = "|---|" + "---|---|" * len(settings)
  lines += [header, rule]
  for m in methods:
    if m.table == "4":
      lines.append(f"| {m.label} |" + "".join(
          f" {_cell(summary, s, m.name)} | {m.paper.get(s, '—')} |" for s in settings))
  ablations = [m for m in methods if m.table == "5" or m.name == "tirg_lastconv"]
  if any(m.table == "5" for m in ablations) and "3d" in settings:
    lines += ["", "## Table 5 (CSS column): TIRG ablations, R@1, 3D-to-3D", "",
              "| Method | ours | paper |", "|---|---|---|"]
    for m in ablations:
      lines.append(f"| {m.label} | {_cell(summary, '3d', m.name)} | {m.paper.get('3d', '—')} |")
  lines += ["", "## R@5 / R@10 / R@50 (ours)", "",
            "| Method | setting | " + " | ".join(KS[1:]) + " | s/step |",
            "|---|---|" + "---|" * len(KS)]
  for s in settings:
    for m in methods:
      entry = summary.get(s, {}).get(m.name, {})
      sps = entry.get("seconds_per_step")
      lines.append(f"| {m.label} | {SETTING_NAMES[s]} | "
                   + " | ".join(_cell(summary, s, m.name, k) for k in KS[1:])
                   + (f" | {sps:.3f} |" if sps else " | — |"))
  return "\n".join(lines) + "\n"


def bar_chart(methods, settings, summary, path: pathlib.Path, metric: str = "R@1"):
  """PNG of grouped bars (ours with std error bars, paper in grey), one panel per setting."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top  (not on bare accelerator images)
  bar, gap, left, top, panel_h, label_h = 16, 14, 50, 30, 220, 130
  group_w = 2 * bar + gap
  width = left + group_w * len(methods) + 20
  height = (panel_h + label_h + top) * len(settings) + 30
  image = Image.new("RGB", (max(width, 360), height), "white")
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default(size=11)
  ours_color, paper_color, axis_color = (52, 101, 164), (170, 170, 170), (60, 60, 60)
  for p, setting in enumerate(settings):
    y0 = top + p * (panel_h + label_h + top)  # panel top; value 100 is at y0
    base = y0 + panel_h
    def y(v, base=base):  # value in percent -> pixel row of this panel
      return base - panel_h * min(max(v, 0.0), 100.0) / 100.0
    draw.text((left, y0 - 22), f"{SETTING_NAMES[setting]}: {metric} (%)  "
              "blue = ours (mean ± std), grey = paper", fill=axis_color, font=font)
    for v in range(0, 101, 20):
      draw.line([(left, y(v)), (width - 10, y(v))], fill=(225, 225, 225))
      draw.text((left - 26, y(v) - 6), f"{v:3d}", fill=axis_color, font=font)
    draw.line([(left, y0), (left, base)], fill=axis_color)
    for i, m in enumerate(methods):
      x = left + 8 + i * group_w
      entry = summary.get(setting, {}).get(m.name, {}).get(metric)
      if entry:
        draw.rectangle([x, y(entry["mean"]), x + bar - 1, base], fill=ours_color)
        if entry["std"] > 0:
          cx = x + bar // 2
          draw.line([(cx, y(entry["mean"] - entry["std"])), (cx, y(entry["mean"] + entry["std"]))],
                    fill="black", width=1)
      if setting in m.paper:
        mean, std = paper_value(m.paper[setting])
        draw.rectangle([x + bar, y(mean), x + 2 * bar - 1, base], fill=paper_color)
        if std > 0:
          cx = x + bar + bar // 2
          draw.line([(cx, y(mean - std)), (cx, y(mean + std))], fill="black", width=1)
      # Labels run bottom-to-top (a rotated strip) so long names fit under narrow groups.
      strip = Image.new("RGB", (label_h - 4, 14), "white")
      ImageDraw.Draw(strip).text((0, 0), m.name[:22], fill=axis_color, font=font)
      image.paste(strip.rotate(90, expand=True), (x + bar // 2, base + 4))
  path = pathlib.Path(path)
  image.save(path, format="PNG")
  return path

"""Every picture cvgl_jax draws (matplotlib, on the Agg canvas: no display).

  draw_panels          queries beside their best tiles, the true tile framed
                       green (`cvgl_jax.retrieve --picture`, the report's
                       retrieval examples);
  plot_recall          recall curves of the training stages on one epoch
                       axis (the report's recall.png);
  plot_pseudo_labels   the pseudo-label round table (pseudo_labels.png).

Each takes the records or arrays it is handed (the caller reads the run or
the bundle) and writes one PNG atomically (`save_figure`), with
matplotlib's object API (no pyplot global state).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import numpy as np

# The recall curves' colours (matplotlib's first three): R@1 keeps its
# colour on every picture.
RECALL_COLOURS = {"R@1": "#1f77b4", "R@5": "#ff7f0e", "R@10": "#2ca02c"}
TRUE_COLOUR = "#1a9e3f"  # The true tile's frame and caption.


@dataclasses.dataclass(frozen=True)
class Panel:
  """One row of a matches picture: a query and its best tiles.

  Attributes:
    query: [H, W, 3] uint8 RGB.
    title: text above the query.
    tiles: [h, w, 3] uint8 RGB images, best first.
    captions: one text per tile.
    true_index: which of `tiles` is the true one, or -1.
  """
  query: np.ndarray
  title: str
  tiles: Sequence[np.ndarray]
  captions: Sequence[str]
  true_index: int = -1


def draw_panels(panels: Sequence[Panel], out_path: str,
                title: str = "") -> None:
  """Draws each panel's query beside its tiles (true tile framed green)
  as a PNG, atomically. Uses matplotlib's Agg canvas (no display)."""
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  if not panels:
    raise ValueError("draw_panels: no panels.")
  cols = max(len(p.tiles) for p in panels)
  aspect = max(p.query.shape[1] / p.query.shape[0] for p in panels)
  fig = figure.Figure(figsize=(1.9 * (aspect + cols), 2.3 * len(panels)
                               + (0.4 if title else 0)),
                      layout="constrained")
  if title:
    fig.suptitle(title, fontsize=11)
  grid = fig.add_gridspec(len(panels), 1 + cols,
                          width_ratios=[aspect] + [1] * cols)
  for r, panel in enumerate(panels):
    ax = fig.add_subplot(grid[r, 0])
    ax.imshow(panel.query)
    ax.set_title(panel.title, fontsize=8)
    ax.set_axis_off()
    for c, (tile, caption) in enumerate(zip(panel.tiles, panel.captions)):
      _draw_tile(fig.add_subplot(grid[r, 1 + c]), tile, caption,
                 true=c == panel.true_index)
  save_figure(fig, out_path)


def _draw_tile(ax, tile: np.ndarray, caption: str, true: bool) -> None:
  """One tile of a panel on `ax`: a thin grey frame, or a 5-point green one
  and "TRUE" under the caption for the true tile."""
  ax.imshow(tile)
  ax.set_xticks([])
  ax.set_yticks([])
  for spine in ax.spines.values():
    spine.set_color(TRUE_COLOUR if true else "#999999")
    spine.set_linewidth(5 if true else 1)
  ax.set_title(caption + ("\nTRUE" if true else ""), fontsize=8,
               color=TRUE_COLOUR if true else "black")


def save_figure(fig, out_path: str, dpi: int = 100) -> None:
  """Writes a matplotlib Figure as PNG via a temporary file and a rename,
  creating the folder."""
  folder = os.path.dirname(os.path.abspath(out_path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f".{os.path.basename(out_path)}.{os.getpid()}"
                     ".tmp")
  fig.savefig(tmp, format="png", dpi=dpi)
  os.replace(tmp, out_path)


def _figure(width: float, height: float, rows: int = 1):
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  fig = figure.Figure(figsize=(width, height), layout="constrained")
  axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
  return fig, axes


def plot_recall(curves: list[dict], out_path: str, title: str = "") -> None:
  """Recall curves as one PNG, the stages one after another.

  Args:
    curves: per training stage, {"stage", "start" (epochs before it),
      "epochs" [n] (epochs done at each evaluation), "R@k" [n] in % for
      each k drawn, "num_references" (R@1 of chance = 100 / it; NaN: no
      chance line)} (`report.recall_curves`).
    out_path: the PNG.
    title: default "Recall on the eval split".
  """
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  fig, (ax,) = _figure(8, 4.5)
  for i, c in enumerate(curves):
    x = c["start"] + c["epochs"]
    for name in [k for k in c if k.startswith("R@")]:
      ax.plot(x, c[name], marker="o", color=RECALL_COLOURS.get(name),
              label=name if i == 0 else None)
    ax.axvline(c["start"], color="#bbbbbb", linestyle="--", linewidth=1)
    # Staggered: a stage of one epoch would put two names on one spot.
    ax.annotate(c["stage"], (c["start"], 1.0), xycoords=("data",
                                                         "axes fraction"),
                xytext=(4, -14 - 12 * (i % 2)), textcoords="offset points",
                fontsize=9, color="#555555")
  refs = curves[-1]["num_references"]
  if refs and math.isfinite(refs):
    # Chance is ~0 on a 0-100 axis: a dark dashed line, labelled on the
    # plot itself, so that it cannot be taken for the axis.
    chance = 100.0 / refs
    ax.axhline(chance, color="#444444", linestyle=(0, (6, 3)), linewidth=1.5,
               label=f"R@1 of chance ({chance:.2g} %)", zorder=1)
    ax.annotate(f"chance {chance:.2g} %", (1.0, chance),
                xycoords=("axes fraction", "data"), xytext=(-4, 4),
                textcoords="offset points", ha="right", fontsize=8,
                color="#444444")
  ax.set_xlabel("epoch (stages in config order)")
  ax.set_ylabel("recall (%)")
  ax.set_ylim(0, 105)
  ax.set_xlim(left=0)
  ax.grid(alpha=0.3)
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.legend(loc="best", fontsize=9)
  ax.set_title(title or "Recall on the eval split", fontsize=11)
  save_figure(fig, out_path)


def plot_pseudo_labels(rounds: list[dict], out_path: str) -> None:
  """The round table as one PNG: counts, precision, and loss / R@1.

  Args:
    rounds: one dict per round (`records.round_table`): "round", counts
      ("mutual/pairs", "margin/pairs", "margin/correct", "num_labels"),
      fractions in [0, 1] ("candidates/precision", "mutual/precision",
      "margin/precision", "labelled_fraction"), "loss", "R@1" in %,
      "warmup" (1.0 for a round on true pairs only); a key a round lacks
      is drawn as missing.
    out_path: the PNG.
  """
  fig, (top, middle, bottom) = _figure(8, 9, rows=3)
  epochs = np.array([r["round"] for r in rounds])

  def series(key, scale=1.0):
    return np.array([scale * r.get(key, math.nan) for r in rounds], float)

  counts = [("mutual/pairs", "mutual nearest pairs", "--"),
            ("margin/pairs", "admitted (pseudo labels)", "-"),
            ("margin/correct", "admitted and correct", "-"),
            ("num_labels", "labels trained on (with true pairs)", ":")]
  if np.array_equal(series("margin/pairs"), series("num_labels"),
                    equal_nan=True):
    # No true pairs (0 % labels): one line, not two drawn on each other.
    counts = counts[:1] + [("margin/pairs", "admitted = labels trained on",
                            "-")] + counts[2:3]
  for key, label, style in counts:
    top.plot(epochs, series(key), style, marker="o", markersize=3,
             label=label)
  top.set_ylabel("pairs")
  top.set_ylim(bottom=0)
  top.legend(fontsize=8, loc="upper left")
  top.set_title("Pseudo labels per round (precision and correct pairs read "
                "the truth: telemetry only)", fontsize=10)
  for key, label, style in (
      ("candidates/precision", "precision: candidates (nearest tile)", ":"),
      ("mutual/precision", "precision: mutual nearest", "--"),
      ("margin/precision", "precision: admitted (pseudo labels)", "-")):
    middle.plot(epochs, series(key, 100.0), style, marker="o", markersize=3,
                label=label)
  middle.plot(epochs, series("labelled_fraction", 100.0), "-.",
              color="#888888", label="labelled fraction of the grounds")
  middle.set_ylabel("precision / labelled (%)")
  middle.set_ylim(0, 105)
  middle.legend(fontsize=8, loc="lower right")
  r1 = series("R@1")
  has = np.isfinite(r1)
  bottom.plot(epochs[has], r1[has], "-", marker="o", markersize=3,
              color=RECALL_COLOURS["R@1"], label="R@1 on the eval split (%)")
  bottom.set_ylabel("R@1 (%)")
  bottom.set_xlabel("round (epoch of the pseudo_label schedule)")
  loss_ax = bottom.twinx()
  loss_ax.plot(epochs, series("loss"), ":", color="#d62728",
               label="train loss (right axis)")
  loss_ax.set_ylabel("loss")
  loss = series("loss")
  if np.isfinite(loss).any():  # Its own range: it moves by a few percent.
    low, high = np.nanmin(loss), np.nanmax(loss)
    pad = max(0.05 * (high - low), 0.01 * abs(high), 1e-3)
    loss_ax.set_ylim(low - pad, high + pad)
  handles = (bottom.get_legend_handles_labels()[0]
             + loss_ax.get_legend_handles_labels()[0])
  bottom.legend(handles, [h.get_label() for h in handles], fontsize=8,
                loc="lower right")
  warm = [r["round"] for r in rounds if r.get("warmup") == 1.0]
  for ax in (top, middle, bottom):
    ax.grid(alpha=0.3)
    for e in warm:
      ax.axvspan(e - 0.5, e + 0.5, color="#dddddd", zorder=0)
  if warm:
    top.annotate("warm-up: true pairs only", (warm[0] - 0.45, 0.02),
                 xycoords=("data", "axes fraction"), fontsize=8,
                 color="#555555")
  save_figure(fig, out_path)

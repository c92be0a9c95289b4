"""A stage's records: writing them, and the pseudo-label round table.

The training loops write one JSON object per line of
`workdir/<stage>/metrics.jsonl` ({"step", "epoch", "kind": "train" |
"eval" | "epoch_start", ...}; read by `run_dir.read_records`) and the same
scalars as TensorBoard events (`MetricWriter`); `round_table` turns a
pseudo-label stage's records into one row per round, for the stage
summary, the end-of-run console table and the report's picture alike.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Mapping

import numpy as np

from cvgl_jax import run_dir


def tensorboard_tag(kind: str, name: str) -> str:
  """`kind/name` spelt so that no TensorBoard writer renames it: "R@1" ->
  "R1", "R@1%" -> "R1pct" (tensorboardX would make both "R_1..." with a
  warning per write)."""
  name = name.replace("@", "").replace("%", "pct")
  return re.sub(r"[^A-Za-z0-9_./-]", "_", f"{kind}/{name}")


class MetricWriter:
  """Scalars to `metrics.jsonl` and TensorBoard event files in one folder.

  Writes nothing when `enabled` is False (processes other than 0).
  """

  def __init__(self, folder: str, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = self._tb = None
    if enabled:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      os.makedirs(folder, exist_ok=True)
      self._jsonl = open(os.path.join(folder, run_dir.METRICS), "a")
      self._tb = tensorboardX.SummaryWriter(
          os.path.join(folder, "tensorboard"), flush_secs=30)

  def write(self, step: int, epoch: int, kind: str,
            metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps(
        {"step": int(step), "epoch": int(epoch), "kind": kind, **values})
        + "\n")
    self._jsonl.flush()
    for name, value in values.items():
      self._tb.add_scalar(tensorboard_tag(kind, name), value, int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()





def round_table(records: list[dict]) -> list[dict]:
  """One row per round (epoch) of a pseudo-label stage, from its records.

  Each row: its epoch_start record (the refinement's statistics: pairs,
  correct pairs and precision after each filter, tau_e, labels trained
  on, labelled fraction), plus "loss" (mean train loss logged during the
  round) and "R@1" (the evaluation at the round's end, NaN when the round
  was not evaluated). Precision and correct pairs read the ground truth:
  telemetry only, never used for training.
  """
  rounds = [dict(r) for r in records if r["kind"] == "epoch_start"]
  for row in rounds:
    losses = [r["loss"] for r in records if r["kind"] == "train"
              and r["epoch"] == row["epoch"] and "loss" in r]
    row["loss"] = float(np.mean(losses)) if losses else math.nan
    evals = [r for r in records if r["kind"] == "eval"
             and r["epoch"] == row["epoch"] + 1]
    row["R@1"] = evals[-1].get("R@1", math.nan) if evals else math.nan
    row["round"] = row.get("schedule_epoch", row["epoch"])
  return rounds


ROUND_COLUMNS = (
    ("round", "round", "{:.0f}"), ("tau", "tau_e", "{:.4f}"),
    ("admitted", "margin/pairs", "{:.0f}"),
    ("correct", "margin/correct", "{:.0f}"),
    ("precision %", "margin/precision", "{:.1%}"),
    ("labels", "num_labels", "{:.0f}"),
    ("labelled %", "labelled_fraction", "{:.1%}"),
    ("loss", "loss", "{:.3f}"), ("R@1", "R@1", "{:.1f}"))


def format_round_table(rounds: list[dict]) -> str:
  """`round_table` as a Markdown table (the poster's per-round numbers)."""
  lines = ["| " + " | ".join(c[0] for c in ROUND_COLUMNS) + " |",
           "|" + " --- |" * len(ROUND_COLUMNS)]
  for row in rounds:
    cells = []
    for _, key, fmt in ROUND_COLUMNS:
      value = row.get(key, math.nan)
      ok = value is not None and math.isfinite(value)
      cells.append(fmt.format(value).replace("%", "") if ok else "-")
    if row.get("warmup") == 1.0:
      cells[0] += " (warm-up)"
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)

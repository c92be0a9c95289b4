"""The pseudo-label stage's round table, from its records.

The training loop writes one JSON object per line of
`workdir/<stage>/metrics.jsonl` ({"step", "epoch", "kind": "train" |
"eval" | "epoch_start", ...}; read by `run_dir.read_records`); this module
turns them into one row per round, for the stage summary, the end-of-run
console table and the report's picture alike.
"""

from __future__ import annotations

import math

import numpy as np


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

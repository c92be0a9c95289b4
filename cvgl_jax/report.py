r"""Pictures of a training run, written under `WORKDIR/report/`.

  python -m cvgl_jax.report --workdir=DIR

  recall.png              R@1, R@5 and R@10 (%) on the eval split after
                          every evaluated epoch of each training stage, the
                          stages one after another in config order on one
                          epoch axis; R@1 of chance for reference.
  pseudo_labels.png       the round table of the pseudo_label stage
                          (`round_table`, also printed at the end of a
                          run): per round the pairs each filter keeps
                          (mutual; margin = the pseudo labels admitted, and
                          how many of those are correct) and the labels
                          trained on; the precision of the candidates,
                          mutual pairs and pseudo labels against the truth
                          (telemetry) and the labelled fraction; the
                          round's train loss and R@1; warm-up rounds (true
                          pairs only) shaded.
  retrieval_examples.png  eval-split queries beside their top-5 tiles under
                          the model the run hands on (the last training
                          stage's selected checkpoint, `config.train.
                          select`), true tile framed green; half hits and
                          half misses when there are both.

Everything is read from the workdir: `config.json`, each stage's
`metrics.jsonl` and checkpoints, and the data the config names; this
module reads it and chooses what to show, `cvgl_jax.plots` draws. A picture
whose records do not exist yet (no evaluation, no pseudo-label stage) is
skipped and left out of what `write_report` returns. Only process 0 writes;
every process must call `write_report`, since the examples embed the eval
split on all devices.
"""

from __future__ import annotations

import math
import os
from typing import Optional

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

from cvgl_jax import cli
from cvgl_jax import config_lib
from cvgl_jax import embed as embed_lib
from cvgl_jax import metrics as metrics_lib
from cvgl_jax import parallel
from cvgl_jax import plots
from cvgl_jax import records
from cvgl_jax import run_dir
from cvgl_jax import trained as trained_lib
from cvgl_jax.data import image_io
from cvgl_jax.data import splits
from cvgl_jax.pseudo import knn


RECALL_KS = (1, 5, 10)
EXAMPLE_TILES = 5


def training_stages(config: ml_collections.ConfigDict) -> list[str]:
  return [s for s in config.stages if s in config_lib.TRAINING_STAGES]


def recall_curves(workdir: str, config: ml_collections.ConfigDict
                  ) -> list[dict]:
  """Per training stage with evaluations: {"stage", "start" (epochs of the
  stages before it), "epochs" [n] (epochs done at each evaluation),
  "R@1" ... [n] in %, "num_references"}."""
  curves, start = [], 0
  for stage in training_stages(config):
    evals = [r for r in run_dir.read_records(workdir, stage)
             if r["kind"] == "eval"]
    if evals:
      curve = {"stage": stage, "start": start,
               "epochs": np.array([r["epoch"] for r in evals]),
               "num_references": evals[-1].get("num_references", math.nan)}
      for k in RECALL_KS:
        curve[f"R@{k}"] = np.array([r.get(f"R@{k}", math.nan)
                                    for r in evals])
      curves.append(curve)
    start += int(config[stage].epochs)
  return curves


def pseudo_rounds(workdir: str, stage: str = "pseudo_label") -> list[dict]:
  """The round table of the pseudo-label stage (`records.round_table`)."""
  return records.round_table(run_dir.read_records(workdir, stage))


def choose_examples(ranks: np.ndarray, count: int) -> np.ndarray:
  """Indices of up to `count` queries, evenly spread over the split: half
  hits (rank 0) and half misses when both exist, sorted."""
  hits, misses = np.flatnonzero(ranks == 0), np.flatnonzero(ranks > 0)
  n_hits = min(len(hits), max(count // 2, count - len(misses)))
  n_misses = min(len(misses), count - n_hits)

  def spread(pool, n):
    if not n:
      return np.zeros(0, np.int64)
    return pool[np.linspace(0, len(pool) - 1, n).round().astype(int)]
  return np.sort(np.concatenate([spread(hits, n_hits),
                                 spread(misses, n_misses)]))


def example_panels(workdir: str, config: ml_collections.ConfigDict,
                   count: int = 6,
                   mesh: Optional[jax.sharding.Mesh] = None
                   ) -> tuple[list[plots.Panel], str]:
  """Picture rows of eval queries under the handed-on checkpoint, and a
  title.

  Embeds the whole eval split (on every process) and ranks it exactly, as
  `evaluate` does.
  """
  # What the run hands on (the last training stage's selected checkpoint,
  # chosen without labels), not the checkpoint with the best R@1.
  trained = trained_lib.load_trained(workdir, mesh=mesh)
  index = splits.read_splits(config, workdir)[1]
  batch = parallel.process_batch_size(int(config.train.eval_batch_size),
                                     trained.mesh, "train.eval_batch_size")
  common = dict(batch_size=batch, mesh=trained.mesh,
                num_threads=int(config.data.num_threads))
  embed_g, embed_s = embed_lib.embed_fns(trained.model, trained.mesh)
  ground = embed_lib.embed_split(
      embed_g, trained.params, index.ground_paths,
      size=trained.spec["ground_size"], **common)
  satellite = embed_lib.embed_split(
      embed_s, trained.params, index.satellite_paths,
      size=trained.spec["satellite_size"], **common)
  known = np.flatnonzero(np.asarray(index.positive) >= 0)
  if not len(known):
    raise ValueError(f"The eval split {index.name!r} has no known "
                     f"positives: no retrieval examples to draw.")
  positive = np.asarray(index.positive)[known]
  result = metrics_lib.recall_at_k(ground[known], satellite, positive)
  k = min(EXAMPLE_TILES, index.num_satellite)
  scores, tops = knn.knn(ground[known], satellite, k, backend="exact")
  panels = []
  for i in choose_examples(result.ranks, count):
    q = known[i]
    panels.append(plots.Panel(
        query=image_io.read_rgb(index.ground_paths[q]),
        title=f"{index.ground_ids[q]}: true tile at rank "
              f"{result.ranks[i] + 1}",
        tiles=[image_io.read_rgb(index.satellite_paths[j])
               for j in tops[i]],
        captions=[f"#{r + 1} {index.satellite_ids[j]}\n{s:.3f}"
                  for r, (j, s) in enumerate(zip(tops[i], scores[i]))],
        true_index=int(np.flatnonzero(tops[i] == positive[i])[0])
        if positive[i] in tops[i] else -1))
  # "best" names what the stage hands on, chosen without labels (at 0 %
  # labels its final model), not the step of the best R@1.
  which = ("handed-on" if trained.checkpoint == "best"
           else trained.checkpoint)
  title = (f"{trained.stage}, {which} checkpoint (step "
           f"{trained.step}): R@1 {result.metrics['R@1']:.1f} % on "
           f"{index.name} ({len(known)} queries)")
  return panels, title


def write_report(workdir: str, *, num_examples: int = 6,
                 mesh: Optional[jax.sharding.Mesh] = None) -> dict[str, str]:
  """Writes the pictures of a run under `workdir/report/`.

  Args:
    workdir: the run's folder.
    num_examples: queries in the retrieval examples.
    mesh: devices for embedding the eval split; default all.

  Returns:
    {"recall" | "pseudo_labels" | "retrieval_examples": PNG path} of the
    pictures written (those whose records exist).
  """
  config = trained_lib.read_config(workdir)
  folder = os.path.join(workdir, run_dir.REPORT)
  main = parallel.is_main_process()
  written = {}
  curves = recall_curves(workdir, config)
  if curves:
    written["recall"] = os.path.join(folder, "recall.png")
    if main:
      plots.plot_recall(curves, written["recall"])
  else:
    logging.info("Report: no evaluation recorded yet; no recall picture.")
  rounds = (pseudo_rounds(workdir) if "pseudo_label" in config.stages
            else [])
  if rounds:
    written["pseudo_labels"] = os.path.join(folder, "pseudo_labels.png")
    if main:
      plots.plot_pseudo_labels(rounds, written["pseudo_labels"])
  try:
    run_dir.last_trained_stage(workdir, training_stages(config))
    has_checkpoint = True
  except run_dir.RunDirError:
    has_checkpoint = False
  if has_checkpoint and num_examples > 0:
    panels, title = example_panels(workdir, config, num_examples, mesh)
    written["retrieval_examples"] = os.path.join(folder,
                                                 "retrieval_examples.png")
    if main:
      plots.draw_panels(panels, written["retrieval_examples"], title)
  return written


def define_flags() -> None:
  """The CLI's flags (only when run as a program; see `export`)."""
  flags.DEFINE_string("workdir", None, "The training run's folder.")
  flags.DEFINE_integer("num_examples", 6,
                       "Queries in retrieval_examples.png.")
  flags.mark_flags_as_required(["workdir"])
  cli.define_job_flags()
  flags.adopt_module_key_flags(cli)  # --help lists them.


def main(argv):
  cli.setup_console()
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  cli.join_job()
  written = write_report(f.workdir, num_examples=f.num_examples)
  if not parallel.is_main_process():
    return
  for name, path in written.items():
    print(f"{name}: {path}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)

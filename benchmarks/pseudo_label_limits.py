r"""What bounds the pseudo labels at the end of stage 3?

  python benchmarks/pseudo_label_limits.py runs/bench2/ours_0

For each run and stage (default: the cold start and stage 3), the stage's
handed-on params embed the train and the val split, and the script prints:

  memorised?   mutual-pair precision and R@1 on the train split (whose
               pseudo labels stage 3 trained on) against the val split
               (never trained on), at the same gallery size (500 grounds
               with their own tiles; the train split averaged over 5 random
               draws). A model that had learnt its wrong train pairs would
               score higher on train than on val.
  re-matching  mutual matching repeated on what the previous passes left
               (their grounds and tiles removed): how many pairs each pass
               adds, at what precision -- can coverage grow past what one
               pass of mutual matching admits without admitting noise?

Precision reads the truth: telemetry, as in the round table.
"""

import argparse

import numpy as np

from cvgl_jax import trained as trained_lib
from cvgl_jax.embed import embed_fns
from cvgl_jax.embed import embed_split
from cvgl_jax.data import splits
from round0_rules import mutual_pairs  # benchmarks/: the same definition

GALLERY = 500
DRAWS = 5
PASSES = 5


def gallery_scores(ground, satellite, positive, rng, draws):
  """Mean (R@1, mutual precision, mutual coverage) in % over `draws`
  galleries of GALLERY grounds and their own tiles (all when draws=1)."""
  out = []
  for _ in range(draws):
    idx = (rng.permutation(len(positive))[:GALLERY] if draws > 1
           else np.arange(len(positive)))
    sim = ground[idx] @ satellite[positive[idx]].T
    rows, cols = mutual_pairs(sim)
    out.append((np.mean(sim.argmax(1) == np.arange(len(idx))),
                np.mean(rows == cols), len(rows) / len(idx)))
  return 100 * np.mean(out, axis=0)


def rematching(sim, positive):
  """[(pairs added, their precision %)] of each pass of mutual matching on
  the grounds and tiles the passes before it left."""
  grounds, tiles = np.arange(sim.shape[0]), np.arange(sim.shape[1])
  passes = []
  for _ in range(PASSES):
    rows, cols = mutual_pairs(sim[np.ix_(grounds, tiles)])
    g, s = grounds[rows], tiles[cols]
    passes.append((len(g), 100 * np.mean(positive[g] == s)))
    grounds, tiles = np.setdiff1d(grounds, g), np.setdiff1d(tiles, s)
    if not len(grounds):
      break
  return passes


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--stages", default="cross_fake,pseudo_label")
  args = parser.parse_args()
  print("| run | stage | train R@1 | val R@1 | train mutual precision | "
        "val mutual precision | re-matching passes: pairs added at "
        "precision % |")
  print("| --- " * 7 + "|")
  for workdir in args.workdirs:
    for stage in args.stages.split(","):
      trained = trained_lib.load_trained(workdir, stage=stage)
      config = trained.config
      embed_g, embed_s = embed_fns(trained.model, trained.mesh)
      options = dict(batch_size=config.train.eval_batch_size,
                     mesh=trained.mesh, num_threads=config.data.num_threads)
      scores, train_sim = {}, None
      for name, split in zip(("train", "val"),
                             splits.read_splits(config, workdir)):
        ground = embed_split(embed_g, trained.params, split.ground_paths,
                             size=config.data.ground_size, **options)
        satellite = embed_split(embed_s, trained.params,
                                split.satellite_paths,
                                size=config.data.satellite_size, **options)
        positive = np.asarray(split.positive)
        scores[name] = gallery_scores(
            ground, satellite, positive, np.random.default_rng(0),
            DRAWS if len(positive) > GALLERY else 1)
        if name == "train":
          train_sim, train_positive = ground @ satellite.T, positive
      passes = ", ".join(f"{n} at {p:.1f}"
                         for n, p in rematching(train_sim, train_positive))
      print(f"| {workdir} | {stage} (step {trained.step}) | "
            f"{scores['train'][0]:.1f} | {scores['val'][0]:.1f} | "
            f"{scores['train'][1]:.1f} | {scores['val'][1]:.1f} | {passes} |")


if __name__ == "__main__":
  main()

r"""Which label-free rule makes the first pseudo-label round precise?

  python benchmarks/round0_rules.py runs/bench2/ours_0 runs/demo_s1 ...

For each run, the cold start's handed-on params (what stage 3 starts from)
embed the train split; then each rule scores the mutual nearest pairs
and the table prints, per rule, the precision of its N most confident pairs
(N = 3 %, 6 %, 12 % of the grounds) and what the first round's threshold
tau_e admits.
Precision reads the truth: telemetry, as in the round table.

Rules (S: [G, R] cosine similarities, ground rows):
  margin      the paper's: mutual pairs, ground's top-1 minus top-2;
  two_sided   min of the ground's and the satellite's margin;
  views8      S averaged over the 8 paired views (flip x 4 rotations of the
              tile with the matching roll of the panorama), then margin
              (pseudo_label.paired_views=8); views2: plain and flipped;
              views4: the 4 quarter turns;
  stable      mutual in every paired view; score = min margin over views;
  csls        CSLS(i, j) = 2 S_ij - r_g(i) - r_s(j) (r: mean of the 10
              nearest), mutual on CSLS, margin on CSLS rows;
  fake        F: the satellite tower on each ground's fake tile (the
              cold start's input) against the real tiles; mutual on F;
  fake_agree  mutual in S and in F, score = min of both margins;
  views1_fake (S + F) / 2, then margin (fake_view=True);
  views8_fake (views8's S + F) / 2 (paired_views=8, fake_view=True);
              views2_fake, views4_fake likewise.
"""

import argparse

import jax.numpy as jnp
import numpy as np

from cvgl_jax import trained as trained_lib
from cvgl_jax.embed import embed_fns
from cvgl_jax.embed import embed_split
from cvgl_jax.pseudo import refine as refine_lib
from cvgl_jax.data import splits


def paired_views(ground_w: int):
  """(name, ground transform, satellite transform) of the 8 paired views,
  on [B, H, W, 3] batches (the conventions of `data.augment`)."""
  views = []
  for flip in (False, True):
    for k in range(4):
      def g(x, flip=flip, k=k):
        x = x[:, :, ::-1] if flip else x
        return jnp.roll(x, -k * (ground_w // 4), axis=2)
      def s(x, flip=flip, k=k):
        x = x[:, :, ::-1] if flip else x
        return jnp.rot90(x, k=k, axes=(1, 2))
      views.append((f"flip{int(flip)}_rot{k}", g, s))
  return views


def mutual_pairs(sim):
  """(ground idx, satellite idx) of the mutual nearest pairs of [G, R]."""
  g_best = sim.argmax(1)
  s_best = sim.argmax(0)
  ground = np.flatnonzero(s_best[g_best] == np.arange(len(g_best)))
  return ground, g_best[ground]


def row_margin(sim, rows):
  top2 = -np.sort(-sim[rows], axis=1)[:, :2]
  return top2[:, 0] - top2[:, 1]


def rule_scores(sims, fake_sim):
  """{rule: (ground idx, sat idx, score)} from {view: S}."""
  plain = sims["flip0_rot0"]
  out = {}
  g, s = mutual_pairs(plain)
  out["margin"] = (g, s, row_margin(plain, g))
  col = row_margin(plain.T, s)
  out["two_sided"] = (g, s, np.minimum(out["margin"][2], col))
  for rule, names in [("views2", ["flip0_rot0", "flip1_rot0"]),
                      ("views4", [f"flip0_rot{k}" for k in range(4)]),
                      ("views8", list(sims))]:
    mean = np.mean([sims[n] for n in names], axis=0)
    g, s = mutual_pairs(mean)
    out[rule] = (g, s, row_margin(mean, g))
  g, s = mutual_pairs(plain)
  keep = np.ones(len(g), bool)
  score = np.full(len(g), np.inf)
  for sim in sims.values():
    g2, s2 = mutual_pairs(sim)
    partner = np.full(sim.shape[0], -1)
    partner[g2] = s2
    keep &= partner[g] == s
    score = np.minimum(score, row_margin(sim, g))
  out["stable"] = (g[keep], s[keep], score[keep])
  k = 10
  r_g = -np.sort(-plain, axis=1)[:, :k].mean(1)
  r_s = -np.sort(-plain, axis=0)[:k].mean(0)
  csls = 2 * plain - r_g[:, None] - r_s[None, :]
  g, s = mutual_pairs(csls)
  out["csls"] = (g, s, row_margin(csls, g))
  g, s = mutual_pairs(fake_sim)
  out["fake"] = (g, s, row_margin(fake_sim, g))
  g, s = mutual_pairs(plain)
  g2, s2 = mutual_pairs(fake_sim)
  partner = np.full(plain.shape[0], -1)
  partner[g2] = s2
  keep = partner[g] == s
  g, s = g[keep], s[keep]
  out["fake_agree"] = (g, s, np.minimum(row_margin(plain, g),
                                         row_margin(fake_sim, g)))
  mean = (plain + fake_sim) / 2
  g, s = mutual_pairs(mean)
  out["views1_fake"] = (g, s, row_margin(mean, g))
  for rule, names in [("views2_fake", ["flip0_rot0", "flip1_rot0"]),
                      ("views4_fake", [f"flip0_rot{k}" for k in range(4)]),
                      ("views8_fake", list(sims))]:
    mean = (np.mean([sims[n] for n in names], axis=0) + fake_sim) / 2
    g, s = mutual_pairs(mean)
    out[rule] = (g, s, row_margin(mean, g))
  return out


def first_round_tau(p) -> float:
  """tau_e of a 0 % run's first round: the warm-up epochs count in the
  curriculum (docs/METHOD.md), so round 0 is epoch `warmup_epochs`."""
  settings = refine_lib.RefineSettings(tau=p.tau, epochs=p.epochs,
                                       curriculum=p.curriculum)
  return refine_lib.threshold(settings, p.warmup_epochs)


def report(name, scores, truth, num_ground, tau):
  fractions = (0.03, 0.06, 0.12)
  print(f"\n{name}: {num_ground} grounds")
  print("| rule | mutual | " + " | ".join(
      f"prec. top {100 * f:.0f} %" for f in fractions) +
        f" | admitted at tau_e={tau:.4f} | its precision % |")
  print("| --- " * (4 + len(fractions)) + "|")
  for rule, (g, s, score) in scores.items():
    correct = truth[g] == s
    order = np.argsort(-score, kind="stable")
    cells = []
    for f in fractions:
      n = int(round(f * num_ground))
      top = correct[order[:n]]
      cells.append(f"{100 * top.mean():.1f}" if len(top) == n else "-")
    admitted = score >= np.float32(tau)
    prec = 100 * correct[admitted].mean() if admitted.any() else float("nan")
    print(f"| {rule} | {len(g)} | " + " | ".join(cells) +
          f" | {admitted.sum()} | {prec:.1f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--stage", default="cross_fake")
  args = parser.parse_args()
  for workdir in args.workdirs:
    trained = trained_lib.load_trained(workdir, stage=args.stage)
    config = trained.config
    train, _ = splits.read_splits(config, workdir)
    embed_g, embed_s = embed_fns(trained.model, trained.mesh)
    views = paired_views(config.data.ground_size[1])
    sims = {}
    options = dict(batch_size=config.train.eval_batch_size,
                   mesh=trained.mesh, num_threads=config.data.num_threads)
    for name, tg, ts in views:
      ground = embed_split(lambda p, x: embed_g(p, tg(x)), trained.params,
                           train.ground_paths, size=config.data.ground_size,
                           **options)
      satellite = embed_split(lambda p, x: embed_s(p, ts(x)), trained.params,
                              train.satellite_paths,
                              size=config.data.satellite_size, **options)
      sims[name] = ground @ satellite.T
      if name == "flip0_rot0":
        real = satellite
    fakes = train.derived_paths(config.cross_fake.fake_folder, ".png")
    fake = embed_split(embed_s, trained.params, fakes,
                       size=config.data.satellite_size, **options)
    truth = np.asarray(train.positive)
    report(f"{workdir} ({args.stage}, step {trained.step})",
           rule_scores(sims, fake @ real.T), truth, train.num_ground,
           first_round_tau(config.pseudo_label))


if __name__ == "__main__":
  main()

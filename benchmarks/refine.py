"""Pseudo-label refinement: ours (exact, ScaNN) vs the authors' NumPy code.

Variants, each timed in its own subprocess so that peak memories do not mix:

  exact          `refine(..., backend="exact")`: one chunked pass over
                 g @ s.T (jitted matmul + top-k + running column argmax).
  scann          `refine(..., backend="scann")`: two ScaNN indexes sized
                 from N (AH + re-ordering, a tree from 100k rows).
  authors_dense  their CVUSA/CVACT path: two dense N x N float32 matrices
                 g @ s.T and s @ g.T, argmax both ways, np.partition top-2 on
                 the mutual rows, margin >= tau_e.
  authors_chunk  their VIGOR path: g @ s.T in row chunks of 5,000 with a
                 Python `np.where(row == max)` per row (ties) and a top-10
                 partition, then s @ g.T in chunks for the satellites'
                 argmax, a Python loop for the mutual test and `np.unique`
                 over the top-10 per mutual row for the margin.

Embeddings are clustered synthetic ones (`embeddings`): ground i and
satellite i are noisy copies of a place, places come in neighbourhoods of
look-alikes, so mutual pairs exist and margins spread around the
threshold. Every variant uses tau = 0.035 (VIGOR) at epoch 0 and one
satellite per ground (no ties).

Memory: `rss_extra_mb` is the process's peak RSS (ru_maxrss) minus its RSS
once the embeddings exist (so it is what the algorithm added, NumPy, XLA
and ScaNN alike); `tracemalloc_mb` is the Python-tracked (NumPy) peak.
Agreement: the share of the exact variant's final pairs a variant also
returns, and how many pairs it returns that exact does not.
`authors_dense` runs only when three N x N matrices (the two and
np.partition's copy of the mutual rows) fit in 80 % of
MemAvailable; it says so when skipped. With --million, ours alone (ScaNN)
at N = 1,000,000, checked on a sample of grounds against exact search.

  python benchmarks/refine.py [--sizes 35532 105214] [--dim 1024]
      [--variants exact scann authors_dense authors_chunk] [--million]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np

TAU = 0.035
GROUP = 16  # Places per neighbourhood: look-alike neighbours, as in a city.
SPREAD = 0.3  # Per-dimension std of a place around its neighbourhood.
NOISE = 0.7  # Per-dimension std of each view around its place.


def embeddings(n, d, seed, chunk=20_000):
  """Clustered pairs, generated in chunks: peak ~ the two outputs.

  Neighbourhood centres ~ N(0, I); a place = its centre + SPREAD * N(0, I);
  ground i and satellite i = place i + NOISE * N(0, I), L2-normalised. So
  cos(g_i, s_i) ~ 0.69, against ~0.63 for a neighbour: top-1 minus top-2
  margins spread around tau, and the data is clustered like real
  embeddings (so ScaNN's partitioning has structure to use).
  """
  rng = np.random.default_rng(seed)
  g = np.empty((n, d), np.float32)
  s = np.empty((n, d), np.float32)
  chunk = chunk // GROUP * GROUP
  for a in range(0, n, chunk):
    b = min(n, a + chunk)
    hood = rng.standard_normal((-(-(b - a) // GROUP), d), dtype=np.float32)
    c = np.repeat(hood, GROUP, axis=0)[:b - a]
    c += SPREAD * rng.standard_normal((b - a, d), dtype=np.float32)
    for out in (g, s):
      x = c + NOISE * rng.standard_normal((b - a, d), dtype=np.float32)
      out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
  return g, s


def authors_dense(g, s, tau_e):
  g_s = g @ s.T
  s_g = s @ g.T
  g2s = np.argmax(g_s, axis=1)
  s2g = np.argmax(s_g, axis=1)
  ids = np.arange(len(g))
  mutual = s2g[g2s] == ids
  top2 = np.partition(g_s[mutual], -2, axis=1)[:, -2:]
  keep = (top2[:, 1] - top2[:, 0]) >= tau_e
  return np.stack([ids[mutual][keep], g2s[mutual][keep]], 1)


def authors_chunk(g, s, tau_e, step=5_000):
  g2s, s2g = [], []
  top10 = np.zeros([len(g), 10])
  for start in range(0, len(g), step):
    sim = g[start:start + step] @ s.T
    best = np.max(sim, axis=1)
    g2s.extend([np.where(row == best[i])[0] for i, row in enumerate(sim)])
    top10[start:start + step] = np.partition(sim, -10, axis=-1)[:, -10:]
    del sim
  for start in range(0, len(s), step):
    sim = s[start:start + step] @ g.T
    s2g.extend(np.argmax(sim, axis=1))
    del sim
  s2g = np.array(s2g)
  pairs = []
  for i, j in enumerate(g2s):
    if i in s2g[j]:
      for j0 in j:
        pairs.append([i, j0])
  pairs = np.array(pairs).reshape(-1, 2)
  logits = []
  for row in top10[pairs[:, 0]]:
    logits.append(np.partition(np.unique(row), -2, axis=-1)[-2:])
  logits = np.array(logits).reshape(-1, 2)
  return pairs[(logits[:, 1] - logits[:, 0]) >= tau_e]


def ours(backend, g, s, **knn_options):
  # pylint: disable-next=g-import-not-at-top
  from cvgl_jax.pseudo import refine as refine_lib
  st = refine_lib.RefineSettings(tau=TAU, epochs=40, backend=backend,
                                 knn_options=knn_options)
  return refine_lib.refine(g, s, 0, st).pairs


def rss_mb():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_variant(args):
  """Child process: one variant at one size; prints one JSON line."""
  g, s = embeddings(args.n, args.dim, args.seed)
  if args.variant in ("exact", "scann"):  # Import jax/scann before the clock.
    # pylint: disable-next=g-import-not-at-top,unused-import
    from cvgl_jax.pseudo import refine
    import scann  # pylint: disable=g-import-not-at-top,unused-import
  base = rss_mb()
  tracemalloc.start()
  t0 = time.perf_counter()
  if args.variant == "authors_dense":
    pairs = authors_dense(g, s, TAU)
  elif args.variant == "authors_chunk":
    pairs = authors_chunk(g, s, TAU)
  else:
    pairs = ours(args.variant, g, s)
  seconds = time.perf_counter() - t0
  _, peak = tracemalloc.get_traced_memory()
  maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  np.save(args.out, np.asarray(pairs, np.int64))
  row = {"variant": args.variant, "n": args.n, "s": seconds,
         "pairs": len(pairs), "rss_extra_mb": maxrss - base,
         "maxrss_mb": maxrss, "tracemalloc_mb": peak / 2**20,
         "load": os.getloadavg()[0]}
  if args.variant == "scann":
    row["where"] = where_the_time_goes(g, s)
  print(json.dumps(row))


def where_the_time_goes(g, s):
  """Seconds of each part of ours' ScaNN cross search, run again part by
  part (knn's reduced path: PCA, then per direction the index build, the
  search and the exact re-scoring; refine's own bookkeeping is the rest)."""
  # pylint: disable-next=g-import-not-at-top
  from cvgl_jax.pseudo import knn
  o = knn.ScannOptions()
  parts, t = {}, time.perf_counter()
  reduced = knn._reduction(o, g, s)  # pylint: disable=protected-access
  if reduced is None:
    return {}
  parts["pca"] = time.perf_counter() - t
  for name, full, small, k in (("g2s", (g, s), reduced, 4),
                               ("s2g", (s, g), reduced[::-1], 1)):
    want = max(k, o.candidates)
    t = time.perf_counter()
    searcher = knn.scann_searcher(small[1], want,
                                  knn.reduced_options(o, len(full[1])))
    parts[f"{name}_build"] = time.perf_counter() - t
    t = time.perf_counter()
    cand, scores = searcher.search_batched_parallel(
        small[0], final_num_neighbors=want, batch_size=o.batch_size)
    parts[f"{name}_search"] = time.perf_counter() - t
    t = time.perf_counter()
    knn._rescore(*full, np.asarray(cand, np.int64),  # pylint: disable=protected-access
                 np.isfinite(scores), k)
    parts[f"{name}_rescore"] = time.perf_counter() - t
  return {k: round(v, 2) for k, v in parts.items()}


def check_million(args):
  """Child: ScaNN refine at N, checked on a sample against exact search."""
  from cvgl_jax.pseudo import knn  # pylint: disable=g-import-not-at-top
  g, s = embeddings(args.n, args.dim, args.seed)
  base = rss_mb()
  t0 = time.perf_counter()
  options = ({"num_leaves_to_search": args.leaves_to_search}
             if args.leaves_to_search else {})
  pairs = ours("scann", g, s, **options)
  seconds = time.perf_counter() - t0
  maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  rng = np.random.default_rng(args.seed + 1)
  sample = np.sort(rng.choice(args.n, args.check, replace=False))
  top, idx = knn.knn(g[sample], s, 2, backend="exact")
  _, back = knn.knn(s[idx[:, 0]], g, 1, backend="exact")
  keep = ((back[:, 0] == sample)
          & (top[:, 0] - top[:, 1] >= np.float32(TAU)))
  truth = {(int(i), int(j)) for i, j in zip(sample[keep], idx[keep, 0])}
  mine = pairs[np.isin(pairs[:, 0], sample)]
  got = {(int(i), int(j)) for i, j in mine}
  print(json.dumps({"variant": "scann", "n": args.n, "s": seconds,
                    "pairs": len(pairs), "rss_extra_mb": maxrss - base,
                    "maxrss_mb": maxrss, "sample": args.check,
                    "sample_exact_pairs": len(truth),
                    "agreement": len(truth & got) / max(1, len(truth)),
                    "extra": len(got - truth),
                    "load": os.getloadavg()[0]}))


def spawn(extra):
  cmd = [sys.executable, __file__, *extra]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
  if out.returncode or not lines:
    return {"error": f"exit {out.returncode} (-9: killed, out of memory?) "
                     + (out.stderr or out.stdout)[-800:]}
  return json.loads(lines[-1])


def mem_available_mb():
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable"):
        return int(line.split()[1]) / 1024
  return 0.0


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", type=int, nargs="*", default=[35_532, 105_214])
  p.add_argument("--dim", type=int, default=1024)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--variants", nargs="+",
                 default=["exact", "scann", "authors_chunk", "authors_dense"])
  p.add_argument("--million", action="store_true",
                 help="also ours (ScaNN) at N = 1,000,000")
  p.add_argument("--check", type=int, default=500,
                 help="grounds checked against exact search at 1M")
  p.add_argument("--leaves-to-search", type=int, default=0,
                 help="1M run: ScaNN leaves searched (0: knn's default)")
  p.add_argument("--variant", help=argparse.SUPPRESS)
  p.add_argument("--n", type=int, help=argparse.SUPPRESS)
  p.add_argument("--out", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.variant == "million":
    return check_million(args)
  if args.variant:
    return run_variant(args)
  common = ["--dim", str(args.dim), "--seed", str(args.seed)]
  with tempfile.TemporaryDirectory() as tmp:
    for n in args.sizes:
      rows = {}
      for v in args.variants:
        # Two N x N matrices plus np.partition's copy of the mutual rows.
        dense_mb = 3 * n * n * 4 / 2**20
        if v == "authors_dense" and dense_mb > 0.8 * mem_available_mb():
          print(f"N={n} authors_dense skipped: needs {dense_mb:.0f} MB, "
                f"{mem_available_mb():.0f} MB available", flush=True)
          continue
        out = os.path.join(tmp, f"{v}_{n}.npy")
        rows[v] = spawn(["--variant", v, "--n", str(n), "--out", out,
                         *common])
        if "error" not in rows[v]:
          rows[v]["file"] = out
        print(f"N={n} {v}: {json.dumps(rows[v])}", flush=True)
      if "exact" in rows and "file" in rows["exact"]:
        ref = {tuple(q) for q in np.load(rows["exact"]["file"]).tolist()}
        for v, r in rows.items():
          if "file" in r:
            got = {tuple(q) for q in np.load(r["file"]).tolist()}
            print(f"N={n} {v}: agreement with exact "
                  f"{len(ref & got) / max(1, len(ref)):.4f}, "
                  f"{len(got - ref)} pairs exact lacks", flush=True)
      for ours_v in ("exact", "scann"):
        for theirs in ("authors_chunk", "authors_dense"):
          if "s" in rows.get(ours_v, {}) and "s" in rows.get(theirs, {}):
            print(f"N={n}: ours ({ours_v}) {rows[ours_v]['s']:.1f} s vs "
                  f"{theirs} {rows[theirs]['s']:.1f} s: "
                  f"{rows[theirs]['s'] / rows[ours_v]['s']:.1f}x", flush=True)
    if args.million:
      r = spawn(["--variant", "million", "--n", "1000000", "--check",
                 str(args.check), "--leaves-to-search",
                 str(args.leaves_to_search), *common])
      print(f"N=1000000 scann: {json.dumps(r)}", flush=True)


if __name__ == "__main__":
  main()

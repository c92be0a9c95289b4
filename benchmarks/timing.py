"""Round-robin timing shared by the benchmarks.

These machines are noisy: variants are timed in turn within each round, in
one process, and compared by their medians.
"""

import statistics
import time
from typing import Callable, Mapping


def round_robin(variants: Mapping[str, Callable[[], object]], rounds: int,
                calls: int = 1, warmup: int = 0,
                warmup_times: dict[str, list[float]] | None = None
                ) -> dict[str, list[float]]:
  """{name: [seconds per call, one entry per round]}: each round times
  `calls` calls of every variant, in turn.

  With `warmup` > 0, each turn first makes that many untimed calls (their
  seconds per call go to `warmup_times` when given): the timed calls then
  measure a variant's steady state, not its cost of resuming after the
  others' turns.
  """
  times = {name: [] for name in variants}
  for _ in range(rounds):
    for name, fn in variants.items():
      if warmup:
        start = time.perf_counter()
        for _ in range(warmup):
          fn()
        if warmup_times is not None:
          warmup_times.setdefault(name, []).append(
              (time.perf_counter() - start) / warmup)
      start = time.perf_counter()
      for _ in range(calls):
        fn()
      times[name].append((time.perf_counter() - start) / calls)
  return times


def medians(times: Mapping[str, list[float]]) -> dict[str, float]:
  return {name: statistics.median(ts) for name, ts in times.items()}

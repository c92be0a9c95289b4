"""Round-robin timing shared by the benchmarks.

These machines are noisy: variants are timed in turn within each round, in
one process, and compared by their medians.
"""

import statistics
import time
from typing import Callable, Mapping


def round_robin(variants: Mapping[str, Callable[[], object]], rounds: int,
                calls: int = 1) -> dict[str, list[float]]:
  """{name: [seconds per call, one entry per round]}: each round times
  `calls` calls of every variant, in turn."""
  times = {name: [] for name in variants}
  for _ in range(rounds):
    for name, fn in variants.items():
      start = time.perf_counter()
      for _ in range(calls):
        fn()
      times[name].append((time.perf_counter() - start) / calls)
  return times


def medians(times: Mapping[str, list[float]]) -> dict[str, float]:
  return {name: statistics.median(ts) for name, ts in times.items()}

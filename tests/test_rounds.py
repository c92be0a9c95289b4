"""Stage 3's rounds (`pseudo.rounds`): what a round embeds with."""

import numpy as np

from cvgl_jax import config_lib
from cvgl_jax.data.index import PairIndex
from cvgl_jax.pseudo import rounds
from cvgl_jax.train import state as state_lib

N = 12


def _index():
  ids = np.array([f"p{i}" for i in range(N)])
  return PairIndex(name="tiny/train", root="/nowhere",
                   ground_paths=np.array([f"/nowhere/g{i}.png"
                                          for i in range(N)]),
                   ground_ids=ids,
                   satellite_paths=np.array([f"/nowhere/s{i}.png"
                                             for i in range(N)]),
                   satellite_ids=ids, positive=np.arange(N))


def test_a_round_embeds_with_the_moving_average():
  """A state keeping an average labels with it, not with the last step's
  params: here the average's embeddings match every ground to its own tile
  and the params' match none."""
  config = config_lib.default_config()
  config.pseudo_label.knn_backend = "exact"
  seen = []

  def embed(params):
    seen.append(params["name"])
    ground = np.eye(N, dtype=np.float32)
    shift = 0 if params["name"] == "average" else 1
    return ground, np.roll(ground, shift, axis=0)

  hook = rounds.make_epoch_start(config, _index(), np.zeros((0, 2), np.int64),
                                 embed)
  state = state_lib.TrainState(params={"name": "params"}, opt_state=None,
                               step=0, rng=None)
  with_average = state.replace(average={"name": "average"})
  for s, correct in ((with_average, N), (state, 0)):
    metrics = hook(s, 0)["metrics"]
    assert metrics["margin/pairs"] == N
    assert metrics["margin/correct"] == correct
  assert seen == ["average", "params"]

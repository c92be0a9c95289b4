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


def test_a_teacher_labels_once_by_the_last_rounds_rule():
  """The retrain stage's hook: the teacher embeds once, whatever the
  epoch and the student's state; its mutual pairs are kept at the last
  round's threshold (0 after the curriculum), so even a pair whose margin
  is far below the first round's tau is a label; every epoch lays out the
  same labels, the labelled fraction's true pairs over them."""
  config = config_lib.default_config()
  p = config.pseudo_label
  p.knn_backend, p.tau, p.epochs, p.warmup_epochs = "exact", 0.5, 10, 6
  calls = []
  # Ground i's best tile is i + 1 (mod N), every pair mutual, each margin
  # 0.07: below any threshold of the curriculum but its last (0).
  ground = np.eye(N, dtype=np.float32)
  satellite = np.roll(ground, 1, axis=0) + 0.9 * ground
  satellite /= np.linalg.norm(satellite, axis=1, keepdims=True)

  def embed(params):
    calls.append(params)
    return ground, satellite

  gt = np.array([[0, 0], [5, 5]], np.int64)
  hook = rounds.make_epoch_start(config, _index(), gt, embed,
                                 teacher="teacher")
  student = state_lib.TrainState(params="student", opt_state=None, step=0,
                                 rng=None)
  expected = {(i, (i + 1) % N) for i in range(N)}
  expected = {pair for pair in expected if pair[0] not in (0, 5)}
  expected |= {(0, 0), (5, 5)}
  for epoch in (0, 3, 9):
    out = hook(student, epoch)
    assert out["metrics"]["warmup"] == 0.0   # No warm-up epochs.
    assert out["metrics"]["margin/pairs"] == N
    assert out["metrics"]["tau_e"] == 0.0
    rows = out["pairs"][out["labeled"]]
    assert set(map(tuple, rows.tolist())) == expected
  assert calls == ["teacher"]  # Embedded once, with the teacher.

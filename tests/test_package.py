"""Properties of the installed package itself."""

import subprocess
import sys


def test_scann_imports_without_tensorflow():
  # A fresh interpreter: another test may have imported anything.
  code = ("import sys, numpy as np, scann\n"
          "db = np.eye(4, dtype=np.float32)\n"
          "s = scann.scann_ops_pybind.builder(db, 1, 'dot_product')"
          ".score_brute_force().build()\n"
          "assert s.search(db[2])[0][0] == 2\n"
          "print('tensorflow' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_package_imports_without_torch_or_tensorflow():
  code = ("import sys\n"
          "import cvgl_jax.main, cvgl_jax.stages, cvgl_jax.models.weights\n"
          "print(sorted(m for m in ('torch', 'tensorflow') "
          "if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr

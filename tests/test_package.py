"""Properties of the installed package itself."""

import pathlib
import shutil
import subprocess
import sys
import zipfile


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


def test_wheel_ships_the_native_kernel_source(tmp_path):
  # cpu/depthwise.py compiles its .cc on first use: a wheel without it would
  # silently fall back to the slower XLA path on every user's machine.
  # Built as a user's pip builds it (isolated, with the pinned backend),
  # from a copy without the checkout's build/ and egg-info leftovers.
  root = pathlib.Path(__file__).parents[1]
  src = tmp_path / "src"
  shutil.copytree(root / "cvgl_jax", src / "cvgl_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(root / name, src / name)
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                  str(src), "-w", str(tmp_path)],
                 check=True, capture_output=True, cwd=tmp_path)
  (wheel,) = tmp_path.glob("cvgl_jax-*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  assert "cvgl_jax/cpu/depthwise.cc" in names
  assert "cvgl_jax/cpu/depthwise.py" in names


def test_scann_is_required_only_where_its_wheels_exist():
  # pip evaluates these markers: on aarch64 (GH200) or macOS nothing asks
  # for scann, and the exact search takes over (cvgl_jax.pseudo.knn).
  import tomllib  # pylint: disable=g-import-not-at-top
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(__file__).parents[1]
  with open(root / "pyproject.toml", "rb") as f:
    deps = [Requirement(d) for d in
            tomllib.load(f)["project"]["dependencies"]]

  def needed(machine, platform):
    env = {"platform_machine": machine, "sys_platform": platform}
    return {r.name for r in deps if r.marker is None or r.marker.evaluate(env)}
  assert "scann" in needed("x86_64", "linux")
  assert "scann" not in needed("aarch64", "linux")
  assert "scann" not in needed("arm64", "darwin")
  assert needed("aarch64", "linux") == needed("x86_64", "linux") - {"scann"}

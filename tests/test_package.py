"""Properties of the installed package itself.

Run as a script (`python tests/test_package.py`) it prints the longest
chain of module-level imports below `cvgl_jax.main` and which module
imports which.
"""

import ast
import functools
import pathlib
import shutil
import subprocess
import sys
import zipfile


def _modules_loaded_by(code: str, modules: tuple[str, ...]) -> list[str]:
  """Runs `code` in a fresh interpreter (another test may have imported
  anything) and returns which of `modules` it loaded."""
  probe = (f"\nimport sys\nprint(sorted(m for m in {modules!r} "
           f"if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code + probe],
                       capture_output=True, text=True, check=True)
  return eval(out.stdout.strip().splitlines()[-1])  # pylint: disable=eval-used


def test_scann_imports_without_tensorflow():
  code = ("import numpy as np, scann\n"
          "db = np.eye(4, dtype=np.float32)\n"
          "s = scann.scann_ops_pybind.builder(db, 1, 'dot_product')"
          ".score_brute_force().build()\n"
          "assert s.search(db[2])[0][0] == 2")
  assert _modules_loaded_by(code, ("tensorflow",)) == []


def test_package_imports_without_torch_or_tensorflow():
  code = "import cvgl_jax.main, cvgl_jax.stages, cvgl_jax.models.weights"
  assert _modules_loaded_by(code, ("torch", "tensorflow")) == []


def test_config_validation_loads_no_jax():
  # The validator runs before anything else (and before the processes of a
  # job join): it must not pay for JAX, Flax or the data pipeline, nor
  # build the CPU kernel.
  code = ("from cvgl_jax import config_lib\n"
          "config = config_lib.default_config()\n"
          "config.data.root = '.'\n"
          "config_lib.validate(config)")
  assert _modules_loaded_by(code, ("jax", "flax", "grain", "orbax")) == []


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


PACKAGE = pathlib.Path(__file__).parents[1] / "cvgl_jax"
# A command-line module may be imported only as listed here: the training
# run ends by drawing its report.
CLI_IMPORTS_ALLOWED = {("cvgl_jax.main", "cvgl_jax.report")}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.lru_cache(maxsize=1)
def import_graph() -> dict[str, frozenset[str]]:
  """{module: the cvgl_jax modules it imports when it is imported} (its
  top-level statements; an import inside a function is not followed)."""
  paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}

  def top_level(body):
    for node in body:
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                           ast.ClassDef)):
        continue
      yield node
      for field in ("body", "orelse", "finalbody", "handlers"):
        yield from top_level(getattr(node, field, []))

  graph = {}
  for name, path in paths.items():
    found = set()
    for node in top_level(ast.parse(path.read_text()).body):
      if isinstance(node, ast.Import):
        found.update(a.name for a in node.names if a.name in paths)
      elif isinstance(node, ast.ImportFrom) and (
          node.module or "").startswith("cvgl_jax"):
        for a in node.names:
          full = f"{node.module}.{a.name}"
          found.add(full if full in paths else node.module)
    graph[name] = frozenset(found - {name})
  return graph


def cli_modules() -> set[str]:
  """The modules that run as programs (`python -m ...`)."""
  return {_module_name(p) for p in PACKAGE.rglob("*.py")
          if p.name == "__main__.py"
          or 'if __name__ == "__main__":' in p.read_text()}


def longest_chain(start: str) -> list[str]:
  """The longest chain of imports from `start` (modules, `start` first)."""
  graph = import_graph()

  @functools.lru_cache(maxsize=None)
  def chain(module):
    return max(([module] + chain(m) for m in graph[module]), key=len,
               default=[module])
  return chain(start)


def test_no_import_cycles():
  graph = import_graph()
  done, cycles = set(), []

  def visit(module, stack):
    if module in stack:
      cycles.append(stack[stack.index(module):] + [module])
      return
    if module in done:
      return
    for m in sorted(graph[module]):
      visit(m, stack + [module])
    done.add(module)
  for module in sorted(graph):
    visit(module, [])
  assert not cycles, cycles


def test_no_module_imports_a_command_line_module():
  """A CLI module is an entry point: what others need of it belongs in a
  library module (the bundle's format in bundle.py, not in export.py)."""
  clis = cli_modules()
  assert {"cvgl_jax.export", "cvgl_jax.retrieve", "cvgl_jax.report",
          "cvgl_jax.main"} <= clis
  wrong = sorted((m, c) for m, imported in import_graph().items()
                 for c in imported & clis
                 if (m, c) not in CLI_IMPORTS_ALLOWED)
  assert not wrong, wrong


def test_at_most_five_floors_below_main():
  """The layers of docs/ARCHITECTURE.md: main -> stages and report ->
  the stage modules, trained, splits -> models, loop, embed -> ... -> the
  leaves. A longer chain means a module imports one above its layer (the
  model importing the CPU kernel, the report the stages) for a reason that
  belongs elsewhere."""
  chain = longest_chain("cvgl_jax.main")
  assert len(chain) - 1 <= 5, " -> ".join(chain)


def test_the_model_imports_no_backend_seam():
  # The paper's model reads as the paper's model: the CPU kernels are
  # handed in (`encoder.Tower`), never imported by convnext or the heads.
  for module in ("cvgl_jax.models.convnext", "cvgl_jax.models.heads"):
    assert not {m for m in reachable(module) if m != module}, module


def reachable(start: str) -> set[str]:
  """Every cvgl_jax module that importing `start` loads (`start` too)."""
  graph, seen, todo = import_graph(), set(), [start]
  while todo:
    module = todo.pop()
    if module not in seen:
      seen.add(module)
      todo.extend(graph[module])
  return seen


if __name__ == "__main__":
  chain = longest_chain("cvgl_jax.main")
  print(f"Longest import chain below cvgl_jax.main: {len(chain) - 1} "
        f"imports\n  " + " -> ".join(chain))
  for cli in sorted(cli_modules()):
    print(f"{cli} loads {len(reachable(cli)) - 1} other cvgl_jax modules")
  for module, imported in sorted(import_graph().items()):
    print(f"{module}: {', '.join(sorted(imported)) or '-'}")
